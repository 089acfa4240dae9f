"""The study's Ray Tune + Optuna orchestration: `run.run_study` drives a search (`search`), trials
(`trial`), progress and the results ledger (`progress`, `results`), best-trial evaluation (`best`),
the Ray cluster (`cluster`)."""
