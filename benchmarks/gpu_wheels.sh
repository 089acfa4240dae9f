#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh needs on a GPU machine without network: what fer/'s import
# path needs beyond that machine's stack (JAX, PyTorch, numpy, pandas, pillow, h5py, ml-dtypes, absl-py, rich,
# psutil, ...). They land in .whl/ (git-ignored, but it travels with the working tree). Run here, with network:
#     bash benchmarks/gpu_wheels.sh
# Versions: the ones verified with this project (see README "Verified versions"); the GPU machine runs Python 3.12.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION="${PY_VERSION:-3.12}"
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "keras==3.15.1" "namex==0.1.0" "optree==0.20.0" "pillow-heif==1.8.1" "packaging>=23"
ls -l .whl
