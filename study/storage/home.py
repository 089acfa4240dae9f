"""Where a study's files are, as seen from any process of a study: the driver, a trial, an
evaluator, a retraining.

A `StudyHome` is handed to every Ray worker (it pickles as three strings). Without storage the
study folder is one folder every node sees (one machine, or NFS): `local(rel)` is the file itself
and `push`/`pull` do nothing, which is today's behaviour. With storage (`fer-study run --storage`)
nothing is shared but the storage: a worker works in a node-local copy (`local(rel)` under the node
cache), `push(rel)` uploads it to `<storage>/<rel>`, `pull(rel)` downloads it, and the prepared
data is this node's one copy (study.storage.shipping). The driver's own folder (`study_dir`) is
then its mirror, which workers never read.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

from study.storage.location import StudyStorage, open_storage
from study.storage.shipping import DATA_PREFIX, node_cache_root, node_copy
from study.storage.transfer import (
    delete_prefix,
    download_tree,
    fetch_published,
    publish,
    upload_tree,
)


@functools.lru_cache(maxsize=8)
def _opened(uri: str) -> StudyStorage:
    """One opened filesystem per URI and process (an S3 client is not free to make)."""
    return open_storage(uri)


@dataclass(frozen=True)
class StudyHome:
    """`study_dir`: the driver's study folder; `data_dir`: its prepared data; `storage_uri`: the
    study's root in storage (`URI/<study>`), None for a study folder every node sees."""

    study_dir: str
    data_dir: str
    storage_uri: str | None = None

    @property
    def name(self) -> str:
        return Path(self.study_dir).name

    @property
    def remote(self) -> bool:
        return self.storage_uri is not None

    def storage(self) -> StudyStorage:
        return _opened(self.storage_uri)

    def data(self, prefix: str = DATA_PREFIX) -> Path:
        """The prepared data `prefix` names (`data`, or a naive-split folder): the study's own
        folder, or this node's copy of what the driver shipped."""
        if not self.remote:
            if prefix == DATA_PREFIX:
                return Path(self.data_dir)
            return Path(self.study_dir) / prefix
        return node_copy(self.storage(), self.name, prefix=prefix)[0]

    def local(self, rel: str) -> Path:
        """Where this process reads and writes `rel` (e.g. `trials/<id>`)."""
        if not self.remote:
            return Path(self.study_dir) / rel
        key = hashlib.sha256(self.storage_uri.encode()).hexdigest()[:12]
        return node_cache_root() / self.name / f"work-{key}" / rel

    def push(self, rel: str) -> None:
        """Upload the local folder `rel` to storage (files only ever added or replaced)."""
        if self.remote and self.local(rel).is_dir():
            upload_tree(self.storage(), self.local(rel), rel)

    def pull(self, rel: str) -> Path:
        """Bring `rel` from storage into `local(rel)` (files whose size matches are kept); return
        the local folder."""
        local = self.local(rel)
        if self.remote:
            download_tree(self.storage(), rel, local)
        return local

    def clear(self, rel: str) -> None:
        """Remove `rel` here and, with storage, there too (a dead attempt's partial folder)."""
        shutil.rmtree(self.local(rel), ignore_errors=True)
        if self.remote:
            delete_prefix(self.storage(), rel)

    def publish(self, folder: Path, rel: str) -> None:
        """Make the finished `folder` appear as `rel` all-or-nothing: a rename on a shared disk; on
        storage, the files then a `_COMMITTED` marker (object stores have no rename)."""
        if not self.remote:
            dst = self.local(rel)
            shutil.rmtree(dst, ignore_errors=True)
            Path(folder).rename(dst)
            return
        publish(self.storage(), Path(folder), rel)

    def fetch_published(self, rel: str, folder: Path) -> None:
        """Download a published `rel` into `folder` (the driver's mirror)."""
        if self.remote:
            fetch_published(self.storage(), rel, Path(folder))
