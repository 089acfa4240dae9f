"""`fer-study predict` and `fer-study evaluate` on the smoke study's best model (shared
`smoke_study`).

Commands run in-process through click's runner (a new process would import TensorFlow again for
every call); the one-line error of a bad path is checked in a real process too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image


def fer_study_process(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def fer_study(*args: str):
    """Run a command in-process; the result has returncode, stdout and stderr like a finished
    process."""
    from click.testing import CliRunner

    from study.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    result.returncode = result.exit_code
    return result


@pytest.fixture(scope="module")
def best_model(smoke_study) -> Path:
    folders = sorted(p for p in (smoke_study / "best").iterdir() if (p / "model.keras").is_file())
    assert folders, "the smoke study has no best model"
    return folders[0]


@pytest.fixture(scope="module")
def classes(best_model) -> list[str]:
    return json.loads((best_model / "test_metrics.json").read_text())["classes"]


def _face(demo_data_dir: Path, cls: str, suffix: str) -> Path:
    return next(p for p in sorted((demo_data_dir / cls).iterdir()) if p.suffix.lower() == suffix)


def test_predict_csv_with_heic_folder_and_gradcam(best_model, classes, demo_data_dir, tmp_path):
    heic = next(p for p in sorted(demo_data_dir.rglob("*.heic")))
    folder = tmp_path / "some"
    folder.mkdir()
    shutil.copy(_face(demo_data_dir, classes[0], ".png"), folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    out_csv, cams = tmp_path / "pred.csv", tmp_path / "cams"
    proc = fer_study("predict", best_model, heic, folder, "--csv", out_csv, "--gradcam", cams)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(out_csv)
    assert list(table["path"]) == [str(heic), str(folder / "a.png")]  # the text file is skipped...
    assert "notes.txt" in proc.stderr and "skipped 1 file" in proc.stderr  # ...and named
    probs = table[[f"p_{c}" for c in classes]].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    assert list(table["predicted"]) == [classes[i] for i in probs.argmax(axis=1)]
    overlays = sorted(cams.glob("*.png"))
    assert len(overlays) == 2
    width, height = Image.open(overlays[0]).size
    assert width == 3 * height  # image | Grad-CAM | Grad-CAM++


def test_predict_prints_a_table(best_model, classes, demo_data_dir):
    proc = fer_study("predict", best_model, _face(demo_data_dir, classes[1], ".png"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "predicted" in proc.stdout and f"p_{classes[1]}" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["{model}", "no/such/image.png"], "no such file or folder: no/such/image.png"),
        (["no/such/model", "{image}"], "no model found at no/such/model"),
    ],
)
def test_predict_bad_path_is_one_line_exit_2(best_model, demo_data_dir, args, message):
    image = next(demo_data_dir.rglob("*.png"))
    proc = fer_study_process("predict", *[a.format(model=best_model, image=image) for a in args])
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"Error: {message}")  # one line, last
    assert "Traceback" not in proc.stderr


def test_using_a_model_never_loads_the_report_code():
    """predict and evaluate live apart from the report (study/cli/inference_cmds.py): running them
    imports nothing of study.report."""
    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from study.cli import main\n"
        "for args in (['predict', 'no/model', 'x.png'], ['evaluate', 'no/model', 'no/data']):\n"
        "    assert CliRunner().invoke(main, args).exit_code == 2\n"
        "print(sorted(m for m in sys.modules if m.startswith('study.report')))\n"
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_evaluate_on_another_labelled_folder(best_model, classes, demo_data_dir, tmp_path):
    data = tmp_path / "other"
    for cls in classes:
        (data / cls).mkdir(parents=True)
        for path in sorted((demo_data_dir / cls).glob("S0[1-3]_*"))[:3]:
            shutil.copy(path, data / cls / path.name)
    (data / "contempt").mkdir()  # not a class of the model: skipped, listed
    shutil.copy(next(demo_data_dir.rglob("*.png")), data / "contempt" / "x.png")
    (data / classes[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "eval.json"
    proc = fer_study("evaluate", best_model, data, "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert metrics["n"] == sum(len(list((data / c).glob("S0*"))) for c in classes)
    assert 0.0 <= metrics["accuracy"]["value"] <= 1.0
    low, high = metrics["macro_f1"]["ci95"]
    assert low <= metrics["macro_f1"]["value"] <= high
    assert np.array(metrics["confusion_matrix"]).sum() == metrics["n"]
    assert result["skipped_folders"] == ["contempt"]
    assert [s["path"] for s in result["skipped_files"]] == [f"{classes[0]}/broken.jpg"]
    assert "accuracy" in proc.stdout and str(out) in proc.stdout


def test_file_name_filter_matches_names_not_folders():
    from fer.evaluate.predict import filter_files

    files = [
        Path("PrivateTest/Training_1.jpg"),
        Path("x/PrivateTest_2.jpg"),
        Path("y/PrivateTest_3.png"),
        Path("y/PublicTest_4.jpg"),
    ]
    kept, labels, out = filter_files(files, [0, 0, 1, 1], include="^PrivateTest_")
    assert kept == files[1:3] and labels == [0, 1] and out == 2
    kept, labels, out = filter_files(files, [0, 0, 1, 1], include="Test_", exclude=r"\.png$")
    assert kept == [files[1], files[3]] and out == 2
    assert filter_files(files, [0, 0, 1, 1]) == (files, [0, 0, 1, 1], 0)


def test_evaluate_only_the_files_a_name_filter_keeps(
    best_model, classes, demo_data_dir, smoke_study, tmp_path
):
    """--include/--exclude: a regex on file names (FER2013's class folders hold all three of its
    splits)."""
    data = tmp_path / "mixed"
    for cls in classes:
        (data / cls).mkdir(parents=True)
        for path in sorted((demo_data_dir / cls).glob("S0[1-4]_*.png"))[:4]:
            shutil.copy(path, data / cls / path.name)
    wanted = [
        p
        for p in data.rglob("*")
        if p.is_file() and p.name.startswith(("S01_", "S02_")) and "shifted" not in p.name
    ]
    proc = fer_study("evaluate", best_model, data, "--include", "^S0[12]_", "--exclude", "shifted")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = (
        smoke_study
        / "evaluations"
        / f"{best_model.name}__mixed__include-S0-12-exclude-shifted.json"
    )
    result = json.loads(out.read_text())  # the study's evaluations/, named after the filter
    assert result["metrics"]["n"] == len(wanted) > 0
    assert result["filtered_out"] == sum(len(list((data / c).iterdir())) for c in classes) - len(
        wanted
    )
    assert (result["include"], result["exclude"]) == ("^S0[12]_", "shifted")
    assert (
        "include ^S0[12]_" in result["dataset"]
        and "left out by the file-name filter" in proc.stdout
    )
    out.unlink()  # the shared study's report tests should not see it
    if not any(out.parent.iterdir()):
        out.parent.rmdir()

    proc = fer_study("evaluate", best_model, data, "--include", "^Nobody_")
    assert (
        proc.returncode == 2
        and "no file under" in proc.stderr
        and "include ^Nobody_" in proc.stderr
    )
    proc = fer_study("evaluate", best_model, data, "--include", "([")
    assert (
        proc.returncode == 2 and "--include '([' is not a valid regular expression" in proc.stderr
    )


def test_evaluate_missing_data_is_exit_2(best_model, tmp_path):
    proc = fer_study("evaluate", best_model, tmp_path / "nothing")
    assert (
        proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = fer_study("evaluate", best_model, empty)
    assert proc.returncode == 2 and "has no class folders" in proc.stderr


def test_evaluate_several_models_scores_their_ensemble(
    smoke_study, classes, demo_data_dir, tmp_path
):
    """Several MODELs: the softmax mean of all of them, each member on the same images, and the
    paired comparison; the default file sits with the study's evaluations, named after the
    ensemble."""
    bests = sorted(p for p in (smoke_study / "best").iterdir() if (p / "model.keras").is_file())
    assert len(bests) == 2, bests
    data = tmp_path / "other"
    for cls in classes:
        (data / cls).mkdir(parents=True)
        for path in sorted((demo_data_dir / cls).glob("S0[1-3]_*.png"))[:3]:
            shutil.copy(path, data / cls / path.name)
    proc = fer_study("evaluate", *bests, data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = smoke_study / "evaluations" / "ensemble-of-2__other.json"
    result = json.loads(out.read_text())
    out.unlink()  # the shared study's report tests should not see it
    if not any(out.parent.iterdir()):
        out.parent.rmdir()
    members = [b.name for b in bests]
    assert result["backbone"] == "ensemble of 2" and result["members"] == members
    n = result["metrics"]["n"]
    assert n == sum(len(list((data / c).iterdir())) for c in classes)

    # the ensemble is the mean of the members' probabilities as `predict` gives them
    from fer.evaluate.metrics import classification_metrics
    from fer.evaluate.predict import predict_images

    frames = [predict_images(b, [data])[0] for b in bests]
    probs = np.mean([f[[f"p_{c}" for c in classes]].to_numpy() for f in frames], axis=0)
    labels = np.array([classes.index(Path(p).parent.name) for p in frames[0]["path"]])
    expected = classification_metrics(labels, probs, classes, n_boot=1000)
    assert result["metrics"]["accuracy"]["value"] == pytest.approx(expected["accuracy"]["value"])
    assert result["metrics"]["confusion_matrix"] == expected["confusion_matrix"]
    for member, frame in zip(members, frames):
        alone = (frame["predicted"].to_numpy() == np.array(classes)[labels]).mean()
        assert result["member_metrics"][member]["accuracy"]["value"] == pytest.approx(alone)
    pairs = {p["b"]: p for p in result["pairs"]}
    assert set(pairs) == set(members)
    for member in members:
        pair = pairs[member]
        assert pair["n"] == n and pair["a"] == "ensemble of 2"
        assert pair["accuracy_a"] == pytest.approx(result["metrics"]["accuracy"]["value"])
        assert pair["accuracy_b"] == pytest.approx(
            result["member_metrics"][member]["accuracy"]["value"]
        )
        assert f"{member}: accuracy" in proc.stdout and "McNemar p" in proc.stdout


def test_an_ensemble_of_models_of_other_classes_is_a_one_line_error(
    best_model, classes, demo_data_dir, tmp_path
):
    other = tmp_path / "other_model"
    shutil.copytree(best_model, other)
    (other / "classes.json").write_text(json.dumps(list(reversed(classes))))
    proc = fer_study("evaluate", best_model, other, demo_data_dir)
    assert proc.returncode == 2, proc.stdout
    assert "an ensemble needs models of the same classes in the same order" in proc.stderr
    assert "Traceback" not in proc.stderr
