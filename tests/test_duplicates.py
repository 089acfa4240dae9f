"""Near-duplicate clustering on real faces (definition: docs/duplicates.md).

Every edit kind of benchmarks/image_edits.py, applied to a real face
(tests/data/astronaut_face.png), must cluster with its source; the same face with a changed
expression (mouth and brows moved by a smooth local warp) must not; a chain of confirmed pairs must
not join two differently labelled images that are not copies of each other. The JAFFE tests (real
people, every expression) skip where $FER_SHARED (default ../shared) lacks it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.image_edits import KINDS, edit
from benchmarks.shared_data import shared_missing, shared_path
from fer.data.decode import decode_file, to_rgb
from fer.prepare.alignment import _shift_search
from fer.prepare.duplicates import NearRule, UnionFind, _cluster_near, find_duplicates
from fer.prepare.hashing import (
    batch_phashes,
    candidate_pairs,
    image_signature,
    phash,
    quick_correlation,
    signature,
    sparse_nonzero,
    thumbnail,
)
from fer.prepare.image_ops import halve, interp_weights, normalise, offset_sums
from fer.prepare.inspect import inspect_file
from fer.prepare.registration import margins, probe_pairs, trimmed_hashes

FACE = Path(__file__).parent / "data" / "astronaut_face.png"
JAFFE = shared_path("datasets", "jaffe-5class")
FER = shared_path("datasets", "fer2013-5class")


def _records(paths):
    recs = [inspect_file(Path(p), None)[0] for p in paths]
    sigs = np.stack([r.thumb for r in recs])
    return ([r.pixel_hash for r in recs], *batch_phashes(sigs), sigs)


def _other_expression(img: Image.Image, strength: float = 3.0) -> Image.Image:
    """The same face with another expression: mouth corners pulled up and brows raised by a smooth
    warp of a few pixels (at 96 px), everything else untouched."""
    a = np.asarray(img, dtype=np.float32)
    h, w = a.shape[:2]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    mouth = np.exp(
        -(
            ((yy - 0.72 * h) / (0.07 * h)) ** 2
            + ((np.abs(xx - 0.5 * w) - 0.12 * w) / (0.08 * w)) ** 2
        )
    )
    brows = np.exp(
        -(
            ((yy - 0.38 * h) / (0.06 * h)) ** 2
            + ((np.abs(xx - 0.5 * w) - 0.17 * w) / (0.1 * w)) ** 2
        )
    )
    sy = yy + strength * mouth + strength * brows  # sample from below: features move up
    y0 = np.clip(np.floor(sy).astype(int), 0, h - 2)
    f = np.clip(sy - y0, 0, 1)[..., None]
    out = a[y0, xx.astype(int)] * (1 - f) + a[y0 + 1, xx.astype(int)] * f
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("kind", KINDS)
def test_each_edit_of_a_real_face_clusters_with_its_source(kind, tmp_path):
    img = Image.open(FACE)
    img.load()
    rng = np.random.default_rng([7, KINDS.index(kind)])
    src = tmp_path / "source.png"
    img.save(src)
    copies = []
    for k in range(3):  # three strengths drawn from the stated range
        data, ext, _ = edit(img, kind, rng)
        copies.append(tmp_path / f"copy{k}.{ext}")
        copies[-1].write_bytes(data)
    other = tmp_path / "other.png"
    _other_expression(img).save(other)
    pix, h, hm, sigs = _records([src, *copies, other])
    dups = find_duplicates(pix, h, hm, sigs, labels=["happy"] * 4 + ["sad"])
    cluster = next((c for c in dups.clusters if 0 in c), [])
    assert sorted(cluster) == [0, 1, 2, 3], (kind, dups.clusters, dups.near_scores)


def test_batch_phashes_match_one_at_a_time():
    rng = np.random.default_rng(1)
    sigs = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    h, hm = batch_phashes(sigs)
    assert h == [f"{phash(thumbnail(s)):016x}" for s in sigs]
    assert hm == [f"{phash(thumbnail(s[:, ::-1])):016x}" for s in sigs]


def test_shift_search_matches_brute_force_correlation():
    rng = np.random.default_rng(2)
    a = rng.random((4, 16, 16), dtype=np.float32) * 255
    b = np.roll(a, (1, -2), axis=(1, 2)) + rng.random((4, 16, 16), dtype=np.float32) * 20
    corr, dy, dx = _shift_search(normalise(a[:, 2:14, 2:14]), b, 2)  # a's centre, normalised once
    for k in range(4):
        ac = a[k, 2:14, 2:14].ravel()
        best = max(
            (np.corrcoef(ac, b[k, 2 + y : 14 + y, 2 + x : 14 + x].ravel())[0, 1], y, x)
            for y in range(-2, 3)
            for x in range(-2, 3)
        )
        assert abs(best[0] - corr[k]) < 1e-4 and (best[1], best[2]) == (dy[k], dx[k]) == (1, -2)


def test_interp_weights_are_bilinear_in_both_layouts():
    rng = np.random.default_rng(5)
    zoom = rng.uniform(0.8, 1.2, 6).astype(np.float32)
    t = rng.uniform(-9, 9, 6).astype(np.float32)  # far enough to clamp at both edges
    for n, crop in ((16, 0), (32, 3), (64, 6)):
        w, wt = (
            interp_weights(n, zoom, t, crop),
            interp_weights(n, zoom, t, crop, transposed=True),
        )
        assert wt.flags.c_contiguous and np.array_equal(wt, w.transpose(0, 2, 1))
        c = (n - 1) / 2
        for k in range(6):
            for o in range(n - 2 * crop):
                pos = min(max(c + (crop + o - c) * float(zoom[k]) + float(t[k]), 0), n - 1)
                want = np.maximum(0, 1 - np.abs(np.arange(n) - pos))  # the tent: bilinear weights
                assert np.allclose(w[k, o], want, atol=1e-5)


def test_offset_sums_match_brute_force():
    rng = np.random.default_rng(6)
    x = rng.normal(0, 40, (3, 5, 20)).astype(np.float32)
    for k in (2, 3, 5, 13):
        got = offset_sums(x, k)
        want = np.stack([x[:, :, o : o + 20 - k + 1].sum(axis=2) for o in range(k)], axis=2)
        assert got.shape == (3, 5, k) and np.allclose(got, want, atol=1e-3)


def test_halve_is_the_2x2_mean():
    x = np.random.default_rng(7).normal(0, 40, (3, 8, 6)).astype(np.float32)
    got = halve(x)
    assert got.dtype == np.float32 and np.allclose(
        got, x.reshape(3, 4, 2, 3, 2).mean(axis=(2, 4)), atol=1e-5
    )


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_signature_from_the_decoded_image_equals_the_rgb_route(mode, tmp_path):
    """inspect_file makes the signature from the decoded grey or RGB image (no RGB round trip): the
    same pixels as `signature(rgb)`, and a grey file's RGB array is its grey level three times."""
    files = sorted(FER.glob("*/Training_*.jpg"))[:40] if FER.is_dir() else []
    rng = np.random.default_rng(8)
    for k in range(10):  # also synthetic images of odd sizes, up- and downscaled
        path = tmp_path / f"{k}.png"
        size = (int(rng.integers(20, 200)), int(rng.integers(20, 200)))
        Image.fromarray(
            rng.integers(0, 256, size[::-1] + ((3,) if mode == "RGB" else ()), dtype=np.uint8)
        ).save(path)
        files.append(path)
    for path in files:
        dec = decode_file(path)
        if mode == "RGB" and dec.image.mode == "L":
            dec.image = dec.image.convert("RGB")
        assert dec.image is not None
        assert np.array_equal(image_signature(dec.image), signature(dec.rgb)), path
        if dec.image.mode == "L":
            assert np.array_equal(dec.rgb, np.asarray(dec.image.convert("RGB"))), path
    with Image.open(files[-1]) as img:
        img.load()
        notes: list[str] = []
        assert np.array_equal(to_rgb(img, notes), np.asarray(img.convert("RGB")))


def test_probe_pairs_match_brute_force():
    rng = np.random.default_rng(4)
    h = rng.integers(0, 2**63, (3, 60), dtype=np.uint64)
    h[1, 7] = h[0, 30] ^ np.uint64(0b111)  # image 7's scale probe ~ image 30's registered hash
    h[2, 41] = h[0, 3]  # image 41's second-peak probe = image 3's registered hash
    h[0, 50] = h[0, 12] ^ np.uint64(1 << 40)
    pairs, how = probe_pairs(h, 4, block_cells=100)
    bits = lambda x, y: int(x ^ y).bit_count()  # noqa: E731
    want = {}
    for i in range(60):
        for j in range(i + 1, 60):
            d = [bits(h[0, i], h[0, j]), bits(h[1, i], h[0, j]), bits(h[0, i], h[1, j])]
            d += [bits(h[2, i], h[0, j]), bits(h[0, i], h[2, j])]
            if min(d) <= 4:
                want[(i, j)] = next(k for k, x in enumerate(d) if x <= 4)
    assert {(int(i), int(j)): int(w) for (i, j), w in zip(pairs, how)} == want
    assert {(7, 30), (3, 41), (12, 50)} <= set(want)


def test_candidate_pairs_match_brute_force():
    rng = np.random.default_rng(5)
    h, hm = rng.integers(0, 2**63, (2, 70), dtype=np.uint64)
    h[9] = h[33] ^ np.uint64(0b1011)  # plain neighbours
    h[20] = hm[50] ^ np.uint64(1 << 62)  # 20 ~ the mirror image of 50
    bits = lambda x, y: int(x ^ y).bit_count()  # noqa: E731
    want = {
        (i, j): bits(h[i], hm[j]) < bits(h[i], h[j])
        for i in range(70)
        for j in range(i + 1, 70)
        if min(bits(h[i], h[j]), bits(h[i], hm[j])) <= 5
    }
    for cells in (100, 10_000):  # several row blocks through the same buffers, and one
        pairs, flips = candidate_pairs(h, hm, 5, block_cells=cells)
        assert {(int(i), int(j)): bool(f) for (i, j), f in zip(pairs, flips)} == want
    assert want[(9, 33)] is False and want[(20, 50)] is True
    pairs, flips = candidate_pairs(h, None, 5)
    assert {(int(i), int(j)) for i, j in pairs} == {
        p for p in want if bits(h[p[0]], h[p[1]]) <= 5
    } and not flips.any()


def test_quick_correlation_any_size_matches_brute_force():
    rng = np.random.default_rng(6)
    for size, r in ((16, 1), (32, 2)):
        t = (rng.random((3, size, size)) * 255).astype(np.float32)
        t[1] = np.roll(t[0], (1, -1), axis=(0, 1)) + rng.random((size, size)) * 10
        got = quick_correlation(t, np.array([[0, 1], [0, 2]]), max_shift=r)
        for k, j in enumerate((1, 2)):
            c = t[0, r : size - r, r : size - r].ravel()
            want = max(
                np.corrcoef(c, t[j, y : y + size - 2 * r, x : x + size - 2 * r].ravel())[0, 1]
                for y in range(2 * r + 1)
                for x in range(2 * r + 1)
            )
            assert abs(got[k] - want) < 1e-4
        assert got[0] > 0.99 > got[1]


def test_a_padded_border_is_trimmed_back_to_its_source(tmp_path):
    """A frame padded around a real face and resized back shrinks the face; its margins are found
    and the trimmed image hashes like the source again (its plain pHash does not)."""
    img = Image.open(FACE).convert("L")
    w, h = img.size
    paths = [tmp_path / "source.png"]
    img.save(paths[0])
    for k, (tone, width) in enumerate([(0, 6), (255, 8), (128, 5)]):
        framed = Image.new("L", (w + 2 * width, h + 2 * width), tone)
        framed.paste(img, (width, width))
        paths.append(tmp_path / f"framed{k}.png")
        framed.resize((w, h), Image.BICUBIC).save(paths[-1])
    _, ph, _, sigs = _records(paths)
    rows = np.arange(len(paths))
    m = margins(sigs, rows)
    assert (m[0] == 0).all() and (m[1:] >= 2).all(), m
    trimmed = trimmed_hashes(sigs, rows, m)
    source = np.uint64(int(ph[0], 16))
    assert all(int(np.bitwise_count(t ^ source)) <= 6 for t in trimmed[1:]), trimmed
    assert trimmed[0] == source  # no margins: the trimmed hash is the pHash
    assert max(int(np.bitwise_count(np.uint64(int(x, 16)) ^ source)) for x in ph[1:]) > 12


def test_sparse_nonzero_matches_numpy():
    rng = np.random.default_rng(3)
    for shape in [(40, 1001), (3, 7), (1, 8), (5, 16)]:
        mask = rng.random(shape) < 0.01
        mask[-1, -1] = True
        assert [a.tolist() for a in sparse_nonzero(mask)] == [a.tolist() for a in np.nonzero(mask)]


def test_same_face_other_expression_does_not_cluster(tmp_path):
    img = Image.open(FACE)
    img.load()
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    img.save(paths[0])
    _other_expression(img, 3.0).save(paths[1])
    _other_expression(img, -3.0).save(paths[2])
    pix, h, hm, sigs = _records(paths)
    dups = find_duplicates(pix, h, hm, sigs, labels=["neutral", "happy", "sad"])
    assert dups.clusters == []
    dups = find_duplicates(pix, h, hm, sigs)  # without labels every pair gets the strict check
    assert dups.clusters == []


def test_a_chain_does_not_join_two_expressions(tmp_path):
    """a ~ b (a copy) and b ~ c (say a borderline match) must not put a and c, labelled differently
    and not copies of each other, into one cluster."""
    img = Image.open(FACE)
    img.load()
    data, _, _ = edit(img, "jpeg", np.random.default_rng(0))
    (tmp_path / "b.jpg").write_bytes(data)
    img.save(tmp_path / "a.png")
    _other_expression(img, 3.0).save(tmp_path / "c.png")
    _, _, _, sigs = _records([tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c.png"])
    score = {"corr": 0.99, "local": 0.01, "mirror": False, "zoom": 1.0, "shift": 0.0}
    uf = UnionFind(3)
    used, _, refused = _cluster_near(
        sigs,
        [(0, 1, score), (1, 2, dict(score, corr=0.95))],
        uf,
        ["happy", "happy", "sad"],
        NearRule(min_correlation=0.90, max_local=0.075),
    )
    assert (
        uf.find(0) == uf.find(1) and uf.find(0) != uf.find(2) and refused == 1 and used == [(0, 1)]
    )
    # the strict results the aligned check already has are reused, not recomputed
    for known, joined in (({(0, 2): False}, False), ({(0, 2): True}, True)):
        uf = UnionFind(3)
        _, _, refused = _cluster_near(
            sigs,
            [(0, 1, score), (1, 2, dict(score, corr=0.95))],
            uf,
            ["happy", "happy", "sad"],
            NearRule(min_correlation=0.90, max_local=0.075),
            checked={(0, 2): known[(0, 2)], (1, 2): True},
        )
        assert (uf.find(0) == uf.find(2)) is joined and refused == (0 if joined else 1)


def _jaffe_or_skip():
    if not JAFFE.is_dir():
        pytest.skip(shared_missing(JAFFE))
    return sorted(JAFFE.rglob("*.png"))


def test_jaffe_one_persons_different_expressions_never_cluster():
    paths = _jaffe_or_skip()
    pix, h, hm, sigs = _records(paths)
    labels = [p.parent.name for p in paths]
    dups = find_duplicates(pix, h, hm, sigs, labels=labels)
    person = [re.match(r"^([A-Z]{2})_", p.name).group(1) for p in paths]
    bad = [
        (paths[i].name, paths[j].name)
        for c in dups.clusters
        for i in c
        for j in c
        if i < j and person[i] == person[j] and labels[i] != labels[j]
    ]
    assert bad == []
    assert all(len({person[i] for i in c}) == 1 for c in dups.clusters)  # never two people


@pytest.mark.parametrize("regex", [None, r"^([A-Z]{2})_"])
def test_jaffe_prepares(regex, tmp_path):
    from fer.prepare import prepare_dataset

    _jaffe_or_skip()
    audit = prepare_dataset(JAFFE, tmp_path / "data", group_regex=regex, image_size=48, log=None)
    assert audit["leakage"]["ok"] and not audit["label_conflicts"]
    assert all(
        audit["counts"][c][s] > 0 for c in audit["classes"] for s in ("train", "val", "test")
    )
    assert (tmp_path / "data" / "duplicates_sheet.png").is_file()


def test_fer2013_faces_each_edit_kind_and_jaffe_expressions(tmp_path):
    """Real FER2013 faces (48 px), one copy per edit kind each, with one JAFFE person's every
    expression as distractors: a regression check of benchmarks/duplicates_eval.py at small scale
    (its calibration part: Training_ files, JAFFE KA). Measured there on 300 sources per part:
    docs/duplicates.md."""
    if not FER.is_dir() or not JAFFE.is_dir():
        pytest.skip(shared_missing(FER if not FER.is_dir() else JAFFE))
    files = sorted(FER.glob("*/Training_*.jpg"))
    sources = files[7 :: len(files) // 10][:10]
    rng = np.random.default_rng(11)
    paths, labels = [], []
    for k, src in enumerate(sources):
        img = Image.open(src)
        img.load()
        paths.append(src)
        labels.append(src.parent.name)
        for kind in KINDS:
            data, ext, _ = edit(img, kind, rng)
            paths.append(tmp_path / f"{k}_{kind}.{ext}")
            paths[-1].write_bytes(data)
            labels.append(src.parent.name)
    jaffe = sorted(JAFFE.glob("*/KA_*.png"))
    paths += jaffe
    labels += [p.parent.name for p in jaffe]
    pix, h, hm, sigs = _records(paths)
    dups = find_duplicates(pix, h, hm, sigs, labels=labels)
    cluster = {i: c for c, members in enumerate(dups.clusters) for i in members}
    n = len(KINDS) + 1
    missed = [
        (k, kind)
        for k in range(len(sources))
        for j, kind in enumerate(KINDS)
        if cluster.get(k * n) is None or cluster.get(k * n + 1 + j) != cluster[k * n]
    ]
    # calibration recall over 300 sources (docs/duplicates.md): shift 0.92, border 0.89, crop 0.98,
    # others >= 0.997
    hard = ("shift", "border", "crop")
    assert [m for m in missed if m[1] not in hard] == [], missed
    assert all(sum(m[1] == kind for m in missed) <= 2 for kind in hard), missed
    first = len(sources) * n
    for c in dups.clusters:
        assert (
            len({labels[i] for i in c if i >= first}) <= 1
        )  # one person's expressions never together
        assert len({i // n for i in c if i < first}) <= 1  # never two FER2013 sources
