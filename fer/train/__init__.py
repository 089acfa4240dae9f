"""Training one trial: the two-stage recipe (`trial.run_trial`), what each epoch does
(`epoch_monitor`), warm-worker model reuse (`warm`), compiled stages kept between trials
(`stage_programs`), frozen-feature caches (`feature_cache`, with `feature_models` and
`feature_compute`) and collapse detection (`collapse`). Inference (`fer.evaluate`, `fer.deploy`)
never imports this package."""
