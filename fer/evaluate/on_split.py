"""Evaluating a trained model on one split of the study's data: the test evaluation of a best trial,
or a trial's own with `evaluate_test`. Here, not in training, so the evaluator needs no training
code."""

from __future__ import annotations

from pathlib import Path

import keras

from fer.core.errors import UserError
from fer.core.files import write_json
from fer.core.names import metrics_file, predictions_file
from fer.data.batches import predict_probs
from fer.evaluate.metrics import classification_metrics, predictions_table


def evaluate_split(model: keras.Model, study_data, split: str, config: dict, out_dir: Path) -> dict:
    """Metrics and per-image predictions of `model` on one split; writes
    <split>_metrics.json/_predictions.csv. With the trial's `tta_flip` the predictions average each
    image and its mirror, as the trial's per-epoch validation did (fer.train.epoch_monitor), so the
    test split sees the predictor that validation selected."""
    pixels, labels = study_data.pixels(split, config["image_size"]), study_data.labels(split)
    if len(labels) == 0:
        raise UserError(f"the {split} split is empty: nothing to evaluate")
    probs = predict_probs(model, pixels, config["batch_size"], tta_flip=bool(config["tta_flip"]))
    classes = list(study_data.classes)
    metrics = classification_metrics(labels, probs, classes, seed=config["seed"])
    write_json(out_dir / metrics_file(split), metrics)
    predictions_table(study_data.paths(split), labels, probs, classes).to_csv(
        out_dir / predictions_file(split), index=False
    )
    return {
        f"{split}_accuracy": metrics["accuracy"]["value"],
        f"{split}_macro_f1": metrics["macro_f1"]["value"],
    }
