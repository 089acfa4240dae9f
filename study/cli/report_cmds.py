"""`fer-study report` (contract: docs/commands.md): the report of a finished study.

Thin wrapper: parse options, call `study.report.build_report`, print. Heavy imports stay inside.
"""

from __future__ import annotations

from pathlib import Path

import click

from study.cli import quiet_backend


@click.command("report")
@click.argument("results", type=click.Path(path_type=Path))
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
def report_command(results: Path, out: Path | None, gradcam_per_class: int) -> None:
    """Build the report of a finished study in results/<study>/: report.html, report.md,
    comparison.csv."""
    quiet_backend()
    from study.report import build_report

    out_dir = build_report(results, out, gradcam_per_class=gradcam_per_class)
    click.echo(f"Report: {out_dir / 'report.html'}")


COMMANDS: list[click.Command] = [report_command]
