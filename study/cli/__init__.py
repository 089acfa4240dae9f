"""The `fer-study` command line: one click group; each command lives in a small module of its own.

User errors (`fer.core.errors.UserError`, click usage errors) end with one line on stderr and exit
status 2. Heavy imports (Keras, Ray) happen inside commands, so `fer-study --help` stays instant,
and a command's module is imported only when that command runs (or help lists it): `fer-study
predict` loads none of the others.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

import click

from fer.core.errors import UserError

# every command, and the module of study/cli that defines it (in its COMMANDS list)
COMMAND_MODULES = {
    "demo-data": "data_cmds",
    "prepare": "data_cmds",
    "train": "train_cmd",
    "run": "run_cmd",
    "report": "report_cmds",
    "predict": "inference_cmds",
    "evaluate": "inference_cmds",
    "export": "export_cmd",
}


class FerGroup(click.Group):
    """A click group that reports `UserError` as one clear line and exit status 2, never a
    traceback, and imports a command's module only when the command is wanted."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMAND_MODULES)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in COMMAND_MODULES:
            return None
        module = importlib.import_module(f"study.cli.{COMMAND_MODULES[name]}")
        return next(command for command in module.COMMANDS if command.name == name)

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


def model_path(model: str, uri_note: str = "") -> Path:
    """MODEL as a local path: itself, or for a stored model (`URI/<study>/best/<backbone>`, or its
    model.keras) its cached local copy (study.storage.readers), announced on stderr so stdout stays
    the command's output. Storage code is imported only for a URI: a local predict never loads it.
    """
    if "://" not in model:  # study.storage.location.is_storage_uri, without importing pyarrow
        return Path(model)
    from study.storage.readers import local_model

    local = local_model(model)
    click.echo(f"Stored model {model}: local copy {local}{uri_note}", err=True)
    return local


if __name__ == "__main__":
    main()
