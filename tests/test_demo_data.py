"""The demo dataset: the messes it promises, correct feature boxes, and learnable faces."""

from __future__ import annotations

import csv
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from fer import CLASSES
from fer.data.decode import decode_file
from fer.prepare.demo_data import generate_demo_data
from fer.prepare.demo_faces import REGIONS, random_subject, render_face


def test_demo_data_has_the_promised_messes(demo_data_dir):
    files = [p for p in demo_data_dir.rglob("*") if p.is_file()]
    names = {p.relative_to(demo_data_dir).as_posix() for p in files}
    assert sorted(p.name for p in demo_data_dir.iterdir() if p.is_dir()) == sorted(CLASSES)
    suffixes = {p.suffix for p in files}
    assert {".png", ".jpg", ".webp", ".heic"} <= suffixes
    assert any(n.endswith("_heic.jpg") for n in names)  # HEIC content behind a .jpg name
    assert decode_file(next(p for p in files if p.name.endswith("_heic.jpg"))).format == "HEIF"
    assert sum("download_" in n for n in names) == len(CLASSES)  # exact copies
    assert any("_shifted" in n for n in names) and any("_small" in n for n in names)
    assert any(p.name.startswith(".") for p in files)
    sizes = {Image.open(p).size for p in files if p.suffix in (".png", ".webp")}
    assert len(sizes) >= 4 and any(w != h for w, h in sizes)


def test_demo_regions_cover_every_decodable_image_with_sane_boxes(demo_data_dir):
    boxes = defaultdict(dict)
    with open(demo_data_dir / "demo_regions.csv") as f:
        for row in csv.DictReader(f):
            boxes[row["path"]][row["region"]] = [float(row[k]) for k in ("x0", "y0", "x1", "y1")]
    images = [
        p.relative_to(demo_data_dir).as_posix()
        for p in demo_data_dir.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix != ".csv"
        and "_999" not in p.name
    ]
    assert set(boxes) == set(images)
    for path, regions in boxes.items():
        assert set(regions) == set(REGIONS)
        for x0, y0, x1, y1 in regions.values():
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        mouth, left_eye, left_brow = regions["mouth"], regions["left_eye"], regions["left_brow"]
        assert (
            (mouth[1] + mouth[3])
            > (left_eye[1] + left_eye[3])
            > (left_brow[1] + left_brow[3]) - 0.05
        )


def test_demo_boxes_contain_what_differs_between_expressions():
    """Two renders from the same random state differ only in the expression: mouth, eyes and brows.
    Every changed pixel must lie in a box, and every changed pixel below the eyes in the mouth box.
    """
    subject = random_subject(np.random.default_rng(0))
    for seed in range(3):
        a = render_face("surprise", subject, (160, 128), np.random.default_rng(seed))
        b = render_face("angry", subject, (160, 128), np.random.default_rng(seed))
        assert (
            a.boxes["mouth"] == b.boxes["mouth"]
        )  # brows move with the expression, the mouth box does not
        changed = (
            np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max(axis=2) > 40
        )
        ys, xs = np.nonzero(changed)
        fx, fy = (xs + 0.5) / 160, (ys + 0.5) / 128

        def inside(name, face=a):
            x0, y0, x1, y1 = face.boxes[name]
            return (fx >= x0) & (fx <= x1) & (fy >= y0) & (fy <= y1)

        in_any = np.zeros(len(xs), bool)
        for name in REGIONS:
            in_any |= inside(name, a) | inside(name, b)
        assert len(xs) > 200 and in_any.mean() > 0.97
        below_eyes = fy > max(a.boxes["left_eye"][3], a.boxes["right_eye"][3])
        assert below_eyes.sum() > 50 and inside("mouth")[below_eyes].mean() > 0.97


def test_demo_data_refuses_a_non_empty_folder_and_is_deterministic(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    from fer.core.errors import UserError

    with pytest.raises(UserError, match="not an empty folder"):
        generate_demo_data(tmp_path / "busy", per_class=3)
    generate_demo_data(tmp_path / "a", per_class=3, seed=5)
    generate_demo_data(tmp_path / "b", per_class=3, seed=5)
    a = sorted(
        (p.relative_to(tmp_path / "a"), p.read_bytes())
        for p in (tmp_path / "a").rglob("*")
        if p.is_file() and p.suffix != ".heic" and not p.name.endswith("_heic.jpg")
    )
    b = sorted(
        (p.relative_to(tmp_path / "b"), p.read_bytes())
        for p in (tmp_path / "b").rglob("*")
        if p.is_file() and p.suffix != ".heic" and not p.name.endswith("_heic.jpg")
    )
    assert a == b


def test_cli_demo_data(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "study.cli", "demo-data", str(out), "--per-class", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "fer-study prepare" in proc.stdout
    assert (out / "demo_regions.csv").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "study.cli", "demo-data", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0


def test_demo_faces_are_learnable_by_a_tiny_cnn(prepared_data):
    """A small CNN trained from scratch at 48 px for a few epochs clearly beats chance (0.2) on
    held-out data."""
    import keras

    keras.utils.set_random_seed(0)
    x = prepared_data.pixels("train", 48).astype("float32") / 255.0
    y = prepared_data.labels("train")
    xv = (
        np.concatenate([prepared_data.pixels(s, 48) for s in ("val", "test")]).astype("float32")
        / 255.0
    )
    yv = np.concatenate([prepared_data.labels(s) for s in ("val", "test")])
    model = keras.Sequential(
        [
            keras.Input((48, 48, 3)),
            keras.layers.Conv2D(16, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(32, 3, activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(5, activation="softmax"),
        ]
    )
    model.compile(
        keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"]
    )
    model.fit(x, y, epochs=10, batch_size=16, verbose=0)
    accuracy = model.evaluate(xv, yv, verbose=0)[1]
    print(f"held-out accuracy {accuracy:.3f}")
    assert accuracy >= 0.45, accuracy
