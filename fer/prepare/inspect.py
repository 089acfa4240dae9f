"""What `prepare` learns about one file: its hashes, size, format and the 64x64 grey signature that
confirms near duplicates, decoded exactly as every later reader decodes it (`fer.data.decode`).
Never raises for a bad file: the record says why it was quarantined."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np

from fer.data.decode import (
    MAX_PIXELS,
    READ_ONCE_BYTES,
    Quarantine,
    decode_file,
    file_sha256,
    pixel_hash,
    resize_square,
)
from fer.prepare.hashing import image_signature, signature


@dataclasses.dataclass
class FileRecord:
    """What the scan learns about one file (a manifest row, before the split)."""

    sha256: str = ""
    pixel_hash: str = ""
    phash: str = ""  # filled by prepare from `thumb` (hashing.batch_phashes)
    phash_mirror: str = ""  # pHash of the mirror image (finds mirrored copies; not in the manifest)
    thumb: np.ndarray | None = (
        None  # 64x64 grey signature, confirms near duplicates (not in the manifest)
    )
    width: int = 0
    height: int = 0
    format: str = ""
    status: str = "ok"
    reason: str = ""


def inspect_file(
    path: Path, image_size: int | None, max_pixels: int = MAX_PIXELS
) -> tuple[FileRecord, np.ndarray | None]:
    """Decode, hash and (optionally) resize one file. Never raises for a bad file: it is
    quarantined."""
    rec = FileRecord()
    try:
        size = path.stat().st_size
        data = (
            path.read_bytes() if size <= READ_ONCE_BYTES else None
        )  # one read for hash and decode
        rec.sha256 = hashlib.sha256(data).hexdigest() if data is not None else file_sha256(path)
    except OSError as exc:
        rec.status, rec.reason = "quarantined", f"unreadable: {exc.strerror or exc}"
        return rec, None
    try:
        dec = decode_file(path, max_pixels, data)
    except Quarantine as q:
        rec.status, rec.reason = "quarantined", str(q)
        return rec, None
    rec.height, rec.width = dec.rgb.shape[:2]
    rec.format = dec.format
    rec.pixel_hash = pixel_hash(dec.rgb)
    # the hashes come from the signature in one vectorised pass (prepare.py)
    rec.thumb = image_signature(dec.image) if dec.image is not None else signature(dec.rgb)
    if dec.converted:
        rec.status, rec.reason = "converted", "; ".join(dec.notes)
    small = resize_square(dec.rgb, image_size) if image_size else None
    return rec, small
