"""The driver's mirror of a stored study (study.storage.mirror) and resume's settling of Optuna
trials from recorded outcomes, against a real S3-compatible server (moto's server mode)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import optuna
import pytest

from fer.core import names
from study.storage import exists, list_files, open_storage, publish, read_text, write_json
from study.storage.home import StudyHome
from study.storage.mirror import StudyMirror, pull_study
from study.tune.search import discard_interrupted
from tests.s3_server import serve, set_test_credentials


@pytest.fixture(scope="module")
def s3():
    yield from serve("mirror")


@pytest.fixture
def home(s3, monkeypatch, tmp_path, request):
    set_test_credentials(monkeypatch)
    monkeypatch.setenv("FER_NODE_CACHE", str(tmp_path / "node"))
    study_dir = tmp_path / "results" / "s"
    study_dir.mkdir(parents=True)
    uri = open_storage(s3.uri("mirror", request.node.name)).child("s").uri
    return StudyHome(str(study_dir), str(study_dir / "data"), uri)


def test_a_trial_folder_comes_in_without_its_model_and_its_lines_reach_the_study_log(home):
    storage = home.storage()
    rel = "trials/t1"
    for name, text in {
        "history.csv": "epoch\n1\n",
        "model.keras": "weights",
        names.TRIAL_LOG_FILE: "building the feature cache\n",
        names.ERROR_FILE: "Traceback (most recent call last):\nValueError: boom\n",
    }.items():
        local = home.local(f"{rel}/{name}")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
    home.push(rel)  # what the trial does on its node
    assert exists(storage, f"{rel}/model.keras")

    StudyMirror(home).pull_trial("t1")
    got = sorted(p.name for p in (Path(home.study_dir) / rel).iterdir())
    assert got == sorted(["history.csv", names.TRIAL_LOG_FILE, names.ERROR_FILE])
    log = (Path(home.study_dir) / names.STUDY_LOG).read_text()
    assert "[t1] building the feature cache" in log and "[t1] ValueError: boom" in log


def test_optuna_sqlite_is_pushed_whole_while_a_connection_holds_it(home):
    db = Path(home.study_dir) / names.OPTUNA_FILE
    connection = sqlite3.connect(db)
    connection.execute("create table t (x int)")
    connection.executemany("insert into t values (?)", [(i,) for i in range(1000)])
    connection.commit()
    connection.execute("begin immediate")  # a write under way: not half-copied
    connection.execute("insert into t values (-1)")
    StudyMirror(home).push(names.OPTUNA_FILE, "missing.json")  # missing files: skipped
    connection.rollback()
    connection.close()
    back = Path(home.study_dir).parent / "back.sqlite3"
    with home.storage().fs.open_input_stream(home.storage().path(names.OPTUNA_FILE)) as stream:
        back.write_bytes(stream.read())
    assert sqlite3.connect(back).execute("select count(*) from t").fetchone() == (1000,)


def test_pull_study_leaves_out_tune_lease_trial_models_and_incomplete_best(home, tmp_path):
    storage = home.storage()
    write_json(storage, names.STUDY_FILE, {"status": "completed"})
    write_json(storage, "driver_lease.json", {"token": "x"})
    write_json(storage, "tune/run-1/experiment_state.json", {})
    write_json(storage, "trials/t1/outcome.json", {"trial_id": "t1"})
    write_json(storage, "trials/t1/model.keras", {})
    done = tmp_path / "done"
    done.mkdir()
    (done / "model.keras").write_text("m")
    publish(storage, done, "best/a")
    write_json(storage, "best/b/model.keras", {})  # files, no marker: an upload cut short
    dest = tmp_path / "copy"
    pull_study(storage, dest)
    got = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert got == ["best/a/model.keras", "study.json", "trials/t1/outcome.json"]
    assert "best/b/model.keras" in list_files(storage)  # nothing deleted in storage
    assert json.loads(read_text(storage, names.STUDY_FILE))["status"] == "completed"


def test_resume_tells_optuna_the_recorded_outcomes_and_requeues_the_rest(tmp_path):
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'o.sqlite3'}")
    study = optuna.create_study(study_name="s", storage=storage)
    study.enqueue_trial({"x": 0.5})
    asked = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(3)]
    recorded = {
        asked[1].number: {"status": names.COMPLETED, "metric_value": 0.25},
        asked[2].number: {"status": names.ERRORED, "metric_value": None},
    }
    requeue = discard_interrupted(storage, "s", recorded)
    trials = optuna.load_study(study_name="s", storage=storage).trials
    states = {t.number: (t.state, t.value) for t in trials}
    assert states[asked[1].number] == (optuna.trial.TrialState.COMPLETE, 0.25)
    assert states[asked[2].number][0] == optuna.trial.TrialState.FAIL
    assert states[asked[0].number][0] == optuna.trial.TrialState.FAIL  # interrupted
    assert requeue == [{"x": 0.5}]  # the start point it was evaluating, queued again
