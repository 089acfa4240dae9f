"""`fer-study train`: one trial end to end, outside Ray, for debugging and timing
(docs/commands.md)."""

from __future__ import annotations

import time
from pathlib import Path

import click

from fer.core import names
from fer.core.errors import UserError
from fer.model.backbones import BACKBONES


def open_or_prepare(
    data_or_study: str | Path, image_size: int, results_root: str | Path = "results"
):
    """A `StudyData` for a study folder (`results/<study>`), its `data/` folder, or a raw class
    folder.

    A raw class folder is prepared once into `<results_root>/<folder name>/data` (DATA itself is
    only read); a later call with the same folder reuses that preparation.
    """
    from fer.data import StudyData
    from fer.prepare import prepare_dataset

    path = Path(data_or_study)
    if not path.is_dir():
        raise UserError(f"not a folder: {path}")
    if names.is_study_folder(path):
        return StudyData(path / names.DATA_DIR), path
    if names.is_prepared_data(path):  # a study's data/, or prepared outside one (`prepare --out`)
        return StudyData(path), path.parent if path.name == names.DATA_DIR else path
    study_dir = Path(results_root) / path.resolve().name
    data_dir = study_dir / names.DATA_DIR
    if names.is_prepared_data(data_dir):  # prepared by an earlier call
        data = StudyData(data_dir)
        if Path(data.source).resolve() != path.resolve():
            raise UserError(
                f"{data_dir} was prepared from {data.source}, not {path}; pass that study "
                "folder, or move it away"
            )
        return data, study_dir
    click.echo(f"preparing {path} into {data_dir} ...", err=True)
    prepare_dataset(path, data_dir, image_size=image_size)
    return StudyData(data_dir), study_dir


@click.command("train")
@click.argument("data_or_study", type=click.Path(path_type=Path))
@click.option("--backbone", "-b", required=True, help=f"one of {', '.join(BACKBONES)}")
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="a trial config key (repeatable), e.g. --set image_size=96 --set epochs_head=3",
)
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="a local backbone weights file (same as --set weights=PATH)",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="trial folder to write [default: <study>/train/<backbone>-<time>]",
)
@click.option(
    "--test",
    "evaluate_test",
    is_flag=True,
    help="also evaluate on the test split (writes test_metrics.json, test_predictions.csv)",
)
@click.option(
    "--threads", type=int, default=None, help="CPU threads for the backend [default: all]"
)
@click.option(
    "--cpu",
    is_flag=True,
    help="train on the CPU even where the machine has a GPU the backend cannot use",
)
def train(data_or_study, backbone, sets, weights, out, evaluate_test, threads, cpu):
    """Train one trial (two stages) on DATA_OR_STUDY: a study folder or a raw class folder (prepared
    first)."""
    from fer.core.config import make_config, parse_set_options

    overrides = parse_set_options(sets)
    if "backbone" in overrides and overrides["backbone"] != backbone:
        raise UserError("give the backbone once: --backbone, not also --set backbone=...")
    overrides["backbone"] = backbone
    if weights is not None:
        if not weights.is_file():
            raise UserError(f"weights file not found: {weights}")
        overrides["weights"] = str(weights.resolve())
    config = make_config(overrides)  # validate before any slow import or preparation

    from fer.core.progress import show_on_terminal
    from fer.runtime.backend import backend_gpu_count, backend_name, configure_backend
    from fer.runtime.devices import check_backend_gpus, system_gpu_count

    configure_backend(threads)
    if not cpu:
        check_backend_gpus(
            system_gpu_count(),
            backend_gpu_count(),
            backend_name(),
            f"this machine has {system_gpu_count()} NVIDIA GPU(s)",
            "pass --cpu",
        )
    show_on_terminal()
    from fer.train.trial import run_trial

    data, study_dir = open_or_prepare(data_or_study, config["image_size"])
    out = out or study_dir / "train" / f"{backbone}-{time.strftime('%Y%m%d-%H%M%S')}"

    def show(record: dict) -> None:
        click.echo(
            f"epoch {record['epoch']:>3} {record['stage']:<8} loss {record['loss']:.4f} "
            f"acc {record['accuracy']:.3f}  val_loss {record['val_loss']:.4f} "
            f"val_acc {record['val_accuracy']:.3f} val_f1 {record['val_macro_f1']:.3f}  "
            f"lr {record['lr']:.2e}  {record['epoch_s']:.1f}s {record['images_per_s']:.1f} img/s"
        )

    summary = run_trial(config, data, out, on_epoch=show, evaluate_test=evaluate_test)
    click.echo(
        f"best epoch {summary['best_epoch']} ({summary['best_stage']}): "
        f"val_loss {summary['val_loss']:.4f} "
        f"val_accuracy {summary['val_accuracy']:.3f} val_macro_f1 {summary['val_macro_f1']:.3f}"
    )
    if evaluate_test:
        click.echo(
            f"test accuracy {summary['test_accuracy']:.3f} "
            f"test_macro_f1 {summary['test_macro_f1']:.3f}"
        )
    click.echo(f"trial folder: {out}")


COMMANDS: list[click.Command] = [train]
