"""Bad and unusual input files: each is converted correctly, quarantined with the right reason, or
refused with a clear error. Datasets here are tiny folders of smooth random images (distinct unless
copied)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pillow_heif
import pytest
from PIL import Image

from fer.core.errors import UserError
from fer.data.decode import Quarantine, decode_file
from fer.prepare import prepare_dataset


def _quiet(*_a, **_k):
    pass


def smooth_image(seed: int, size=(64, 64)) -> Image.Image:
    """A distinct, smooth colour image (random 6x6 colours, upsampled): survives resizing like a
    photo."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        size, Image.BICUBIC
    )


def make_dataset(root: Path, classes=("a", "b", "c"), per_class=8, seed=0) -> Path:
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            smooth_image(seed * 1000 + c * 100 + k).save(root / name / f"img_{k:02d}.png")
    return root


def prepare(data: Path, out: Path, **kw) -> tuple[pd.DataFrame, dict]:
    import json

    kw.setdefault("image_size", 32)
    kw.setdefault("workers", 0)
    prepare_dataset(data, out, log=_quiet, **kw)
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False).set_index("path")
    return manifest, json.loads((out / "audit.json").read_text())


# ---- decoding single files
# ----------------------------------------------------------------------------------


def test_heic_is_decoded_even_behind_a_jpg_name(tmp_path):
    img = smooth_image(1)
    path = tmp_path / "photo.jpg"
    pillow_heif.from_pillow(img).save(path, quality=95)
    dec = decode_file(path)
    assert dec.format == "HEIF" and dec.rgb.shape == (64, 64, 3)
    assert np.abs(dec.rgb.astype(int) - np.asarray(img, dtype=int)).mean() < 8
    assert any("content is HEIF" in n for n in dec.notes)


def test_text_named_png_is_quarantined(tmp_path):
    path = tmp_path / "x.png"
    path.write_text("not a picture at all")
    with pytest.raises(Quarantine, match="not an image"):
        decode_file(path)


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display = rotate 90 degrees clockwise
    path = tmp_path / "rot.jpg"
    Image.fromarray(arr).save(path, exif=exif.tobytes(), quality=95)
    dec = decode_file(path)
    assert dec.rgb.shape == (40, 20, 3)
    assert dec.rgb[:15].mean() > 200 and dec.rgb[25:].mean() < 50  # left half became the top half
    assert any("EXIF orientation 6" in n for n in dec.notes)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "CMYK", "I;16", "P", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    base = np.asarray(smooth_image(2, (32, 32)))
    if mode == "I;16":
        grey = np.asarray(Image.fromarray(base).convert("L")).astype(np.uint16) * 257
        img = Image.fromarray(grey)  # a uint16 array: a 16-bit greyscale image
        expected = np.repeat((grey // 257).astype(np.uint8)[:, :, None], 3, axis=2)
    elif mode in ("LA", "RGBA"):
        rgba = Image.fromarray(base).convert("RGBA")
        alpha = np.full((32, 32), 255, np.uint8)
        alpha[:, :16] = 0  # left half fully transparent: must come out white, not black
        rgba.putalpha(Image.fromarray(alpha))
        img = rgba.convert(mode)
        expected = None
    else:
        img = Image.fromarray(base).convert(mode)
        expected = np.asarray(img.convert("RGB"))
    path = tmp_path / f"m.{'jpg' if mode == 'CMYK' else 'png'}"
    img.save(path)
    dec = decode_file(path)
    assert dec.rgb.dtype == np.uint8 and dec.rgb.shape == (32, 32, 3)
    assert dec.converted and any(f"mode {Image.open(path).mode} -> RGB" in n for n in dec.notes)
    if mode in ("LA", "RGBA"):
        assert (dec.rgb[:, :16] == 255).all()
        visible = np.asarray(img.convert("RGB"))[:, 16:]
        assert np.abs(dec.rgb[:, 16:].astype(int) - visible).max() <= 1
    elif mode == "CMYK":
        assert (
            np.abs(
                dec.rgb.astype(int) - np.asarray(Image.open(path).convert("RGB"), dtype=int)
            ).max()
            <= 1
        )
        assert np.abs(dec.rgb.astype(int) - base.astype(int)).mean() < 10
    else:
        assert np.abs(dec.rgb.astype(int) - expected.astype(int)).max() <= 1
    if mode == "I;16":
        assert (
            dec.rgb.max() > 128
        )  # scaled down from 16 bits, not clipped to white or crushed to black


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A tiny PNG file that declares width x height pixels (a decompression-bomb shape)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 40_000, 40_000)
    assert path.stat().st_size < 200
    with pytest.raises(Quarantine, match="decompression bomb: 40000x40000"):
        decode_file(path)


def test_empty_and_truncated_files(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(Quarantine, match=r"empty file \(0 bytes\)"):
        decode_file(tmp_path / "empty.jpg")
    buf = io.BytesIO()
    smooth_image(3, (128, 128)).save(buf, format="JPEG", quality=95)
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(Quarantine, match="truncated image"):
        decode_file(tmp_path / "cut.jpg")


# ---- a whole folder
# -----------------------------------------------------------------------------------------


def test_bad_files_in_a_folder_are_quarantined_with_reasons(tmp_path):
    data = make_dataset(tmp_path / "data")
    (data / "a" / "empty.png").write_bytes(b"")
    (data / "a" / "notes.png").write_text("hello")
    (data / "b" / ".hidden.png").write_bytes((data / "b" / "img_00.png").read_bytes())
    (data / "b" / ".thumbs").mkdir()
    (data / "b" / ".thumbs" / "t.png").write_bytes(b"x")
    _png_header_only(data / "c" / "bomb.png", 30_000, 30_000)
    buf = io.BytesIO()
    smooth_image(9, (96, 96)).save(buf, format="JPEG")
    (data / "c" / "cut.jpg").write_bytes(buf.getvalue()[:400])
    outside = tmp_path / "outside.png"
    smooth_image(77).save(outside)
    (data / "a" / "link_out.png").symlink_to(outside)
    (data / "a" / "link_in.png").symlink_to(data / "b" / "img_01.png")
    (data / "a" / "dir_link").symlink_to(tmp_path, target_is_directory=True)
    (data / "a" / "sub").mkdir()
    smooth_image(555).save(data / "a" / "sub" / "deep.png")
    os.mkfifo(data / "c" / "pipe.png")
    (data / "loose.png").write_bytes((data / "a" / "img_00.png").read_bytes())

    m, audit = prepare(data, tmp_path / "out")
    reasons = {p: r for p, r in zip(m.index, m.reason)}
    assert reasons["a/empty.png"] == "empty file (0 bytes)"
    assert reasons["a/notes.png"].startswith("not an image")
    assert reasons["b/.hidden.png"] == "hidden file"
    assert reasons["b/.thumbs/"] == "hidden folder, not read"
    assert reasons["c/bomb.png"].startswith("decompression bomb")
    assert reasons["c/cut.jpg"].startswith(("truncated image", "corrupt or unreadable"))
    assert reasons["a/link_out.png"] == "symlink to a file outside DATA, not followed"
    assert reasons["a/dir_link/"] == "symlinked folder, not followed"
    assert reasons["c/pipe.png"] == "not a regular file"
    assert reasons["loose.png"] == "not inside a class folder"
    for p in (
        "a/empty.png",
        "a/notes.png",
        "b/.hidden.png",
        "c/bomb.png",
        "c/cut.jpg",
        "a/link_out.png",
    ):
        assert m.loc[p, "status"] == "quarantined" and m.loc[p, "split"] == "excluded"
    # a symlink inside DATA is read, and is the same picture as its target under another label
    assert "label conflict" in m.loc["a/link_in.png", "reason"]
    assert "label conflict" in m.loc["b/img_01.png", "reason"]
    assert (
        m.loc["a/sub/deep.png", "label"] == "a" and m.loc["a/sub/deep.png", "split"] != "excluded"
    )
    assert not any("outside.png" in p for p in m.index)
    assert {q["path"] for q in audit["quarantined"]} >= {"a/empty.png", "c/bomb.png", "c/pipe.png"}
    assert audit["totals"]["quarantined"] == (m.status == "quarantined").sum()


def test_a_file_that_vanishes_before_it_is_read_is_quarantined(tmp_path):
    from fer.prepare.inspect import inspect_file

    rec, pixels = inspect_file(tmp_path / "gone.png", 16)
    assert rec.status == "quarantined" and rec.reason.startswith("unreadable") and pixels is None


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_quarantined(tmp_path):
    data = make_dataset(tmp_path / "data")
    locked = data / "a" / "locked.png"
    smooth_image(42).save(locked)
    locked.chmod(0)
    try:
        m, _ = prepare(data, tmp_path / "out")
    finally:
        locked.chmod(0o644)
    assert m.loc["a/locked.png", "reason"].startswith("unreadable")


def test_duplicates_label_conflicts_and_keep_duplicates(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=8)
    src = Image.open(data / "a" / "img_00.png")
    src.save(
        data / "a" / "z_copy.webp", lossless=True
    )  # same pixels, other bytes (sorts after: not kept)
    src.resize((48, 48), Image.LANCZOS).save(data / "a" / "small.jpg", quality=80)  # near
    src.save(data / "b" / "stolen.png")  # the same picture labelled b: a conflict
    m, audit = prepare(data, tmp_path / "out")
    assert m.loc["a/z_copy.webp", "reason"].startswith("label conflict")
    assert {p for p in m.index if m.loc[p, "reason"].startswith("label conflict")} == {
        "a/img_00.png",
        "a/z_copy.webp",
        "a/small.jpg",
        "b/stolen.png",
    }
    assert audit["label_conflicts"][0]["labels"] == ["a", "b"]

    (data / "b" / "stolen.png").unlink()
    m, audit = prepare(data, tmp_path / "out2")
    assert m.loc["a/img_00.png", "status"] == "ok" and m.loc["a/img_00.png", "split"] != "excluded"
    assert m.loc["a/z_copy.webp", "reason"] == "exact duplicate of a/img_00.png"
    assert m.loc["a/small.jpg", "reason"] == "near duplicate of a/img_00.png"
    assert m.loc["a/z_copy.webp", "pixel_hash"] == m.loc["a/img_00.png", "pixel_hash"]
    assert m.loc["a/z_copy.webp", "sha256"] != m.loc["a/img_00.png", "sha256"]
    assert audit["duplicates"]["exact_pairs"] == 1 and audit["duplicates"]["near_pairs"] >= 1

    m, _ = prepare(data, tmp_path / "out3", keep_duplicates=True)
    kept = m.loc[["a/img_00.png", "a/z_copy.webp", "a/small.jpg"]]
    assert (
        (kept.status != "duplicate").all()
        and kept.split.nunique() == 1
        and kept.group.nunique() == 1
    )


def test_distinct_images_are_not_called_duplicates(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=12)
    m, audit = prepare(data, tmp_path / "out")
    assert (m.status == "ok").all() and audit["duplicates"]["clusters"] == []


def test_predefined_split_by_name_and_by_csv_with_crossing_clusters_excluded(tmp_path):
    data = tmp_path / "data"
    for c, name in enumerate(("x", "y")):
        (data / name).mkdir(parents=True)
        for k in range(9):
            prefix = ("Training", "PublicTest", "PrivateTest")[k % 3]
            smooth_image(c * 100 + k).save(data / name / f"{prefix}_{k}.png")
    Image.open(data / "x" / "Training_0.png").save(
        data / "x" / "PrivateTest_copy.png"
    )  # leaks train -> test
    spec = "train=^Training_,val=^PublicTest_,test=^PrivateTest_"
    m, audit = prepare(data, tmp_path / "out", predefined=spec)
    assert (
        m.loc["y/Training_0.png", "split"] == "train"
        and m.loc["y/PublicTest_1.png", "split"] == "val"
    )
    assert m.loc["y/PrivateTest_2.png", "split"] == "test"
    assert (
        m.loc["x/Training_0.png", "split"] == "excluded"
        and m.loc["x/PrivateTest_copy.png", "split"] == "excluded"
    )
    assert "crosses the predefined splits" in m.loc["x/Training_0.png", "reason"]
    crossing = audit["predefined_split"]["crossing_clusters"]
    assert len(crossing) == 1 and crossing[0]["splits"] == ["test", "train"]
    assert audit["leakage"]["duplicate_pairs_across_splits"] == 0

    table = tmp_path / "split.csv"
    rows = [
        f"{p},{'test' if p.endswith('_1.png') else 'val' if p.endswith('_2.png') else 'train'}"
        for p in sorted(m.index)
        if p.endswith(".png")
    ]
    table.write_text("path,split\n" + "\n".join(rows) + "\n")
    m2, _ = prepare(data, tmp_path / "out2", predefined=str(table))
    assert (
        m2.loc["y/PublicTest_1.png", "split"] == "test"
        and m2.loc["y/PrivateTest_2.png", "split"] == "val"
    )


def test_unknown_class_folders_are_reported(tmp_path):
    data = make_dataset(tmp_path / "data", classes=("a", "b", "misc"))
    m, audit = prepare(data, tmp_path / "out", classes=["a", "b"])
    assert audit["unknown_class_folders"] == ["misc"] and audit["classes"] == ["a", "b"]
    assert (m[m.index.str.startswith("misc/")].reason == "in unknown class folder 'misc'").all()


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "DATA folder not found"),
        ("no_classes", "no class folders"),
        ("one_class", "need at least two classes"),
        ("too_few", "class 'b' has 2 usable image"),
        ("all_junk", "need at least two classes"),
        ("bad_split", "--split needs three positive fractions"),
        ("bad_regex", "--group-regex"),
        ("split_folders", "holds split folders"),
    ],
)
def test_clear_errors(tmp_path, case, message):
    data = tmp_path / "data"
    kw = {}
    if case == "no_classes":
        data.mkdir()
        smooth_image(0).save(data / "loose.png")
    elif case == "one_class":
        make_dataset(data, classes=("a",))
    elif case == "too_few":
        make_dataset(data, classes=("a",))
        make_dataset(data, classes=("b",), per_class=2, seed=5)
    elif case == "all_junk":
        make_dataset(data, classes=("a",))
        (data / "b").mkdir()
        (data / "b" / "x.png").write_text("junk")
    elif case == "bad_split":
        make_dataset(data)
        kw["split"] = "0.8,0.3,0.1"
    elif case == "split_folders":
        make_dataset(data / "train")
        make_dataset(data / "test")
    elif case == "bad_regex":
        make_dataset(data)
        kw["group_regex"] = "^(S\\d+"
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        prepare(data, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_group_regex_keeps_subjects_whole_on_a_small_folder(tmp_path):
    data = tmp_path / "data"
    for c, name in enumerate(("a", "b")):
        (data / name).mkdir(parents=True)
        for k in range(24):
            smooth_image(c * 100 + k).save(data / name / f"P{k % 8}_{name}_{k}.png")
    m, audit = prepare(data, tmp_path / "out", group_regex=r"^(P\d+)_")
    subjects = m.index.str.extract(r"/(P\d+)_")[0].to_numpy()
    per_subject = pd.Series(m.split.to_numpy()).groupby(subjects).nunique()
    assert (per_subject == 1).all() and audit["groups"] == 8 and audit["leakage"]["ok"]


def test_group_regex_also_finds_subject_folders_and_reports_misses(tmp_path):
    data = tmp_path / "data"
    for c, name in enumerate(("a", "b")):
        for k in range(24):
            folder = data / name / f"P{k % 8}"
            folder.mkdir(parents=True, exist_ok=True)
            smooth_image(c * 100 + k).save(folder / f"{k}.png")
        smooth_image(900 + c).save(data / name / "nobody.png")
    m, audit = prepare(data, tmp_path / "out", group_regex=r"^(P\d+)/")
    subjects = m.index.str.extract(r"/(P\d+)/")[0]
    assert (m.group[subjects.notna().to_numpy()] == subjects.dropna().to_numpy()).all()
    assert audit["group_regex_unmatched"] == 2 and m.loc["a/nobody.png", "group"] == "a/nobody.png"
