"""Shared pytest fixtures (each part adds its own; never rewrite another part's)."""

import pytest


def pytest_collection_modifyitems(items):
    """A test that needs a whole study (`smoke_study`, minutes) is end-to-end: marked `slow`, so the
    fast target `pytest -m "not slow"` leaves it out."""
    for item in items:
        if "smoke_study" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


# ---- study fixtures (owner: study)
# ------------------------------------------------------------------- A prepared study folder (tiny
# demo data, 32 px cache) shared by every study test, and `smoke_study`: one real `fer-study run` of
# a smoke-like space (two backbones, two trials each, ASHA), whose complete results folder
# (trials.csv, best/<backbone>/ with test metrics) the study and report tests both read.

STUDY_SMOKE_TRIALS = 2


def _fer_study_cmd() -> list[str]:
    import sys

    return [sys.executable, "-m", "study.cli"]


def _run_study(
    folder, space_file, *extra, num_cpus: int = 2, env: dict | None = None, timeout: float = 900
):
    """`fer-study run FOLDER --space SPACE --num-cpus N --no-dashboard EXTRA...` in a subprocess:
    the real command with its own local Ray. `env`: extra environment variables (the test hooks).
    Returns the CompletedProcess (text output captured)."""
    import os
    import subprocess

    command = _fer_study_cmd() + [
        "run",
        str(folder),
        "--space",
        str(space_file),
        "--num-cpus",
        str(num_cpus),
    ]
    command += ["--no-dashboard", *map(str, extra)]
    full_env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def run_study_cli():
    """`_run_study`: a study through the real `fer-study run` command."""
    return _run_study


def _run_under_jax(script: str, *args, timeout: float = 600, **env) -> list[dict]:
    """Runs `python -c script args...` with KERAS_BACKEND=jax (the backend is chosen at import, so
    it needs a process of its own) and returns the JSON lines it printed; fails the test with its
    stderr if it failed."""
    import json
    import os
    import subprocess
    import sys

    full_env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", **env)
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="session")
def run_under_jax():
    """`_run_under_jax`: a script in a JAX-backend subprocess, its JSON lines back."""
    pytest.importorskip("jax", reason="jax is not installed (pip install -e .[jax])")
    return _run_under_jax


@pytest.fixture(scope="session")
def study_demo_data(demo_data_dir):
    """The shared demo class folders (read only: studies prepare them into their own folders)."""
    return demo_data_dir


@pytest.fixture(scope="session")
def study_base(study_demo_data, tmp_path_factory):
    """A prepared study folder (`<tmp>/results/base`, with data/) made from `study_demo_data`."""
    from fer.prepare import prepare_dataset

    folder = tmp_path_factory.mktemp("study_base") / "results" / "base"
    prepare_dataset(
        study_demo_data,
        folder / "data",
        group_regex=r"^(S\d+)_",
        seed=0,
        image_size=32,
        log=lambda *a, **k: None,
    )
    return folder


@pytest.fixture
def new_study(study_base, tmp_path):
    """A fresh study folder holding a copy of the prepared data (each test has its own results)."""
    import shutil

    def make(name: str):
        folder = tmp_path / "results" / name
        shutil.copytree(study_base / "data", folder / "data")
        return folder

    return make


@pytest.fixture(scope="session")
def smoke_space_file(tmp_path_factory):
    """search_spaces/smoke.yaml with two trials per backbone (the suite's budget)."""
    from pathlib import Path

    import yaml

    raw = yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml").read_text()
    )
    raw["trials_per_backbone"] = STUDY_SMOKE_TRIALS
    path = tmp_path_factory.mktemp("spaces") / "smoke_test.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def smoke_study(study_demo_data, smoke_space_file, tmp_path_factory):
    """Run the real `fer-study run` on the raw demo class folders (prepared by the command itself,
    as in the README); return the study folder, with complete best/<backbone>/ folders and
    run_output.txt."""
    results = tmp_path_factory.mktemp("smoke") / "results"
    proc = _run_study(
        study_demo_data,
        smoke_space_file,
        "--name",
        "smoke",
        "--results",
        results,
        "--group-regex",
        r"^(S\d+)_",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    folder = results / "smoke"
    (folder / "run_output.txt").write_text(proc.stdout + proc.stderr)
    return folder


# ---- data fixtures (owner: data)
# --------------------------------------------------------------------- `demo_data_dir`: the demo
# dataset (30 faces per class + its messes), generated once per session. READ ONLY: a test that
# needs to change files copies it first. `prepared_data`: a StudyData prepared from it at 48 px with
# subject groups (`^(S\d+)_`), seed 0.

DEMO_PER_CLASS = 30
PREPARED_IMAGE_SIZE = 48


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory):
    from fer.prepare.demo_data import generate_demo_data

    out = tmp_path_factory.mktemp("demo_data") / "faces"
    generate_demo_data(out, per_class=DEMO_PER_CLASS, seed=0)
    return out


@pytest.fixture(scope="session")
def prepared_data(demo_data_dir, tmp_path_factory):
    from fer.data import StudyData
    from fer.prepare import prepare_dataset
    from fer.prepare.demo_data import GROUP_REGEX

    out = tmp_path_factory.mktemp("prepared") / "results" / "faces" / "data"
    prepare_dataset(
        demo_data_dir,
        out,
        group_regex=GROUP_REGEX,
        seed=0,
        image_size=PREPARED_IMAGE_SIZE,
        log=None,
    )
    return StudyData(out)
