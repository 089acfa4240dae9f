"""The `fer-study` command line: one click group; each command lives in a small module of its own.

User errors (`fer.core.errors.UserError`, click usage errors) end with one line on stderr and exit
status 2. Heavy imports (Keras, Ray) happen inside commands, so `fer-study --help` stays instant.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from fer.core.errors import UserError


class FerGroup(click.Group):
    """A click group that reports `UserError` as one clear line and exit status 2, never a
    traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=FerGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fer-study")
def main() -> None:
    """Honest, distributed model-comparison studies for facial emotion recognition."""


def quiet_backend() -> None:
    """Keep TensorFlow's start-up chatter and repeated warnings off the terminal of commands that
    load models (report, predict, evaluate, export)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    # TensorFlow's Python logger warns about "retracing" when several models (one per backbone,
    # Grad-CAM) predict in one process: expected here, and it floods the terminal
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


def _register() -> None:
    # last in this module: the command modules import `quiet_backend` from it
    from study.cli import data_cmds, export_cmd, inference_cmds, report_cmds, run_cmd, train_cmd

    for module in (data_cmds, train_cmd, run_cmd, report_cmds, inference_cmds, export_cmd):
        for command in module.COMMANDS:
            main.add_command(command)


_register()

if __name__ == "__main__":
    main()
