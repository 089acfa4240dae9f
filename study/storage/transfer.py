"""Moving files between a node and a `StudyStorage`: small text/JSON objects, whole folder trees,
and published folders that readers never see half-written.

Object stores have no rename, so a folder is published all-or-nothing with a commit marker written
LAST (`_COMMITTED`, a JSON manifest of every file and its size): readers require it, a re-publish
deletes it first, and "absent" (nothing there) is told apart from "incomplete" (files, no marker).
Downloads skip a local file whose size already matches (cheap; not a content check: a published
folder is never changed in place, so same name and size means the same file).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs

from fer.core.errors import UserError
from study.storage.location import StudyStorage

MARKER = "_COMMITTED"
CHUNK = 8 << 20


def _output(storage: StudyStorage, rel: str):
    """A stream writing `rel`; on a local (file://) root the parent folders are made first (object
    stores have no folders to make)."""
    path = storage.path(rel)
    if isinstance(storage.fs, pafs.LocalFileSystem):
        storage.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return storage.fs.open_output_stream(path)


def write_text(storage: StudyStorage, rel: str, text: str) -> None:
    """Write one small object (a single PUT: readers see the old object or the new one)."""
    with _output(storage, rel) as out:
        out.write(text.encode())


def read_text(storage: StudyStorage, rel: str) -> str | None:
    """One small object's text, or None when it does not exist."""
    try:
        with storage.fs.open_input_stream(storage.path(rel)) as f:
            return f.read().decode()
    except FileNotFoundError:
        return None


def write_json(storage: StudyStorage, rel: str, data) -> None:
    write_text(storage, rel, json.dumps(data, indent=2) + "\n")


def read_json(storage: StudyStorage, rel: str):
    text = read_text(storage, rel)
    return None if text is None else json.loads(text)


def exists(storage: StudyStorage, rel: str) -> bool:
    return storage.fs.get_file_info(storage.path(rel)).type != pafs.FileType.NotFound


def list_files(storage: StudyStorage, rel: str = "") -> dict[str, int]:
    """Every file under `rel`, recursively: relative path -> size. Empty when nothing is there."""
    base = storage.path(rel)
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    return {
        info.path[len(base) + 1 :]: info.size
        for info in storage.fs.get_file_info(selector)
        if info.type == pafs.FileType.File
    }


def delete_prefix(storage: StudyStorage, rel: str) -> None:
    """Remove everything under `rel` (nothing there is fine)."""
    path = storage.path(rel)
    info = storage.fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        storage.fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        storage.fs.delete_file(path)


def upload_file(storage: StudyStorage, local: Path, rel: str) -> None:
    with open(local, "rb") as src, _output(storage, rel) as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)


def download_file(storage: StudyStorage, rel: str, local: Path) -> None:
    """Copy one object to `local` through a temporary name, so a reader never sees half a file."""
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
    with storage.fs.open_input_stream(storage.path(rel)) as src, open(tmp, "wb") as out:
        while chunk := src.read(CHUNK):
            out.write(chunk)
    os.replace(tmp, local)


def _local_files(folder: Path) -> dict[str, int]:
    return {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def upload_tree(storage: StudyStorage, folder: Path, rel: str) -> dict[str, int]:
    """Upload every file under `folder` to `rel` (no marker). Returns relative path -> size."""
    files = _local_files(Path(folder))
    for name in files:
        upload_file(storage, Path(folder) / name, f"{rel}/{name}")
    return files


def download_tree(
    storage: StudyStorage, rel: str, folder: Path, files: dict[str, int] | None = None
) -> int:
    """Download `rel` into `folder`, skipping files whose local size already matches. `files`
    (relative path -> size, e.g. a manifest) saves a listing. Returns how many were fetched."""
    files = list_files(storage, rel) if files is None else files
    fetched = 0
    for name, size in files.items():
        local = Path(folder) / name
        if local.is_file() and local.stat().st_size == size:
            continue
        download_file(storage, f"{rel}/{name}", local)
        fetched += 1
    return fetched


def publish(storage: StudyStorage, folder: Path, rel: str, meta: dict | None = None) -> dict:
    """Publish `folder` at `rel` all-or-nothing: the old marker goes first, then the old files,
    then every file, then the marker (a manifest of the files and sizes, plus `meta`)."""
    delete_prefix(storage, f"{rel}/{MARKER}")
    delete_prefix(storage, rel)
    files = upload_tree(storage, folder, rel)
    manifest = {"files": files, **(meta or {})}
    write_json(storage, f"{rel}/{MARKER}", manifest)
    return manifest


def published(storage: StudyStorage, rel: str) -> dict | None:
    """The marker's manifest of a published folder; None when nothing is there; UserError (one
    line) when files are there without a marker (an upload cut short or under way)."""
    manifest = read_json(storage, f"{rel}/{MARKER}")
    if manifest is not None:
        return manifest
    if list_files(storage, rel):
        raise UserError(
            f"{storage.path(rel)} in {storage.uri} is incomplete (no {MARKER} marker): its upload "
            "was cut short or is still running; publish it again"
        )
    return None


def fetch_published(storage: StudyStorage, rel: str, folder: Path) -> dict:
    """Download a published folder (UserError if absent or incomplete). Returns its manifest."""
    manifest = published(storage, rel)
    if manifest is None:
        raise UserError(f"{storage.path(rel)} is not in {storage.uri}")
    download_tree(storage, rel, folder, manifest["files"])
    return manifest
