"""Compute something once across processes and nodes that share a folder (create-or-wait on a lock
file).

Used for results that many trials of a study need and that are expensive (the head-stage feature
cache): the first process to create `<name>.lock` with O_CREAT|O_EXCL (atomic on local file systems
and NFS v3+) computes, writing its files under temporary names and moving them into place with
`os.replace`, a marker file last; the others poll until the marker appears. The owner touches its
lock often (`beat`), so a lock left untouched for `stale_s` seconds is taken to belong to a dead
process and is broken. No Ray, no fcntl (advisory locks are not reliable across NFS clients).

Also the project's atomic file writes (`atomic_write_text`, `write_json`): a reader on any node sees
the old file or the whole new one.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

STALE_S = 600.0  # a lock untouched this long was left by a dead process
POLL_S = 0.5


def partial_path(path: Path) -> Path:
    """A temporary name beside `path`, unique to this host and process, for write-then-rename."""
    return path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}.partial")


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` so readers see the old file or the whole new one (also from other nodes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data, *, sort_keys: bool = False) -> None:
    """The project's one JSON writer: atomic (`atomic_write_text`), indented, newline-terminated;
    numpy scalars become numbers and anything else JSON cannot hold becomes its string."""
    atomic_write_text(
        path, json.dumps(data, indent=2, sort_keys=sort_keys, default=_jsonable) + "\n"
    )


def _jsonable(value):
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def create_or_wait(
    marker: Path,
    lock: Path,
    compute: Callable[[Callable[[], None]], None],
    stale_s: float = STALE_S,
    poll_s: float = POLL_S,
) -> bool:
    """Make sure `compute` has run once, across processes and nodes: `marker` existing means done.

    Returns True when this process ran `compute(beat)`; `beat()` refreshes the lock (call it often).
    A lock whose mtime is older than `stale_s` is broken (its owner died). If `compute` raises, the
    lock is removed and the error propagates; a waiting process then tries itself.
    """
    announced = False
    while True:
        if marker.exists():
            return False
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if _break_if_stale(lock, stale_s):
                continue
            if not announced:
                log.info("waiting for %s, being computed by %s", marker.stem, _read_owner(lock))
                announced = True
            time.sleep(poll_s)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(
                json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()})
            )
        try:
            if marker.exists():  # finished by another process between our check and our lock
                return False
            compute(lambda: _touch(lock))
            return True
        finally:
            try:
                os.unlink(lock)
            except (
                FileNotFoundError
            ):  # broken as stale by another process (we were too slow to beat)
                pass


def _touch(lock: Path) -> None:
    try:
        os.utime(lock)
    except FileNotFoundError:
        pass


def _read_owner(lock: Path) -> str:
    try:
        owner = json.loads(lock.read_text())
        return f"{owner['host']} pid {owner['pid']}"
    except (OSError, ValueError, KeyError):
        return "another process"


def _break_if_stale(lock: Path, stale_s: float) -> bool:
    """Remove `lock` if it was not touched for `stale_s` seconds. Returns True if the caller should
    retry now.

    The stale file is first renamed to a name of our own, so of several waiters only one removes it;
    if what we renamed turns out to be a fresh lock (replaced in between), it is put back (link
    fails if a newer one exists, which then wins).
    """
    try:
        st = lock.stat()
    except FileNotFoundError:
        return True
    if time.time() - st.st_mtime < stale_s:
        return False
    grabbed = lock.with_name(f"{lock.name}.stale-{socket.gethostname()}-{os.getpid()}")
    try:
        os.rename(lock, grabbed)
    except FileNotFoundError:
        return True
    if grabbed.stat().st_ino != st.st_ino:
        try:
            os.link(grabbed, lock)
        except FileExistsError:
            pass
    else:
        log.warning(
            "broke a stale lock %s (held by %s, untouched for %.0f s)",
            lock,
            _read_owner(grabbed),
            time.time() - st.st_mtime,
        )
    grabbed.unlink(missing_ok=True)
    return True
