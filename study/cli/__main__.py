"""`python3 -m study.cli ...`: the same command line as the `fer-study` entry point."""

from study.cli import main

if (
    __name__ == "__main__"
):  # spawned worker processes re-import this module; only the parent runs the CLI
    main()
