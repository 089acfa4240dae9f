"""GPU readiness without a GPU: a study whose trials ask for GPUs the backend cannot use stops with
the fix (a real local Ray told it has one GPU), and long one-off steps report progress with rate and
time left."""

import logging

import pytest

from fer.core.errors import UserError
from fer.core.progress import Progress
from fer.runtime.devices import check_backend_gpus


@pytest.mark.parametrize("backend, fix", [("tensorflow", '".[gpu]"'), ("jax", '".[jax-cuda]"')])
def test_gpus_the_backend_cannot_use_are_refused_with_the_fix(backend, fix):
    with pytest.raises(UserError) as info:
        check_backend_gpus(1, 0, backend, "trials ask for 1 GPU each", "pass --gpus-per-trial 0")
    message = str(info.value)
    assert (
        "\n" not in message
        and fix in message
        and "--gpus-per-trial 0" in message
        and backend in message
    )
    check_backend_gpus(0.5, 1, backend, "x", "y")  # a usable GPU: fine
    check_backend_gpus(0, 0, backend, "x", "y")  # no GPU asked for: fine


def test_run_refuses_trials_on_a_fake_gpu_the_backend_cannot_see(
    new_study, smoke_space_file, run_study_cli
):
    """Ray is told the machine has one GPU; the CPU-only TensorFlow in the worker sees none: one
    line, exit 2, before any trial starts."""
    study = new_study("fake_gpu")
    proc = run_study_cli(
        study, smoke_space_file, "--num-gpus", 1, env={"KERAS_BACKEND": "tensorflow"}, timeout=300
    )
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    error_lines = [line for line in proc.stderr.splitlines() if "sees no GPU" in line]
    assert len(error_lines) == 1 and '".[gpu]"' in error_lines[0], proc.stderr[-2000:]
    assert not (study / "trials").exists() or not any((study / "trials").iterdir())
    assert "Traceback" not in proc.stderr


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_lines_give_rate_and_time_left_at_most_every_interval():
    clock, lines = _Clock(), []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("fer.core.progress")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(
        logging.INFO
    )  # setLevel, not `.level =`: it clears the logger's cached isEnabledFor answers
    try:
        progress = Progress("head feature cache", 1000, every_s=10, clock=clock)
        for _ in range(9):  # 100 images a second
            clock.now += 1
            progress.advance(100)
        clock.now += 1
        progress.advance(100)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (
        len(lines) == 1
        and lines[0] == "head feature cache: 1000/1000 images, 100.0 images/s, done in 10 s"
    )
    progress = Progress("pixel cache", 1000, every_s=10, clock=clock)
    clock.now += 3
    progress.done = 300
    assert progress.line() == "pixel cache: 300/1000 images, 100.0 images/s, 7 s left"


def test_a_new_pixel_cache_reports_progress(prepared_data, tmp_path):
    import shutil

    from fer.data import StudyData

    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("fer.core.progress")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(
        logging.INFO
    )  # setLevel, not `.level =`: it clears the logger's cached isEnabledFor answers
    try:
        shutil.copytree(prepared_data.dir, tmp_path / "data")
        data, size = StudyData(tmp_path / "data"), 24
        n = len(data.pixels("val", size))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert (
        lines
        and lines[-1].startswith(f"{size}px pixel cache (val): {n}/{n} files")
        and "done in" in lines[-1]
    )
