"""How fast is `prepare`, and does its memory stay flat as the dataset grows? One JSON line.

    python3 benchmarks/prepare_speed.py [--data $FER_SHARED/datasets/fer2013-5class] [--image-size
    48]
                                        [--fractions 0.25,0.5,1] [--workers N]

Runs the real `prepare_dataset` (FER2013's own split via --predefined file-name patterns) on growing
subsets of DATA (hard links in a temp folder, or copies where links are not possible; DATA itself is
only read) and reports, per run, images/s (files decoded / wall seconds, everything included: scan,
decode, hashes, duplicates, split, audit, cache files), the CPU seconds spent (process + workers: on
a shared machine images per CPU-second shows the cost when wall time is inflated by other people's
jobs), and the peak memory of the process plus its decoding workers, each run in a fresh process:
PSS (proportional set size, so pages shared by forked workers count once) and its anonymous part
(memory the processes own: no mapped files, no shared libraries), sampled every 50 ms. Target: >=
500 images/s on 2 cores, and anonymous memory that grows with the file count by no more than the
per-file metadata (hashes, 32x32 thumbnail, manifest row: a few KiB), less than the pixel cache's
own size per file (5.6 KiB at 48 px, 147 KiB at 224 px); pixels are never held in memory.

Measured 2026-11-27 on the shared 2-core machine (load average 10-17 from other jobs), 48 px, 29,142
files, two runs: 405 and 464 images/s wall, 1129 and 1413 images per CPU-second, peak PSS (process +
workers) 253 MiB, anonymous growth 3.7-3.8 KiB per file between the 25 % and the full run. At 224 px
(25 % subset) the cache is 147 KiB per image and writing it dominates: ~440-490 images per
CPU-second. 2026-11-30, after the near-duplicate rework (docs/duplicates.md), same machine at load
~3: 1,233 images per CPU-second (23.6 CPU-s; 1,654 and 17.6 before it), peak PSS 380 MiB, anonymous
growth 6.6 KiB per file. 2026-11-30, with registered hashes (shift-tolerant candidates), load 9-17,
same sitting as b3a1220: 33.5-37.0 CPU-s (789-871 images per CPU-second) against 16.8-20.7
(1,411-1,733), peak PSS 481 MiB against 254, anonymous growth 8.2 KiB per file against 3.7.
2026-11-30, issue 10 (probe hashes, early reject, chunked memory), load 6-9, same sitting as
b3a1220: 35.8 CPU-s (815 images per CPU-second) against 21.2 (1,378), peak PSS 342 MiB against 254,
anonymous growth 7.7 KiB per file against 3.7. 2026-11-30, issue 10 (trimmed hashes, cheaper aligned
check, signatures in a file-backed map), load 3.6-4.4, same sitting as b3a1220 and 20486c7, two
rounds: 24.1-24.3 CPU-s (1,200-1,211 images per CPU-second) against 13.1-14.0 (2,086-2,230) and
26.6-27.2; anonymous growth 3.1-3.7 KiB per file against 3.7-4.4 and 7.5-7.6; peak PSS (mapped
signature pages included) 332-336 MiB against 260-272 and 345-349. 2026-12-01, cheaper per-file work
and aligned check with identical decisions (docs/duplicates.md), load 0.0-1.2, same sitting as
b3a1220 (two rounds, alternating) and 9dcec3e (once, 1d59cd2's detector): 22.2-22.3 CPU-s
(1,306-1,316 images per CPU-second) against 14.0-14.2 (2,060-2,078) and 28.0 (1,041); anonymous
growth 3.8-4.7 KiB per file against 4.2-4.3 and 3.1; peak PSS 373-374 MiB against 295-296.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared_data import shared_missing, shared_path  # noqa: E402 - after the sys.path line

DEFAULT_DATA = shared_path("datasets", "fer2013-5class")
PREDEFINED = "train=^Training_,val=^PublicTest_,test=^PrivateTest_"


def _rollup_kib(pid: int) -> dict[str, int]:
    """Pss and Pss_Anon of one process: proportional set sizes, so pages a forked worker shares with
    its parent are counted once in the sum, not once per process (as RSS would)."""
    out = {"Pss": 0, "Pss_Anon": 0, "Rss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                key = line.split(":")[0]
                if key in out:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


class MemorySampler(threading.Thread):
    """Peak memory of this process plus all its descendants, summed over processes at each
    sample."""

    def __init__(self, interval: float = 0.05):
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.interval = interval
        self.peak = {"Pss": 0, "Pss_Anon": 0, "Rss": 0}
        self.stop = threading.Event()

    def sample(self) -> dict[str, int]:
        pids = [self.proc.pid] + [c.pid for c in self.proc.children(recursive=True)]
        rollups = [_rollup_kib(p) for p in pids]
        return {k: sum(r[k] for r in rollups) for k in self.peak}

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in self.sample().items():
                self.peak[k] = max(self.peak[k], v)
            time.sleep(self.interval)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the decoding
    workers)."""
    import resource

    own, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def subset(data: Path, fraction: float, tmp: Path) -> tuple[Path, int]:
    """DATA itself for 1.0, else a folder with every k-th file of each class (hard links, or
    copies)."""
    if fraction >= 1.0:
        return data, sum(1 for p in data.rglob("*") if p.is_file())
    out = tmp / f"subset_{fraction:g}" / data.name
    n = 0
    for cls in sorted(p for p in data.iterdir() if p.is_dir()):
        files = sorted(cls.iterdir())
        keep = files[
            :: max(1, round(1 / fraction))
        ]  # every k-th: all three predefined splits stay in
        (out / cls.name).mkdir(parents=True)
        for f in keep:
            try:
                os.link(f, out / cls.name / f.name)
            except OSError:
                shutil.copyfile(f, out / cls.name / f.name)
            n += 1
    return out, n


def run_once(data: Path, out: Path, image_size: int, workers: int | None) -> dict:
    """One prepare in this (fresh) process, measured."""
    from fer.prepare import prepare_dataset

    sampler = MemorySampler()
    before = sampler.sample()
    sampler.start()
    cpu0 = _cpu_seconds()
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    audit = prepare_dataset(
        data, out, image_size=image_size, predefined=PREDEFINED, workers=workers, log=None
    )
    seconds = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    sampler.stop.set()
    sampler.join()
    cache = sum(p.stat().st_size for p in (out / "pixels").glob("*.npy"))
    t = audit["timing"]
    mib = lambda kib: round(kib / 1024, 1)  # noqa: E731
    return {
        "files": t["files"],
        "decoded": t["decoded"],
        "seconds": round(seconds, 2),
        "images_per_s": round(t["decoded"] / seconds, 1),
        "scan_decode_seconds": t["scan_decode_seconds"],
        "workers": t["workers"],
        "cpu_seconds": round(cpu, 2),
        "images_per_cpu_s": round(t["decoded"] / cpu, 1) if cpu else None,
        "load_avg_1m_before": round(load0, 2),
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
        "memory_before_mib": {"pss": mib(before["Pss"]), "pss_anon": mib(before["Pss_Anon"])},
        "peak_pss_mib": mib(sampler.peak["Pss"]),
        "peak_pss_anon_mib": mib(sampler.peak["Pss_Anon"]),
        "peak_rss_sum_mib": mib(sampler.peak["Rss"]),
        "pixel_cache_mib": round(cache / 2**20, 1),
        "duplicates_excluded": audit["totals"]["duplicate"],
        "leakage_ok": audit["leakage"]["ok"],
    }


def _child(args) -> None:
    run = run_once(args.one, args.out, args.image_size, args.workers)
    print(json.dumps(run))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument(
        "--fractions", default="0.25,0.5,1", help="subset sizes to run (memory-growth check)"
    )
    p.add_argument(
        "--workers", type=int, default=None, help="decoding processes (default: up to 2)"
    )
    # internal: run one prepare of this folder
    p.add_argument("--one", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return _child(args)
    if not args.data.is_dir():
        sys.exit(shared_missing(args.data))
    print(json.dumps(_summary(args, _runs(args))))


def _runs(args) -> list[dict]:
    """One prepare per subset size, each in a fresh process (its memory is its own)."""
    import subprocess

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for fraction in (float(f) for f in args.fractions.split(",")):
            data, _ = subset(args.data, fraction, Path(tmp))
            out = Path(tmp) / f"out_{fraction:g}"
            cmd = [
                sys.executable,
                __file__,
                "--one",
                str(data),
                "--out",
                str(out),
                "--image-size",
                str(args.image_size),
            ] + (["--workers", str(args.workers)] if args.workers is not None else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            runs.append({"fraction": fraction, **json.loads(proc.stdout.strip().splitlines()[-1])})
            shutil.rmtree(out)
    return runs


def _summary(args, runs: list[dict]) -> dict:
    """The benchmark's JSON line: the full run's figures, and memory growth per file between the
    smallest and the full run."""
    from fer.runtime.machine import machine_info

    full, small = runs[-1], runs[0]
    growth = None
    if len(runs) > 1:
        growth = round(
            (full["peak_pss_anon_mib"] - small["peak_pss_anon_mib"])
            * 1024
            / max(1, full["files"] - small["files"]),
            2,
        )
    return {
        "benchmark": "prepare_speed",
        "data": str(args.data),
        "image_size": args.image_size,
        "files": full["files"],
        "images_per_s": full["images_per_s"],
        "target_images_per_s": 500,
        "images_per_cpu_s": full["images_per_cpu_s"],
        "load_avg_1m_during": full["load_avg_1m_after"],
        "peak_pss_mib": full["peak_pss_mib"],
        "peak_pss_anon_mib": full["peak_pss_anon_mib"],
        "pss_anon_growth_kib_per_file": growth,
        "pixel_cache_kib_per_file": round(
            full["pixel_cache_mib"] * 1024 / max(1, full["files"]), 2
        ),
        "runs": runs,
        "machine": machine_info(),
        "note": "2-core machine shared with other engineers' jobs while measured (see load_avg)",
    }


if __name__ == "__main__":
    main()
