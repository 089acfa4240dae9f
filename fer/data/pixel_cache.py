"""The decoded-pixel cache: one `.npy` (uint8, N x S x S x 3) per split and image size.

Decoding runs in a pool of worker processes that write their rows straight into the destination file
with `os.pwrite`, so neither the parent nor the workers hold more than one image at a time, and
results stream back as small metadata records. Files appear atomically (written as `*.partial`, then
renamed); a lock file makes concurrent builders of the same cache wait for one another instead of
racing.
"""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

# Below this many files a pool costs more (process start-up) than it saves.
POOL_MIN_FILES = 200


def default_workers(n_files: int) -> int:
    """Up to 2 decoding processes for a big enough job; none inside a training process (a trial that
    builds a new cache size has its own CPU share, and forking a process with TensorFlow/JAX threads
    is unsafe)."""
    if n_files < POOL_MIN_FILES or _threaded_framework_loaded():
        return 0
    return max(1, min(2, os.cpu_count() or 1))


def _threaded_framework_loaded() -> bool:
    return any(m in sys.modules for m in ("tensorflow", "jax", "torch"))


def npy_header(n: int, size: int) -> bytes:
    """The .npy header of a uint8 (n, size, size, 3) array: rows can then be written at fixed
    offsets."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (n, size, size, 3)}
    )
    return buf.getvalue()


def row_bytes(size: int) -> int:
    return size * size * 3


# ---- pool plumbing: each worker holds one open file descriptor of the destination
# -------------------------
_worker_fd: int | None = None
_worker_func: Callable | None = None


def _init_worker(dest: str, func: Callable) -> None:
    global _worker_fd, _worker_func
    _worker_fd = os.open(dest, os.O_WRONLY)
    _worker_func = func


def _run_task(task):
    args, offset = task
    meta, pixels = _worker_func(*args)
    if pixels is not None:
        os.pwrite(_worker_fd, np.ascontiguousarray(pixels, dtype=np.uint8).tobytes(), offset)
    return meta


def decode_into(
    dest: Path, func: Callable, tasks: Iterable[tuple[tuple, int]], workers: int
) -> Iterator:
    """Run `func(*args) -> (meta, pixels | None)` for each `(args, offset)` task, writing the pixels
    at `offset` of `dest` (which must already have its final size); yield the metas in task order.
    """
    if workers <= 0:
        _init_worker(str(dest), func)
        try:
            for task in tasks:
                yield _run_task(task)
        finally:
            _close_worker_fd()
        return
    ctx = multiprocessing.get_context(_start_method())
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(dest), func)) as pool:
        yield from pool.imap(
            _run_task, tasks, chunksize=128
        )  # big chunks: few messages between processes


def _start_method() -> str:
    """fork (fast, works from any script) unless a threaded ML framework is loaded: forking a
    process that holds TensorFlow/JAX/PyTorch thread pools can deadlock, so then spawn (which needs
    the usual `if __name__ == "__main__":` guard in the calling script, as the `fer-study` entry
    point has). Only an explicit `workers=` gets here in that case: `default_workers` decodes
    in-process instead."""
    return "spawn" if _threaded_framework_loaded() or sys.platform != "linux" else "fork"


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
    """Hold an exclusive advisory lock on `lock_path` (process-safe; released if the process
    dies)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write_npy_from_rows(
    dest: Path, source_raw: Path, rows: list[int], size: int, chunk: int = 256
) -> None:
    """Gather `rows` of a raw row file (size x size x 3 per row) into a new .npy, a chunk at a
    time."""
    rb = row_bytes(size)
    partial = dest.with_name(dest.name + ".partial")
    with open(source_raw, "rb") as src, open(partial, "wb") as out:
        out.write(npy_header(len(rows), size))
        for start in range(0, len(rows), chunk):
            out.write(
                b"".join(os.pread(src.fileno(), rb, r * rb) for r in rows[start : start + chunk])
            )
    os.replace(
        partial, dest
    )  # atomic: readers see no file or the whole file (no fsync: a cache, rebuildable)


def open_pixels(path: Path) -> np.ndarray:
    return np.load(path, mmap_mode="r")
