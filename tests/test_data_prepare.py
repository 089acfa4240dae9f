"""`prepare` on the demo data: the study-data files, the duplicate and group rules, the split,
StudyData."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer.core.errors import UserError
from fer.data import StudyData
from fer.prepare import prepare_dataset
from fer.prepare.demo_data import GROUP_REGEX
from fer.prepare.pipeline import MANIFEST_COLUMNS, PrepareSettings


def _quiet(*_a, **_k):
    pass


def _manifest(sd: StudyData) -> pd.DataFrame:
    return pd.read_csv(sd.dir / "manifest.csv", keep_default_na=False)


def test_manifest_columns_and_one_row_per_file(prepared_data, demo_data_dir):
    m = _manifest(prepared_data)
    assert list(m.columns) == MANIFEST_COLUMNS
    files = {
        p.relative_to(demo_data_dir).as_posix() for p in demo_data_dir.rglob("*") if p.is_file()
    }
    assert set(m.path) == files and len(m) == len(files)
    assert set(m.split) <= {"train", "val", "test", "excluded"}
    assert set(m.status) <= {"ok", "converted", "quarantined", "duplicate"}
    heic = m[m.path.str.endswith(".heic")]
    assert heic.status.isin(["converted", "duplicate"]).all() and (heic.status == "converted").any()
    assert (heic.format == "HEIF").all() and heic.reason.str.contains("decoded HEIF").all()


def test_demo_messes_are_found(prepared_data):
    m = _manifest(prepared_data).set_index("path")
    assert m.loc["sad/S02_sad_999.jpg", "status"] == "quarantined"
    assert "truncated" in m.loc["sad/S02_sad_999.jpg", "reason"]
    assert m.loc["happy/.DS_Store", "reason"] == "hidden file"
    assert m.loc["demo_regions.csv", "reason"] == "not inside a class folder"
    copies = [
        p
        for p in m.index
        if "download_" in p
        or "_shifted" in p
        or "_small" in p
        or "_reencoded" in p
        or p.endswith("_heic.jpg")
    ]
    assert len(copies) == 15
    for p in (
        copies
    ):  # each planted copy is grouped with its original, and the cluster keeps exactly one
        label = p.split("/")[0]
        stem = f"{label}/S01_{label}_000" if "download_" in p else re.sub(r"_[a-z]+\.\w+$", "", p)
        original = next(q for q in m.index if q.startswith(stem + ".") and q != p)
        assert m.loc[p, "group"] == m.loc[original, "group"], (p, original)
        cluster = m[m.group == m.loc[p, "group"]]
        assert (cluster.status == "duplicate").sum() == cluster.index.isin(copies).sum()
    dup = m[m.status == "duplicate"]
    assert len(dup) == 15 and (dup.split == "excluded").all()
    assert dup.reason.str.contains("duplicate of").all()
    audit = json.loads((prepared_data.dir / "audit.json").read_text())
    assert audit["label_conflicts"] == []
    assert audit["leakage"]["duplicate_pairs_across_splits"] == 0 and audit["leakage"]["ok"]


def test_subjects_and_clusters_stay_in_one_split(prepared_data):
    m = _manifest(prepared_data)
    used = m[m.split != "excluded"]
    assert (used.groupby("group").split.nunique() == 1).all()
    subjects = used.path.str.extract(r"/(S\d+)_")[0]
    assert (used.assign(subject=subjects).groupby("subject").split.nunique() == 1).all()


def test_studydata_interface(prepared_data, demo_data_dir):
    sd = prepared_data
    assert sd.classes == ["angry", "fear", "happy", "sad", "surprise"]
    assert sd.source == demo_data_dir.resolve()
    n = {s: len(sd.labels(s)) for s in ("train", "val", "test")}
    assert all(v > 0 for v in n.values()) and 0.55 < n["train"] / sum(n.values()) < 0.85
    for s in ("train", "val", "test"):
        labels = sd.labels(s)
        assert labels.dtype == np.int64 and set(labels) == set(range(5))
        px = sd.pixels(s, 48)
        assert (
            isinstance(px, np.memmap)
            and px.dtype == np.uint8
            and px.shape == (len(labels), 48, 48, 3)
        )
        assert len(sd.paths(s)) == len(labels)
    train = sd.labels("train")
    counts = np.bincount(train, minlength=5)
    expected = {i: len(train) / (5 * counts[i]) for i in range(5)}
    assert sd.class_weights == pytest.approx(expected, rel=1e-4)


def test_pixels_match_a_fresh_decode(prepared_data):
    from fer.data.decode import decode_file, resize_square

    sd = prepared_data
    paths, px = sd.paths("val"), sd.pixels("val", 48)
    for k in (0, len(paths) - 1):
        fresh = resize_square(decode_file(sd.source / paths[k]).rgb, 48)
        assert np.array_equal(px[k], fresh)


def test_a_new_size_is_built_once_even_when_processes_race(prepared_data, tmp_path):
    """Two processes ask for a size that does not exist yet; both get the same, complete file."""
    import shutil

    folder = tmp_path / "data"
    shutil.copytree(prepared_data.dir, folder)
    code = (
        "import sys; from fer.data import StudyData; "
        "px = StudyData(sys.argv[1]).pixels('train', 40); print(px.shape[0], int(px[-1].sum()))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and int(outs[0].split()[0]) == len(prepared_data.labels("train"))
    assert not list((folder / "pixels").glob("*.partial"))
    assert not (folder / "pixels" / "test_40.npy").exists()  # only the split asked for is built


def test_the_test_split_is_never_opened_by_a_train_val_reader(prepared_data):
    code = (
        "import sys; from fer.data import StudyData; sd = StudyData(sys.argv[1]); "
        "a = sd.pixels('train', 48); b = sd.pixels('val', 48); "
        "print(open('/proc/self/maps').read())"
    )
    maps = subprocess.run(
        [sys.executable, "-c", code, str(prepared_data.dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "pixels/train_48.npy" in maps and "pixels/val_48.npy" in maps
    assert "pixels/test_48.npy" not in maps and prepared_data.pixel_file("test", 48).exists()


def test_split_is_deterministic_per_seed_and_changes_with_it(
    demo_data_dir, prepared_data, tmp_path
):
    prepare_dataset(
        demo_data_dir, tmp_path / "same", group_regex=GROUP_REGEX, seed=0, image_size=32, log=_quiet
    )
    prepare_dataset(
        demo_data_dir,
        tmp_path / "other",
        group_regex=GROUP_REGEX,
        seed=1,
        image_size=32,
        log=_quiet,
    )
    base = _manifest(prepared_data)
    same = pd.read_csv(tmp_path / "same" / "manifest.csv", keep_default_na=False)
    other = pd.read_csv(tmp_path / "other" / "manifest.csv", keep_default_na=False)
    assert base.split.tolist() == same.split.tolist()
    assert base.split.tolist() != other.split.tolist()


def test_worker_pool_gives_the_same_result_as_in_process(demo_data_dir, prepared_data, tmp_path):
    prepare_dataset(
        demo_data_dir,
        tmp_path / "pool",
        group_regex=GROUP_REGEX,
        seed=0,
        image_size=48,
        workers=2,
        log=_quiet,
    )
    pooled = StudyData(tmp_path / "pool")
    assert _manifest(pooled).equals(_manifest(prepared_data))
    for s in ("train", "val", "test"):
        assert np.array_equal(pooled.pixels(s, 48), prepared_data.pixels(s, 48))


def test_data_folder_is_byte_for_byte_unchanged(demo_data_dir, prepared_data, tmp_path):
    def snapshot():
        return {
            p.relative_to(demo_data_dir).as_posix(): (
                hashlib.sha256(p.read_bytes()).hexdigest(),
                p.stat().st_mtime_ns,
            )
            for p in demo_data_dir.rglob("*")
            if p.is_file()
        }

    before = snapshot()
    folders = sorted(p for p in demo_data_dir.rglob("*") if p.is_dir())
    prepare_dataset(
        demo_data_dir, tmp_path / "again", group_regex=GROUP_REGEX, image_size=32, log=_quiet
    )
    StudyData(tmp_path / "again").pixels("val", 20)  # a new size reads DATA again
    assert snapshot() == before
    assert sorted(p for p in demo_data_dir.rglob("*") if p.is_dir()) == folders


def test_cli_prepare_writes_results_and_prints_a_summary(demo_data_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "study.cli",
            "prepare",
            str(demo_data_dir),
            "--image-size",
            "32",
            "--group-regex",
            GROUP_REGEX,
            "--study",
            "mine",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "leakage check" in proc.stdout and "OK" in proc.stdout
    assert (tmp_path / "results" / "mine" / "data" / "pixels" / "train_32.npy").is_file()
    proc = subprocess.run(
        [sys.executable, "-m", "study.cli", "prepare", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stderr.startswith("Error: DATA folder not found")
    assert "Traceback" not in proc.stderr


def test_a_new_size_needs_the_unchanged_data(prepared_data, demo_data_dir, tmp_path):
    import shutil

    data = tmp_path / "faces"
    shutil.copytree(demo_data_dir, data)
    prepare_dataset(data, tmp_path / "study", group_regex=GROUP_REGEX, image_size=32, log=_quiet)
    sd = StudyData(tmp_path / "study")
    victim = data / sd.paths("val")[0]
    Image.new("RGB", (64, 64), "red").save(victim, format=Image.open(victim).format)
    with pytest.raises(UserError, match="changed since prepare"):
        sd.pixels("val", 24)
    assert not sd.pixel_file("val", 24).exists()
    shutil.rmtree(data)
    with pytest.raises(UserError, match="is not available to build it"):
        sd.pixels("train", 24)
    assert sd.pixels("train", 32).shape[1] == 32  # the prepared size still works without DATA


def test_output_inside_data_is_refused(demo_data_dir):
    with pytest.raises(UserError, match="inside DATA"):
        prepare_dataset(demo_data_dir, demo_data_dir / "results", log=_quiet)


def test_not_a_prepared_folder(tmp_path):
    with pytest.raises(UserError, match="not a prepared study-data folder"):
        StudyData(tmp_path)


def test_settings_come_as_a_dataclass_or_as_keywords(demo_data_dir, prepared_data, tmp_path):
    """`prepare_dataset(data, out, **options)` builds a PrepareSettings: the same folder as passing
    one; a misspelt option is an error naming the settings, never silently ignored."""
    settings = PrepareSettings(group_regex=GROUP_REGEX, seed=0, image_size=48)
    prepare_dataset(demo_data_dir, tmp_path / "typed", settings=settings, log=_quiet)
    assert _manifest(prepared_data).equals(
        pd.read_csv(tmp_path / "typed" / "manifest.csv", keep_default_na=False)
    )
    with pytest.raises(TypeError, match=r"unknown setting\(s\) 'group_regx'.*group_regex"):
        prepare_dataset(demo_data_dir, tmp_path / "typo", group_regx=GROUP_REGEX, log=_quiet)
    with pytest.raises(TypeError, match="not both"):
        prepare_dataset(demo_data_dir, tmp_path / "x", settings=settings, seed=1, log=_quiet)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "x").exists()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 1  # type: ignore[misc]
