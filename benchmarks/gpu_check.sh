#!/usr/bin/env bash
# One short GPU check (< 12 min including compiles): a real fer-study trial under KERAS_BACKEND=jax against the
# bare Keras train step of the same model, on a machine with one NVIDIA GPU, JAX (+ PyTorch), no TensorFlow,
# no Ray/Optuna and no network.
#
#   bash benchmarks/gpu_wheels.sh          # here, with network: the missing pure-Python/binary wheels -> .whl/
#   bash benchmarks/gpu_check.sh           # there: EfficientNetB1 @224, batch 128, mixed_bfloat16 (auto), weights=none
#   bash benchmarks/gpu_check.sh --cpu-smoke   # anywhere: the same path on the CPU, tiny (MobileNet 0.25 @32)
#
# Steps: install .whl/*.whl (those for this Python) into a temporary --target; generate demo data (several
# processes) and prepare it at the image size (fer.data, no study/ imports: those need Ray); run
# benchmarks/trial_speed.py (its JSON line has trial and bare-step images/s per stage and the machine); run
# benchmarks/compile_reuse.py on the same data (2 trials of $COMPILE_BACKBONE with other dropout, label smoothing
# and learning rates in one process: does the second reuse the first's compiled steps? target <= 0.2 of its
# compile seconds); print one JSON line: trial images/s, bare-step images/s, their ratio (target >= 0.8), the
# compile reuse, seconds of each step.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
MODE=gpu
[[ "${1:-}" == "--cpu-smoke" || "${GPU_CHECK_CPU_SMOKE:-}" == "1" ]] && MODE=cpu-smoke
if [[ $MODE == gpu ]]; then
    BACKBONE=efficientnetb1 SIZE=224 BATCH=128 EPOCHS=2 SEEDS=8 PER_CLASS=60 LIMIT=420
    COMPILE_BACKBONE=mobilenetv2 COMPILE_BATCH=64 COMPILE_LIMIT=240
else
    BACKBONE=mobilenet025 SIZE=32 BATCH=8 EPOCHS=1 SEEDS=2 PER_CLASS=8 LIMIT=900
    COMPILE_BACKBONE=mobilenet025 COMPILE_BATCH=8 COMPILE_LIMIT=600
    export JAX_PLATFORMS=cpu
fi
export KERAS_BACKEND=jax TF_CPP_MIN_LOG_LEVEL=2 XLA_PYTHON_CLIENT_PREALLOCATE=false
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fer-gpu-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
T0=$SECONDS

# 1. wheels -> $WORK/site (only those built for this interpreter; pip's own vendored packaging decides)
mkdir -p "$WORK/site"
WHEELS=$(python3 - "$REPO/.whl" <<'PY'
import pathlib, sys
from pip._vendor.packaging.tags import sys_tags
from pip._vendor.packaging.utils import parse_wheel_filename
ok = set(sys_tags())
for wheel in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    if set(parse_wheel_filename(wheel.name)[3]) & ok:
        print(wheel)
    else:
        print(f"gpu_check: skipping {wheel.name} (not for this Python)", file=sys.stderr)
PY
)
if [[ -n "$WHEELS" ]]; then
    # shellcheck disable=SC2086
    python3 -m pip install --quiet --no-deps --no-index --target "$WORK/site" $WHEELS
fi
export PYTHONPATH="$WORK/site:$REPO${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import keras, fer.train.trial, fer.data, fer.prepare.demo_data, fer.runtime.machine" 2>"$WORK/import.err" || {
    echo "gpu_check: fer's import path fails (run benchmarks/gpu_wheels.sh where there is network):" >&2
    tail -3 "$WORK/import.err" >&2; exit 2; }
WHEELS_S=$((SECONDS - T0))

# 2. demo data (one process per seed), merged into one class-folder tree, prepared at $SIZE
T1=$SECONDS
for seed in $(seq 1 "$SEEDS"); do
    python3 -c "import sys; from fer.prepare.demo_data import generate_demo_data; \
generate_demo_data(sys.argv[1], per_class=int(sys.argv[2]), seed=int(sys.argv[3]))" \
        "$WORK/demo$seed" "$PER_CLASS" "$seed" &
done
wait
mkdir -p "$WORK/demo"
for seed in $(seq 1 "$SEEDS"); do
    for cls in "$WORK/demo$seed"/*/; do
        name=$(basename "$cls"); mkdir -p "$WORK/demo/$name"
        for f in "$cls"*; do [[ -f "$f" ]] && mv "$f" "$WORK/demo/$name/s${seed}_$(basename "$f")"; done
    done
done
python3 -c "import sys; from fer.prepare import prepare_dataset; \
prepare_dataset(sys.argv[1], sys.argv[2], image_size=int(sys.argv[3]), log=lambda *a, **k: None)" \
    "$WORK/demo" "$WORK/study/data" "$SIZE"
DATA_S=$((SECONDS - T1))

# 3. the trial and the bare step
T2=$SECONDS
timeout "$LIMIT" python3 benchmarks/trial_speed.py --backbone "$BACKBONE" --image-size "$SIZE" \
    --batch-size "$BATCH" --epochs "$EPOCHS" --data "$WORK/study" > "$WORK/trial_speed.json"
TRIAL_S=$((SECONDS - T2))

# 4. compiled steps reused by a later trial (the study's JAX compilation cache; a failure here is reported, not fatal)
T3=$SECONDS
timeout "$COMPILE_LIMIT" python3 benchmarks/compile_reuse.py --backbone "$COMPILE_BACKBONE" --image-size "$SIZE" \
    --batch-size "$COMPILE_BATCH" --trials 2 --data "$WORK/study" > "$WORK/compile_reuse.json" \
    || echo "gpu_check: compile_reuse.py failed or timed out (exit $?)" >&2
COMPILE_S=$((SECONDS - T3))
python3 - "$WORK/trial_speed.json" "$MODE" "$WHEELS_S" "$DATA_S" "$TRIAL_S" "$((SECONDS - T0))" \
    "$WORK/compile_reuse.json" "$COMPILE_S" <<'PY'
import json, sys
speed = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
try:
    reuse = json.loads(open(sys.argv[7]).read().strip().splitlines()[-1])
    reuse = {key: reuse[key] for key in ("backbone", "image_size", "batch_size", "trials", "later_vs_first",
                                         "later_vs_first_total", "target_ratio", "compile_cache_files")}
except (OSError, ValueError, IndexError, KeyError) as exc:
    reuse = {"error": f"{type(exc).__name__}: {exc}"}
trial, bare = speed["trial_images_per_s"], speed["bare_images_per_s"]
# time-weighted over the stages, as trial_speed.py: the bare seconds for the trial's images / the trial's seconds
trial_all = len(trial) / sum(1 / v for v in trial.values())
bare_all = len(trial) / sum(1 / bare[s] for s in trial)
print(json.dumps({
    "benchmark": "gpu_check", "mode": sys.argv[2], "backend": "jax", "backbone": speed["backbone"],
    "image_size": speed["image_size"], "batch_size": speed["batch_size"], "train_images": speed["train_images"],
    "trial_images_per_s": round(trial_all, 1), "bare_images_per_s": round(bare_all, 1),
    "ratio": speed["ratio_overall"], "target_ratio": 0.8, "per_stage": {
        "trial": trial, "bare": bare, "ratio": speed["ratio"]},
    "startup_s": speed["startup_s"], "startup_parts_s": speed["startup_parts_s"],
    "compile_reuse": reuse,
    "seconds": {"wheels": int(sys.argv[3]), "data": int(sys.argv[4]), "trial_speed": int(sys.argv[5]),
                "compile_reuse": int(sys.argv[8]), "total": int(sys.argv[6])},
    "machine": speed["machine"],
}))
PY
