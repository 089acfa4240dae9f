"""A laptop that has only the storage (issue 22, item 6): `report URI/<study>` and `predict`,
`evaluate`, `export URI/<study>/best/<backbone>`, against a real S3-compatible server (moto's server
mode, tests/s3_server.py) holding the finished `smoke_study` uploaded as `run --storage` leaves it:
plain files as they are, `data/` and each `best/<backbone>/` published with their `_COMMITTED`
marker, no `tune/`. Every answer is compared with the same command on the local study folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from fer.core.errors import UserError
from study.storage import (
    delete_prefix,
    list_files,
    open_storage,
    publish,
    ship_data,
    upload_tree,
    write_json,
    write_text,
)
from study.storage.transfer import MARKER, upload_file
from tests.s3_server import TEST_CREDENTIALS, serve

ROOT = Path(__file__).resolve().parents[1]
STUDY = "smoke"


@pytest.fixture(scope="module")
def s3():
    yield from serve("studies")


@pytest.fixture(scope="module")
def credentials():
    """The environment a user sets (module-wide: the stored study is uploaded once)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in _env_vars().items():
            patch.setenv(name, value)
        patch.delenv("AWS_SESSION_TOKEN", raising=False)
        yield


def _env_vars() -> dict[str, str]:
    return {
        **TEST_CREDENTIALS,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def stored(s3, credentials, smoke_study) -> str:
    """The smoke study in storage, as `run --storage` leaves it; returns `URI/<study>`."""
    root = open_storage(s3.uri("studies", "lab"))
    storage = root.child(STUDY)
    for entry in sorted(Path(smoke_study).iterdir()):
        if entry.name in ("tune", "data", "best"):
            continue
        if entry.is_dir():
            upload_tree(storage, entry, entry.name)
        else:
            upload_file(storage, entry, entry.name)
    ship_data(storage, Path(smoke_study) / "data")
    for best in sorted((Path(smoke_study) / "best").iterdir()):
        publish(storage, best, f"best/{best.name}")
    # a best folder whose upload was cut short: files, no marker
    upload_tree(storage, next(iter(sorted((Path(smoke_study) / "best").iterdir()))), "best/half")
    return storage.uri


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "node_cache"
    monkeypatch.setenv("FER_NODE_CACHE", str(folder))
    return folder


def _model_uri(stored: str, backbone: str, *tail: str) -> str:
    """`URI/<study>/best/<backbone>[/tail]` with the endpoint query kept at the end."""
    base, _, query = stored.partition("?")
    return "/".join([base, "best", backbone, *tail]) + (f"?{query}" if query else "")


def _fer_study(args: list[str], cwd: Path, cache: Path, timeout: float = 300):
    """The real `fer-study` command in a subprocess, run in `cwd` (nothing lands in the repo)."""
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        TF_CPP_MIN_LOG_LEVEL="2",
        FER_NODE_CACHE=str(cache),
        **_env_vars(),
    )
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _backbones(smoke_study) -> list[str]:
    return sorted(p.name for p in (Path(smoke_study) / "best").iterdir())


def test_report_of_a_stored_study_matches_the_local_one(stored, smoke_study, tmp_path, cache):
    from study.report import build_report

    work = tmp_path / "laptop"
    work.mkdir()
    results = tmp_path / "empty_results"
    proc = _fer_study(
        ["report", stored, "--results", str(results), "--gradcam-per-class", "0"], work, cache
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    mirror = results / STUDY
    assert f"Mirror of {stored}: {mirror}" in proc.stdout
    html = work / "reports" / STUDY / "report.html"
    assert html.is_file() and str(html.relative_to(work)) in proc.stdout
    # the mirror: the study's files, no Tune folder, no per-trial models, every best model
    assert (mirror / "study.json").is_file() and not (mirror / "tune").exists()
    assert not list((mirror / "trials").rglob("*.keras"))
    assert all((mirror / "best" / b / "model.keras").is_file() for b in _backbones(smoke_study))
    assert not (mirror / "best" / "half").exists()  # incomplete: left out
    local = build_report(smoke_study, tmp_path / "local_report", gradcam_per_class=0)
    ours = pd.read_csv(work / "reports" / STUDY / "comparison.csv")
    pd.testing.assert_frame_equal(ours, pd.read_csv(local / "comparison.csv"))
    assert len(ours[ours.status != "ensemble"]) == len(_backbones(smoke_study))


def test_predict_and_evaluate_a_stored_model(stored, smoke_study, demo_data_dir, tmp_path, cache):
    from fer.evaluate.predict import evaluate_folder, predict_images
    from study.cli import main

    backbone = _backbones(smoke_study)[0]
    images = sorted(p for p in Path(demo_data_dir).rglob("*.png"))[:4]
    csv = tmp_path / "preds.csv"
    run = CliRunner().invoke(
        main, ["predict", _model_uri(stored, backbone), *map(str, images), "--csv", str(csv)]
    )
    assert run.exit_code == 0, run.output
    copy = next((cache / "models").iterdir())
    assert f"local copy {copy}" in run.stderr and (copy / "model.keras").is_file()
    expected, _ = predict_images(Path(smoke_study) / "best" / backbone, images)
    ours = pd.read_csv(csv)
    probs = [c for c in expected.columns if c.startswith("p_")]
    assert len(probs) >= 2 and list(ours["path"]) == list(expected["path"])
    assert list(ours["predicted"]) == list(expected["predicted"])
    np.testing.assert_allclose(ours[probs].to_numpy(float), expected[probs].to_numpy(float), 1e-6)

    # evaluate: the model file's URI, the same metrics, printed (not written into any study)
    data = Path(demo_data_dir)
    run = CliRunner().invoke(
        main, ["evaluate", _model_uri(stored, backbone, "model.keras"), str(data)]
    )
    assert run.exit_code == 0, run.output
    assert "metrics: --out or stdout" in run.stderr
    result = json.loads(run.stdout)
    reference = evaluate_folder(Path(smoke_study) / "best" / backbone, data)
    assert result["metrics"]["accuracy"] == reference["metrics"]["accuracy"]
    assert not (Path(smoke_study) / "evaluations").exists()
    assert [p for p in (cache / "models").iterdir() if p.is_dir()] == [copy]  # one cached copy


def test_export_a_stored_model_into_its_local_copy(stored, smoke_study, tmp_path, cache):
    from study.cli import main

    pytest.importorskip("tensorflow", reason="the exports use TensorFlow's TFLite")
    backbone = _backbones(smoke_study)[-1]
    before = list_files(open_storage(stored))
    run = CliRunner().invoke(main, ["export", _model_uri(stored, backbone), "--format", "tflite"])
    assert run.exit_code == 0, run.output
    copy = next(p for p in (cache / "models").iterdir() if p.is_dir())
    folder = copy / "export" / "tflite"
    assert f": {folder} (" in run.stdout and (folder / "export.json").is_file()
    check = json.loads((folder / "export.json").read_text())["check"]
    assert check["ok"] and check["n"] > 0
    assert str(cache / STUDY) in run.stdout  # the study's test images, from the node cache
    assert list_files(open_storage(stored)) == before  # nothing written to the storage


def _one_line_exit_2(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def test_incomplete_or_missing_models_are_refused(stored, tmp_path, cache):
    image = tmp_path / "face.png"
    line = _one_line_exit_2(
        _fer_study(["predict", _model_uri(stored, "half"), str(image)], tmp_path, cache)
    )
    assert "incomplete" in line and MARKER in line
    line = _one_line_exit_2(
        _fer_study(["predict", _model_uri(stored, "nope"), str(image)], tmp_path, cache)
    )
    assert "no such published model" in line
    assert not (cache / "models").exists() or not any(
        p.is_dir() for p in (cache / "models").iterdir()
    )


def test_a_uri_without_a_study_is_refused(stored, s3, tmp_path, cache):
    results = tmp_path / "results"
    line = _one_line_exit_2(
        _fer_study(["report", s3.uri("studies", "lab"), "--results", str(results)], tmp_path, cache)
    )
    assert "holds no study (no study.json)" in line
    line = _one_line_exit_2(
        _fer_study(
            ["report", s3.uri("no-bucket", STUDY), "--results", str(results)], tmp_path, cache
        )
    )
    assert "bucket 'no-bucket' does not exist" in line
    assert not results.exists()


@pytest.mark.parametrize(
    "content",
    [{"study.json": '{"started_at": "another day"}'}, {"data/study_data.json": "{}"}],
    ids=["another-study", "prepared-only"],
)
def test_a_local_folder_holding_another_study_is_not_overwritten(stored, tmp_path, content):
    from study.storage.readers import mirror_study

    other = tmp_path / "results" / STUDY
    for rel, text in content.items():
        (other / rel).parent.mkdir(parents=True, exist_ok=True)
        (other / rel).write_text(text)
    with pytest.raises(UserError, match="holds another study"):
        mirror_study(stored, tmp_path / "results")
    assert sorted(p.relative_to(other).as_posix() for p in other.rglob("*") if p.is_file()) == [
        *content
    ]


def test_a_running_studys_existing_folder_is_not_pulled_into(s3, credentials, tmp_path):
    """A driver's own folder is this study's folder: while the lease is in storage nothing is
    pulled into an existing one (a fresh, empty one is still filled)."""
    from study.storage.readers import mirror_study

    storage = open_storage(s3.uri("studies", "lab2")).child("running")
    write_json(storage, "study.json", {"started_at": "t0"})
    write_json(storage, "driver_lease.json", {"pid": 1})
    try:
        folder, pulled = mirror_study(storage.uri, tmp_path)
        assert pulled and (folder / "study.json").is_file()
        write_text(storage, "trials.csv", "trial_id\n")
        assert mirror_study(storage.uri, tmp_path) == (folder, False)
        assert not (folder / "trials.csv").exists()
        delete_prefix(storage, "driver_lease.json")
        assert mirror_study(storage.uri, tmp_path) == (folder, True)
        assert (folder / "trials.csv").is_file() and not (folder / "driver_lease.json").exists()
    finally:
        delete_prefix(storage, "")


def test_the_cached_model_is_reused_until_it_is_published_again(stored, smoke_study, tmp_path):
    from study.storage.readers import local_model

    backbone = _backbones(smoke_study)[0]
    uri = _model_uri(stored, backbone)
    first = local_model(uri, tmp_path)
    model = first / "model.keras"
    stamp = model.stat().st_mtime_ns
    assert local_model(uri, tmp_path) == first and model.stat().st_mtime_ns == stamp
    assert local_model(_model_uri(stored, backbone, "model.keras"), tmp_path) == model
    # published again with every file of the same size (only the marker's time differs)
    changed = tmp_path / "republished"
    shutil.copytree(Path(smoke_study) / "best" / backbone, changed)
    target = next(p for p in sorted(changed.iterdir()) if p.suffix == ".json")
    new = target.read_bytes()[::-1]
    assert new != target.read_bytes()
    target.write_bytes(new)
    storage = open_storage(stored)
    time.sleep(1.1)  # S3 keeps an object's time to the second
    publish(storage, changed, f"best/{backbone}")
    try:
        again = local_model(uri, tmp_path)
        assert again == first and (again / target.name).read_bytes() == new
    finally:
        publish(storage, Path(smoke_study) / "best" / backbone, f"best/{backbone}")
    # a cached copy with a file of the wrong size is not used: downloaded again
    size = local_model(uri, tmp_path) and model.stat().st_size
    model.write_bytes(b"broken")
    assert local_model(uri, tmp_path) == first and model.stat().st_size == size


@pytest.mark.parametrize(
    "tail", [("best",), ("trials", "x"), ("best", "b", "other.txt")], ids=["short", "trial", "file"]
)
def test_a_uri_that_is_no_stored_model_is_one_line(s3, tail):
    from study.storage.readers import local_model

    base, _, query = s3.uri("studies", "lab/smoke").partition("?")
    with pytest.raises(UserError, match="is not a stored model") as info:
        local_model("/".join([base, *tail]) + "?" + query)
    assert "\n" not in str(info.value)
