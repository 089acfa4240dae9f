"""`fer-study run ... --naive-split N`: how much a notebook's random split flatters the test
accuracy.

Why: a published FER figure usually comes from a random split over files, so a subject's other
photos and duplicates of a test image sit in train. On a small posed dataset (JAFFE: 10 people) the
model can then recognise the person rather than the expression. This retrains each backbone's
selected configuration (its best trial's config.json, unchanged, same training seed) on two kinds of
split, for N split seeds each:
- `naive`: what a notebook does: every decodable file (duplicates that prepare set aside included,
  subjects ignored), split 70/15/15 at random per class;
- `audited`: what prepare does: the usable files only, duplicate clusters and subjects (the
  manifest's `group`) kept whole, the same fractions.
Both are stratified by class the same way, so the gap between them is the leakage, not class
balance. Groups are placed in a seeded random order (not prepare's largest-first, which with 10
people gives the same split for most seeds), so each seed is another draw of people; a seed whose
split leaves a class out of a split is skipped for the next one. Kinds are paired by seed.

Each split is a study-data folder of its own under `results/<study>/naive_split/data/<kind>-<seed>/`
(a manifest over the same DATA; its pixel caches are decoded from DATA here, before training).
Trainings run as Ray tasks, like `final_seeds` (study.tune.best), and finished ones are reused on a
rerun. Results: `results/<study>/naive_split.json` (per backbone, kind and seed: test accuracy and
macro F1, and the share of test images whose subject or duplicate cluster also has images in train;
per backbone the mean, sd and the paired gap naive - audited) and the report's "Naive vs audited
split" section (study/report/naive.py).

The test split of each of these folders is used once per training, to measure; nothing is chosen on
it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from fer.core import names
from fer.core.errors import UserError
from fer.core.files import write_json
from fer.data.split import SPLITS, check_every_split_has_every_class, group_split
from fer.prepare.audit import balanced_class_weights
from study.tune.options import StudyPlace

FOLDER = "naive_split"
KINDS = ("naive", "audited")
# every file a notebook could read (quarantined ones: not)
DECODABLE = ("ok", "converted", "duplicate")


def read_manifest(data_dir: Path) -> pd.DataFrame:
    return pd.read_csv(Path(data_dir) / "manifest.csv", dtype=str, keep_default_na=False)


def resplit(
    manifest: pd.DataFrame, classes: list[str], kind: str, seed: int, fractions
) -> pd.DataFrame:
    """The manifest with its `split` column redone for `kind` (naive or audited) and `seed`."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    m = manifest.copy()
    if kind == "naive":
        use = m.status.isin(DECODABLE) & m.label.isin(classes) & (m.pixel_hash != "")
        groups = m.path[use].tolist()  # every file on its own
    else:
        use = m.split.isin(SPLITS)
        groups = m.group[use].tolist()  # subjects and duplicate clusters whole
    index = {c: i for i, c in enumerate(classes)}
    labels = np.array([index[c] for c in m.label[use]], dtype=np.int64)
    split_idx = group_split(labels, groups, len(classes), fractions, seed, largest_first=False)
    check_every_split_has_every_class(
        labels, split_idx, classes, f"the {kind} split with seed {seed}"
    )
    m["split"] = "excluded"
    m.loc[use, "split"] = [SPLITS[s] for s in split_idx]
    return m


def leaked_share(manifest: pd.DataFrame) -> float:
    """Share of test images whose group (subject / duplicate cluster, as prepare found it) has train
    images."""
    train_groups = set(manifest.group[manifest.split == "train"])
    test = manifest.group[manifest.split == "test"]
    return float(test.isin(train_groups).mean()) if len(test) else 0.0


def write_split_data(
    source_dir: Path, dest: Path, manifest: pd.DataFrame, kind: str, seed: int
) -> Path:
    """A study-data folder over the same DATA with `manifest`'s split (no pixels yet: built on first
    use)."""
    if (dest / names.STUDY_DATA_FILE).is_file():
        return dest
    meta = json.loads((Path(source_dir) / names.STUDY_DATA_FILE).read_text())
    classes = list(meta["classes"])
    weights = balanced_class_weights(manifest.label[manifest.split == "train"], classes)
    partial = dest.with_name(dest.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(partial / names.MANIFEST_FILE, index=False)
    counts = {s: int((manifest.split == s).sum()) for s in SPLITS}
    write_json(
        partial / names.AUDIT_FILE,
        {
            "classes": classes,
            "class_weights": weights,
            "split_counts": counts,
            "split_kind": kind,
            "split_seed": seed,
            "test_groups_in_train": leaked_share(manifest),
        },
    )
    meta.update(image_sizes=[], seed=seed, predefined=None, split_kind=kind)
    write_json(partial / names.STUDY_DATA_FILE, meta)
    partial.rename(dest)
    return dest


def prepare_splits(
    study_dir: Path, data_dir: Path, seeds: int, sizes: set[int], log: Callable[[str], None] = print
) -> dict[tuple[str, int], Path]:
    """Write the 2 x `seeds` split folders and decode their pixel caches at `sizes`; {(kind, seed):
    folder}."""
    from fer.data import StudyData

    meta = json.loads((Path(data_dir) / names.STUDY_DATA_FILE).read_text())
    fractions = tuple(meta.get("split") or (0.7, 0.15, 0.15))
    manifest, classes = read_manifest(data_dir), list(meta["classes"])
    folders, seed = {}, int(meta.get("seed", 0)) - 1
    while len(folders) < 2 * seeds and seed < int(meta.get("seed", 0)) + 3 * seeds:
        seed += 1
        try:
            splits = {kind: resplit(manifest, classes, kind, seed, fractions) for kind in KINDS}
        except UserError as exc:
            log(f"naive split: seed {seed} skipped: {exc}")
            continue
        for kind in KINDS:
            dest = Path(study_dir) / FOLDER / "data" / f"{kind}-{seed}"
            if not (dest / names.STUDY_DATA_FILE).is_file():
                write_split_data(data_dir, dest, splits[kind], kind, seed)
            study_data = StudyData(dest)
            for size in sorted(sizes):
                for split in SPLITS:
                    if not study_data.pixel_file(split, size).exists():
                        study_data.pixels(split, size)
            folders[(kind, seed)] = dest
    log(f"naive split: {len(folders)} split folders ready ({seeds} seeds x {', '.join(KINDS)})")
    return folders


def run_naive_split(place: StudyPlace, seeds: int) -> dict:
    """Retrain every backbone's selected config on each split folder (Ray tasks); write
    naive_split.json."""
    if seeds < 2:
        raise UserError(f"--naive-split needs at least 2 split seeds for a spread, got {seeds}")
    configs = _selected_configs(place.study_dir)
    sizes = {c["image_size"] for c in configs.values()}
    folders = prepare_splits(place.study_dir, place.data_dir, seeds, sizes, place.log)
    if place.storage_uri is not None:  # the split folders reach the nodes as the data did
        from study.storage import ship_data

        for folder in folders.values():
            ship_data(place.home.storage(), folder, _rel(place, folder))
    runs = _collect(_start_trainings(place, configs, folders), folders, place.log)
    result = {
        "seeds": seeds,
        "kinds": list(KINDS),
        "backbones": {b: summarize(r) for b, r in runs.items()},
    }
    write_json(place.study_dir / names.NAIVE_SPLIT_FILE, result)
    place.mirror.push(names.NAIVE_SPLIT_FILE)
    _log_gaps(result, place.log)
    return result


def _selected_configs(study_dir: Path) -> dict[str, dict]:
    """{backbone: config} of every evaluated best trial (best/<backbone>/)."""
    configs = {}
    for best in sorted((study_dir / names.BEST_DIR).glob(f"*/{names.SELECTION_FILE}")):
        configs[best.parent.name] = json.loads((best.parent / names.CONFIG_FILE).read_text())
    if not configs:
        raise UserError(
            f"--naive-split: {study_dir} has no selected configuration (best/<backbone>/) "
            "to retrain"
        )
    return configs


def _start_trainings(place: StudyPlace, configs: dict, folders: dict) -> dict:
    """{(backbone, kind, seed): retraining} (study.tune.best.retrain: a finished one is reused)."""
    from study.tune.best import retrain

    jobs = {}
    for backbone, config in configs.items():
        for (kind, seed), data in folders.items():
            out = f"{FOLDER}/{backbone}/{kind}-{seed}"
            jobs[(backbone, kind, seed)] = retrain(place, config, out, _rel(place, data))
    return jobs


def _rel(place: StudyPlace, folder: Path) -> str:
    """A folder of the study, relative to it (what workers are given)."""
    return Path(folder).resolve().relative_to(Path(place.study_dir).resolve()).as_posix()


def _collect(jobs: dict, folders: dict, log: Callable[[str], None]) -> dict:
    """{backbone: {kind: {seed: results}}} of the trainings that finished (failures: logged)."""
    from study.tune.best import finished

    runs: dict = {}
    for (backbone, kind, seed), job in jobs.items():
        try:
            summary = finished(job)
        except Exception as exc:  # noqa: BLE001 - report and go on with the others
            log(f"naive split: {backbone} {kind} seed {seed} failed: {exc}")
            continue
        audit = json.loads((folders[(kind, seed)] / names.AUDIT_FILE).read_text())
        runs.setdefault(backbone, {}).setdefault(kind, {})[str(seed)] = {
            "test_accuracy": summary.get("test_accuracy"),
            "test_macro_f1": summary.get("test_macro_f1"),
            "val_accuracy": summary.get("val_accuracy"),
            "epochs_run": summary.get("epochs_run"),
            "n": audit["split_counts"],
            "test_groups_in_train": audit["test_groups_in_train"],
        }
    return runs


def _log_gaps(result: dict, log: Callable[[str], None]) -> None:
    for backbone, stats in result["backbones"].items():
        gap = stats.get("gap")
        if gap:
            naive, audited = stats["naive"], stats["audited"]
            log(
                f"naive split: {backbone}: test accuracy naive {naive['mean']:.3f} +/- "
                f"{naive['sd']:.3f}, audited {audited['mean']:.3f} +/- {audited['sd']:.3f}, "
                f"gap {gap['mean']:+.3f} +/- {gap['sd']:.3f} ({gap['n']} seeds)"
            )


def _stats(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def summarize(per_kind: dict) -> dict:
    """Mean/sd of test accuracy per kind, and the paired per-seed gap naive - audited."""
    out = {"runs": per_kind}
    for kind in KINDS:
        values = [
            r["test_accuracy"]
            for r in per_kind.get(kind, {}).values()
            if r.get("test_accuracy") is not None
        ]
        if values:
            out[kind] = _stats(values)
            out[kind]["test_groups_in_train"] = statistics.fmean(
                r["test_groups_in_train"] for r in per_kind[kind].values()
            )
    naive, audited = per_kind.get("naive", {}), per_kind.get("audited", {})
    gaps = [
        naive[s]["test_accuracy"] - audited[s]["test_accuracy"]
        for s in naive
        if s in audited
        and naive[s].get("test_accuracy") is not None
        and audited[s].get("test_accuracy") is not None
    ]
    if gaps:
        out["gap"] = _stats(gaps)
    return out
