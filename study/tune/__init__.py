"""The study's Ray Tune + Optuna orchestration: `driver.run_study` drives it top-down; `options`
(the typed objects it runs with), `record` (study.json), `tuner` (the Tune run) with `search`
(searcher, scheduler), `trainable` (the trial worker), `callback`, `outcome`, `progress_view` and
`ledger` (each trial's outcome, trials.csv); after the search `best` with `evaluator` (test split),
`naive_split`; `cluster` (Ray)."""
