"""`fer-study` commands: data (contract: docs/commands.md): `demo-data` and `prepare`."""

from __future__ import annotations

from pathlib import Path

import click

from fer.core.config import PARAMS

COMMANDS: list[click.Command] = []


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--per-class", default=200, show_default=True, help="clean images per class (messes are added)"
)
@click.option("--seed", default=0, show_default=True)
def demo_data(out: Path, per_class: int, seed: int) -> None:
    """Generate a small, learnable synthetic 5-class face dataset (with real-world messes) in
    OUT."""
    from fer.prepare.demo_data import GROUP_REGEX, generate_demo_data

    info = generate_demo_data(out, per_class=per_class, seed=seed)
    click.echo(
        f"wrote {info['files']} files ({info['classes']} classes x {per_class} faces of "
        f"{info['subjects']} subjects, plus duplicates, HEIC, a corrupt and a hidden file) to {out}"
    )
    click.echo(f"next: fer-study prepare {out} --group-regex '{GROUP_REGEX}'")


@click.command("prepare")
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--study", default=None, help="study name (default: DATA's folder name)")
@click.option(
    "--results",
    "results_dir",
    default="results",
    show_default=True,
    type=click.Path(path_type=Path),
    help="results folder; output goes to RESULTS/<study>/data",
)
@click.option(
    "--group-regex",
    default=None,
    help=r"regex whose first group is a subject id kept in one split, searched in the file name, "
    r"then in the path below the class folder, e.g. '^(S\d+)_'",
)
@click.option(
    "--split", "split", default="0.7,0.15,0.15", show_default=True, help="train,val,test fractions"
)
@click.option(
    "--predefined",
    default=None,
    help="use the dataset's own split: 'train=RE,val=RE,test=RE' on file names, "
    "or a CSV of path,split",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--image-size",
    default=PARAMS["image_size"].default,
    show_default=True,
    help="size of the decoded-pixel cache (the trial config's image_size range)",
)
@click.option(
    "--classes", default=None, help="expected class folders, comma-separated (others are reported)"
)
@click.option(
    "--keep-duplicates", is_flag=True, help="keep every copy in a duplicate cluster (same split)"
)
@click.option(
    "--workers",
    default=None,
    type=int,
    help="decoding processes (default: up to 2; 0 = in-process)",
)
def prepare(
    data: Path,
    study: str | None,
    results_dir: Path,
    group_regex: str | None,
    split: str,
    predefined: str | None,
    seed: int,
    image_size: int,
    classes: str | None,
    keep_duplicates: bool,
    workers: int | None,
) -> None:
    """Scan, decode, de-duplicate and split DATA (class folders) into RESULTS/<study>/data. DATA is
    read only."""
    from fer.prepare import prepare_dataset

    name = study or data.absolute().name
    prepare_dataset(
        data,
        results_dir / name / "data",
        group_regex=group_regex,
        split=split,
        seed=seed,
        image_size=image_size,
        predefined=predefined,
        classes=[c.strip() for c in classes.split(",")] if classes else None,
        keep_duplicates=keep_duplicates,
        workers=workers,
        log=click.echo,
    )


COMMANDS.extend([demo_data, prepare])
