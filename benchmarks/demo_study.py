"""The small demo study that the study benchmarks run (study_overhead.py, worker_memory.py): demo
faces prepared into a study folder and a one-backbone space that searches only the dropout, so
trials differ in nothing that changes their cost."""

from __future__ import annotations

from pathlib import Path


def demo_study(
    tmp: Path, name: str, backbone: str, image_size: int, per_class: int, trials: int, **fixed
):
    """Prepare `per_class` demo images per class into `tmp/results/<name>/data` and write
    `tmp/space.yaml` (weights none, batch 16, no augmentation, no scheduler, `fixed` on top).
    Returns (study folder, space)."""
    import yaml

    from fer.prepare import prepare_dataset
    from fer.prepare.demo_data import generate_demo_data

    generate_demo_data(tmp / "demo", per_class=per_class, seed=0)
    study = tmp / "results" / name
    prepare_dataset(
        tmp / "demo",
        study / "data",
        group_regex=r"^(S\d+)_",
        image_size=image_size,
        log=lambda *a, **k: None,
    )
    space = {
        "name": name,
        "backbones": [backbone],
        "trials_per_backbone": trials,
        "scheduler": {"type": "none"},
        "fixed": {
            "image_size": image_size,
            "weights": "none",
            "batch_size": 16,
            "augment": 0.0,
            **fixed,
        },
        "space": {"dropout": {"uniform": [0.1, 0.6]}},
    }
    (tmp / "space.yaml").write_text(yaml.safe_dump(space))
    return study, tmp / "space.yaml"
