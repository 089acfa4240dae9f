"""One synthetic face: a procedural drawing whose mouth, eyes and brows encode five emotions.

The cues are bold and consistent per emotion, so a tiny CNN at 48 px learns them within a few
epochs (the demo dataset, demo_data.py, is built from these faces). Each subject has a fixed
identity (skin, face shape, eye spacing, hair); each image varies pose (rotation), size, position,
background, lighting and noise. `render_face` also returns the mouth, eye and brow boxes, for the
Grad-CAM faithfulness test.

| emotion  | mouth                   | eyes          | brows                      |
|----------|-------------------------|---------------|----------------------------|
| angry    | flat, tight, thick line | narrow        | low, slanted down to centre |
| fear     | wide open, short oval   | wide          | raised, inner ends up      |
| happy    | big smile (U)           | normal        | relaxed, level             |
| sad      | frown (inverted U)      | half-closed   | inner ends raised          |
| surprise | tall open O             | wide          | high, arched               |
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SUPERSAMPLE = 2
REGIONS = ("mouth", "left_eye", "right_eye", "left_brow", "right_brow")


# Per emotion: eye openness (fraction of face radius), brow height and inner-end offset (+ = lower),
# brow arch, and the mouth shape.
_EXPRESSIONS = {
    "angry": dict(eye_open=0.05, brow_y=-0.42, brow_inner=0.16, mouth="flat"),
    "fear": dict(eye_open=0.20, brow_y=-0.62, brow_inner=-0.12, mouth="wide_open"),
    "happy": dict(eye_open=0.11, brow_y=-0.52, brow_inner=0.0, mouth="smile"),
    "sad": dict(eye_open=0.07, brow_y=-0.50, brow_inner=-0.14, mouth="frown"),
    "surprise": dict(eye_open=0.22, brow_y=-0.70, brow_inner=0.0, mouth="o"),
}


# Each face shows its emotion at a random intensity in INTENSITY: eyes and brows move that far from
# NEUTRAL towards the emotion's values and open mouths and mouth curves scale with it. Weak
# expressions are what makes the data learnable but not trivial (a tiny CNN at 48 px needs a few
# hundred faces, not a few dozen).
INTENSITY = (0.45, 1.0)
NEUTRAL = dict(eye_open=0.11, brow_y=-0.52, brow_inner=0.0)


def _expression(emotion: str, intensity: float) -> dict:
    e = dict(_EXPRESSIONS[emotion])
    for key, neutral in NEUTRAL.items():
        e[key] = neutral + intensity * (e[key] - neutral)
    e["mouth_open"] = 0.3 + 0.7 * intensity
    return e


@dataclasses.dataclass(frozen=True)
class Subject:
    skin: tuple[int, int, int]
    brow: tuple[int, int, int]
    iris: tuple[int, int, int]
    face_aspect: float  # face height / width
    eye_spacing: float  # eye centre distance from the middle, as a fraction of the face radius


def random_subject(rng: np.random.Generator) -> Subject:
    tone = rng.uniform(0.35, 1.0)
    skin = tuple(
        int(c) for c in (np.array([235, 200, 170]) * tone + np.array([15, 10, 5]) * (1 - tone))
    )
    brow = tuple(int(c) for c in rng.integers(10, 90, 3))
    iris = tuple(int(c) for c in rng.integers(20, 140, 3))
    return Subject(skin, brow, iris, float(rng.uniform(1.15, 1.35)), float(rng.uniform(0.34, 0.42)))


@dataclasses.dataclass
class Face:
    image: Image.Image
    boxes: dict[str, tuple[float, float, float, float]]  # fractions of width/height


def _rotate_box(box, centre, angle_deg):
    """Bounding box of `box` after Pillow's counter-clockwise `rotate(angle_deg, center=centre)`."""
    x0, y0, x1, y1 = box
    cx, cy = centre
    t = math.radians(angle_deg)
    xs, ys = [], []
    for x, y in ((x0, y0), (x1, y0), (x0, y1), (x1, y1)):
        dx, dy = x - cx, y - cy
        xs.append(cx + dx * math.cos(t) + dy * math.sin(t))
        ys.append(cy - dx * math.sin(t) + dy * math.cos(t))
    return min(xs), min(ys), max(xs), max(ys)


@dataclasses.dataclass(frozen=True)
class _Head:
    """Where the face is drawn, in supersampled pixels."""

    cx: float
    cy: float
    r: float  # face half-width
    fh: float  # face half-height
    lw: int  # stroke width of brows and eyes


_DARK = (25, 15, 15)
_MOUTH_INK = (70, 8, 12)


def render_face(
    emotion: str, subject: Subject, size: tuple[int, int], rng: np.random.Generator
) -> Face:
    """Draw one face; return the image and its feature boxes (fractions of the image).

    The steps draw from `rng` in a fixed order (the demo data must not change from run to run or
    with a refactor), so they run in this order only."""
    w, h = size
    W, H = w * SUPERSAMPLE, h * SUPERSAMPLE
    img, bg = _background(W, H, rng)
    d = ImageDraw.Draw(img)
    head = _place_head(W, H, subject, rng)
    e = _expression(emotion, float(rng.uniform(*INTENSITY)))
    _draw_head(d, head, subject, rng)
    boxes = _draw_eyes_and_brows(d, head, subject, e, emotion)
    boxes["mouth"] = _draw_mouth(d, head, e)
    img, boxes = _pose_and_light(img, boxes, head, bg, size, rng)
    fractions = {k: clip_box((b[0] / W, b[1] / H, b[2] / W, b[3] / H)) for k, b in boxes.items()}
    return Face(img, fractions)


def _background(W: int, H: int, rng: np.random.Generator) -> tuple[Image.Image, tuple]:
    """A plain colour with muted clutter shapes, so no two photos share a layout."""
    bg = tuple(int(c) for c in rng.integers(30, 226, 3))
    img = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = rng.uniform(-0.3, 1.0, 2) * (W, H)
        ww, hh = rng.uniform(0.2, 0.7, 2) * (W, H)
        shape = d.ellipse if rng.random() < 0.5 else d.rectangle
        # muted: faces stand out
        tint = (np.array(bg) * 0.5 + rng.integers(0, 256, 3) * 0.5).astype(int)
        shape((x0, y0, x0 + ww, y0 + hh), fill=tuple(int(c) for c in tint))
    return img, bg


def _place_head(W: int, H: int, subject: Subject, rng: np.random.Generator) -> _Head:
    # face half-width: faces fill the frame, as in cropped datasets
    r = min(W, H) * rng.uniform(0.38, 0.44)
    cx = W / 2 + rng.uniform(-0.06, 0.06) * W
    cy = H / 2 + rng.uniform(-0.03, 0.06) * H
    return _Head(cx, cy, r, fh=r * subject.face_aspect, lw=max(2, int(0.14 * r)))


def _draw_head(d: ImageDraw.ImageDraw, head: _Head, subject: Subject, rng) -> None:
    """Hair (style and colour change per photo), then the face."""
    cx, cy, r, fh = head.cx, head.cy, head.r, head.fh
    hair = tuple(int(c) for c in rng.integers(10, 200, 3))
    hair_low = rng.uniform(-0.45, 0.05)
    d.ellipse(
        (
            cx - r * rng.uniform(1.0, 1.15),
            cy - fh * rng.uniform(1.05, 1.2),
            cx + r * rng.uniform(1.0, 1.15),
            cy + fh * hair_low,
        ),
        fill=hair,
    )
    d.ellipse((cx - r, cy - fh, cx + r, cy + fh), fill=subject.skin)


def _draw_eyes_and_brows(
    d: ImageDraw.ImageDraw, head: _Head, subject: Subject, e: dict, emotion: str
) -> dict[str, tuple[float, float, float, float]]:
    """Both eyes and brows as the expression `e` sets them; returns their boxes."""
    cx, cy, r, lw = head.cx, head.cy, head.r, head.lw
    boxes: dict[str, tuple[float, float, float, float]] = {}
    eye_y = cy - 0.22 * r
    for side, name in ((-1, "left"), (1, "right")):
        ex = cx + side * subject.eye_spacing * r
        ew, eh = 0.2 * r, e["eye_open"] * r * 1.2
        d.ellipse(
            (ex - ew, eye_y - eh, ex + ew, eye_y + eh),
            fill=(250, 250, 250),
            outline=_DARK,
            width=max(1, lw // 2),
        )
        pr = min(0.08 * r, eh * 0.9)
        d.ellipse((ex - pr, eye_y - pr, ex + pr, eye_y + pr), fill=subject.iris)
        boxes[f"{name}_eye"] = (ex - 0.24 * r, eye_y - 0.26 * r, ex + 0.24 * r, eye_y + 0.26 * r)

        by = cy + e["brow_y"] * r
        inner = (cx + side * 0.12 * r, by + e["brow_inner"] * r)
        outer = (cx + side * 0.55 * r, by - 0.3 * e["brow_inner"] * r)
        if emotion == "surprise":  # arched
            mid = (cx + side * 0.33 * r, by - 0.08 * r)
            d.line([inner, mid, outer], fill=subject.brow, width=lw, joint="curve")
        else:
            d.line([inner, outer], fill=subject.brow, width=lw)
        xs = (inner[0], outer[0])
        boxes[f"{name}_brow"] = (
            min(xs) - 0.06 * r,
            by - 0.2 * r,
            max(xs) + 0.06 * r,
            by + 0.24 * r,
        )
    return boxes


def _draw_mouth(d: ImageDraw.ImageDraw, head: _Head, e: dict) -> tuple[float, float, float, float]:
    """The mouth shape of the expression, scaled by its intensity; returns the mouth box."""
    cx, r = head.cx, head.r
    my = head.cy + 0.52 * r
    mw = 0.48 * r
    shape = e["mouth"]
    mlw = int(head.lw * 1.5)
    k = e["mouth_open"]  # a weaker expression: a flatter smile or frown, a smaller open mouth
    if shape == "smile":
        d.arc(
            (cx - mw, my - 0.06 * r - 0.26 * r * k, cx + mw, my - 0.06 * r + 0.26 * r * k),
            10,
            170,
            fill=_MOUTH_INK,
            width=mlw,
        )
    elif shape == "frown":
        d.arc(
            (cx - mw, my + 0.2 * r - 0.22 * r * k, cx + mw, my + 0.2 * r + 0.22 * r * k),
            195,
            345,
            fill=_MOUTH_INK,
            width=mlw,
        )
    elif shape == "flat":
        d.line([(cx - mw * 0.8, my), (cx + mw * 0.8, my)], fill=_MOUTH_INK, width=mlw)
    elif shape == "o":
        d.ellipse(
            (
                cx - 0.2 * r,
                my + 0.02 * r - 0.24 * r * k,
                cx + 0.2 * r,
                my + 0.02 * r + 0.24 * r * k,
            ),
            fill=_MOUTH_INK,
        )
    else:  # wide_open
        d.ellipse(
            (cx - mw, my + 0.02 * r - 0.12 * r * k, cx + mw, my + 0.02 * r + 0.12 * r * k),
            fill=_MOUTH_INK,
        )
        d.rectangle(
            (cx - mw * 0.7, my - 0.08 * r * k, cx + mw * 0.7, my - 0.02 * r * k),
            fill=(245, 245, 240),
        )
    return (cx - 0.5 * r, my - 0.3 * r, cx + 0.5 * r, my + 0.32 * r)


def _pose_and_light(img: Image.Image, boxes: dict, head: _Head, bg, size, rng):
    """The photo around the drawing: head rotation, uneven light, downsampling, sometimes blur, and
    sensor noise. Returns the image at `size` and the boxes rotated with it (in supersampled
    pixels)."""
    w, h = size
    W, H = img.size
    angle = float(rng.uniform(-10, 10))
    img = img.rotate(angle, resample=Image.BICUBIC, center=(head.cx, head.cy), fillcolor=bg)
    boxes = {k: _rotate_box(b, (head.cx, head.cy), angle) for k, b in boxes.items()}

    pixels = np.asarray(img, dtype=np.float32)
    gx, gy = rng.uniform(-0.5, 0.5, 2)  # a light gradient in a random direction
    ramp = np.linspace(-1, 1, W)[None, :] * gx + np.linspace(-1, 1, H)[:, None] * gy
    pixels = pixels * (rng.uniform(0.8, 1.15) + 0.3 * ramp)[:, :, None]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).resize((w, h), Image.LANCZOS)
    if rng.random() < 0.2:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, rng.uniform(2, 6), (h, w, 3))
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), boxes


def clip_box(box):
    """A box (fractions of the image) clipped to the image."""
    return tuple(float(min(1.0, max(0.0, v))) for v in box)
