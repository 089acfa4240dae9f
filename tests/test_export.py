"""`fer-study export` (fer.deploy.export), the deployment figures (fer.deploy.latency) and the
report's deployment view.

One tiny smallcnn (32 px, augmentation on, so the export must trace the `aug_affine` layer in
inference mode) is trained once on the prepared demo study; every format is exported from its
best-model folder and compared with the Keras model here, independently of the export's own check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from fer.core.errors import UserError

pytest.importorskip("tensorflow", reason="the exports use TensorFlow's SavedModel / TFLite")


@pytest.fixture(scope="module")
def best_dir(study_base, tmp_path_factory):
    """results/exp/best/smallcnn: a trained model with test metrics and a latency.json, like a
    study's."""
    from fer.core.config import make_config
    from fer.data import StudyData
    from fer.deploy.latency import LATENCY_FILE, measure_and_write
    from fer.model.build import load_trained_model
    from fer.train.trial import run_trial

    study = tmp_path_factory.mktemp("export") / "results" / "exp"
    shutil.copytree(study_base / "data", study / "data")
    # learns the demo faces in about 20 s (test accuracy 0.55 on 20 images, every class predicted):
    # a model with a constant answer would make the top-1 agreement of the quantized exports
    # trivially perfect
    config = make_config(
        backbone="smallcnn",
        image_size=32,
        weights="none",
        dense_units=64,
        dropout=0.1,
        batch_size=16,
        epochs_head=2,
        epochs_finetune=20,
        unfreeze_layers=200,
        augment=0.5,
        lr_head=1e-3,
        lr_finetune=3e-3,
        patience=8,
        seed=1,
    )
    best = study / "best" / "smallcnn"
    run_trial(config, StudyData(study / "data"), best, evaluate_test=True)
    confusion = np.array(json.loads((best / "test_metrics.json").read_text())["confusion_matrix"])
    assert (confusion.sum(axis=0) > 0).sum() >= 3, "the fixture model did not learn: fix its config"
    measure_and_write(load_trained_model(best / "model.keras"), best / LATENCY_FILE, threads=None)
    return best


@pytest.fixture(scope="module")
def keras_reference(best_dir):
    from fer.data import StudyData
    from fer.data.batches import predict_probs
    from fer.model.build import load_trained_model

    model = load_trained_model(best_dir / "model.keras")
    test = np.asarray(StudyData(best_dir.parent.parent / "data").pixels("test", 32))
    return model, test, predict_probs(model, test, 64)


def _cli(*args):
    from study.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("fmt", ["saved_model", "tflite", "onnx"])
def test_float_export_gives_the_same_probabilities(best_dir, keras_reference, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("tf2onnx", reason="the optional extra 'onnx' is not installed")
        pytest.importorskip("onnxruntime", reason="the optional extra 'onnx' is not installed")
    from fer.deploy.exported import ExportedModel

    _, test, reference = keras_reference
    out = tmp_path / fmt
    result = _cli("export", best_dir, "--format", fmt, "--out", out)
    assert result.exit_code == 0, result.output
    info = json.loads((out / "export.json").read_text())
    assert info["classes"] == json.loads((best_dir / "test_metrics.json").read_text())["classes"]
    assert info["input_size"] == 32 and info["check"]["ok"] and info["check"]["n"] == len(test)
    assert (
        info["backbone"] == "smallcnn"
        and info["check"]["accuracy_export"] == info["check"]["accuracy_keras"]
    )
    assert info["size_bytes"] > 0 and info["latency"]["devices"]["cpu"]["latency_ms_median"] > 0
    exported = ExportedModel(out / "export.json")  # independently of the export's own check
    probs = exported.predict(test, batch_size=7)  # uneven batches: resizing the TFLite input works
    np.testing.assert_allclose(probs, reference, atol=1e-4)
    assert probs.shape == (len(test), len(info["classes"]))
    assert exported._run is not None and exported.path.name == {"saved_model": "saved_model"}.get(
        fmt, f"model.{fmt}"
    )


@pytest.mark.parametrize("quantize", ["float16", "int8"])
def test_quantized_tflite_agrees_on_the_top_class(best_dir, keras_reference, quantize, tmp_path):
    from fer.deploy.export import TOP1_AGREEMENT
    from fer.deploy.exported import ExportedModel

    _, test, reference = keras_reference
    out = tmp_path / quantize
    result = _cli("export", best_dir, "--format", "tflite", "--quantize", quantize, "--out", out)
    info = json.loads((out / "export.json").read_text())
    probs = ExportedModel(out / "export.json").predict(test)
    top1 = float((probs.argmax(1) == reference.argmax(1)).mean())
    assert info["check"]["top1_agreement"] == pytest.approx(top1)
    assert result.exit_code == (0 if top1 >= TOP1_AGREEMENT[quantize] else 1), result.output
    assert top1 >= TOP1_AGREEMENT[quantize]  # a trained smallcnn is confident enough for both
    float_size = json.loads((best_dir / "latency.json").read_text())["size_bytes"]
    assert info["size_bytes"] < float_size * (0.6 if quantize == "float16" else 0.35)


def test_predict_accepts_the_export(best_dir, keras_reference, tmp_path, demo_data_dir):
    from fer.evaluate.predict import predict_images

    _cli("export", best_dir, "--format", "tflite", "--out", tmp_path / "tfl")
    images = sorted((demo_data_dir).rglob("*.png"))[:6]
    from_keras, _ = predict_images(best_dir, images)
    for target in (tmp_path / "tfl", tmp_path / "tfl" / "model.tflite"):
        from_export, _ = predict_images(target, images)
        assert list(from_export["predicted"]) == list(from_keras["predicted"])
        np.testing.assert_allclose(from_export["confidence"], from_keras["confidence"], atol=1e-4)
    with pytest.raises(UserError, match="--gradcam needs the model.keras"):
        predict_images(tmp_path / "tfl", images, gradcam_dir=tmp_path / "cams")
    from fer.evaluate.predict import evaluate_folder

    keras_eval = evaluate_folder(best_dir, demo_data_dir, n_boot=10)
    export_eval = evaluate_folder(tmp_path / "tfl", demo_data_dir, n_boot=10)
    assert export_eval["backbone"] == keras_eval["backbone"] == "smallcnn"
    assert export_eval["metrics"]["confusion_matrix"] == keras_eval["metrics"]["confusion_matrix"]


def test_bad_input_is_one_line_and_exit_2(best_dir, tmp_path):
    not_a_model = tmp_path / "junk"
    not_a_model.mkdir()
    (not_a_model / "model.keras").write_text("not a model")
    cases = [
        (
            ["--format", "saved_model", "--quantize", "int8"],
            best_dir,
            "--quantize is not available for saved_model",
        ),
        (
            ["--format", "onnx", "--quantize", "float16"],
            best_dir,
            "--quantize is not available for onnx",
        ),
        (["--format", "tflite", "--quantize", "int4"], best_dir, "unknown quantization 'int4'"),
        (["--format", "coreml"], best_dir, "unknown export format 'coreml'"),
        (
            ["--format", "saved_model", "--out", not_a_model],
            best_dir,
            "exists and is not an earlier export",
        ),
        (["--format", "tflite"], tmp_path / "missing", "no model found"),
        (["--format", "tflite"], tmp_path, "no model found"),
        (
            ["--format", "tflite", "--data", best_dir.parent.parent / "data"],
            not_a_model,
            "could not load model",
        ),
    ]
    for options, target, message in cases:
        result = _cli("export", target, *options)
        assert result.exit_code == 2, (options, result.output)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], (options, result.output)
    assert (
        not_a_model / "model.keras"
    ).read_text() == "not a model"  # a user's folder is never replaced


def test_bad_input_through_the_real_entry_point(tmp_path):
    """The same error path in a fresh process (no test runner around it): one line on stderr, exit
    2."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "study.cli",
            "export",
            str(tmp_path),
            "--format",
            "saved_model",
            "--quantize",
            "float16",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 2
    expected = (
        "Error: --quantize is not available for saved_model; "
        "quantized exports: tflite (float16/int8)"
    )
    assert proc.stderr.strip().splitlines() == [expected]


def test_failed_quantization_is_a_user_error(tmp_path):
    from fer.deploy.writers import write_tflite

    with pytest.raises(UserError, match="int8 quantization needs calibration images"):
        write_tflite(tmp_path, tmp_path / "m.tflite", "int8", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(UserError, match="^float16 quantization failed: "):
        write_tflite(tmp_path, tmp_path / "m.tflite", "float16", None)  # not a SavedModel


def test_agreement_criteria():
    from fer.deploy.export import agreement

    ref = np.array([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.3, 0.3, 0.4]] * 34)
    assert agreement(ref, ref + 5e-5, None)["ok"]
    assert not agreement(ref, ref + 2e-4, None)["ok"]
    swapped = ref.copy()
    swapped[0] = [0.1, 0.7, 0.2]  # one of 102 images changes its top class: 99.02% agreement passes
    assert agreement(ref, swapped, "float16")["ok"]
    swapped[1] = [0.7, 0.2, 0.1]  # two: 98.0%, enough for int8 (97%), not for float16 (99%)
    assert agreement(ref, swapped, "float16")["top1_agreement"] == pytest.approx(100 / 102)
    assert not agreement(ref, swapped, "float16")["ok"] and agreement(ref, swapped, "int8")["ok"]


def test_latency_figures_are_sane(best_dir):
    from fer.model.build import load_trained_model

    stored = json.loads((best_dir / "latency.json").read_text())
    model = load_trained_model(best_dir / "model.keras")
    assert stored["params"] == model.count_params() and stored["image_size"] == 32
    assert (
        4 * stored["params"] <= stored["size_bytes"] < 4 * stored["params"] + 1024
    )  # float32 (+ RNG state)
    cpu = stored["devices"]["cpu"]
    assert 0 < cpu["latency_ms_median"] <= cpu["latency_ms_p90"] < 1000 and cpu["runs"] >= 50
    assert (
        cpu["images_per_s"] > 1000 / cpu["latency_ms_p90"] / 4
    )  # batching is not much slower per image
    assert stored["machine"]["cores"] and len(stored["load_average_before"]) == 3


def test_time_predict_measures_what_it_calls():
    import time

    from fer.deploy.latency import time_predict

    def slow(x):
        time.sleep(0.002 * len(x))
        return np.zeros((len(x), 5))

    t = time_predict(slow, 8, runs=50, warmup=1, batch=8, batch_runs=2)
    assert 2.0 <= t["latency_ms_median"] < 20 and t["latency_ms_p90"] >= t["latency_ms_median"]
    assert 8 / 0.1 < t["images_per_s"] <= 8 / 0.016
    assert (
        t["cpu_ms_per_image"] < 2.0 and t["batch_cpu_ms_per_image"] < 2.0
    )  # sleeping costs no CPU


def test_pareto_front():
    from study.report.deploy_columns import pareto_front

    # (latency ms, accuracy): b is slower and less accurate than a; d ties a exactly; e is fastest
    points = [(10, 0.80), (20, 0.75), (40, 0.90), (10, 0.80), (5, 0.50), (40, 0.85)]
    assert pareto_front(points) == [True, False, True, True, True, False]
    assert pareto_front([]) == [] and pareto_front([(1.0, 0.1)]) == [True]


def test_report_shows_latency_columns_and_the_pareto_plot(best_dir, tmp_path):
    """A study folder with two tested backbones (the second a copy with other stored figures)."""
    import pandas as pd

    from study.report import build_report

    study = tmp_path / "results" / "deploy"
    shutil.copytree(best_dir.parent.parent / "data", study / "data")
    shutil.copytree(best_dir, study / "best" / "smallcnn")
    other = study / "best" / "slowcnn"
    shutil.copytree(best_dir, other)
    stored = json.loads((other / "latency.json").read_text())
    stored["devices"]["cpu"]["latency_ms_median"] *= 10
    stored["devices"]["cpu"]["latency_ms_p90"] *= 10
    (other / "latency.json").write_text(json.dumps(stored))
    (study / "study.json").write_text(
        json.dumps({"name": "deploy", "status": "completed"})
    )  # what `run` writes
    out = build_report(study, tmp_path / "report", gradcam_per_class=0)
    rows = pd.read_csv(out / "comparison.csv").set_index("backbone")
    assert rows.loc["slowcnn", "cpu_latency_ms"] == pytest.approx(
        10 * rows.loc["smallcnn", "cpu_latency_ms"]
    )
    assert {"size_mb", "cpu_latency_p90_ms", "cpu_images_per_s_b64"} <= set(rows.columns)
    assert (out / "figures" / "accuracy_latency.png").stat().st_size > 1000
    md = (out / "report.md").read_text()
    assert "CPU ms/image (median, p90)" in md and "Pareto front" in md
    # same accuracy, 10x slower: only the fast copy is on the front
    front_line = next(line for line in md.splitlines() if "Backbones on the Pareto front" in line)
    assert front_line.rstrip().endswith("smallcnn.")


def test_export_under_the_jax_backend(best_dir, keras_reference, tmp_path):
    """The same model.keras exported by a KERAS_BACKEND=jax process (Keras's SavedModel export goes
    through jax2tf there): the TFLite file still gives the Keras probabilities; ONNX says it needs
    TensorFlow."""
    pytest.importorskip("jax", reason="jax is not installed (the optional extra 'jax')")
    from fer.deploy.exported import ExportedModel

    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="3")
    base = [sys.executable, "-m", "study.cli", "export", str(best_dir)]
    proc = subprocess.run(
        base + ["--format", "tflite", "--out", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _, test, reference = keras_reference
    np.testing.assert_allclose(
        ExportedModel(tmp_path / "t" / "export.json").predict(test), reference, atol=1e-4
    )
    proc = subprocess.run(
        base + ["--format", "onnx", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert (
        proc.returncode == 2 and "KERAS_BACKEND=tensorflow" in proc.stderr.strip().splitlines()[-1]
    )
    assert (
        not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    )  # nothing half-written
