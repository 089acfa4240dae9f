"""`fer-study report` (contract: docs/commands.md): the report of a finished study.

Thin wrapper: parse options, call `study.report.build_report`, print. Heavy imports stay inside.
"""

from __future__ import annotations

from pathlib import Path

import click

from study.cli import quiet_backend


@click.command("report")
@click.argument("results", type=click.Path(path_type=str))
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="output folder (default: reports/<study>/)",
)
@click.option(
    "--gradcam-per-class",
    type=int,
    default=2,
    show_default=True,
    help="correct and incorrect test images per class in the Grad-CAM appendix (0: no appendix)",
)
@click.option(
    "--results",
    "results_root",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="folder that holds study folders: a stored study (RESULTS given as URI/<study>) is "
    "mirrored into its <study>/",
)
def report_command(
    results: str, out: Path | None, gradcam_per_class: int, results_root: Path
) -> None:
    """Build the report of a finished study in results/<study>/: report.html, report.md,
    comparison.csv. RESULTS may be a stored study, URI/<study> (`run --storage URI`): it is first
    mirrored into results/<study>/ (only what changed is downloaded), and the report built from
    there."""
    quiet_backend()
    folder = Path(results)
    if "://" in results:  # study.storage.location.is_storage_uri, without importing pyarrow
        from study.storage.readers import mirror_study

        folder, pulled = mirror_study(results, results_root)
        if pulled:
            click.echo(f"Mirror of {results}: {folder}")
        else:
            click.echo(
                f"A driver holds {results} (its lease is in the storage): reporting from {folder} "
                "as it is, without pulling into it (an empty --results folder gets a fresh copy)"
            )
    from study.report import build_report

    out_dir = build_report(folder, out, gradcam_per_class=gradcam_per_class)
    click.echo(f"Report: {out_dir / 'report.html'}")


COMMANDS: list[click.Command] = [report_command]
