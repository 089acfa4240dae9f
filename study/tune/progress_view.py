"""What a running study shows: one line per trial. Finished trials scroll up; on a terminal the
running ones are redrawn in place under them, elsewhere (CI logs, files) a line is printed when a
trial starts and when it ends. Fed by study.tune.callback.StudyCallback (in the driver).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from fer.core import names
from study.tune.ledger import clean_float


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def trial_line(
    tid: str,
    backbone: str,
    state: str,
    record: dict | None,
    metric: str,
    params: dict,
    error: str | None = None,
) -> str:
    """One trial's line: id, backbone, state, its epoch and metric so far (`record`: an epoch's
    report), its tuned `params`, and the error that ended it."""
    record = record or {}
    value = clean_float(record.get(metric))
    parts = [
        f"{tid:<12}",
        f"{backbone:<14}",
        f"{state:<9}",
        f"epoch {int(record.get('epoch', 0)):>3}",
        f"{metric} {value:.4f}" if value is not None else f"{metric} -     ",
        " ".join(f"{k}={_fmt(v)}" for k, v in params.items()),
    ]
    line = "  ".join(parts)
    if error:
        line += f"  ERROR: {error}"
    return line


class ProgressView:
    """One line per trial: finished trials scroll up, running ones are redrawn in place on a
    terminal."""

    def __init__(
        self, total: int, metric: str, stream: TextIO | None = None, live: bool | None = None
    ):
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.total, self.metric = total, metric
        self.running: dict[str, str] = {}
        self.done = dict.fromkeys(names.TRIAL_STATUSES, 0)
        self._drawn = 0
        self._last_draw = 0.0

    def __getstate__(self):
        # Tune pickles its callbacks with the experiment; a stream cannot be pickled
        return {**self.__dict__, "stream": None}

    def __setstate__(self, state):
        self.__dict__.update(state, stream=sys.stdout)

    def _summary(self) -> str:
        finished = sum(self.done.values())
        return (
            f"[{finished}/{self.total} trials] running {len(self.running)}, completed "
            f"{self.done[names.COMPLETED]}, stopped early {self.done[names.STOPPED]}, "
            f"errored {self.done[names.ERRORED]}"
        )

    def _redraw(self, permanent: list[str] = ()) -> None:
        out = []
        if self.live and self._drawn:
            out.append(f"\x1b[{self._drawn}F\x1b[J")
        out.extend(line + "\n" for line in permanent)
        if self.live:
            block = list(self.running.values()) + [self._summary()]
            out.extend(line + "\n" for line in block)
            self._drawn = len(block)
        self.stream.write("".join(out))
        self.stream.flush()

    def started(self, tid: str, line: str) -> None:
        self.running[tid] = line
        self._redraw([] if self.live else [line])

    def update(self, tid: str, line: str) -> None:
        self.running[tid] = line
        if self.live and time.monotonic() - self._last_draw > 0.5:
            self._last_draw = time.monotonic()
            self._redraw()

    def finished(self, tid: str, status: str, line: str) -> None:
        self.running.pop(tid, None)
        self.done[status] = self.done.get(status, 0) + 1
        self._redraw([line] if self.live else [line, self._summary()])
