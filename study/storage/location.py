"""Where a study lives when its nodes share no disk: one storage URI opened as Ray and pyarrow open
it, and the checks that turn a bad URI into one line before any trial starts.

`StudyStorage` holds the pyarrow filesystem and the root path; workers get the URI string and call
`open_storage` again (the object also pickles). Credentials come only from the environment (or the
cloud's own mechanism), never from the URI, so `uri` is safe to print and to record. S3 is opened
with short connect/request timeouts and few retries so a wrong endpoint fails in seconds, not after
the AWS SDK's default minutes of retrying.
"""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

import pyarrow.fs as pafs

from fer.core.errors import UserError

SCHEMES = ("s3", "gs", "gcs", "file", "hdfs", "viewfs")
SECRET_KEYS = ("access_key", "secret_key", "session_token")
CREDENTIAL_VARS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if temporary)"
S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 60.0
S3_ATTEMPTS = 3
_S3_QUERY_KEYS = ("endpoint_override", "scheme", "region", "allow_bucket_creation")


@dataclass
class StudyStorage:
    """A storage root: `fs` (pyarrow filesystem), `root` (a path in it, no trailing slash) and
    `uri` (what the user gave, without secrets: re-openable with `open_storage`)."""

    uri: str
    fs: pafs.FileSystem = field(repr=False)
    root: str

    def path(self, *parts: str) -> str:
        """The filesystem path of `parts` under the root (`/`-joined, as object stores want)."""
        return "/".join([self.root, *(p.strip("/") for p in parts if p)])

    def child(self, *parts: str) -> StudyStorage:
        """The same storage rooted deeper (e.g. at `<study>`); its `uri` names the new root."""
        rel = "/".join(p.strip("/") for p in parts if p)
        split = urlsplit(self.uri)
        uri = split._replace(path=split.path.rstrip("/") + "/" + rel).geturl()
        return StudyStorage(uri=uri, fs=self.fs, root=self.path(rel))

    @property
    def endpoint(self) -> str:
        """Where requests go, for error lines: the endpoint override, else the scheme's service."""
        query = dict(parse_qsl(urlsplit(self.uri).query))
        return query.get("endpoint_override") or f"{urlsplit(self.uri).scheme}:// default endpoint"

    def __reduce__(self):
        return (open_storage, (self.uri,))


def is_storage_uri(text: str) -> bool:
    """True for `scheme://...` (a storage URI), False for a plain local path."""
    return "://" in str(text)


def study_name_in(root: StudyStorage, study_uri: str) -> str:
    """The study's name in `URI/<study>` given with `--storage URI`; UserError where the study's URI
    is not directly under the storage's."""
    study = urlsplit(study_uri)
    base = urlsplit(root.uri)
    parent, _, name = f"{study.netloc}/{study.path.strip('/')}".rstrip("/").rpartition("/")
    if not name or study.scheme != base.scheme or parent != root.root:
        raise UserError(
            f"{study_uri} is not a study directly under the storage {root.uri} "
            "(give the study as URI/<study> with --storage URI)"
        )
    return name


def open_storage(uri: str) -> StudyStorage:
    """Open `uri` (`s3://bucket/prefix[?endpoint_override=HOST:PORT&scheme=http]`, `gs://...`,
    `file:///...`). Raises UserError for secrets in the URI or a scheme pyarrow cannot open. Does
    not touch the network (see `check_storage`)."""
    split = urlsplit(str(uri))
    query = dict(parse_qsl(split.query))
    secrets = sorted(k for k in query if k in SECRET_KEYS)
    if secrets:
        raise UserError(
            f"the storage URI carries {', '.join(secrets)}: remove it and set the credentials in "
            f"the environment instead ({CREDENTIAL_VARS})"
        )
    safe = split.geturl()
    if split.scheme not in SCHEMES:
        raise UserError(
            f"cannot open storage URI {safe}: scheme {split.scheme or '(none)'!r} is not one of "
            f"{', '.join(s + '://' for s in SCHEMES)}"
        )
    try:
        if split.scheme == "s3":
            return StudyStorage(uri=safe, fs=_s3(query), root=_root(split))
        fs, root = pafs.FileSystem.from_uri(safe)
    except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"cannot open storage URI {safe}: {_first_line(exc)}") from None
    return StudyStorage(uri=safe, fs=fs, root=root.rstrip("/"))


def _root(split) -> str:
    if not split.netloc:
        raise UserError(f"the storage URI {split.geturl()} names no bucket (s3://BUCKET/prefix)")
    return f"{split.netloc}/{split.path.strip('/')}".rstrip("/")


def _s3(query: dict) -> pafs.S3FileSystem:
    unknown = sorted(set(query) - set(_S3_QUERY_KEYS))
    if unknown:
        raise UserError(
            f"unknown s3 URI option(s) {', '.join(unknown)} (known: {', '.join(_S3_QUERY_KEYS)})"
        )
    region = (
        query.get("region") or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    )
    kwargs = {"region": region or "us-east-1"}
    if "endpoint_override" in query:
        kwargs["endpoint_override"] = query["endpoint_override"]
    if "scheme" in query:
        kwargs["scheme"] = query["scheme"]
    return pafs.S3FileSystem(
        **kwargs,
        connect_timeout=S3_CONNECT_TIMEOUT_S,
        request_timeout=S3_REQUEST_TIMEOUT_S,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
        allow_delayed_open=True,  # small objects in one PutObject, not a multipart upload
    )


def check_storage(storage: StudyStorage, writable: bool = True) -> None:
    """The driver's check before any trial: the endpoint answers, the bucket exists, the credentials
    work and the root is writable (a probe object written, read back and deleted). `writable=False`
    (readers: read-only credentials suffice) stops before the probe. One UserError line per
    problem."""
    _check_reachable(storage)
    probe = storage.path(f"_probe-{uuid.uuid4().hex}")
    try:
        if storage.root.split("/")[0] and isinstance(storage.fs, pafs.S3FileSystem):
            bucket = storage.root.split("/")[0]
            if storage.fs.get_file_info(bucket).type == pafs.FileType.NotFound:
                raise UserError(f"storage {storage.uri}: bucket {bucket!r} does not exist")
        if not writable:
            return
        storage.fs.create_dir(storage.root, recursive=True)
        with storage.fs.open_output_stream(probe) as out:
            out.write(b"probe")
        with storage.fs.open_input_stream(probe) as f:
            f.read()
        storage.fs.delete_file(probe)
    except OSError as exc:
        raise UserError(explain_error(storage, exc)) from None


def _check_reachable(storage: StudyStorage) -> None:
    """An S3 endpoint override must accept a TCP connection within the connect timeout: one try,
    so a wrong host or port fails in seconds instead of after the SDK's retries."""
    override = dict(parse_qsl(urlsplit(storage.uri).query)).get("endpoint_override")
    if not override:
        return
    scheme = dict(parse_qsl(urlsplit(storage.uri).query)).get("scheme", "https")
    host, _, port = override.rpartition(":") if ":" in override else (override, "", "")
    port_number = int(port) if port.isdigit() else (80 if scheme == "http" else 443)
    try:
        socket.create_connection((host or override, port_number), S3_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(
            f"storage {storage.uri}: cannot reach the endpoint {override} ({exc})"
        ) from None


def explain_error(storage: StudyStorage, exc: BaseException) -> str:
    """One line for a storage failure: unreachable endpoint, refused credentials, missing bucket."""
    text = _first_line(exc)
    upper = text.upper()
    if "NETWORK_CONNECTION" in upper or "COULD NOT CONNECT" in upper or "TIMEOUT" in upper:
        return f"storage {storage.uri}: cannot reach the endpoint {storage.endpoint} ({text})"
    if "NO_SUCH_BUCKET" in upper or "NOSUCHBUCKET" in upper:
        bucket = storage.root.split("/")[0]
        return f"storage {storage.uri}: bucket {bucket!r} does not exist"
    if not isinstance(storage.fs, pafs.S3FileSystem):
        if isinstance(storage.fs, pafs.GcsFileSystem) and "PERMISSION" in upper:
            return (
                f"storage {storage.uri}: the credentials were refused; set "
                f"GOOGLE_APPLICATION_CREDENTIALS or use the machine's service account ({text})"
            )
        return f"storage {storage.uri}: {text}"
    has_env = bool(os.environ.get("AWS_ACCESS_KEY_ID"))
    credential_words = ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE", "FORBIDDEN", "403")
    if any(w in upper for w in credential_words) or not has_env:
        # pyarrow also tries ~/.aws and the machine's role: without the variables, none worked
        state = (
            "were refused"
            if has_env
            else "are missing (none in the environment; no profile or role of this machine "
            "was accepted)"
        )
        return (
            f"storage {storage.uri}: the credentials {state}; set {CREDENTIAL_VARS} in the "
            f"environment ({text})"
        )
    return f"storage {storage.uri}: {text}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
