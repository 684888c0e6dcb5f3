"""Image-classification data: readers, normalisation, augmentation and a batch loader that
streams image folders.

Names are imported lazily, so ``qkd_deploy.data.preprocess`` (numpy only) stays importable on a
machine without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qkd_deploy.data.augment import Augment
    from qkd_deploy.data.datasets import (
        DATASET_FORMS,
        DatasetSplits,
        ImageSplit,
        load_dataset,
        read_idx,
    )
    from qkd_deploy.data.folder import FolderSplit
    from qkd_deploy.data.loader import (
        BatchLoader,
        default_workers,
        split_statistics,
        stratified_subset,
    )
    from qkd_deploy.data.preprocess import Preprocess, normalization_stats, parse_normalize

_EXPORTS = {
    "Augment": "augment",
    "DATASET_FORMS": "datasets",
    "DatasetSplits": "datasets",
    "ImageSplit": "datasets",
    "load_dataset": "datasets",
    "read_idx": "datasets",
    "FolderSplit": "folder",
    "BatchLoader": "loader",
    "default_workers": "loader",
    "split_statistics": "loader",
    "stratified_subset": "loader",
    "Preprocess": "preprocess",
    "normalization_stats": "preprocess",
    "parse_normalize": "preprocess",
}

__all__ = [
    "DATASET_FORMS",
    "Augment",
    "BatchLoader",
    "DatasetSplits",
    "FolderSplit",
    "ImageSplit",
    "Preprocess",
    "default_workers",
    "load_dataset",
    "normalization_stats",
    "parse_normalize",
    "read_idx",
    "split_statistics",
    "stratified_subset",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
