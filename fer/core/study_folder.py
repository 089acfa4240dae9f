"""Which study folder is this? The one answer every command uses for "a path inside
results/<study>/".

A study folder holds `data/` (the prepared data); its best models sit in `best/<backbone>/` and its
trials in `trials/<trial_id>/`. Commands accept any of these (or a file in them) and need the study
around it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fer.core import names

# folders directly below a study folder that hold one model each
_MODEL_PARENTS = (names.BEST_DIR, names.TRIALS_DIR)


@dataclasses.dataclass(frozen=True)
class StudyFolder:
    """A study folder, results/<study>/, and the places in it the commands read."""

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / names.DATA_DIR

    @property
    def has_results(self) -> bool:
        return names.has_study_results(self.root)


def find_study(path: str | Path) -> StudyFolder | None:
    """The study folder `path` is, or lies in: the study folder itself, its `data/`, a
    `best/<backbone>/` or `trials/<trial_id>/` folder, or a file in one of those; None when it is
    none of these."""
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    candidates = [folder]
    if folder.name == names.DATA_DIR:
        candidates.append(folder.parent)
    if folder.parent.name in _MODEL_PARENTS:
        candidates.append(folder.parent.parent)
    for candidate in candidates:
        if names.is_study_folder(candidate):
            return StudyFolder(candidate)
    return None
