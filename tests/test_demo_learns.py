"""The demo's settings learn the demo faces: each backbone of search_spaces/smoke.yaml, with the space's fixed
settings and its start point, trained on the small shared demo data (30 faces per class, 48 px), clearly beats
chance (0.2) on validation faces of subjects it never saw. A small version of `bash scripts/demo.sh`, so a
change to the generator, the backbones or the smoke space that stops the demo from learning fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

from fer.training import run_trial
from study.space import load_space

SMOKE = Path(__file__).resolve().parents[1] / "search_spaces" / "smoke.yaml"
SPACE = load_space(SMOKE)


@pytest.mark.parametrize("backbone", SPACE.backbones)
def test_smoke_space_learns_the_demo_faces(backbone, prepared_data, tmp_path):
    config = {**SPACE.fixed, **SPACE.start_points[0], "backbone": backbone, "epochs_finetune": 10}
    summary = run_trial(config, prepared_data, tmp_path)
    print(f"{backbone}: val accuracy {summary['val_accuracy']:.3f} after {summary['epochs_run']} epochs, "
          f"{summary['train_s']:.1f} s")
    assert summary["val_accuracy"] >= 0.5, summary
