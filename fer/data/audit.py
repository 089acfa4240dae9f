"""The audit (`audit.json`): counts, class weights, duplicates, quarantine, and the leakage check.

The leakage check does not trust the splitter: it re-reads the final split column and counts every exact
or near-duplicate pair, and every group, that ends up in two different splits. Anything but 0 is a bug.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fer.data.split import SPLITS


def balanced_class_weights(train_labels: pd.Series, classes: list[str]) -> dict[str, float]:
    """sklearn's "balanced": n_samples / (n_classes * n_samples_of_class), from the train split."""
    counts = train_labels.value_counts()
    n = len(train_labels)
    return {c: round(n / (len(classes) * int(counts.get(c, 0))), 6) if counts.get(c, 0) else 0.0
            for c in classes}


def leakage(table: pd.DataFrame, pairs: list[tuple[int, int]]) -> dict:
    split, path = table["split"].tolist(), table["path"].tolist()
    crossing = [(i, j) for i, j in pairs if split[i] in SPLITS and split[j] in SPLITS and split[i] != split[j]]
    used = table[table.split.isin(SPLITS)]
    groups_across = int((used.groupby("group")["split"].nunique() > 1).sum())
    return {
        "duplicate_pairs_across_splits": len(crossing),
        "examples": [[path[i], path[j]] for i, j in crossing[:10]],
        "groups_across_splits": groups_across,
        "ok": not crossing and groups_across == 0,
    }


def build_audit(table: pd.DataFrame, classes: list[str], unknown_folders: list[str], empty_classes: list[str],
                dup_report: dict, predefined_report: dict | None, near) -> dict:
    counts = table[table.label.isin(classes)].groupby(["label", "split"]).size()
    counts = {c: {s: int(counts.get((c, s), 0)) for s in (*SPLITS, "excluded")} for c in classes}
    status_counts = table.status.value_counts()
    path, label, split, pixel_hash = (table[c].tolist() for c in ("path", "label", "split", "pixel_hash"))
    clusters = []
    for members in dup_report["clusters_idx"]:
        clusters.append({"kind": "exact" if len({pixel_hash[i] for i in members}) == 1 else "near",
                         "labels": sorted({label[i] for i in members}),
                         "paths": [path[i] for i in members],
                         "kept": [path[i] for i in members if split[i] in SPLITS]})
    quarantined = table[table.status == "quarantined"]
    return {
        "classes": classes,
        "counts": counts,
        "totals": {
            "files": len(table),
            **{s: int((table.split == s).sum()) for s in (*SPLITS, "excluded")},
            **{s: int(status_counts.get(s, 0)) for s in ("ok", "converted", "quarantined", "duplicate")},
        },
        "class_weights": balanced_class_weights(table.label[table.split == "train"], classes),
        "groups": int(table.group[table.split.isin(SPLITS)].nunique()),
        "duplicates": {
            "near_rule": {"phash_max_bits": near[0], "min_thumbnail_correlation": near[1]},
            "exact_pairs": len(dup_report["exact_pairs"]),
            "near_pairs": len(dup_report["near_pairs"]),
            "exact_clusters": sum(c["kind"] == "exact" for c in clusters),
            "near_clusters": sum(c["kind"] == "near" for c in clusters),
            "clusters": clusters,
        },
        "label_conflicts": dup_report["label_conflicts"],
        "quarantined": [{"path": p, "reason": r} for p, r in zip(quarantined.path, quarantined.reason)],
        "converted": int(status_counts.get("converted", 0)),
        "unknown_class_folders": unknown_folders,
        "empty_classes": empty_classes,
        "predefined_split": predefined_report,
        "leakage": leakage(table, dup_report["exact_pairs"] + dup_report["near_pairs"]),
    }


def summary_text(audit: dict, out_dir: Path) -> str:
    """The few lines a user reads on the terminal after `prepare`."""
    t = audit["totals"]
    width = max(len(c) for c in audit["classes"])
    lines = [f"prepared {t['files']} files -> {out_dir}",
             f"  {'class':<{width}}  {'train':>6} {'val':>6} {'test':>6} {'excl.':>6}  weight"]
    for c in audit["classes"]:
        n = audit["counts"][c]
        lines.append(f"  {c:<{width}}  {n['train']:>6} {n['val']:>6} {n['test']:>6} {n['excluded']:>6}"
                     f"  {audit['class_weights'][c]:.3f}")
    d = audit["duplicates"]
    lines.append(f"  quarantined {t['quarantined']}, converted {t['converted']}, duplicates excluded "
                 f"{t['duplicate']} ({d['exact_clusters']} exact + {d['near_clusters']} near clusters), "
                 f"label conflicts {len(audit['label_conflicts'])}, groups {audit['groups']}")
    if audit.get("group_regex_unmatched"):
        lines.append(f"  --group-regex matched no subject in {audit['group_regex_unmatched']} usable files "
                     "(each of them is its own group)")
    if audit["unknown_class_folders"]:
        lines.append(f"  unknown class folders (not used): {', '.join(audit['unknown_class_folders'])}")
    if audit["empty_classes"]:
        lines.append(f"  class folders without usable images (dropped): {', '.join(audit['empty_classes'])}")
    if audit["predefined_split"] and audit["predefined_split"]["crossing_clusters"]:
        lines.append(f"  predefined split leaks: {len(audit['predefined_split']['crossing_clusters'])} duplicate "
                     "clusters crossed splits (excluded)")
    leak = audit["leakage"]
    lines.append(f"  leakage check: {leak['duplicate_pairs_across_splits']} duplicate pairs and "
                 f"{leak['groups_across_splits']} groups across splits -> {'OK' if leak['ok'] else 'FAILED'}")
    reasons: dict[str, int] = {}
    for q in audit["quarantined"]:
        key = q["reason"].split(":")[0]
        reasons[key] = reasons.get(key, 0) + 1
    if reasons:
        lines.append("  quarantine reasons: " + ", ".join(f"{k} ({v})" for k, v in sorted(reasons.items())))
    return "\n".join(lines)
