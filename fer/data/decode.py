"""Decoding one image file into RGB pixels, whatever its extension, mode or orientation says.

Pillow identifies a file by its content (magic bytes), not its name, and after
`register_heif_opener()` that includes HEIC/HEIF; so a HEIC named `.jpg` is read and a text file
named `.png` is refused. Everything a dataset throws at us ends in one of two outcomes: an RGB uint8
array (with a note when it had to be converted), or a `Quarantine` with a human-readable reason.
Nothing here writes to the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

register_heif_opener()

# Larger images are refused before their pixels are decoded: a 100 MB PNG can declare 40000 x 40000
# pixels and ask for gigabytes of memory. 100 megapixels is above any phone or DSLR photo.
MAX_PIXELS = 100_000_000
Image.MAX_IMAGE_PIXELS = None  # we enforce MAX_PIXELS ourselves, with our own message

READ_ONCE_BYTES = 64 << 20  # files up to this size are read into memory once (hashed, then decoded)
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}


class Quarantine(Exception):
    """A file that cannot be used; `str()` is the reason written to the manifest."""


@dataclasses.dataclass
class Decoded:
    """One decoded image: RGB pixels plus what the manifest records about it."""

    rgb: np.ndarray  # uint8 (H, W, 3), orientation applied
    format: str  # what the content is (JPEG, PNG, WEBP, HEIF, ...), not what the name says
    notes: list[str]  # conversions applied; empty when the file was plain RGB the right way up
    # the decoded image itself where it is plain greyscale or RGB (the same pixels as `rgb`): the
    # signature is made from it directly, without a round trip through the RGB array
    # (`image_signature`)
    image: Image.Image | None = None

    @property
    def converted(self) -> bool:
        return bool(self.notes)


def decode_file(path: Path, max_pixels: int = MAX_PIXELS, data: bytes | None = None) -> Decoded:
    """Read `path` (or its already-read bytes `data`) into RGB pixels, or raise `Quarantine` with
    the reason."""
    if data is None:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise Quarantine(f"unreadable: {exc.strerror or exc}") from None
    else:
        size = len(data)
    if size == 0:
        raise Quarantine("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's EXIF/ICC warnings are not our user's problem
            with Image.open(path if data is None else io.BytesIO(data)) as img:
                fmt = img.format or "unknown"
                width, height = img.size
                if width * height > max_pixels:
                    raise Quarantine(
                        f"decompression bomb: {width}x{height} pixels is over the limit of "
                        f"{max_pixels:,}"
                    )
                img.load()
                notes: list[str] = []
                if fmt == "HEIF" or fmt == "AVIF":
                    notes.append(f"decoded {fmt}")
                ext = path.suffix.lower().lstrip(".")
                if ext and not _extension_matches(ext, fmt):
                    notes.append(f"content is {fmt}, name says .{ext}")
                orientation = img.getexif().get(0x0112)
                if orientation in (2, 3, 4, 5, 6, 7, 8):
                    img = ImageOps.exif_transpose(img)
                    notes.append(f"EXIF orientation {orientation} applied")
                rgb = to_rgb(img, notes)
                plain = img if img.mode in ("L", "RGB") and "transparency" not in img.info else None
    except Quarantine:
        raise
    except UnidentifiedImageError:
        raise Quarantine("not an image (content not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise Quarantine(f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        message = str(exc) or type(exc).__name__
        if "truncated" in message:
            raise Quarantine(f"truncated image: {message}") from None
        raise Quarantine(f"corrupt or unreadable image: {message}") from None
    return Decoded(rgb=rgb, format=fmt, notes=notes, image=plain)


_EXTENSIONS = {
    "JPEG": {"jpg", "jpeg", "jpe", "jfif"},
    "PNG": {"png"},
    "WEBP": {"webp"},
    "GIF": {"gif"},
    "BMP": {"bmp", "dib"},
    "TIFF": {"tif", "tiff"},
    "HEIF": {"heic", "heif", "hif"},
    "AVIF": {"avif"},
    "MPO": {"jpg", "jpeg", "mpo"},
    "PPM": {"ppm", "pgm", "pbm", "pnm"},
}


def _extension_matches(ext: str, fmt: str) -> bool:
    return ext in _EXTENSIONS.get(fmt, {fmt.lower()})


def to_rgb(img: Image.Image, notes: list[str]) -> np.ndarray:
    """Convert any Pillow mode to uint8 RGB, appending what was done to `notes`.

    Transparency is composited over white (a transparent background is not black); 16-bit and 32-bit
    greyscale are scaled down, not clipped; palette images keep their colours.
    """
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    notes.append(f"mode {mode} -> RGB")
    if mode == "L" and "transparency" not in img.info:  # grey: the RGB channels are copies of it
        return np.repeat(np.asarray(img, dtype=np.uint8)[:, :, None], 3, axis=2)
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = np.asarray(img).astype(np.float64)
        if mode == "F" and grey.size and grey.max() <= 1.0:
            grey = grey * 255.0
        elif mode != "F" and grey.size and (mode.startswith("I;16") or grey.max() > 255):
            grey = grey / 257.0  # 65535 -> 255
        grey = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(white, rgba).convert("RGB"), dtype=np.uint8).copy()
    return np.asarray(img.convert("RGB"), dtype=np.uint8).copy()


def resize_square(rgb: np.ndarray, size: int) -> np.ndarray:
    """Squash to size x size (the aspect ratio is not kept, as the published method does)."""
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR, reducing_gap=3.0))


def pixel_hash(rgb: np.ndarray) -> str:
    """sha256 of the decoded pixels and their shape: equal for byte-different files of the same
    image."""
    h = hashlib.sha256(f"{rgb.shape}".encode())
    h.update(np.ascontiguousarray(rgb).tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
