"""Does near-duplicate clustering find edited copies of real faces, and never join one person's
expressions?

    python3 benchmarks/duplicates_eval.py [--fer $FER_SHARED/datasets/fer2013-5class]
                                          [--jaffe $FER_SHARED/datasets/jaffe-5class] [--sources
                                          300] [--before OLD_AUDIT_JSON]

With --before (an audit.json of FER2013 prepared by an earlier version, 48 px, its own split), it
also prepares FER2013 with this version and reports both exclusion counts (total, label conflicts,
per class) and how many of the earlier label-conflict clusters (copies checked by eye) are still
clustered whole.

Fixtures from real faces (docs/duplicates.md), two parts: calibration = FER2013 `Training_` sources
and JAFFE subjects KA KM MK NM UY (sorted, every other one); held-out = `PublicTest_`/`PrivateTest_`
sources and JAFFE KL KR NA TM YM. Thresholds in fer/prepare/duplicates.py were chosen on the
calibration part only. Per FER2013 source, one copy per edit kind (benchmarks/image_edits.py,
strengths from its stated ranges), written as files and run through the real decoder and
`find_duplicates`, with all the part's sources and JAFFE images together (each one a distractor for
the others). Reported per part: recall per edit kind (copy in the same final cluster as its source),
false joins (pairs in a cluster from different FER sources or different JAFFE people), JAFFE
same-person different-expression pairs in clusters (target 0) and same-expression takes clustered
(allowed). One JSON line with the machine, then a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.shared_data import shared_path  # noqa: E402 - after the repository is on sys.path

SHARED = shared_path("datasets")


def _records(paths):
    from fer.data.decode import decode_file
    from fer.prepare.hashing import phashes, signature

    sigs, h, hm = [], [], []
    for p in paths:
        s = signature(decode_file(Path(p)).rgb)
        a, b = phashes(s)
        sigs.append(s)
        h.append(a)
        hm.append(b)
    return np.stack(sigs), h, hm


def run_part(part: str, fer: Path, jaffe: Path, n_sources: int, seed: int, tmp: Path) -> dict:
    """One part's figures: recall per edit kind, false joins, JAFFE expressions clustered."""
    from benchmarks.image_edits import KINDS
    from fer.prepare.duplicates import find_duplicates

    rng = np.random.default_rng([seed, part == "held_out"])
    fixtures = _fixtures(part, fer, jaffe, n_sources, rng, tmp)
    paths, meta, sources = fixtures["paths"], fixtures["meta"], fixtures["sources"]
    sigs, h, hm = _records(paths)
    pix = [f"{i}" for i in range(len(paths))]  # no exact duplicates among fixtures by construction
    t0 = time.process_time()
    labels = [m[2] if m[0] == "jaffe" else sources[m[1]].parent.name for m in meta]
    dups = find_duplicates(pix, h, hm, sigs, labels=labels)
    cpu = time.process_time() - t0
    cluster_of = {i: c for c, members in enumerate(dups.clusters) for i in members}
    src_index = {m[1]: i for i, m in enumerate(meta) if m[0] == "fer" and m[2] == "source"}

    def with_source(i, m):  # copy i (meta m) is in the same final cluster as its source
        return cluster_of.get(i, -1) >= 0 and cluster_of.get(i) == cluster_of.get(src_index[m[1]])

    recall = {}
    for kind in KINDS:
        hits = [with_source(i, m) for i, m in enumerate(meta) if m[0] == "fer" and m[2] == kind]
        recall[kind] = round(float(np.mean(hits)), 4)
    copies = [(i, m) for i, m in enumerate(meta) if m[0] == "fer" and m[2] != "source"]
    joins = _joins(dups.clusters, meta, sources, paths)
    return {
        "part": part,
        "fer_sources": n_sources,
        "jaffe_people": fixtures["people"],
        "images": len(paths),
        "recall_per_edit": recall,
        "recall_all_edits": round(sum(with_source(i, m) for i, m in copies) / len(copies), 4),
        "false_joins_fer_or_people": joins["false_fer"] + joins["diff_people"],
        "false_join_examples": sorted(joins["false_examples"])[:10],
        "jaffe_diff_expression_pairs_clustered": joins["diff_expr"],
        "jaffe_diff_expression_examples": joins["diff_examples"],
        "jaffe_same_expression_pairs_clustered": joins["same_expr"],
        "near_pairs": len(dups.near_pairs),
        "refused_unions": dups.refused,
        "find_duplicates_cpu_s": round(cpu, 2),
    }


def _fixtures(part: str, fer: Path, jaffe: Path, n_sources: int, rng, tmp: Path) -> dict:
    """The part's images: FER2013 sources, one edited copy of each per edit kind (written as files),
    and the part's JAFFE people. meta per image: ("fer", source index, kind) or ("jaffe", person,
    expression)."""
    from PIL import Image

    from benchmarks.image_edits import KINDS, edit

    files = sorted(p for p in fer.rglob("*.jpg"))
    pool = [p for p in files if p.name.startswith("Training_") == (part == "calibration")]
    sources = [pool[k] for k in rng.choice(len(pool), n_sources, replace=False)]
    paths, meta = [], []
    for k, src in enumerate(sources):
        paths.append(src)
        meta.append(("fer", k, "source"))
        img = Image.open(src)
        img.load()
        for kind in KINDS:
            data, ext, _ = edit(img, kind, rng)
            out = tmp / f"{part}_{k}_{kind}.{ext}"
            out.write_bytes(data)
            paths.append(out)
            meta.append(("fer", k, kind))
    people = sorted({p.name[:2] for p in jaffe.rglob("*.png")})
    mine = people[0::2] if part == "calibration" else people[1::2]
    for p in sorted(jaffe.rglob("*.png")):
        if p.name[:2] in mine:
            paths.append(p)
            meta.append(("jaffe", p.name[:2], p.parent.name))
    return {"paths": paths, "meta": meta, "sources": sources, "people": mine}


def _joins(clusters, meta, sources, paths) -> dict:
    """Pairs inside final clusters that must not be there (different FER sources, different JAFFE
    people, one JAFFE person's different expressions) and those allowed (same-expression takes)."""
    out = {
        "false_fer": 0,
        "diff_people": 0,
        "diff_expr": 0,
        "same_expr": 0,
        "diff_examples": [],
        "false_examples": set(),
    }
    for members in clusters:
        for x in range(len(members)):
            for y in range(x + 1, len(members)):
                a, b = meta[members[x]], meta[members[y]]
                if a[0] != b[0] or (a[0] == "fer" and a[1] != b[1]):
                    out["false_fer"] += 1
                    names = [sources[m[1]].name if m[0] == "fer" else m[1] for m in (a, b)]
                    out["false_examples"].add(" ~ ".join(sorted(names)))
                elif a[0] == "jaffe":
                    if a[1] != b[1]:
                        out["diff_people"] += 1
                        out["false_examples"].add(f"{a[1]} ~ {b[1]}")
                    elif a[2] != b[2]:
                        out["diff_expr"] += 1
                        out["diff_examples"].append(
                            [paths[members[x]].name, paths[members[y]].name]
                        )
                    else:
                        out["same_expr"] += 1
    return out


def before_after(fer: Path, before_audit: Path, tmp: Path) -> dict:
    import itertools

    from fer.prepare import prepare_dataset

    def counts(audit):
        return {
            "excluded": audit["totals"]["excluded"],
            "label_conflict_clusters": len(audit["label_conflicts"]),
            "label_conflict_files": sum(len(c["paths"]) for c in audit["label_conflicts"]),
            "excluded_per_class": {c: v["excluded"] for c, v in audit["counts"].items()},
        }

    old = json.loads(before_audit.read_text())
    new = prepare_dataset(
        fer,
        tmp / "fer_data",
        image_size=48,
        log=None,
        predefined="train=^Training_,val=^PublicTest_,test=^PrivateTest_",
    )
    cluster = {p: k for k, c in enumerate(new["duplicates"]["clusters"]) for p in c["paths"]}
    whole = sum(
        len({cluster.get(p, -1 - n) for n, p in enumerate(c["paths"])}) == 1
        for c in old["label_conflicts"]
    )
    pairs = [
        (a, b) for c in old["label_conflicts"] for a, b in itertools.combinations(c["paths"], 2)
    ]
    kept = sum(a in cluster and cluster.get(a) == cluster.get(b) for a, b in pairs)
    return {
        "before": counts(old),
        "after": counts(new),
        "old_conflict_clusters_still_whole": f"{whole}/{len(old['label_conflicts'])}",
        "old_conflict_pairs_still_clustered": round(kept / max(1, len(pairs)), 4),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fer", type=Path, default=SHARED / "fer2013-5class")
    p.add_argument("--jaffe", type=Path, default=SHARED / "jaffe-5class")
    p.add_argument("--sources", type=int, default=300, help="FER2013 sources per part")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="calibration,held_out")
    p.add_argument(
        "--before", type=Path, help="audit.json of FER2013 prepared by an earlier version"
    )
    args = p.parse_args()
    from benchmarks.image_edits import RANGES
    from fer.prepare import candidates as c
    from fer.prepare import duplicates as d
    from fer.runtime.machine import machine_info

    parts = []
    with tempfile.TemporaryDirectory() as tmp:
        for part in args.parts.split(","):
            parts.append(run_part(part, args.fer, args.jaffe, args.sources, args.seed, Path(tmp)))
        fer2013 = before_after(args.fer, args.before, Path(tmp)) if args.before else None
    rule = {
        "phash_max_bits": d.NEAR_PHASH_BITS,
        "prefilter": c.PREFILTER_MIN_CORRELATION,
        "min_correlation": d.NEAR_MIN_CORRELATION,
        "max_local": d.NEAR_MAX_LOCAL,
        "loose_min_correlation": d.LOOSE_MIN_CORRELATION,
        "loose_max_local": d.LOOSE_MAX_LOCAL,
        "registered_min_corr16": c.REGISTERED_MIN_CORR16,
        "registered_prefilter": c.REGISTERED_PREFILTER,
    }
    print(
        json.dumps(
            {
                "benchmark": "duplicates_eval",
                "rule": rule,
                "edit_ranges": RANGES,
                "parts": parts,
                "fer2013_before_after": fer2013,
                "machine": machine_info(),
            }
        )
    )
    kinds = list(RANGES)
    print(f"\n{'edit kind':<22}" + "".join(f"{q['part']:>14}" for q in parts))
    for k in kinds:
        print(f"{k:<22}" + "".join(f"{q['recall_per_edit'][k]:>14.3f}" for q in parts))
    for key in (
        "recall_all_edits",
        "false_joins_fer_or_people",
        "jaffe_diff_expression_pairs_clustered",
        "jaffe_same_expression_pairs_clustered",
        "refused_unions",
        "find_duplicates_cpu_s",
    ):
        print(f"{key:<22}"[:40] + "".join(f"{q[key]:>14}" for q in parts))
    if fer2013:
        print(f"\nFER2013 prepare: {json.dumps(fer2013)}")


if __name__ == "__main__":
    main()
