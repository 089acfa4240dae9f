"""Progress lines for long one-off steps (feature caches, pixel caches): done/total, rate, time
left.

A cache for a large dataset can take minutes; without a line every few seconds a user cannot tell a
slow step from a hung one. Lines go to the `fer.core.progress` logger: `fer-study train` shows them
on the terminal, a study's trials append them to the study's `study.log` (see `log_to_file`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("fer.core.progress")


class Progress:
    """`advance(n)` after each chunk of work; a line at most every `every_s` seconds, and one at the
    end."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "images",
        every_s: float = 10.0,
        clock=time.perf_counter,
    ):
        self.what, self.total, self.unit, self.every_s, self.clock = (
            what,
            max(0, int(total)),
            unit,
            every_s,
            clock,
        )
        self.done = 0
        self.started = self.last = clock()

    def advance(self, n: int = 1) -> None:
        self.done = min(self.total, self.done + n) if self.total else self.done + n
        now = self.clock()
        if self.done >= self.total or now - self.last >= self.every_s:
            self.last = now
            log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max(1e-9, (self.clock() if now is None else now) - self.started)
        rate = self.done / elapsed
        text = f"{self.what}: {self.done}/{self.total} {self.unit}, {rate:.1f} {self.unit}/s"
        if self.done >= self.total:
            return f"{text}, done in {_duration(elapsed)}"
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        return f"{text}, {_duration(left)} left"


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "unknown time"
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def show_on_terminal() -> None:
    """Progress lines on stderr (the `train` command)."""
    _attach(logging.StreamHandler())


def log_to_file(path: str | Path, only: bool = False) -> None:
    """Progress lines appended to `path` (a study's study.log), once per process whatever the
    calls. `only`: the lines go to `path` alone from now on (a warm worker's next trial logs into
    its own trial folder, not into the previous trial's)."""
    path = Path(path)
    if only:
        for handler in [h for h in log.handlers if isinstance(h, logging.FileHandler)]:
            if Path(handler.baseFilename) != path.absolute():
                log.removeHandler(handler)
                handler.close()
    for handler in log.handlers:
        if (
            isinstance(handler, logging.FileHandler)
            and Path(handler.baseFilename) == path.absolute()
        ):
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    _attach(logging.FileHandler(path))


def _attach(handler: logging.Handler) -> None:
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
