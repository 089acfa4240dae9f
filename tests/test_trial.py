"""The trial (fer.train.trial.run_trial, fer-study train) on real demo data, with tiny models and
images.

The five-backbone test is the most expensive test of the suite: one parametrised test, tiny images
(inceptionv3 needs 75 px), one epoch per stage. Tests that need the offline ImageNet files in
$FER_SHARED/weights (docs/benchmarks.md) skip with a reason when they are absent.
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

from benchmarks.shared_data import shared_missing, shared_path
from fer.core.config import make_config
from fer.core.errors import UserError
from fer.core.names import COLLAPSE_FILE, RECORD_KEYS
from fer.data import StudyData
from fer.model.backbones import BACKBONES, get_backbone
from fer.train.trial import run_trial

WEIGHTS_DIR = shared_path("weights")
MOBILENETV2_FILE = WEIGHTS_DIR / "mobilenet_v2_1.0_torchvision_port_no_top.weights.h5"
MOBILENET025_FILE = WEIGHTS_DIR / "mobilenet_2_5_224_tf_no_top.h5"
needs_weights = pytest.mark.skipif(
    not MOBILENETV2_FILE.is_file() or not MOBILENET025_FILE.is_file(),
    reason=shared_missing(MOBILENETV2_FILE),
)
TINY = dict(epochs_head=1, epochs_finetune=1, batch_size=16, unfreeze_layers=8, patience=2)


@pytest.fixture(scope="module")
def trial_data(prepared_data) -> StudyData:
    return prepared_data if isinstance(prepared_data, StudyData) else StudyData(prepared_data)


def _read_history(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "history.csv")


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_each_backbone_trains_both_stages(trial_data, tmp_path, backbone):
    from fer.model.build import backbone_layers, load_trained_model

    size = max(32, get_backbone(backbone).min_size)  # tiny, but at least the backbone's minimum
    records = []
    summary = run_trial(
        dict(backbone=backbone, image_size=size, weights="none", **TINY),
        trial_data,
        tmp_path,
        on_epoch=records.append,
    )
    assert [r["stage"] for r in records] == ["head", "finetune"]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert set(r) == set(RECORD_KEYS)
        assert 0.0 <= r["val_accuracy"] <= 1.0 and 0.0 <= r["val_macro_f1"] <= 1.0
        assert np.isfinite(r["loss"]) and np.isfinite(r["val_loss"]) and r["images_per_s"] > 0
    assert records[1]["lr"] == pytest.approx(1e-4)  # stage 2 starts at lr_finetune
    assert (
        summary["trainable_layers"]["head"] == 0
        and 0 < summary["trainable_layers"]["finetune"] <= 8
    )
    written = sorted(
        p.name for p in tmp_path.iterdir() if p.name != COLLAPSE_FILE
    )  # one epoch per stage
    assert written == [
        "config.json",
        "history.csv",
        "model.keras",
        "summary.json",
        "val_metrics.json",
    ]
    assert (tmp_path / COLLAPSE_FILE).is_file() == bool(
        summary["collapsed_stages"]
    )  # only when one collapsed
    assert _read_history(tmp_path).columns.tolist() == list(RECORD_KEYS)
    assert json.loads((tmp_path / "config.json").read_text())["backbone"] == backbone
    val = json.loads((tmp_path / "val_metrics.json").read_text())
    assert val["n"] == len(trial_data.labels("val")) and "ci95" in val["macro_f1"]

    # The best model loads back (its predictions are checked in the beats-chance test). Trained from
    # scratch (weights=none), only BatchNormalization inside the unfrozen range may have trained.
    model = load_trained_model(tmp_path / "model.keras")
    assert model.output_shape == (None, 5)
    assert not any(
        layer.trainable
        for layer in backbone_layers(model)[: -TINY["unfreeze_layers"]]
        if layer.__class__.__name__ == "BatchNormalization"
    )


@pytest.mark.parametrize("backbone", ["smallcnn", "minixception", "vggcnn"])
def test_from_scratch_backbones_refuse_imagenet_naming_the_alternatives(backbone):
    """The registry's from-scratch CNNs have no ImageNet file: one line saying what to pass."""
    from fer.model.build import build_model

    with pytest.raises(UserError, match=f"{backbone} has no ImageNet weights.*weights=none"):
        build_model(make_config(backbone=backbone, image_size=48, weights="imagenet"), 5)


def test_vggcnn_is_two_convolutions_per_block_in_four_blocks():
    """VGG-style: blocks of two 3x3 conv + BN + ReLU (32, 64, 128, 256 filters), whole blocks for
    block-aware unfreezing, a 6x6 Grad-CAM target at 48 px."""
    from fer.model.build import backbone_layers, build_model

    model = build_model(make_config(backbone="vggcnn", image_size=48, weights="none"), 5)
    backbone = get_backbone("vggcnn")
    convs = [layer for layer in backbone_layers(model) if layer.__class__.__name__ == "Conv2D"]
    assert [(c.filters, c.kernel_size) for c in convs] == [
        (f, (3, 3)) for f in (32, 32, 64, 64, 128, 128, 256, 256)
    ]
    blocks = [backbone.block_of(layer.name) for layer in backbone_layers(model)]
    assert sorted(set(blocks)) == [f"vggcnn_block{i}" for i in range(1, 5)]
    assert tuple(model.get_layer(backbone.gradcam_layer).output.shape[1:3]) == (6, 6)


@pytest.mark.parametrize("train_batchnorm", [False, True])
def test_batchnorm_trains_only_when_training_from_scratch(train_batchnorm):
    """Pretrained backbones keep BN frozen in both stages; from-scratch ones (weights=none) train
    it."""
    from fer.model.build import backbone_layers, build_model, set_stage

    model = build_model(make_config(backbone="mobilenetv2", image_size=32, weights="none"), 5)
    set_stage(model, "finetune", 10, train_batchnorm=train_batchnorm)
    layers = backbone_layers(model)
    trainable_bn = {
        layer.name
        for layer in layers
        if layer.__class__.__name__ == "BatchNormalization" and layer.trainable
    }
    if train_batchnorm:
        assert trainable_bn and trainable_bn <= {layer.name for layer in layers[-10:]}
    else:
        assert trainable_bn == set()


def test_smallcnn_learns_from_scratch_and_has_no_imagenet_weights(trial_data, tmp_path):
    """The smoke/demo backbone learns the demo faces without pretrained weights (chance is 0.2)."""
    config = dict(
        backbone="smallcnn",
        image_size=48,
        weights="none",
        dense_units=64,
        batch_size=16,
        epochs_head=2,
        epochs_finetune=15,
        patience=15,
        augment=0.0,
        unfreeze_layers=200,
        lr_finetune=3e-3,
    )
    summary = run_trial(config, trial_data, tmp_path)
    assert summary["val_accuracy"] >= 0.35
    assert not any(
        stage["ended_collapsed"] for stage in summary["collapsed_stages"]
    )  # fer/train/collapse.py
    with pytest.raises(UserError, match="weights=none"):
        run_trial(dict(config, weights="imagenet"), trial_data, tmp_path / "imagenet")


def test_best_model_saved_only_before_reports_that_may_stop_the_trial_and_at_the_end(
    trial_data, tmp_path
):
    """In a study the scheduler can stop a trial only after its decision epochs' reports: the best
    model so far is on disk before those (also when an earlier epoch was the best), and the overall
    best at the end."""
    import keras

    from fer.data.batches import predict_probs
    from fer.model.build import load_trained_model

    model_file, seen = tmp_path / "model.keras", []
    onehot = np.eye(len(trial_data.classes))[trial_data.labels("val")]

    def saved_val_loss():
        probs = predict_probs(load_trained_model(model_file), trial_data.pixels("val", 32), 16)
        return float(keras.losses.CategoricalCrossentropy()(onehot, probs))

    def on_epoch(record):
        seen.append(record["val_loss"])
        if record["epoch"] < 3:
            assert not model_file.exists()
        elif record["epoch"] == 3:  # a decision epoch: the best of epochs 1-3 is on disk
            assert saved_val_loss() == pytest.approx(min(seen), rel=1e-4)

    config = dict(
        backbone="smallcnn",
        image_size=32,
        weights="none",
        epochs_head=3,
        epochs_finetune=3,
        batch_size=16,
        patience=10,
        unfreeze_layers=200,
        augment=0.0,
        lr_finetune=3e-3,
    )
    run_trial(config, trial_data, tmp_path, on_epoch=on_epoch, report_can_stop={3}.__contains__)
    assert len(seen) == 6
    assert saved_val_loss() == pytest.approx(min(seen), rel=1e-4)
    val = json.loads(
        (tmp_path / "val_metrics.json").read_text()
    )  # reused from the best epoch's predictions
    assert val["val_loss"] == pytest.approx(min(seen), rel=1e-4)


@needs_weights
def test_trial_beats_chance_and_saves_best_model_before_each_report(trial_data, tmp_path):
    """MobileNetV2 from the offline ImageNet file learns the demo emotions; model.keras is the best
    model."""
    from fer.data.batches import predict_probs
    from fer.model.build import load_trained_model

    model_file, seen = tmp_path / "model.keras", []

    def on_epoch(record):  # what a scheduler would see if it stopped the trial right now
        seen.append(
            (record["val_loss"], model_file.stat().st_mtime_ns if model_file.exists() else None)
        )

    config = dict(
        backbone="mobilenetv2",
        image_size=48,
        weights=str(MOBILENETV2_FILE),
        bn_epsilon=1e-5,
        epochs_head=5,
        epochs_finetune=1,
        batch_size=16,
        patience=4,
        augment=0.0,
    )
    summary = run_trial(config, trial_data, tmp_path, on_epoch=on_epoch)
    assert summary["val_accuracy"] >= 0.5 and summary["val_macro_f1"] >= 0.4, summary  # chance: 0.2
    best = np.inf
    for i, (val_loss, mtime) in enumerate(seen):
        assert mtime is not None
        improved = val_loss < best
        best = min(best, val_loss)
        if i > 0:
            assert (mtime != seen[i - 1][1]) == improved, (i, seen)
    val = json.loads((tmp_path / "val_metrics.json").read_text())
    assert val["val_loss"] == pytest.approx(best, rel=1e-4)
    # the saved file is exactly the model that was evaluated
    probs = predict_probs(load_trained_model(model_file), trial_data.pixels("val", 48), 16)
    assert np.mean(probs.argmax(axis=1) == trial_data.labels("val")) == pytest.approx(
        val["accuracy"]["value"]
    )


@needs_weights
@pytest.mark.parametrize(
    "backbone,path", [("mobilenetv2", MOBILENETV2_FILE), ("mobilenet025", MOBILENET025_FILE)]
)
def test_weights_from_file_are_really_loaded(trial_data, backbone, path):
    import keras

    from fer.model.build import build_model

    images = trial_data.pixels("val", 32)[:6]

    def features(weights):  # pooled backbone features, called eagerly (no predict-function trace)
        model = build_model(make_config(backbone=backbone, image_size=32, weights=weights), 5)
        pooled = keras.Model(model.input, model.get_layer("head_pool").output)
        return keras.ops.convert_to_numpy(pooled(images.astype("float32"), training=False))

    from_file, random_init = features(str(path)), features("none")
    assert not np.allclose(from_file, random_init, atol=1e-3)
    # informative: they differ between images (random-init MobileNets give ~1e-12 everywhere, BN
    # frozen)
    assert from_file.std(axis=0).mean() > 1e-3 > random_init.std(axis=0).mean()


@pytest.mark.parametrize(
    "backbone,size,blocks,expected,inside,outside",
    [
        (
            "inceptionv3",
            75,
            1,
            22,
            ["mixed10", "mixed9_1"],
            ["mixed9"],
        ),  # mixed9_1 is inside module mixed10
        ("mobilenetv2", 32, 2, 7, ["block_16_project", "Conv_1", "out_relu"], ["block_15_project"]),
        (
            "densenet121",
            32,
            1,
            1,
            ["relu"],
            ["conv5_block16_concat"],
        ),  # top block: bn (frozen) + relu
    ],
)
def test_block_aware_unfreezing_takes_whole_blocks(
    backbone, size, blocks, expected, inside, outside
):
    from fer.model.backbones import get_backbone
    from fer.model.build import backbone_layers, build_model, set_stage

    model = build_model(make_config(backbone=backbone, image_size=size, weights="none"), 5)
    count = set_stage(model, "finetune", blocks, "blocks", get_backbone(backbone))
    trainable = {layer.name for layer in backbone_layers(model) if layer.trainable}
    assert count == len(trainable) == expected
    assert set(inside) <= trainable and not set(outside) & trainable
    assert not any(
        model.get_layer(name).__class__.__name__ == "BatchNormalization" for name in trainable
    )
    assert set_stage(model, "head", blocks, "blocks", get_backbone(backbone)) == 0
    assert not any(layer.trainable for layer in backbone_layers(model))


def test_imagenet_download_failure_names_the_alternatives():
    from fer.model.build import build_model

    try:
        build_model(make_config(backbone="mobilenet025", image_size=32, weights="imagenet"), 5)
    except UserError as exc:
        message = str(exc)
    else:
        pytest.skip(
            "ImageNet weights could be fetched here (online or cached): no failure to check"
        )
    assert "--weights PATH" in message and "weights=none" in message and "\n" not in message


def test_missing_weights_file_is_a_user_error(tmp_path):
    from fer.model.build import build_model

    with pytest.raises(UserError, match="weights file not found"):
        build_model(
            make_config(backbone="mobilenet025", image_size=32, weights=str(tmp_path / "x.h5")), 5
        )
    bad = tmp_path / "bad.weights.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(UserError, match="could not load weights file"):
        build_model(make_config(backbone="mobilenet025", image_size=32, weights=str(bad)), 5)


def test_test_split_untouched_and_runs_repeatable(trial_data, tmp_path):
    """Without evaluate_test the test split's pixel cache is never opened (here it is garbage)."""
    data_dir = tmp_path / "data"
    shutil.copytree(trial_data.dir, data_dir)
    pixel_dir = data_dir / "pixels"
    garbage = {}
    for path in pixel_dir.glob("test_*.npy"):
        path.write_bytes(b"garbage")
        garbage[path.name] = b"garbage"
    assert garbage  # the prepared test cache exists, so it is really made unreadable
    weights = (
        dict(weights=str(MOBILENET025_FILE))
        if MOBILENET025_FILE.is_file()
        else dict(weights="none")
    )
    config = dict(
        backbone="mobilenet025", image_size=48, **weights, **TINY
    )  # the prepared size: no rebuild
    run_trial(config, StudyData(data_dir), tmp_path / "a")
    assert {
        p.name: p.read_bytes() for p in pixel_dir.glob("test_*.npy")
    } == garbage  # none built, none read
    assert not list((tmp_path / "a").glob("test_*"))
    # same config, same seed, untouched copy of the data: the same run, number for number
    run_trial(config, trial_data, tmp_path / "b")
    pd.testing.assert_frame_equal(
        _read_history(tmp_path / "a").drop(columns=["epoch_s", "images_per_s"]),
        _read_history(tmp_path / "b").drop(columns=["epoch_s", "images_per_s"]),
    )


# ---- the command line
# -----------------------------------------------------------------------------------


def _cli(args, cwd=None):
    from click.testing import CliRunner

    from study.cli import main

    runner = CliRunner()
    if cwd is None:
        return runner.invoke(main, args)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(main, args)
    finally:
        os.chdir(old)


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--set", "dropuot=0.5"], "unknown config key 'dropuot'"),
        (["--set", "dropout=lots"], "config key 'dropout': expected float"),
        (["--set", "dropout=1.5"], "config key 'dropout': 1.5 is outside"),
        (["--set", "image_size"], "--set expects key=value"),
        (["--set", "unfreeze_unit=some"], "config key 'unfreeze_unit'"),
        (["--weights", "no/such/file.h5"], "weights file not found"),
    ],
)
def test_cli_bad_options_are_one_line_errors(tmp_path, args, needle):
    result = _cli(["train", str(tmp_path), "--backbone", "mobilenet025", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.output


def test_cli_unknown_backbone_and_missing_folder(tmp_path):
    result = _cli(["train", str(tmp_path), "--backbone", "vgg16"])
    assert result.exit_code == 2 and "unknown backbone 'vgg16'" in result.stderr
    result = _cli(["train", str(tmp_path / "nope"), "--backbone", "mobilenet025"])
    assert result.exit_code == 2 and "not a folder" in result.stderr


def test_cli_train_prepares_a_raw_folder_and_evaluates_test_on_request(demo_data_dir, tmp_path):
    out = tmp_path / "trial"
    args = [
        "train",
        str(demo_data_dir),
        "--backbone",
        "mobilenet025",
        "--set",
        "image_size=32",
        "--set",
        "epochs_head=1",
        "--set",
        "epochs_finetune=1",
        "--set",
        "weights=none",
        "--out",
        str(out),
        "--test",
    ]
    result = _cli(args, cwd=tmp_path)
    assert result.exit_code == 0, result.output + str(result.exception)
    data_dir = tmp_path / "results" / Path(demo_data_dir).name / "data"
    assert (data_dir / "manifest.csv").is_file()  # prepared where the contract says, DATA untouched
    assert "test accuracy" in result.output and "trial folder" in result.output
    test = json.loads((out / "test_metrics.json").read_text())
    predictions = pd.read_csv(out / "test_predictions.csv")
    assert len(predictions) == test["n"] == len(StudyData(data_dir).labels("test"))
    assert {"path", "label", "predicted", "p_happy"} <= set(predictions.columns)


# ---- other backends and process setup (subprocesses: a fresh interpreter each)
# -----------------------------

_JAX_TRIAL = """
import json, sys
from fer.runtime.backend import configure_backend
print(json.dumps(configure_backend(1)))
import keras
from fer.data import StudyData
from fer.train.trial import run_trial
config = dict(backbone="mobilenet025", image_size=32, weights="none", epochs_head=1,
              epochs_finetune=1, batch_size=16, unfreeze_layers=8)
summary = run_trial(config, StudyData(sys.argv[1]), sys.argv[2])
print(json.dumps({"backend": keras.backend.backend(), "epochs": summary["epochs_run"]}))
"""


@pytest.mark.slow
def test_trial_runs_under_jax(trial_data, tmp_path, run_under_jax):
    lines = run_under_jax(_JAX_TRIAL, trial_data.dir, tmp_path, timeout=300)
    assert lines[0] == {"backend": "jax", "threads": 1}
    assert lines[-1] == {"backend": "jax", "epochs": 2}
    assert (tmp_path / "model.keras").is_file() and len(_read_history(tmp_path)) == 2


def test_configure_backend_limits_tensorflow_threads():
    code = (
        "from fer.runtime.backend import configure_backend; import tensorflow as tf; "
        "print(configure_backend()['threads'], "
        "tf.config.threading.get_intra_op_parallelism_threads(), "
        "tf.config.threading.get_inter_op_parallelism_threads())"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", FER_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["1", "1", "1"]
