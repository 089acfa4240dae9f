"""`fer-study run` (docs/commands.md): a thin click wrapper around
`study.tune.driver.run_study`."""

from __future__ import annotations

import sys

import click


@click.command("run")
@click.argument("data_or_study", type=click.Path(file_okay=False, path_type=str))
@click.option(
    "--space",
    "space_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=str),
    help="search-space YAML (see search_spaces/)",
)
@click.option(
    "--name", default=None, help="study name: results/NAME/ (default: the DATA folder's name)"
)
@click.option(
    "--address",
    default=None,
    help="join an existing Ray cluster ('auto' or 'ray://HOST:10001'); default: start a local Ray",
)
@click.option(
    "--gpus-per-trial",
    type=float,
    default=None,
    help="GPUs per trial, fractions allowed (0.5 = two trials per GPU); default 1 if GPUs exist, "
    "else 0",
)
@click.option(
    "--cpus-per-trial",
    type=float,
    default=1.0,
    show_default=True,
    help="CPUs per trial (also the trial's TensorFlow thread count)",
)
@click.option(
    "--group-regex",
    default=None,
    help="when DATA is prepared here: regex whose first group names the subject (kept in one "
    "split)",
)
@click.option(
    "--resume", is_flag=True, help="continue an interrupted study: finished trials are kept"
)
@click.option(
    "--num-cpus", type=int, default=None, help="CPUs the local Ray may use (default: all)"
)
@click.option(
    "--num-gpus", type=int, default=None, help="GPUs the local Ray may use (default: all it finds)"
)
@click.option(
    "--dashboard/--no-dashboard",
    default=True,
    show_default=True,
    help="local Ray dashboard (127.0.0.1)",
)
@click.option(
    "--results",
    "results_root",
    default="results",
    show_default=True,
    type=click.Path(file_okay=False),
    help="folder that holds study folders",
)
@click.option(
    "--naive-split",
    "naive_split",
    type=int,
    default=0,
    is_flag=False,
    flag_value=5,
    metavar="[SEEDS]",
    help="after the study, retrain each backbone's selected config on a notebook's random split "
    "and on the audited split, SEEDS split seeds each (default 5): "
    "results/<study>/naive_split.json",
)
@click.option(
    "--storage",
    default=None,
    metavar="URI",
    help="the study's home in object storage, for clusters whose nodes share no disk: "
    "s3://bucket/prefix (S3-compatible: ?endpoint_override=HOST:PORT&scheme=http), gs://..., "
    "file:///...; the study lives in URI/<study>/, results/<study>/ is its local mirror; "
    "credentials from the environment only (docs/cluster.md). Resume from any machine: "
    "run URI/<study> --storage URI --resume",
)
@click.option(
    "--max-retries",
    type=int,
    default=2,
    show_default=True,
    help="times a trial whose worker process or node died (an OOM kill, a lost machine) is run "
    "again from scratch; it counts once in its backbone's budget. Errors of the trial itself: "
    "never",
)
@click.option(
    "--reuse-workers/--fresh-workers",
    default=True,
    show_default=True,
    help="warm workers (default): a trial slot keeps its worker process from one trial to the "
    "next (imported Keras, its model reset to its initial weights, its compiled stages), with "
    "Keras' state cleared in between; --fresh-workers: a new process per trial",
)
def run(data_or_study, space_path, **options):
    """Run (or --resume) a study: one Optuna search per backbone on Ray Tune, then each backbone's
    best trial evaluated once on the test split. DATA_OR_STUDY is a class-folder dataset (prepared
    first), a study folder made by `fer-study prepare`, or with --storage URI a stored study
    URI/<study>."""
    from study.tune.driver import StudyIncomplete, StudyOptions, run_study

    # every option above is a StudyOptions field of the same name
    try:
        run_study(data_or_study, space_path, StudyOptions(**options))
    except StudyIncomplete as exc:
        click.echo(f"Interrupted: {exc}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("Interrupted: continue with the same command plus --resume", err=True)
        sys.exit(130)


COMMANDS: list[click.Command] = [run]
