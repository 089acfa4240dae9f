"""Training one trial: the two-stage recipe (`trial.run_trial`), warm-worker model reuse (`warm`),
compiled stages kept between trials (`stage_programs`), frozen-feature caches (`feature_cache`) and
collapse detection (`collapse`). Inference (`fer.evaluate`, `fer.deploy`) never imports this
package."""
