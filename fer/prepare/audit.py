"""The audit (`audit.json`): counts, class weights, duplicates, quarantine, and the leakage check.

The leakage check does not trust the splitter: it re-reads the final split column and counts every
exact or near-duplicate pair, and every group, that ends up in two different splits. Anything but 0
is a bug.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fer.data.split import SPLITS
from fer.prepare.placement import DuplicateReport


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
    dups: DuplicateReport,
    predefined_report: dict | None,
) -> dict:
    """audit.json from the final manifest (`table`) and what the steps before reported."""
    status_counts = table.status.value_counts()
    quarantined = table[table.status == "quarantined"]
    return {
        "classes": classes,
        "counts": _counts(table, classes),
        "totals": _totals(table, status_counts),
        "class_weights": balanced_class_weights(table.label[table.split == "train"], classes),
        "groups": int(table.group[table.split.isin(SPLITS)].nunique()),
        "duplicates": _duplicates(dups, _clusters(table, dups)),
        "label_conflicts": dups.label_conflicts,
        "quarantined": [
            {"path": p, "reason": r} for p, r in zip(quarantined.path, quarantined.reason)
        ],
        "converted": int(status_counts.get("converted", 0)),
        "unknown_class_folders": unknown_folders,
        "empty_classes": empty_classes,
        "predefined_split": predefined_report,
        "leakage": leakage(table, dups.exact_pairs + dups.near_pairs),
    }


def _counts(table: pd.DataFrame, classes: list[str]) -> dict:
    """Per class, how many images each split got and how many were excluded."""
    counts = table[table.label.isin(classes)].groupby(["label", "split"]).size()
    return {c: {s: int(counts.get((c, s), 0)) for s in (*SPLITS, "excluded")} for c in classes}


def _totals(table: pd.DataFrame, status_counts: pd.Series) -> dict:
    return {
        "files": len(table),
        **{s: int((table.split == s).sum()) for s in (*SPLITS, "excluded")},
        **{
            s: int(status_counts.get(s, 0)) for s in ("ok", "converted", "quarantined", "duplicate")
        },
    }


def _clusters(table: pd.DataFrame, dups: DuplicateReport) -> list[dict]:
    """Each duplicate cluster for a reader: its paths, which copies were kept, and why its pairs
    count as copies."""
    path, label, split, pixel_hash = (
        table[c].tolist() for c in ("path", "label", "split", "pixel_hash")
    )
    cluster_of = {i: k for k, members in enumerate(dups.clusters) for i in members}
    why_in: dict[int, list] = {}  # the pairs of each cluster, in one pass (not clusters x pairs)
    for (i, j), w in _pair_reasons(dups).items():
        if i in cluster_of and cluster_of[i] == cluster_of.get(j):
            why_in.setdefault(cluster_of[i], []).append({"pair": [path[i], path[j]], **w})
    return [
        {
            "kind": "exact" if len({pixel_hash[i] for i in members}) == 1 else "near",
            "labels": sorted({label[i] for i in members}),
            "paths": [path[i] for i in members],
            "kept": [path[i] for i in members if split[i] in SPLITS],
            "why": why_in.get(k, []),
        }
        for k, members in enumerate(dups.clusters)
    ]


def _duplicates(dups: DuplicateReport, clusters: list[dict]) -> dict:
    bits, min_correlation, max_local = dups.near_rule
    return {
        "near_rule": {
            "phash_max_bits": bits,
            "min_correlation": min_correlation,
            "max_local_difference": max_local,
            "definition": "docs/duplicates.md",
        },
        "unions_refused_by_cluster_check": dups.refused_unions,
        "exact_pairs": len(dups.exact_pairs),
        "near_pairs": len(dups.near_pairs),
        "exact_clusters": sum(c["kind"] == "exact" for c in clusters),
        "near_clusters": sum(c["kind"] == "near" for c in clusters),
        "clusters": clusters,
    }


def edit_guess(score: dict) -> str:
    """What a confirmed near pair looks like, in words, from its alignment (alignment.compare)."""
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


def _pair_reasons(dups: DuplicateReport) -> dict:
    """(i, j) -> why the pair counts as copies, and how similar it is."""
    out = {}
    for i, j in dups.exact_pairs:
        out[(i, j)] = {"why": "exact (same pixels)", "similarity": 1.0}
    for (i, j), s in zip(dups.near_pairs, dups.near_scores):
        out[(i, j)] = {
            "why": edit_guess(s),
            "similarity": s["corr"],
            "local_difference": s["local"],
        }
    return out


SHEET_PAIRS = 12  # excluded pairs drawn for the contact sheet
SHEET_CONFLICTS = 6  # and label-conflict pairs


def write_contact_sheet(
    dest: Path, sigs, paths: list[str], labels: list[str], dups: DuplicateReport, seed: int
) -> Path | None:
    """A PNG of a random sample of excluded pairs and of label-conflict clusters, side by side with
    captions, so a user can see what `prepare` dropped. None when there is nothing to show."""
    reasons = _pair_reasons(dups)
    rows = _sheet_rows(reasons, dups, labels, seed)
    if not rows:
        return None
    captions = [_caption(what, reasons[pair], pair, paths, labels) for what, pair in rows]
    _draw_sheet([pair for _, pair in rows], captions, sigs).save(dest)
    return dest


def _sheet_rows(reasons: dict, dups: DuplicateReport, labels: list[str], seed: int) -> list:
    """(what, pair) per row: a seeded sample of plain excluded pairs, then of label conflicts."""
    import numpy as np

    rng = np.random.default_rng(seed)
    conflict_sets = [set(c) for c in dups.clusters if len({labels[i] for i in c}) > 1]
    in_conflict = set().union(*conflict_sets) if conflict_sets else set()
    plain = [p for p in reasons if p[0] not in in_conflict]
    conflicts = [p for p in reasons if p[0] in in_conflict]
    picked = rng.permutation(len(plain))[:SHEET_PAIRS] if plain else []
    rows = [("excluded", plain[k]) for k in picked]
    picked = rng.permutation(len(conflicts))[:SHEET_CONFLICTS] if conflicts else []
    return rows + [("label conflict", conflicts[k]) for k in picked]


def _caption(what: str, w: dict, pair, paths: list[str], labels: list[str]) -> list[str]:
    i, j = pair
    return [
        f"{what}: {w['why']}, similarity {w['similarity']:.3f}"
        + (f", local diff {w['local_difference']:.2f}" if "local_difference" in w else ""),
        f"{paths[i]} ({labels[i]})",
        f"{paths[j]} ({labels[j]})",
    ]


def _draw_sheet(pairs: list, captions: list[list[str]], sigs):
    """One line per pair: both signatures, then the caption lines."""
    from PIL import Image, ImageDraw

    cell, text_w, line = 64, 560, 76
    sheet = Image.new("L", (2 * cell + text_w, line * len(pairs)), 255)
    draw = ImageDraw.Draw(sheet)
    for r, ((i, j), caption) in enumerate(zip(pairs, captions)):
        y = r * line + 6
        sheet.paste(Image.fromarray(sigs[i]), (0, y))
        sheet.paste(Image.fromarray(sigs[j]), (cell + 2, y))
        for k, t in enumerate(caption):
            draw.text((2 * cell + 10, y + 4 + 16 * k), t[:95], fill=0)
    return sheet


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
            f"  predefined split leaks: {len(audit['predefined_split']['crossing_clusters'])} "
            "duplicate clusters crossed splits (excluded)"
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
