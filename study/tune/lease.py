"""One driver per study: the lease a `fer-study run` holds on its study folder while it runs.

Why: two drivers on one study folder each take the other's live trials for interrupted ones and
discard them, and Optuna then fails the first driver (`UpdateFinishedTrialError`). So the driver
takes `driver_lease.json` in the study folder before it writes anything there, renews it from a
daemon thread while it runs, and deletes it at the end (also on Ctrl-C and on errors). A second
driver reads a live lease and stops with one line naming the host, the pid and since when the first
one runs. A driver that was killed cannot delete its lease: the lease expires `expires_after_s`
after its last renewal (60 s; `FER_LEASE_S` sets it), and on the same host a lease whose pid is no
longer alive is taken over at once.

The lease lives on a `pyarrow.fs.FileSystem` (a local folder or object storage, where there is no
exclusive create): a driver writes its lease, waits `settle_s`, and reads it back; only the driver
whose random token it reads back owns the study, so two drivers that start together end with
exactly one owner (the last write wins on both kinds of storage).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.fs as pafs

from fer.core.errors import UserError

LEASE_FILE = "driver_lease.json"
DEFAULT_EXPIRES_S = 60.0
LEASE_ENV = "FER_LEASE_S"


class LeaseHeld(UserError):
    """Another live driver holds the study's lease (one line, exit 2)."""


def lease_seconds() -> float:
    """The lease's expiry: `FER_LEASE_S` (tests shorten it) or 60 s."""
    raw = os.environ.get(LEASE_ENV, "").strip()
    if not raw:
        return DEFAULT_EXPIRES_S
    try:
        value = float(raw)
    except ValueError:
        raise UserError(f"{LEASE_ENV}={raw!r} is not a number of seconds") from None
    if value <= 0:
        raise UserError(f"{LEASE_ENV}={raw!r} must be more than 0 seconds")
    return value


class StudyLease:
    """The lease file `path` on `fs`. Use as a context manager (`with StudyLease(...) as lease:`):
    acquire, renew in a daemon thread, release at the end. `where` names the study in messages."""

    def __init__(
        self,
        fs: pafs.FileSystem,
        path: str,
        *,
        where: str | None = None,
        expires_after_s: float | None = None,
        settle_s: float = 0.5,
    ):
        self.fs = fs
        self.path = path
        self.where = where or path.rsplit("/", 1)[0]
        self.expires_after_s = float(expires_after_s or lease_seconds())
        self.renew_every_s = max(0.2, self.expires_after_s / 6)
        self.settle_s = settle_s
        self.token = secrets.token_hex(16)
        self.held = False
        self.lost = False  # another driver took the lease over while this one held it
        self._started_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def in_folder(cls, folder: str | Path, **kwargs) -> StudyLease:
        """The lease of a local study folder (created if missing)."""
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        fs = pafs.LocalFileSystem()
        return cls(fs, (folder / LEASE_FILE).as_posix(), where=str(folder), **kwargs)

    # ---- the lease file
    def read(self) -> dict | None:
        """The lease as written, or None where there is none (or it cannot be read as a lease)."""
        try:
            with self.fs.open_input_stream(self.path) as stream:
                data = json.loads(stream.read().decode("utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # a half-written or foreign file: not a lease anyone holds
        return data if isinstance(data, dict) and data.get("token") else None

    def _write(self) -> None:
        now = time.time()
        body = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "token": self.token,
            "started_at": self._started_at or now,
            "renewed_at": now,
            "expires_after_s": self.expires_after_s,
        }
        payload = json.dumps(body, indent=1).encode("utf-8")
        if isinstance(self.fs, pafs.LocalFileSystem):
            # write then rename: a reader never sees half a file (an object store's put is atomic)
            tmp = f"{self.path}.{self.token[:8]}.tmp"
            with self.fs.open_output_stream(tmp) as stream:
                stream.write(payload)
            self.fs.move(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as stream:
                stream.write(payload)

    # ---- acquire, renew, release
    def acquire(self) -> None:
        """Take the lease, or raise `LeaseHeld` (one line) where a live driver holds it."""
        current = self.read()
        if current and current.get("token") != self.token:
            _refuse_if_live(current, self.where)
        self._started_at = time.time()
        failed = None
        try:
            self._write()
        except OSError as exc:  # e.g. an object store refusing two uploads of one key at once
            failed = exc
        time.sleep(self.settle_s)  # a driver that wrote at the same moment has written by now
        back = self.read()
        if not back or back.get("token") != self.token:
            if back:
                _refuse_if_live(back, self.where, fresh=True)
            if failed is not None:
                raise UserError(f"cannot write the driver lease {self.path}: {failed}")
            raise LeaseHeld(f"{self.where}: another driver started this study at the same moment")
        self.held = True

    def renew(self) -> None:
        """Write a new `renewed_at`, unless another driver has taken the lease over meanwhile."""
        current = self.read()
        if current is not None and current.get("token") != self.token:
            self.lost = True
            return
        self._write()

    def release(self) -> None:
        """Stop renewing and delete the lease where it is still this driver's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.held:
            current = self.read()
            if current is None or current.get("token") == self.token:
                try:
                    self.fs.delete_file(self.path)
                except FileNotFoundError:
                    pass
            self.held = False

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.renew_every_s):
            try:
                self.renew()
            except OSError:
                pass  # storage briefly unreachable: the next renewal tries again
            if self.lost:
                return

    def __enter__(self) -> StudyLease:
        self.acquire()
        self._thread = threading.Thread(target=self._renew_loop, name="fer-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _refuse_if_live(lease: dict, where: str, fresh: bool = False) -> None:
    """Raise `LeaseHeld` naming the holder, unless its lease expired or its driver is known dead
    (same host, pid not alive): such a lease is taken over at once. `fresh`: it was just written."""
    now = time.time()
    age = now - float(lease.get("renewed_at", 0))
    expires = float(lease.get("expires_after_s", DEFAULT_EXPIRES_S))
    if not fresh and age > expires:
        return
    if not fresh and lease.get("host") == socket.gethostname() and not _pid_alive(lease.get("pid")):
        return
    since = datetime.fromtimestamp(float(lease.get("started_at", now)), UTC)
    raise LeaseHeld(
        f"{where} is being run by another driver (host {lease.get('host')}, pid {lease.get('pid')},"
        f" since {since:%Y-%m-%d %H:%M:%S} UTC, lease renewed {max(age, 0):.0f} s ago); wait for it"
        f" to end or stop it (a killed driver's lease expires {expires:.0f} s after its last"
        " renewal, then --resume continues the study)"
    )


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's process, or no pid: assume it lives
    return True
