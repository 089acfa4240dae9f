"""`prepare`: from a messy class-folder dataset to an audited, leak-free split
(results/<study>/data).

The flow is `pipeline.prepare_dataset`: scan (`scan`) -> decode and hash each file (`inspect`) ->
duplicates (`hashing`, `registration`, `candidates`, `alignment`, `duplicates`) -> groups and split
(`placement`, `fer.data.split`) -> audit (`audit`) -> pixel cache. Trials never import this package:
they read the result through `fer.data.StudyData`.
"""

from fer.prepare.pipeline import PrepareSettings, prepare_dataset

__all__ = ["PrepareSettings", "prepare_dataset"]
