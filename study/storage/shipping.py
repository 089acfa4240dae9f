"""Prepared study data to every node without a shared disk (issue 22, item 2).

The driver publishes `results/<study>/data` once to `<storage>/data` (marker last, with the data's
identity). On a node, `local_data` keeps ONE local copy per study and identity under a node-local
cache folder, made under `create_or_wait`'s lock so concurrent trials on that node download once,
and opens it with `StudyData` (memory-mapped, as for a local study). A new identity (data prepared
again) lands in a new folder, so a trial never reads a mix of two versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from fer.core.errors import UserError
from fer.core.files import create_or_wait
from fer.core.names import STUDY_DATA_FILE
from study.storage.location import StudyStorage
from study.storage.transfer import MARKER, download_tree, publish, published

DATA_PREFIX = "data"
CACHE_ENV = "FER_NODE_CACHE"
DONE = ".complete"


def data_identity(data_dir: Path) -> str:
    """A short hash of the prepared data: its study_data.json and every shipped file's name and
    size (prepare writes a new study_data.json whenever it runs, so a re-prepare changes it)."""
    digest = hashlib.sha256((Path(data_dir) / STUDY_DATA_FILE).read_bytes())
    digest.update(json.dumps(sorted(_shipped_files(Path(data_dir)).items())).encode())
    return digest.hexdigest()[:16]


def _shipped_files(data_dir: Path) -> dict[str, int]:
    """What a node needs: every file but hidden ones and locks (partial writes, lock files)."""
    return {
        p.relative_to(data_dir).as_posix(): p.stat().st_size
        for p in sorted(data_dir.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock")
    }


def ship_data(storage: StudyStorage, data_dir: Path, prefix: str = DATA_PREFIX) -> str:
    """Publish the prepared `data_dir` under `<storage>/<prefix>` (default `data`) unless the same
    identity is already published there. Returns the identity. `storage` is the study's root
    (`URI/<study>`)."""
    data_dir = Path(data_dir)
    if not (data_dir / STUDY_DATA_FILE).is_file():
        raise UserError(f"{data_dir} is not a prepared study-data folder (run `fer-study prepare`)")
    identity = data_identity(data_dir)
    try:
        current = published(storage, prefix)
    except UserError:  # a half-uploaded copy: publish over it
        current = None
    if current is not None and current.get("identity") == identity:
        return identity
    staging = _only_shipped(data_dir)
    try:
        publish(storage, staging, prefix, {"identity": identity})
    finally:
        if staging != data_dir:
            shutil.rmtree(staging, ignore_errors=True)
    return identity


def _only_shipped(data_dir: Path) -> Path:
    """`data_dir` itself when it holds nothing to leave out, else a folder of links to the files
    that ship (so locks and partial files are never uploaded)."""
    every = {p.relative_to(data_dir).as_posix() for p in data_dir.rglob("*") if p.is_file()}
    shipped = _shipped_files(data_dir)
    if every == set(shipped):
        return data_dir
    staging = Path(tempfile.mkdtemp(prefix="fer-ship-"))
    for name in shipped:
        (staging / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(data_dir / name, staging / name)
    return staging


def node_cache_root() -> Path:
    """The node-local cache folder: `$FER_NODE_CACHE`, else `~/.cache/fer-study`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fer-study")


def local_data_dir(storage: StudyStorage, study: str, cache_root: Path | None = None) -> Path:
    """This node's copy of the study's published data, downloaded once per node (other processes
    asking at the same time wait for it). UserError when the data is absent or incomplete."""
    return node_copy(storage, study, cache_root)[0]


def node_copy(
    storage: StudyStorage, study: str, cache_root: Path | None = None, prefix: str = DATA_PREFIX
) -> tuple[Path, bool]:
    """`local_data_dir` (of the data published at `prefix`), also saying whether this process did
    the download (True) or found or waited for another's copy (False)."""
    manifest = published(storage, prefix)
    if manifest is None:
        raise UserError(
            f"{storage.path(prefix)} is not in {storage.uri}: the study's data was not shipped"
        )
    slug = prefix.strip("/").replace("/", "_")
    folder = Path(cache_root or node_cache_root()) / study / f"{slug}-{manifest['identity']}"
    folder.mkdir(parents=True, exist_ok=True)

    def fetch(beat) -> None:
        download_tree(storage, prefix, folder, manifest["files"])
        beat()
        (folder / DONE).write_text(json.dumps({"from": storage.uri, MARKER: manifest}))

    downloaded = create_or_wait(folder / DONE, folder.with_name(folder.name + ".lock"), fetch)
    return folder, downloaded


def local_data(storage: StudyStorage, study: str, cache_root: Path | None = None):
    """`StudyData` over this node's copy (see `local_data_dir`)."""
    from fer.data import StudyData

    return StudyData(local_data_dir(storage, study, cache_root))
