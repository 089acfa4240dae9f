"""The audit (`audit.json`): counts, class weights, duplicates, quarantine, and the leakage check.

The leakage check does not trust the splitter: it re-reads the final split column and counts every
exact or near-duplicate pair, and every group, that ends up in two different splits. Anything but 0
is a bug.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fer.data.split import SPLITS


def balanced_class_weights(train_labels: pd.Series, classes: list[str]) -> dict[str, float]:
    """sklearn's "balanced": n_samples / (n_classes * n_samples_of_class), from the train split."""
    counts = train_labels.value_counts()
    n = len(train_labels)
    return {
        c: round(n / (len(classes) * int(counts.get(c, 0))), 6) if counts.get(c, 0) else 0.0
        for c in classes
    }


def leakage(table: pd.DataFrame, pairs: list[tuple[int, int]]) -> dict:
    split, path = table["split"].tolist(), table["path"].tolist()
    crossing = [
        (i, j)
        for i, j in pairs
        if split[i] in SPLITS and split[j] in SPLITS and split[i] != split[j]
    ]
    used = table[table.split.isin(SPLITS)]
    groups_across = int((used.groupby("group")["split"].nunique() > 1).sum())
    return {
        "duplicate_pairs_across_splits": len(crossing),
        "examples": [[path[i], path[j]] for i, j in crossing[:10]],
        "groups_across_splits": groups_across,
        "ok": not crossing and groups_across == 0,
    }


def build_audit(
    table: pd.DataFrame,
    classes: list[str],
    unknown_folders: list[str],
    empty_classes: list[str],
    dup_report: dict,
    predefined_report: dict | None,
    near,
) -> dict:
    counts = table[table.label.isin(classes)].groupby(["label", "split"]).size()
    counts = {c: {s: int(counts.get((c, s), 0)) for s in (*SPLITS, "excluded")} for c in classes}
    status_counts = table.status.value_counts()
    path, label, split, pixel_hash = (
        table[c].tolist() for c in ("path", "label", "split", "pixel_hash")
    )
    clusters = []
    why_of = _pair_reasons(dup_report)
    cluster_of = {i: k for k, members in enumerate(dup_report["clusters_idx"]) for i in members}
    why_in: dict[int, list] = {}  # the pairs of each cluster, in one pass (not clusters x pairs)
    for (i, j), w in why_of.items():
        if i in cluster_of and cluster_of[i] == cluster_of.get(j):
            why_in.setdefault(cluster_of[i], []).append({"pair": [path[i], path[j]], **w})
    for k, members in enumerate(dup_report["clusters_idx"]):
        clusters.append(
            {
                "kind": "exact" if len({pixel_hash[i] for i in members}) == 1 else "near",
                "labels": sorted({label[i] for i in members}),
                "paths": [path[i] for i in members],
                "kept": [path[i] for i in members if split[i] in SPLITS],
                "why": why_in.get(k, []),
            }
        )
    quarantined = table[table.status == "quarantined"]
    return {
        "classes": classes,
        "counts": counts,
        "totals": {
            "files": len(table),
            **{s: int((table.split == s).sum()) for s in (*SPLITS, "excluded")},
            **{
                s: int(status_counts.get(s, 0))
                for s in ("ok", "converted", "quarantined", "duplicate")
            },
        },
        "class_weights": balanced_class_weights(table.label[table.split == "train"], classes),
        "groups": int(table.group[table.split.isin(SPLITS)].nunique()),
        "duplicates": {
            "near_rule": {
                "phash_max_bits": near[0],
                "min_correlation": near[1],
                "max_local_difference": near[2],
                "definition": "docs/duplicates.md",
            },
            "unions_refused_by_cluster_check": dup_report.get("refused_unions", 0),
            "exact_pairs": len(dup_report["exact_pairs"]),
            "near_pairs": len(dup_report["near_pairs"]),
            "exact_clusters": sum(c["kind"] == "exact" for c in clusters),
            "near_clusters": sum(c["kind"] == "near" for c in clusters),
            "clusters": clusters,
        },
        "label_conflicts": dup_report["label_conflicts"],
        "quarantined": [
            {"path": p, "reason": r} for p, r in zip(quarantined.path, quarantined.reason)
        ],
        "converted": int(status_counts.get("converted", 0)),
        "unknown_class_folders": unknown_folders,
        "empty_classes": empty_classes,
        "predefined_split": predefined_report,
        "leakage": leakage(table, dup_report["exact_pairs"] + dup_report["near_pairs"]),
    }


def edit_guess(score: dict) -> str:
    """What a confirmed near pair looks like, in words, from its alignment (hashing.compare)."""
    parts = []
    if score.get("mirror"):
        parts.append("mirrored")
    if abs(score.get("zoom", 1.0) - 1.0) > 0.02:
        parts.append("cropped or rescaled")
    if score.get("shift", 0.0) >= 2.0:
        parts.append("shifted")
    if not parts:
        close = score.get("corr", 0) >= 0.985
        parts.append(
            "re-encoded, resized or re-lit" if close else "edited or a near-identical frame"
        )
    return ", ".join(parts)


def _pair_reasons(dup_report: dict) -> dict:
    out = {}
    for i, j in dup_report["exact_pairs"]:
        out[(i, j)] = {"why": "exact (same pixels)", "similarity": 1.0}
    for (i, j), s in zip(dup_report["near_pairs"], dup_report.get("near_scores", [])):
        out[(i, j)] = {
            "why": edit_guess(s),
            "similarity": s["corr"],
            "local_difference": s["local"],
        }
    return out


def write_contact_sheet(
    dest: Path,
    sigs,
    paths: list[str],
    labels: list[str],
    dup_report: dict,
    seed: int,
    n_pairs: int = 12,
    n_conflicts: int = 6,
) -> Path | None:
    """A PNG of a random sample of excluded pairs and of label-conflict clusters, side by side with
    captions, so a user can see what `prepare` dropped. None when there is nothing to show."""
    import numpy as np
    from PIL import Image, ImageDraw

    reasons = _pair_reasons(dup_report)
    rng = np.random.default_rng(seed)
    conflict_sets = [set(c) for c in dup_report["clusters_idx"] if len({labels[i] for i in c}) > 1]
    in_conflict = set().union(*conflict_sets) if conflict_sets else set()
    plain = [p for p in reasons if p[0] not in in_conflict]
    conflicts = [p for p in reasons if p[0] in in_conflict]
    rows = [("excluded", p) for p in (rng.permutation(len(plain))[:n_pairs] if plain else [])]
    rows = [("excluded", plain[k]) for _, k in rows]
    picked = rng.permutation(len(conflicts))[:n_conflicts] if conflicts else []
    rows += [("label conflict", conflicts[k]) for k in picked]
    if not rows:
        return None
    cell, text_w, line = 64, 560, 76
    sheet = Image.new("L", (2 * cell + text_w, line * len(rows)), 255)
    draw = ImageDraw.Draw(sheet)
    for r, (what, (i, j)) in enumerate(rows):
        y = r * line + 6
        sheet.paste(Image.fromarray(sigs[i]), (0, y))
        sheet.paste(Image.fromarray(sigs[j]), (cell + 2, y))
        w = reasons[(i, j)]
        caption = [
            f"{what}: {w['why']}, similarity {w['similarity']:.3f}"
            + (f", local diff {w['local_difference']:.2f}" if "local_difference" in w else ""),
            f"{paths[i]} ({labels[i]})",
            f"{paths[j]} ({labels[j]})",
        ]
        for k, t in enumerate(caption):
            draw.text((2 * cell + 10, y + 4 + 16 * k), t[:95], fill=0)
    sheet.save(dest)
    return dest


def summary_text(audit: dict, out_dir: Path) -> str:
    """The few lines a user reads on the terminal after `prepare`."""
    t = audit["totals"]
    width = max(len(c) for c in audit["classes"])
    lines = [
        f"prepared {t['files']} files -> {out_dir}",
        f"  {'class':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'excl.':>6}  weight",
    ]
    for c in audit["classes"]:
        n = audit["counts"][c]
        lines.append(
            f"  {c:<{width}}  {n['train']:>6} {n['val']:>6} {n['test']:>6} {n['excluded']:>6}"
            f"  {audit['class_weights'][c]:.3f}"
        )
    d = audit["duplicates"]
    lines.append(
        f"  quarantined {t['quarantined']}, converted {t['converted']}, duplicates excluded "
        f"{t['duplicate']} ({d['exact_clusters']} exact + {d['near_clusters']} near clusters), "
        f"label conflicts {len(audit['label_conflicts'])}, groups {audit['groups']}"
    )
    if audit.get("group_regex_unmatched"):
        lines.append(
            f"  --group-regex matched no subject in {audit['group_regex_unmatched']} usable files "
            "(each of them is its own group)"
        )
    if audit["unknown_class_folders"]:
        lines.append(
            f"  unknown class folders (not used): {', '.join(audit['unknown_class_folders'])}"
        )
    if audit["empty_classes"]:
        lines.append(
            f"  class folders without usable images (dropped): {', '.join(audit['empty_classes'])}"
        )
    if audit["predefined_split"] and audit["predefined_split"]["crossing_clusters"]:
        lines.append(
            f"  predefined split leaks: {len(audit['predefined_split']['crossing_clusters'])} duplicate "
            "clusters crossed splits (excluded)"
        )
    leak = audit["leakage"]
    lines.append(
        f"  leakage check: {leak['duplicate_pairs_across_splits']} duplicate pairs and "
        f"{leak['groups_across_splits']} groups across splits -> {'OK' if leak['ok'] else 'FAILED'}"
    )
    reasons: dict[str, int] = {}
    for q in audit["quarantined"]:
        key = q["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines.append(
            "  quarantine reasons: " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items()))
        )
    return "\n".join(lines)
