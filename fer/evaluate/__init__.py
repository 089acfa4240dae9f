"""Evaluating trained models: metrics with bootstrap intervals (`metrics`), paired comparison of two
models (`compare`), a split of the study's data (`on_split`) and images or folders outside it
(`predict`)."""
