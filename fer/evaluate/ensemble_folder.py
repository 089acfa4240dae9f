"""Several trained models as one: their softmax outputs averaged on a labelled folder (behind
`fer-study evaluate MODEL MODEL ... DATA`).

Why: the report's ensemble row is on the images `prepare` kept in the test split; a figure that is
comparable with published ones (FER2013's 2,908 PrivateTest images, duplicates included) or with
another dataset needs the same ensemble applied to a folder. Equal weights, every member predicting
as it does alone (its own input size, its own `tta_flip`), so the ensemble selects nothing on the
data it is scored on. Each member's accuracy on the same images and the paired comparison with the
ensemble (paired bootstrap, McNemar's exact test: `fer.evaluate.compare`) come with it, because "is
the ensemble better than its best member" is the question a reader asks next.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fer.core.errors import UserError
from fer.evaluate.compare import compare_paired
from fer.evaluate.predict import (
    check_evaluation_inputs,
    labelled_inputs,
    load_for_prediction,
)


def ensemble_name(n_members: int) -> str:
    """The ensemble's name in results and reports (the report's ensemble row uses it too)."""
    return f"ensemble of {n_members}"


def _member_names(backbones: list[str | None], paths: list[str]) -> list[str]:
    """Backbone names, with the model's path where two members share a backbone."""
    names = [b or Path(p).name for b, p in zip(backbones, paths)]
    return [n if names.count(n) == 1 else f"{n} ({p})" for n, p in zip(names, paths)]


def evaluate_ensemble(
    model_paths: list[str | Path],
    data_dir: str | Path,
    batch_size: int = 32,
    n_boot: int = 1000,
    include: str | None = None,
    exclude: str | None = None,
) -> dict:
    """The full metric set of the members' mean softmax on a labelled class-folder dataset, each
    member's metrics on the same images, and the ensemble compared with each member (paired).

    The members must predict the same classes in the same order (a model of another study's
    classes is a clear error, not a silently shuffled average).
    """
    paths = [str(p) for p in model_paths]
    if len(paths) < 2:
        raise UserError("an ensemble needs at least two models")
    data_dir = Path(data_dir)
    check_evaluation_inputs(data_dir, include, exclude)
    loaded = [load_for_prediction(p) for p in paths]
    classes = loaded[0][1]
    for path, (_, other, *_) in zip(paths[1:], loaded[1:]):
        if list(other) != list(classes):
            raise UserError(
                f"{path} predicts {', '.join(other)}; {paths[0]} predicts {', '.join(classes)}: "
                "an ensemble needs models of the same classes in the same order"
            )
    inputs = labelled_inputs(data_dir, classes, include, exclude)
    images = inputs.decode(data_dir, sorted({size for _, _, size, _, _ in loaded}))
    y_true = images.y_true
    member_probs = [predict(images.pixels[size], batch_size) for predict, _, size, _, _ in loaded]
    probs = np.mean(member_probs, axis=0)

    from fer.evaluate.metrics import classification_metrics

    members = _member_names([backbone for *_, backbone, _ in loaded], paths)
    name = ensemble_name(len(members))
    predicted = probs.argmax(axis=1)
    return {
        **inputs.describe(data_dir, include, exclude),
        "model": paths,
        "backbone": name,
        "members": members,
        "skipped_files": images.skipped_files,
        "metrics": classification_metrics(y_true, probs, classes, n_boot=n_boot),
        "member_metrics": {
            m: classification_metrics(y_true, p, classes, n_boot=n_boot)
            for m, p in zip(members, member_probs)
        },
        "pairs": [
            {"a": name, "b": m, **compare_paired(y_true, predicted, p.argmax(axis=1))}
            for m, p in zip(members, member_probs)
        ],
    }
