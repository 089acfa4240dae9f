"""A stored study read from a machine that has only the storage (a laptop): `report URI/<study>`
and `predict` / `evaluate` / `export URI/<study>/best/<backbone>[/model.keras]`.

The commands themselves stay local-only; this module turns a URI into a local folder first:
- `mirror_study`: the study pulled into `results/<study>/` (`pull_study`: no Tune folder, no trial
  models, no half-published folder), which the report then reads as any local study. A folder of
  that name holding anything else (no study.json with the same `started_at`) is refused, and one
  that a running driver may be writing is reported as it is: neither is ever overwritten.
- `local_model`: a published best folder downloaded into `<node cache>/models/<hash of its URI>/`,
  re-used while its `_COMMITTED` marker is the same (manifest and time) and every file has the
  manifest's size; published again, it is downloaded afresh.
- `local_study_data`: the study's published data for `export`'s check (the node cache `run`'s
  trials use, study.storage.shipping), since a cached model has no `../../data` next to it.

Reading never writes to the storage: no probe object as `check_storage` writes, so read-only
credentials suffice; a bad endpoint, bucket or credentials still ends in `check_storage`'s lines.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from urllib.parse import urlsplit

from fer.core import names
from fer.core.errors import UserError
from fer.core.files import create_or_wait
from study.storage.location import (
    StudyStorage,
    check_storage,
    explain_error,
    open_storage,
)
from study.storage.mirror import LEASE_FILE, pull_study
from study.storage.shipping import DONE, node_cache_root, node_copy
from study.storage.transfer import (
    MARKER,
    download_file,
    download_tree,
    exists,
    published,
    read_json,
)

MODELS_DIR = "models"  # <node cache>/models/<hash>/: cached best folders
MODEL_FORM = "URI/<study>/best/<backbone> or URI/<study>/best/<backbone>/model.keras"

__all__ = ["local_model", "local_study_data", "mirror_study", "stored_study"]


def _reading(storage: StudyStorage, call):
    """`call()` with a storage failure turned into check_storage's one line."""
    try:
        return call()
    except OSError as exc:
        raise UserError(explain_error(storage, exc)) from None


def stored_study(uri: str) -> tuple[StudyStorage, dict]:
    """The study at `uri` (`URI/<study>`) opened and checked, with its study.json. UserError (one
    line) where the storage cannot be read or holds no study there."""
    storage = open_storage(uri)
    check_storage(storage, writable=False)
    info = _reading(storage, lambda: read_json(storage, names.STUDY_FILE))
    if info is None:
        raise UserError(
            f"{storage.uri} holds no study (no {names.STUDY_FILE}): give the study as URI/<study>"
        )
    return storage, info


def mirror_study(uri: str, results_root: str | Path) -> tuple[Path, bool]:
    """Pull the stored study at `uri` into `results_root/<study>/`; return that folder and whether
    it was pulled. A folder there that holds anything but this study stays untouched (UserError),
    and so does this study's folder while a driver holds the study: it may be that driver's own
    folder, whose live files (Optuna's SQLite) a pull would replace under it."""
    storage, info = stored_study(uri)
    name = storage.root.rstrip("/").rsplit("/", 1)[-1]
    folder = Path(results_root) / name
    if folder.is_dir() and any(folder.iterdir()):
        local = _local_json(folder / names.STUDY_FILE)
        if not local or local.get("started_at") != info.get("started_at"):
            raise UserError(
                f"{folder} holds another study than {storage.uri} (started "
                f"{local.get('started_at', '?')}, the stored one {info.get('started_at')}): give "
                "another --results folder"
            )
        if _reading(storage, lambda: exists(storage, LEASE_FILE)):
            return folder, False

    def pull() -> None:
        # study.json first: a pull cut short leaves a folder that the next pull recognises
        download_file(storage, names.STUDY_FILE, folder / names.STUDY_FILE)
        pull_study(storage, folder)

    _reading(storage, pull)
    return folder, True


def _local_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _split_model_uri(uri: str) -> tuple[str, str, bool]:
    """(`URI/<study>`, `best/<backbone>`, whether the model file itself was named)."""
    split = urlsplit(uri)
    parts = [p for p in split.path.split("/") if p]
    is_file = bool(parts) and parts[-1] == names.MODEL_FILE
    if is_file:
        parts = parts[:-1]
    if len(parts) < 2 or parts[-2] != names.BEST_DIR or not (split.netloc or len(parts) > 2):
        raise UserError(f"{uri} is not a stored model: give it as {MODEL_FORM}")
    study_path = "/" + "/".join(parts[:-2]) if parts[:-2] else ""
    return split._replace(path=study_path).geturl(), "/".join(parts[-2:]), is_file


def local_model(uri: str, cache_root: Path | None = None) -> Path:
    """A local copy of the stored model at `uri` (see MODEL_FORM): the cached best folder, or its
    model.keras where the URI named the file. UserError where the folder is absent or incomplete."""
    study_uri, rel, is_file = _split_model_uri(uri)
    storage = open_storage(study_uri)
    check_storage(storage, writable=False)
    manifest = _reading(storage, lambda: published(storage, rel))
    if manifest is None:
        raise UserError(f"{storage.child(rel).uri} is not in the storage: no such published model")
    # the marker's time tells a folder published again with files of the same sizes
    stamp = _reading(storage, lambda: storage.fs.get_file_info(storage.path(rel, MARKER)).mtime_ns)
    record = {"from": storage.child(rel).uri, MARKER: manifest, "published_ns": stamp}
    key = hashlib.sha256(record["from"].encode()).hexdigest()[:16]
    folder = Path(cache_root or node_cache_root()) / MODELS_DIR / key
    done = folder / DONE
    if not _is_complete(folder, record):
        done.unlink(missing_ok=True)

    def fetch(beat) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # a changed or partial copy: start afresh
        folder.mkdir(parents=True)
        _reading(storage, lambda: download_tree(storage, rel, folder, manifest["files"]))
        beat()
        done.write_text(json.dumps(record))

    folder.parent.mkdir(parents=True, exist_ok=True)
    create_or_wait(done, folder.with_name(folder.name + ".lock"), fetch)
    return folder / names.MODEL_FILE if is_file else folder


def _is_complete(folder: Path, record: dict) -> bool:
    """The cached copy was made from this very publication (manifest and marker time) and every
    file still has the manifest's size."""
    return _local_json(folder / DONE) == record and all(
        (folder / name).is_file() and (folder / name).stat().st_size == size
        for name, size in record[MARKER]["files"].items()
    )


def local_study_data(model_uri: str, cache_root: Path | None = None) -> Path:
    """This machine's copy of the published data of the study that the stored model belongs to."""
    study_uri, _, _ = _split_model_uri(model_uri)
    storage = open_storage(study_uri)
    check_storage(storage, writable=False)
    name = storage.root.rstrip("/").rsplit("/", 1)[-1]
    return _reading(storage, lambda: node_copy(storage, name, cache_root)[0])
