"""The storage layer against a real S3-compatible server (moto's server mode in this process):
opening URIs, the one-line checks for bad input, transfers, published folders and data shipping."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fer.core.errors import UserError
from study.storage import (
    check_storage,
    delete_prefix,
    download_tree,
    exists,
    fetch_published,
    list_files,
    open_storage,
    publish,
    published,
    read_json,
    read_text,
    ship_data,
    upload_tree,
    write_json,
    write_text,
)
from study.storage.transfer import MARKER
from tests.s3_server import enforce_auth, serve, set_test_credentials

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def s3():
    yield from serve("studies")


@pytest.fixture
def store(s3, monkeypatch, request):
    set_test_credentials(monkeypatch)
    storage = open_storage(s3.uri("studies", request.node.name))
    yield storage
    delete_prefix(storage, "")


def _error_line(call) -> str:
    with pytest.raises(UserError) as info:
        call()
    text = str(info.value)
    assert "\n" not in text
    return text


def test_uri_is_opened_pickled_and_reopened(store, tmp_path):
    write_text(store, "a.txt", "hello")
    again = pickle.loads(pickle.dumps(store))
    assert again.uri == store.uri and read_text(again, "a.txt") == "hello"
    assert read_text(open_storage(store.uri), "a.txt") == "hello"
    local = open_storage(f"file://{tmp_path}/root")
    check_storage(local)
    write_json(local, "x/y.json", {"k": 1})
    assert json.loads((tmp_path / "root" / "x" / "y.json").read_text()) == {"k": 1}


def test_secrets_in_the_uri_are_refused(s3):
    text = _error_line(lambda: open_storage(s3.uri("studies") + "&secret_key=abc&access_key=k"))
    assert "AWS_ACCESS_KEY_ID" in text and "abc" not in text


def test_unknown_scheme_names_the_known_ones():
    text = _error_line(lambda: open_storage("ftp://host/folder"))
    assert "http-x" in _error_line(lambda: open_storage("s3://b/p?scheme=http-x"))
    assert "'ftp'" in text and "s3://" in text and "gs://" in text and "file://" in text


def test_unreachable_endpoint_is_named_fast(monkeypatch):
    set_test_credentials(monkeypatch)
    storage = open_storage("s3://studies/x?endpoint_override=127.0.0.1:9&scheme=http")
    text = _error_line(lambda: check_storage(storage))
    assert "cannot reach the endpoint 127.0.0.1:9" in text


def test_missing_bucket_is_named(s3, monkeypatch):
    set_test_credentials(monkeypatch)
    text = _error_line(lambda: check_storage(open_storage(s3.uri("no-such-bucket", "p"))))
    assert "bucket 'no-such-bucket' does not exist" in text


def test_wrong_or_missing_credentials_name_the_variables(s3, monkeypatch):
    set_test_credentials(monkeypatch)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
    with enforce_auth():
        text = _error_line(lambda: check_storage(open_storage(s3.uri("studies", "p"))))
    assert "credentials were refused" in text and "AWS_SECRET_ACCESS_KEY" in text
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with enforce_auth():
        text = _error_line(lambda: check_storage(open_storage(s3.uri("studies", "p"))))
    assert "credentials are missing" in text and "AWS_ACCESS_KEY_ID" in text


def test_check_passes_and_leaves_nothing(store):
    check_storage(store)
    assert list_files(store) == {}


def test_small_objects_list_exists_delete(store):
    assert read_text(store, "none.txt") is None and read_json(store, "none.json") is None
    write_json(store, "a/b.json", {"x": [1, 2]})
    write_text(store, "a/c/d.txt", "dd")
    assert read_json(store, "a/b.json") == {"x": [1, 2]}
    assert exists(store, "a/b.json") and exists(store, "a") and not exists(store, "zz")
    size = len(json.dumps({"x": [1, 2]}, indent=2)) + 1
    assert list_files(store, "a") == {"b.json": size, "c/d.txt": 2}
    delete_prefix(store, "a/c")
    assert list_files(store, "a") == {"b.json": size}
    delete_prefix(store, "nothing-here")


def _tree(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "one.txt").write_text("1")
    (folder / "sub" / "big.bin").write_bytes(np.random.default_rng(0).bytes(11 << 20))
    return folder


def test_tree_round_trip_skips_unchanged(store, tmp_path):
    src = _tree(tmp_path / "src")
    assert upload_tree(store, src, "t") == {"one.txt": 1, "sub/big.bin": 11 << 20}
    dst = tmp_path / "dst"
    assert download_tree(store, "t", dst) == 2
    assert (dst / "sub" / "big.bin").read_bytes() == (src / "sub" / "big.bin").read_bytes()
    assert download_tree(store, "t", dst) == 0
    (dst / "one.txt").write_text("changed size")
    assert download_tree(store, "t", dst) == 1 and (dst / "one.txt").read_text() == "1"


def test_published_folder_absent_incomplete_complete(store, tmp_path):
    src = tmp_path / "best"
    src.mkdir()
    (src / "model.keras").write_text("m1")
    assert published(store, "best/x") is None
    upload_tree(store, src, "best/x")  # a cut-short publish: files, no marker
    assert "incomplete" in _error_line(lambda: published(store, "best/x"))
    assert "incomplete" in _error_line(lambda: fetch_published(store, "best/x", tmp_path / "o"))
    manifest = publish(store, src, "best/x", {"trial": 3})
    assert manifest == {"files": {"model.keras": 2}, "trial": 3}
    (src / "model.keras").unlink()
    (src / "other.txt").write_text("o")
    publish(store, src, "best/x")
    assert set(list_files(store, "best/x")) == {"other.txt", MARKER}
    fetch_published(store, "best/x", tmp_path / "got")
    assert (tmp_path / "got" / "other.txt").read_text() == "o"


def test_data_shipped_once_and_read_by_two_processes(store, study_base, tmp_path):
    from fer.data import StudyData

    identity = ship_data(store, study_base / "data")
    assert ship_data(store, study_base / "data") == identity  # unchanged: nothing re-uploaded
    cache = tmp_path / "node-cache"
    script = (
        "import sys, json, hashlib\n"
        "from fer.data import StudyData\n"
        "from study.storage import open_storage\n"
        "from study.storage.shipping import node_copy\n"
        "folder, downloaded = node_copy(open_storage(sys.argv[1]), 'base', sys.argv[2])\n"
        "px = StudyData(folder).pixels('train', 32)\n"
        "print(json.dumps([str(folder), downloaded, hashlib.sha256(px.tobytes()).hexdigest()]))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, store.uri, str(cache)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [r[1][-2000:] for r in results]
    (dir_a, got_a, hash_a), (dir_b, got_b, hash_b) = (
        json.loads(r[0].strip().splitlines()[-1]) for r in results
    )
    assert dir_a == dir_b and hash_a == hash_b
    assert sorted([got_a, got_b]) == [False, True]  # one process downloaded, the other waited
    local = StudyData(study_base / "data").pixels("train", 32)
    assert hash_a == __import__("hashlib").sha256(local.tobytes()).hexdigest()
    copies = [p for p in (cache / "base").iterdir() if p.is_dir()]
    assert [p.name for p in copies] == [f"data-{identity}"]
    assert not list((cache / "base").glob("*.lock"))


def test_data_download_happens_once_per_node(store, study_base, tmp_path):
    from study.storage import local_data_dir

    ship_data(store, study_base / "data")
    cache = tmp_path / "cache"
    first = local_data_dir(store, "base", cache)
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    time.sleep(0.01)
    assert local_data_dir(store, "base", cache) == first
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamp


def test_half_uploaded_data_is_refused(store, study_base, tmp_path):
    from study.storage import local_data

    upload_tree(store, study_base / "data", "data")
    text = _error_line(lambda: local_data(store, "base", tmp_path / "cache"))
    assert "incomplete" in text and MARKER in text
    assert "not shipped" in _error_line(
        lambda: local_data(open_storage(store.child("empty").uri), "b", tmp_path / "c")
    )
