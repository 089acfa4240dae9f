"""`fer-study` commands that use a trained model: predict, evaluate (contract: docs/commands.md).

Thin wrappers: parse options, call `fer.evaluate.predict`, print. Apart from the report commands so
that using a model never loads the report's code; heavy imports stay inside.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from study.cli import model_path, quiet_backend


@click.command("predict")
@click.argument("model", type=click.Path(path_type=str))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path),
    default=None,
    help="write the table as CSV here instead of printing it",
)
@click.option(
    "--gradcam",
    "gradcam_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="save image | Grad-CAM | Grad-CAM++ overlays (predicted class) in this folder",
)
def predict_command(
    model: str, images: tuple[Path, ...], csv_path: Path | None, gradcam_dir: Path | None
) -> None:
    """Predicted emotion and class probabilities for images (files or folders), decoded like
    `prepare`.

    MODEL is a model.keras file, a trial folder (e.g. results/<study>/best/<backbone>), an export
    (`fer-study export`: its folder or model file) or a stored study's URI/<study>/best/<backbone>
    (downloaded once into a local cache).
    """
    quiet_backend()
    local = model_path(model)
    from fer.evaluate.predict import predict_images

    table, skipped = predict_images(local, list(images), gradcam_dir=gradcam_dir)
    if csv_path is not None:
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv_path, index=False)
        click.echo(f"{len(table)} predictions written to {csv_path}")
    else:
        click.echo(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    if skipped:
        click.echo(f"skipped {len(skipped)} file(s) that are not readable images:", err=True)
        for path, reason in skipped:
            click.echo(f"  {path}: {reason}", err=True)
    if gradcam_dir is not None:
        click.echo(f"Grad-CAM overlays: {gradcam_dir}")


@click.command("evaluate")
@click.argument("models", nargs=-1, required=True, type=click.Path(path_type=str))
@click.argument("data", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="metrics JSON (default: results/<study>/evaluations/<backbone>__<data>.json when MODEL "
    "is a local study's best model, ensemble-of-N__<data>.json for several of one study, where "
    "the report finds it; otherwise, a stored model included, printed)",
)
@click.option(
    "--include",
    default=None,
    metavar="REGEX",
    help="evaluate only files whose name matches REGEX "
    "(e.g. '^PrivateTest_' for FER2013's test images)",
)
@click.option(
    "--exclude", default=None, metavar="REGEX", help="skip files whose name matches REGEX"
)
def evaluate_command(
    models: tuple[str, ...], data: Path, out: Path | None, include: str | None, exclude: str | None
) -> None:
    """Full metric set (95% intervals, per class, confusion matrix) of MODEL on another labelled
    DATA folder; with several MODELs, of their ensemble (softmax mean, equal weights), with each
    member on the same images and compared with the ensemble (paired bootstrap, McNemar).

    DATA holds one folder per class, named like the model's classes; other folders are skipped and
    listed. MODEL may be a stored study's URI/<study>/best/<backbone>: its metrics go to --out or
    stdout only, never into the storage or the model's local cache.
    """
    quiet_backend()
    stored = any("://" in m for m in models)
    local = [model_path(m, " (metrics: --out or stdout)" if stored else "") for m in models]
    from fer.evaluate.predict import default_evaluation_path, evaluate_folder

    if len(local) == 1:
        result = evaluate_folder(local[0], data, include=include, exclude=exclude)
    else:
        from fer.evaluate.ensemble_folder import evaluate_ensemble

        result = evaluate_ensemble(local, data, include=include, exclude=exclude)
    if out is None and not stored:
        out = default_evaluation_path(local, data, include, exclude)
    summary = _evaluation_summary(result)
    if out is None:
        click.echo(json.dumps(result, indent=2))
        click.echo(summary, err=True)
        return
    from fer.core.files import write_json

    write_json(out, result)
    click.echo(summary)
    click.echo(f"Written: {out}")


def _evaluation_summary(result: dict) -> str:
    """One line: accuracy with its interval, macro F1, and what was left out or skipped."""
    metrics = result["metrics"]
    summary = (
        f"{result['backbone']} on {result['dataset']}: n={metrics['n']}, "
        f"accuracy {metrics['accuracy']['value']:.3f} "
        f"[{metrics['accuracy']['ci95'][0]:.3f}, {metrics['accuracy']['ci95'][1]:.3f}], "
        f"macro F1 {metrics['macro_f1']['value']:.3f}"
    )
    if result["filtered_out"]:
        summary += f" ({result['filtered_out']} file(s) left out by the file-name filter)"
    if result["skipped_files"] or result["skipped_folders"]:
        summary += (
            f" (skipped {len(result['skipped_files'])} unreadable file(s), "
            f"{len(result['skipped_folders'])} folder(s) not in the model's classes)"
        )
    for pair in result.get("pairs", []):
        member = result["member_metrics"][pair["b"]]["accuracy"]
        summary += (
            f"\n  {pair['b']}: accuracy {member['value']:.3f}; ensemble - {pair['b']} "
            f"{pair['difference']:+.3f} [{pair['ci95'][0]:+.3f}, {pair['ci95'][1]:+.3f}], "
            f"McNemar p = {pair['mcnemar_p']:.3g}"
            + (" (distinguishable)" if pair["distinguishable"] else " (indistinguishable)")
        )
    return summary


COMMANDS: list[click.Command] = [predict_command, evaluate_command]
