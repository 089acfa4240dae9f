"""study: the fer-study product layer (search spaces, Ray Tune orchestration, CLI, report).

Only this package imports Ray; `fer/` stays importable and runnable without it.
"""
