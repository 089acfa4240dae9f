"""`fer-study` commands: run (see ../shared/DESIGN.md for the contract)."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
