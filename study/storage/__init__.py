"""A study's home in object storage (S3, GCS, S3-compatible servers, file://): open and check a
storage URI, move files and published folders, ship the prepared data to every node.

The small API the driver and trials use:
- `open_storage(uri)` -> `StudyStorage` (picklable; workers may also re-open from `storage.uri`);
- `check_storage(storage)`: one UserError line per problem, before any trial starts;
- `publish` / `published` / `fetch_published`: folders readers never see half-written;
- `ship_data(storage, data_dir)` on the driver, `local_data(storage, study)` in a trial.
"""

from study.storage.location import StudyStorage, check_storage, is_storage_uri, open_storage
from study.storage.shipping import local_data, local_data_dir, ship_data
from study.storage.transfer import (
    delete_prefix,
    download_tree,
    exists,
    fetch_published,
    list_files,
    publish,
    published,
    read_json,
    read_text,
    upload_tree,
    write_json,
    write_text,
)

__all__ = [
    "StudyStorage",
    "check_storage",
    "delete_prefix",
    "download_tree",
    "exists",
    "fetch_published",
    "is_storage_uri",
    "list_files",
    "local_data",
    "local_data_dir",
    "open_storage",
    "publish",
    "published",
    "read_json",
    "read_text",
    "ship_data",
    "upload_tree",
    "write_json",
    "write_text",
]
