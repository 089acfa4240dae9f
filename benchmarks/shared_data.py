"""Where benchmarks and data tests find the real datasets and offline weights (never the product).

They live outside the repository (FER2013 and JAFFE are for research use only and are never
committed): `$FER_SHARED`, default `../shared` beside the repository, as this workplace's CI
provides. Tests that need a missing part skip with `shared_missing`'s reason; benchmarks stop with
it. docs/benchmarks.md gives the layout.
"""

from __future__ import annotations

import os
from pathlib import Path

SHARED_ENV = "FER_SHARED"
SHARED_DOWNLOADS = {
    "datasets/fer2013-5class": "FER2013 (research use only) as 48x48 JPEGs in five class folders "
    "angry, fear, happy, sad, surprise, file names keeping the official split prefixes "
    "Training_, PublicTest_, PrivateTest_",
    "datasets/jaffe-5class": "JAFFE (non-commercial research only) as PNGs in the same five class "
    "folders, file names <SUBJECT>_<EXPR><take>_<n>.png",
    "weights": "the offline ImageNet weight file (docs/benchmarks.md names each file and where it "
    "comes from)",
}


def shared_path(*parts: str) -> Path:
    """A path under the folder that holds the real datasets and offline weights used by benchmarks
    and data tests (never by the product): `$FER_SHARED`, default `../shared` beside the repository.
    See docs/benchmarks.md for its layout and where to get each part."""
    root = os.environ.get(SHARED_ENV) or Path(__file__).resolve().parents[2] / "shared"
    return Path(root).joinpath(*parts)


def shared_missing(path) -> str:
    """The one-line explanation for a missing shared file or folder: what it is and how to provide
    it."""
    root = shared_path()
    try:
        rel = Path(path).relative_to(root).as_posix()
    except ValueError:
        rel = str(path)
    what = next(
        (text for key, text in SHARED_DOWNLOADS.items() if rel.startswith(key)),
        "a shared data file",
    )
    return (
        f"{path} not found: put {what} there, or set {SHARED_ENV} to the folder that holds "
        "datasets/ and weights/ (docs/benchmarks.md)"
    )
