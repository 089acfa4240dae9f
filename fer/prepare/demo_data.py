"""The synthetic demo dataset: procedural faces (demo_faces.py) in a folder as messy as a real one.

It is fer-study's embedded default data and the test suite's data, so it must be (1) learnable by a
tiny CNN at 48 px within a few epochs (the faces' cues are bold and consistent per emotion), and (2)
as messy as a real folder: HEIC files (one of them named .jpg), PNG/JPEG/WebP mixed, varied sizes
and aspect ratios, exact and near duplicates (re-encoded, resized, shifted copies), a truncated
file, a hidden file, and subject ids in file names (`S07_happy_012.png`; group with
`--group-regex '^(S\\d+)_'`).

`demo_regions.csv` gives the mouth, eye and brow boxes as fractions of every saved image (duplicates
included), for the Grad-CAM faithfulness test.
"""

from __future__ import annotations

import csv
import io
import shutil
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image

from fer import CLASSES
from fer.core.errors import UserError
from fer.prepare.demo_faces import REGIONS, Face, clip_box, random_subject, render_face

GROUP_REGEX = r"^(S\d+)_"


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    if fmt == "heic":
        pillow_heif.from_pillow(img).save(path, quality=85)
    elif fmt == "jpg":
        img.save(path, format="JPEG", quality=92)
    elif fmt == "webp":
        img.save(path, format="WEBP", quality=90)
    else:
        img.save(path, format="PNG")


def _image_size(rng: np.random.Generator) -> tuple[int, int]:
    side = int(rng.choice([64, 96, 128, 160, 200]))
    aspect = float(rng.choice([1.0, 1.0, 0.8, 1.25]))
    return side, int(round(side * aspect))


def generate_demo_data(out, per_class: int = 200, seed: int = 0) -> dict:
    """Write the demo dataset to `out` (class folders + `demo_regions.csv`); return counts of what
    was made.

    `out` must not exist or be empty, so a typo never mixes demo faces into a real dataset.
    """
    out = Path(out)
    if per_class < 3:
        raise UserError(
            f"--per-class must be at least 3 (got {per_class}): every class needs images for "
            "train, val and test"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(
            f"{out} exists and is not an empty folder; demo-data writes only into a new folder"
        )
    rng = np.random.default_rng(seed)
    n_subjects = max(8, per_class // 4)
    subjects = [random_subject(np.random.default_rng([seed, 1000 + i])) for i in range(n_subjects)]
    formats = ["png", "jpg", "webp", "png", "jpg", "heic", "png", "jpg"]
    regions: list[tuple[str, dict]] = []
    made: dict[str, list[tuple[Path, Face]]] = {}
    for emotion in CLASSES:
        (out / emotion).mkdir(parents=True, exist_ok=True)
        made[emotion] = []
        for k in range(per_class):
            sid = k % n_subjects
            face = render_face(emotion, subjects[sid], _image_size(rng), rng)
            fmt = formats[int(rng.integers(len(formats)))]
            path = out / emotion / f"S{sid + 1:02d}_{emotion}_{k:03d}.{fmt}"
            _save(face.image, path, fmt)
            regions.append((path.relative_to(out).as_posix(), face.boxes))
            made[emotion].append((path, face))
        _add_messes(out, emotion, made[emotion], regions)
    (out / "happy" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    _write_regions(out / "demo_regions.csv", regions)
    return {
        "classes": len(CLASSES),
        "per_class": per_class,
        "subjects": n_subjects,
        "files": sum(1 for p in out.rglob("*") if p.is_file()),
    }


def _add_messes(out: Path, emotion: str, files: list[tuple[Path, Face]], regions) -> None:
    """Duplicates, a HEIC named .jpg and a truncated file, spread over the classes."""
    src, face0 = files[0]
    i = CLASSES.index(emotion)
    boxes = face0.boxes
    # an exact byte copy under a scraped-looking name (no subject id: only the duplicate finder
    # groups it)
    copy = out / emotion / f"download_{i}{src.suffix}"
    shutil.copyfile(src, copy)
    regions.append((copy.relative_to(out).as_posix(), boxes))
    if emotion in ("happy", "sad", "angry"):  # re-encoded as a lower-quality JPEG
        p = out / emotion / f"{src.stem}_reencoded.jpg"
        face0.image.save(p, format="JPEG", quality=55)
        regions.append((p.relative_to(out).as_posix(), boxes))
    if emotion in ("fear", "surprise", "happy"):  # resized to 70 %: same fractions
        p = out / emotion / f"{src.stem}_small.png"
        w, h = face0.image.size
        face0.image.resize((int(w * 0.7), int(h * 0.7)), Image.LANCZOS).save(p)
        regions.append((p.relative_to(out).as_posix(), boxes))
    if emotion in ("sad", "angry", "surprise"):  # shifted right and down by 1 % (edges replicated)
        p = out / emotion / f"{src.stem}_shifted.png"
        arr = np.asarray(face0.image)
        h, w = arr.shape[:2]
        dx, dy = max(1, round(0.01 * w)), max(1, round(0.01 * h))
        shifted = np.pad(arr, ((dy, 0), (dx, 0), (0, 0)), mode="edge")[:h, :w]
        Image.fromarray(shifted).save(p)
        regions.append(
            (
                p.relative_to(out).as_posix(),
                {
                    k: clip_box((b[0] + dx / w, b[1] + dy / h, b[2] + dx / w, b[3] + dy / h))
                    for k, b in boxes.items()
                },
            )
        )
    if emotion == "fear":  # HEIC content behind a .jpg name: content sniffing must still read it
        path1, face1 = files[1]
        p = out / emotion / f"{path1.stem}_heic.jpg"
        buf = io.BytesIO()
        pillow_heif.from_pillow(face1.image).save(buf, quality=85)
        p.write_bytes(buf.getvalue())
        regions.append((p.relative_to(out).as_posix(), face1.boxes))
    if emotion == "sad":  # a truncated JPEG
        buf = io.BytesIO()
        face0.image.save(buf, format="JPEG", quality=90)
        data = buf.getvalue()
        (out / emotion / "S02_sad_999.jpg").write_bytes(data[: len(data) * 2 // 3])


def _write_regions(path: Path, regions) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "region", "x0", "y0", "x1", "y1"])
        for rel, boxes in regions:
            for name in REGIONS:
                w.writerow([rel, name, *(f"{v:.4f}" for v in boxes[name])])
