"""The decoded-pixel cache: one `.npy` (uint8, N x S x S x 3) per split and image size.

Decoding runs in a pool of worker processes that write their rows straight into the destination file
with `os.pwrite`, so neither the parent nor the workers hold more than one image at a time, and results
stream back as small metadata records. Files appear atomically (written as `*.partial`, then renamed);
a lock file makes concurrent builders of the same cache wait for one another instead of racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

# Below this many files a pool costs more (process start-up) than it saves.
POOL_MIN_FILES = 200


def default_workers(n_files: int) -> int:
    if n_files < POOL_MIN_FILES:
        return 0
    return max(1, min(2, os.cpu_count() or 1))


def npy_header(n: int, size: int) -> bytes:
    """The .npy header of a uint8 (n, size, size, 3) array: rows can then be written at fixed offsets."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)})
    return buf.getvalue()


def row_bytes(size: int) -> int:
    return size * size * 3


# ---- pool plumbing: each worker holds one open file descriptor of the destination -------------------------
_worker_fd: int | None = None


def _init_worker(dest: str) -> None:
    global _worker_fd
    _worker_fd = os.open(dest, os.O_WRONLY)


def _run_task(task):
    func, args, offset = task
    meta, pixels = func(*args)
    if pixels is not None:
        os.pwrite(_worker_fd, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), offset)
    return meta


def decode_into(dest: Path, tasks: Iterable[tuple[Callable, tuple, int]], workers: int) -> Iterator:
    """Run `func(*args) -> (meta, pixels|None)` per task, writing pixels at `offset` of `dest`; yield metas
    in task order. `dest` must already exist with its final size."""
    if workers <= 0:
        _init_worker(str(dest))
        try:
            for task in tasks:
                yield _run_task(task)
        finally:
            _close_worker_fd()
        return
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold TensorFlow threads
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(dest),)) as pool:
        yield from pool.imap(_run_task, tasks, chunksize=32)


def _close_worker_fd() -> None:
    global _worker_fd
    if _worker_fd is not None:
        os.close(_worker_fd)
        _worker_fd = None


def allocate(path: Path, n_bytes: int) -> None:
    with open(path, "wb") as f:
        f.truncate(n_bytes)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path):
    """Hold an exclusive advisory lock on `lock_path` (process-safe; released if the process dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_npy_from_rows(dest: Path, source_raw: Path, rows: list[int], size: int, chunk: int = 256) -> None:
    """Gather `rows` of a raw row file (size x size x 3 per row) into a new .npy, a chunk at a time."""
    rb = row_bytes(size)
    partial = dest.with_name(dest.name + ".partial")
    with open(source_raw, "rb") as src, open(partial, "wb") as out:
        out.write(npy_header(len(rows), size))
        for start in range(0, len(rows), chunk):
            out.write(b"".join(os.pread(src.fileno(), rb, r * rb) for r in rows[start:start + chunk]))
        out.flush()
        os.fsync(out.fileno())
    os.replace(partial, dest)


def open_pixels(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")
