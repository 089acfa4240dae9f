"""A real S3-compatible server in the test process: moto's server mode (`ThreadedMotoServer`) on
127.0.0.1 and a free port, as Ray, pandas and s3fs test against. Tests reach it through storage URIs
(`s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`), exactly as a user reaches MinIO.

Two adjustments to moto 5.2.1, both about the server, never about our code:
- its CompleteMultipartUpload reply has the wrong root tag (getmoto/moto#10055), which pyarrow
  rightly treats as a failed upload; `_fix_multipart_reply` renames the tag so files larger than one
  part (pyarrow's multipart uploads) work as on real S3;
- it accepts any credentials unless told otherwise; `enforce_auth` makes it check them, for the
  wrong-credentials tests.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re

TEST_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_WRONG_ROOT = re.compile(rb"<(/?)CompleteMultipartUpload(Output|Response)?\b")


def _fix_multipart_reply() -> None:
    from moto.s3.responses import S3Response

    if getattr(S3Response.serialized, "_fer_fixed", False):
        return
    original = S3Response.serialized

    def serialized(self, action_result):
        status, headers, body = original(self, action_result)
        if self.data.get("Action") == "CompleteMultipartUpload" and isinstance(body, str | bytes):
            raw = body.encode() if isinstance(body, str) else body
            if b"CompleteMultipartUploadResult" not in raw:
                raw = _WRONG_ROOT.sub(rb"<\1CompleteMultipartUploadResult", raw)
            body = raw.decode() if isinstance(body, str) else raw
        return status, headers, body

    serialized._fer_fixed = True
    S3Response.serialized = serialized


class S3Server:
    """One moto server; `uri(bucket, prefix)` is the storage URI a user would pass."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        _fix_multipart_reply()
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"{host}:{port}"

    def uri(self, bucket: str, prefix: str = "") -> str:
        path = f"{bucket}/{prefix}".rstrip("/")
        return f"s3://{path}?endpoint_override={self.endpoint}&scheme=http"

    def create_bucket(self, bucket: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=f"http://{self.endpoint}",
            region_name="us-east-1",
            aws_access_key_id=TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )
        client.create_bucket(Bucket=bucket)

    def stop(self) -> None:
        self._server.stop()


def serve(bucket: str):
    """A module fixture's body (`yield from serve("bucket")`): a running server holding `bucket`,
    stopped afterwards; the test is skipped where moto's server (the test extra) is missing."""
    import pytest

    pytest.importorskip("moto.server", reason="moto[server] (the test extra) is not installed")
    server = S3Server()
    server.create_bucket(bucket)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def enforce_auth():
    """Make the server check credentials (moto accepts any by default): a wrong key is refused
    with InvalidAccessKeyId, as real S3 does."""
    from moto import settings

    old = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old


def set_test_credentials(monkeypatch) -> None:
    """The environment variables a user sets, with moto's conventional test values."""
    for name, value in TEST_CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
