"""`fer-study export`: a best model as SavedModel, TFLite or ONNX, checked against the Keras model.

Thin: parse options, call `fer.deploy.export.export_best`, print. Exit 0 when the export agrees with
the Keras model, 1 when it does not (the files stay, for a look), 2 for bad input (one line,
`UserError`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from study.cli import model_path, quiet_backend


@click.command("export")
@click.argument("best_dir", type=click.Path(path_type=str))
@click.option(
    "--format", "fmt", required=True, metavar="FORMAT", help="saved_model, tflite or onnx"
)
@click.option("--quantize", default=None, metavar="KIND", help="tflite only: float16 or int8")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="output folder [default: BEST_DIR/export/FORMAT[-KIND]; for a stored BEST_DIR, in its "
    "local cached copy]",
)
@click.option(
    "--data",
    "data_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="the study's data folder [default: BEST_DIR/../../data; for a stored BEST_DIR, the stored "
    "study's data, downloaded once into the node cache]",
)
def export_command(
    best_dir: str, fmt: str, quantize: str | None, out: Path | None, data_dir: Path | None
) -> None:
    """Export BEST_DIR's model (e.g. results/<study>/best/<backbone>) with its preprocessing inside:
    uint8 RGB images in, class probabilities out, export.json (classes, input size) next to it.

    The export is checked on up to 500 test images of the study: float exports must agree with the
    Keras model to 1e-4 in probability, float16 / int8 ones on the top-1 class for 99% / 97% of the
    images.

    BEST_DIR may be a stored study's URI/<study>/best/<backbone>: it is exported from its local
    cached copy (into that copy unless --out is given), checked on the stored study's test images;
    nothing is written to the storage.
    """
    quiet_backend()
    from fer.deploy.export import export_best, validate_request

    validate_request(fmt, quantize)
    local = model_path(best_dir)
    if data_dir is None and "://" in best_dir:
        from study.storage.readers import local_study_data

        data_dir = local_study_data(best_dir)
        click.echo(f"Test images for the check: the stored study's data, copied to {data_dir}")
    result = export_best(local, fmt, quantize, out, data_dir)
    check = result["check"]
    click.echo(
        f"exported {result['backbone']} as {fmt}{'/' + quantize if quantize else ''}: "
        f"{result['folder']} ({result['size_bytes'] / 1e6:.2f} MB)"
    )
    click.echo(
        f"check on {check['n']} images ({check['images']}): "
        f"max |p - p_keras| {check['max_abs_diff']:.2e}, "
        f"top-1 agreement {check['top1_agreement']:.4f} (needs {check['criterion']}); accuracy "
        f"{check['accuracy_export']:.3f} exported vs {check['accuracy_keras']:.3f} Keras"
    )
    cpu = (result.get("latency") or {}).get("devices", {}).get("cpu")
    if cpu:
        click.echo(
            f"latency (CPU, one image): median {cpu['latency_ms_median']:.2f} ms, "
            f"p90 {cpu['latency_ms_p90']:.2f} ms; "
            f"batch {cpu['batch']}: {cpu['images_per_s']:.0f} images/s"
        )
    if not result["ok"]:
        click.echo(
            f"Error: the export does NOT agree with the Keras model ({check['criterion']} failed)",
            err=True,
        )
        sys.exit(1)


COMMANDS: list[click.Command] = [export_command]
