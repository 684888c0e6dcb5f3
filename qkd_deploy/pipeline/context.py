"""What every stage of a run reads: its config and plan, its data and preprocessing, and its
run directory."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import torch

from qkd_deploy.config import Config
from qkd_deploy.data import (
    BatchLoader,
    DatasetSplits,
    Preprocess,
    load_dataset,
    parse_normalize,
    split_statistics,
    stratified_subset,
)
from qkd_deploy.pipeline.plan import Plan
from qkd_deploy.rundir import RunDir
from qkd_deploy.train.device import resolve_device

EVAL_BATCH = 256


def load_data(config: Config) -> tuple[DatasetSplits, Preprocess]:
    """The run's data (``data.train_limit`` applied) and its preprocessing: the configured
    normalisation, or the training split's statistics."""
    data = load_dataset(config.data.spec, config.data.image_size)
    if config.data.train_limit:
        data.train = stratified_subset(data.train, config.data.train_limit, config.seed)
    preprocess = (
        parse_normalize(config.data.normalize, data.in_channels)
        if config.data.normalize
        else split_statistics(data.train, config.data.workers)
    )
    return data, preprocess


@dataclasses.dataclass
class Context:
    """What every stage needs: the config, the data, its preprocessing, the run directory."""

    config: Config
    data: DatasetSplits
    preprocess: Preprocess
    run: RunDir
    # CPU training in channels-last layout; off when a model of the run cannot run in it
    # (checks.check_method_fits finds out before training)
    channels_last: bool = True

    @functools.cached_property
    def plan(self) -> Plan:
        return Plan.of(self.config)

    @functools.cached_property
    def device(self) -> torch.device:
        """Where the models train (``config.device``; everything else runs on the CPU)."""
        return resolve_device(self.config.device)

    def train_loader(self, batch_size: int, seed_offset: int) -> BatchLoader:
        augment = self.data.augment if self.config.data.augment else None
        return BatchLoader(
            self.data.train,
            self.preprocess,
            batch_size,
            shuffle=True,
            augment=augment,
            seed=self.config.seed + seed_offset,
            drop_last=True,
            workers=self.config.data.workers,
        )

    def test_loader(self) -> BatchLoader:
        return BatchLoader(
            self.data.test, self.preprocess, EVAL_BATCH, workers=self.config.data.workers
        )

    @property
    def test_labels(self) -> np.ndarray:
        return self.data.test.labels.numpy()
