"""Training jobs that ``test_distributed`` runs under torchrun (``python distributed_jobs.py
OUT``): process 0 trains, process 1 follows, and both save what they trained in OUT."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from qkd_deploy.config import TrainConfig, load_config
from qkd_deploy.data import BatchLoader, load_dataset, normalization_stats
from qkd_deploy.data.datasets import ImageSplit
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import METHODS
from qkd_deploy.pipeline import checks as P
from qkd_deploy.rundir import RunDir
from qkd_deploy.train import distributed
from qkd_deploy.train.loop import fit, train_job

SHARED_METHODS = sorted(name for name, cls in METHODS.items() if cls.trains and not cls.data_free)


def toy_job() -> tuple[nn.Module, BatchLoader, TrainConfig]:
    """A BatchNorm-free classifier on the digits: on N processes it must train exactly as on one
    (the averaged gradient of the shards is the whole batch's gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    data = load_dataset("digits")
    preprocess = normalization_stats(data.train.images.numpy())
    loader = BatchLoader(
        data.train, preprocess, 60, shuffle=True, augment=data.augment, seed=0, drop_last=True
    )
    return model, loader, TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.0)


class RankGate(nn.Module):
    """A classifier whose second layer only process 0's steps use: process 1 gets no gradient
    for it, as a method that draws a branch at random per step may."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        self.extra = nn.Linear(10, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if self.training and distributed.current().rank == 1:
            return y
        return self.extra(y)


def method_job(method: str, folder: Path) -> tuple[nn.Module, BatchLoader, TrainConfig]:
    """``method`` built as the pipeline builds it (untrained teachers and student, digits), and
    a few steps of 6 images."""
    data = load_dataset("digits")
    config = load_config(overrides=[f"student.method={method}", "student.bits=[w4a4]"])
    preprocess = normalization_stats(data.train.images.numpy())
    ctx = P.Context(config, data, preprocess, RunDir(folder))
    distiller, _, _ = P.untrained_method(ctx)
    few = ImageSplit(data.train.images[:18], data.train.labels[:18])
    loader = BatchLoader(few, preprocess, 6, shuffle=True, augment=data.augment, drop_last=True)
    return distiller, loader, TrainConfig(epochs=1, lr=0.01, warmup_epochs=0.0)


def lead(out: Path) -> None:
    """The toy job; again from the test's checkpoint of its first epoch (trained by one
    process); with a layer that process 1 does not use; then every method that can be shared."""
    for name, model in (("toy", None), ("resume", None), ("gate", RankGate())):
        toy, loader, cfg = toy_job()
        model = model or toy
        torch.save(model.state_dict(), out / f"{name}.before.pt")
        distiller = build_distiller("none", model, [])
        history = fit(distiller, loader, cfg, out / f"{name}.checkpoint.pt", desc=name)
        torch.save({"state": model.state_dict(), "history": history}, out / f"{name}.pt")
        torch.save(model.state_dict(), out / f"{name}.rank0.pt")
    for method in SHARED_METHODS:
        distiller, loader, cfg = method_job(method, Path(tempfile.mkdtemp()))
        before = [p.detach().clone() for p in distiller.student.parameters()]
        history = fit(distiller, loader, cfg, out / f"{method}.pt", desc=method, progress=False)
        after = distiller.student.parameters()
        changed = any(not torch.equal(a, p) for a, p in zip(before, after, strict=True))
        torch.save({"history": history, "changed": changed}, out / f"{method}.result.pt")
        torch.save(distiller.state_dict(), out / f"{method}.rank0.pt")


def follow(group: distributed.Group, out: Path) -> None:
    """``loop.serve``, keeping each trained student for the test to compare."""
    while (job := group.receive_job()) is not None:
        train_job(group, **job)
        trained = job["job"]
        # the toy jobs' distiller holds just the student: their files are its state, as rank 0's
        model = trained.distiller if trained.desc in SHARED_METHODS else trained.distiller.student
        torch.save(model.state_dict(), out / f"{trained.desc}.rank1.pt")


if __name__ == "__main__":
    out = Path(sys.argv[1])
    with distributed.session() as group:
        assert group is not None, "run me under torchrun"
        if group.leader:
            lead(out)
        else:
            follow(group, out)
