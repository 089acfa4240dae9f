"""Study data as trials read it: `StudyData` (a prepared folder: classes, labels, memory-mapped
pixels), the pixel cache (`pixel_cache`), decoding one file (`decode`), the split names (`split`)
and the input pipeline (`batches`). Written by `fer.prepare`; importing this package does not import
the duplicate detector."""

from fer.data.study_data import StudyData

__all__ = ["StudyData"]
