"""Study data: from a class-folder dataset to an audited, leak-free split with a decoded-pixel cache.

`prepare_dataset(data_dir, out_dir, ...)` writes `out_dir` (= results/<study>/data); `StudyData(out_dir)`
reads it. See INTERNALS.md for the interface and docs/results.md for the files.
"""

from fer.data.prepare import prepare_dataset
from fer.data.study_data import StudyData

__all__ = ["StudyData", "prepare_dataset"]
