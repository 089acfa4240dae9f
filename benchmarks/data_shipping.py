"""What shipping the prepared data to nodes without a shared disk costs (issue 22, item 2). One
JSON line.

    python3 benchmarks/data_shipping.py [--data $FER_SHARED/datasets/fer2013-5class]
                                        [--sizes 48,96] [--fraction 1] [--nodes 2]

Prepares DATA (FER2013's own split; DATA itself is only read) once per image size, starts a real
S3-compatible server (moto's server mode, tests/s3_server.py) on 127.0.0.1, publishes each prepared
folder with `ship_data` (marker last) and fetches it into `--nodes` separate node caches with
`local_data` (what a trial does on a fresh node), then opens it with `StudyData` and touches every
train pixel. Reports per size: files and bytes shipped, upload seconds, per-node download seconds,
and the seconds of a second `local_data` on a node that already has the copy (the per-trial cost).
The server runs in this process on loopback, so the figures are the storage layer's own cost
(pyarrow, hashing, local disk), a floor for a real network; prepare time is reported apart.
`--fraction 0.05` gives a quick run on every 20th file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.prepare_speed import PREDEFINED, subset  # noqa: E402 - after the sys.path line
from benchmarks.shared_data import shared_missing, shared_path  # noqa: E402

DEFAULT_DATA = shared_path("datasets", "fer2013-5class")


def _ship_one(server, data: Path, size: int, work: Path, nodes: int) -> dict:
    from fer.prepare import prepare_dataset
    from study.storage import local_data, local_data_dir, open_storage, ship_data
    from study.storage.transfer import list_files

    t0 = time.perf_counter()
    prepare_dataset(
        data, work / f"p{size}" / "data", image_size=size, predefined=PREDEFINED, log=None
    )
    prepare_s = time.perf_counter() - t0
    storage = open_storage(server.uri("bench", f"fer2013-{size}"))
    t0 = time.perf_counter()
    ship_data(storage, work / f"p{size}" / "data")
    upload_s = time.perf_counter() - t0
    shipped = list_files(storage, "data")
    per_node, warm = [], []
    for node in range(nodes):
        cache = work / f"node{node}"
        t0 = time.perf_counter()
        study_data = local_data(open_storage(storage.uri), f"fer2013-{size}", cache)
        float(study_data.pixels("train", size).sum(dtype="float64"))  # every byte read once
        per_node.append(round(time.perf_counter() - t0, 2))
        t0 = time.perf_counter()
        local_data_dir(open_storage(storage.uri), f"fer2013-{size}", cache)
        warm.append(round(time.perf_counter() - t0, 3))
    return {
        "image_size": size,
        "files": len(shipped),
        "mib": round(sum(shipped.values()) / 2**20, 1),
        "prepare_s": round(prepare_s, 1),
        "upload_s": round(upload_s, 2),
        "node_download_s": per_node,
        "node_cached_s": warm,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--sizes", default="48,96")
    parser.add_argument("--fraction", type=float, default=1.0)
    parser.add_argument("--nodes", type=int, default=2)
    args = parser.parse_args()
    if not args.data.is_dir():
        sys.exit(shared_missing(args.data))
    from fer.runtime.machine import machine_info
    from tests.s3_server import TEST_CREDENTIALS, S3Server

    os.environ.update(TEST_CREDENTIALS)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    server = S3Server()
    server.create_bucket("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="fer-ship-bench-") as tmp:
            data, n = subset(args.data, args.fraction, Path(tmp))
            runs = [
                _ship_one(server, data, int(s), Path(tmp), args.nodes)
                for s in args.sizes.split(",")
            ]
    finally:
        server.stop()
    line = {"benchmark": "data_shipping", "images": n, "fraction": args.fraction, "runs": runs}
    print(json.dumps(line | {"machine": machine_info()}))


if __name__ == "__main__":
    main()
