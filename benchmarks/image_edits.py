"""The edits a dataset really contains, applied to one image with strengths drawn from stated
ranges.

They define what a near-duplicate is (docs/duplicates.md) and are how the detector is measured: an
edited copy of a face must be clustered with its source (benchmarks/duplicates_eval.py,
tests/test_duplicates.py). Each edit returns the bytes of a file, so the copy goes through the same
decoder as a user's files (EXIF orientation included). The ranges (the `RANGES` text is printed by
the benchmark):
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

RANGES = {
    "jpeg": "re-encoded as JPEG, quality 30-90",
    "resize": "resized by a factor 0.5-2.0 (log-uniform; bilinear, bicubic, Lanczos or box filter)",
    "grey": "colour <-> grey: a colour image converted to grey, a grey one tinted "
    "(channel gains 0.8-1.2)",
    "brightness_contrast": "brightness -40..+40 of 255, contrast x0.6-1.5, gamma 0.7-1.4 "
    "(clipped to 0-255)",
    "crop": "cropped by 2-10% of each side's length per axis (split at random between the two "
    "edges), resized back",
    "shift": "content shifted by up to 10% of the size per axis (at least 2% on one), the gap "
    "filled by edge pixels, black or grey",
    "mirror": "mirrored left-right",
    "watermark": "semi-transparent text (opacity 0.25-0.6, height 8-15% of the image) at a random "
    "place",
    "border": "a frame 2-8% of the size wide, drawn over the edges or padded around and resized "
    "back",
    "exif": "pixels rotated or transposed and saved as JPEG (quality 95) with the EXIF orientation "
    "that undoes it",
}
KINDS = tuple(RANGES)
_WORDS = ("stock", "(c) photo", "SAMPLE", "preview", "www.faces", "istock", "copyright")
_EXIF_UNDO = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def edit(img: Image.Image, kind: str, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    """(file bytes, extension, the drawn parameters) of one edited copy of `img` (L or RGB)."""
    if kind not in _EDITS:
        raise ValueError(f"unknown edit {kind!r}; known: {', '.join(KINDS)}")
    return _EDITS[kind](img, rng)


def _jpeg(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    q = int(rng.integers(30, 91))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=q)
    return buf.getvalue(), "jpg", {"quality": q}


def _resize(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    w, h = img.size
    f = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    filt = [Image.BILINEAR, Image.BICUBIC, Image.LANCZOS, Image.BOX][int(rng.integers(4))]
    return (
        _png(img.resize((max(8, round(w * f)), max(8, round(h * f))), filt)),
        "png",
        {"factor": round(f, 3)},
    )


def _grey(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    if img.mode == "L":
        gains = rng.uniform(0.8, 1.2, 3)
        a = np.asarray(img, np.float32)[:, :, None] * gains
        return (
            _png(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))),
            "png",
            {"gains": gains.round(3).tolist()},
        )
    return _png(img.convert("L")), "png", {"to": "grey"}


def _brightness_contrast(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    b, c, g = rng.uniform(-40, 40), rng.uniform(0.6, 1.5), rng.uniform(0.7, 1.4)
    a = np.asarray(img, np.float32)
    a = 255.0 * (a / 255.0) ** g
    a = (a - a.mean()) * c + a.mean() + b
    return (
        _png(Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), img.mode)),
        "png",
        {"brightness": round(b, 1), "contrast": round(c, 3), "gamma": round(g, 3)},
    )


def _crop(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    w, h = img.size
    fx, fy = rng.uniform(0.02, 0.10, 2)
    sx, sy = rng.uniform(0, 1, 2)
    box = (
        round(w * fx * sx),
        round(h * fy * sy),
        w - round(w * fx * (1 - sx)),
        h - round(h * fy * (1 - sy)),
    )
    return _png(img.crop(box).resize((w, h), Image.BICUBIC)), "png", {"box": box}


def _shift(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    w, h = img.size
    d = rng.uniform(-0.10, 0.10, 2)
    if np.abs(d).max() < 0.02:
        d[int(rng.integers(2))] = 0.02 * rng.choice([-1, 1])
    dx, dy = round(d[0] * w), round(d[1] * h)
    fill = ["edge", "black", "grey"][int(rng.integers(3))]
    a = np.asarray(img)
    pad = ((abs(dy), abs(dy)), (abs(dx), abs(dx))) + (((0, 0),) if a.ndim == 3 else ())
    if fill == "edge":
        padded = np.pad(a, pad, mode="edge")
    else:
        padded = np.pad(a, pad, mode="constant", constant_values=0 if fill == "black" else 128)
    y0, x0 = abs(dy) - dy, abs(dx) - dx
    return (
        _png(Image.fromarray(padded[y0 : y0 + h, x0 : x0 + w])),
        "png",
        {"dx": dx, "dy": dy, "fill": fill},
    )


def _mirror(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    return _png(ImageOps.mirror(img)), "png", {}


def _watermark(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    w, h = img.size
    out = img.convert("RGBA")
    layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
    size = max(6, round(h * rng.uniform(0.08, 0.15)))
    font = ImageFont.load_default(size=size)
    text = _WORDS[int(rng.integers(len(_WORDS)))]
    draw = ImageDraw.Draw(layer)
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
    x = int(rng.integers(-(x1 - x0) // 4, max(1, w - 3 * (x1 - x0) // 4)))
    y = int(rng.integers(0, max(1, h - (y1 - y0))))
    alpha = float(rng.uniform(0.25, 0.6))
    tone = 255 if rng.uniform() < 0.6 else 0
    draw.text((x, y - y0), text, font=font, fill=(tone, tone, tone, round(255 * alpha)))
    out = Image.alpha_composite(out, layer).convert(img.mode)
    return (
        _png(out),
        "png",
        {"text": text, "size": size, "opacity": round(alpha, 2), "at": (x, y)},
    )


def _border(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    w, h = img.size
    f = rng.uniform(0.02, 0.08)
    tone = int(rng.choice([0, 255, int(rng.integers(0, 256))]))
    bw = max(1, round(f * min(w, h)))
    colour = tone if img.mode == "L" else (tone,) * 3
    if rng.uniform() < 0.5:
        out = img.copy()
        ImageDraw.Draw(out).rectangle((0, 0, w - 1, h - 1), outline=colour, width=bw)
        how = "drawn"
    else:
        out = ImageOps.expand(img, border=bw, fill=colour).resize((w, h), Image.BICUBIC)
        how = "padded"
    return _png(out), "png", {"width": bw, "tone": tone, "how": how}


def _exif(img: Image.Image, rng: np.random.Generator) -> tuple[bytes, str, dict]:
    orientation = int(rng.choice([3, 6, 8, 2, 5, 7, 4]))
    stored = img.transpose(_inverse(orientation))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue(), "jpg", {"orientation": orientation}


_EDITS = {
    "jpeg": _jpeg,
    "resize": _resize,
    "grey": _grey,
    "brightness_contrast": _brightness_contrast,
    "crop": _crop,
    "shift": _shift,
    "mirror": _mirror,
    "watermark": _watermark,
    "border": _border,
    "exif": _exif,
}


def _inverse(orientation: int) -> Image.Transpose:
    """The transpose that, undone by EXIF `orientation` (ImageOps.exif_transpose), gives the
    original back."""
    undo = _EXIF_UNDO[orientation]
    return {
        Image.Transpose.ROTATE_270: Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_90: Image.Transpose.ROTATE_270,
    }.get(undo, undo)
