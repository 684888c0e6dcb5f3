"""``fit``: trains a Distiller for a number of epochs, one atomic checkpoint per epoch.

A run killed mid-way resumes from the last finished epoch with the same optimiser, schedule,
RNG state and data order (the loader's order depends only on seed and epoch), so a resumed run
gives the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from qkd_deploy.config import TrainConfig
from qkd_deploy.distill.base import Distiller
from qkd_deploy.errors import TrainingDiverged, UserError
from qkd_deploy.fileio import atomic_write_bytes
from qkd_deploy.torch_files import load_weights_only
from qkd_deploy.train import distributed
from qkd_deploy.train.device import CPU
from qkd_deploy.train.optim import build_optimizer, build_scheduler


@dataclass
class EpochStats:
    epoch: int
    loss: float
    train_accuracy: float
    losses: dict[str, float]


class StepsOnly:
    """The loader of a data-free method: ``steps`` batches of ``(None, None)`` per epoch, so the
    method generates its own images and never sees the training set."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def set_epoch(self, epoch: int) -> None:
        """Nothing depends on the epoch."""

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return iter([(None, None)] * self.steps)


@dataclass
class TrainingJob:
    """What ``fit`` trains: sent as is to the other processes of a torchrun run."""

    distiller: Distiller
    loader: Any
    cfg: TrainConfig
    checkpoint: Path
    saved: dict | None  # the checkpoint's contents, when resuming
    desc: str
    layout: torch.memory_format  # of the models and 4-D batches while they train


def fit(
    distiller: Distiller,
    loader,
    cfg: TrainConfig,
    checkpoint: Path,
    desc: str = "train",
    progress: bool = True,
    device: torch.device = CPU,
    channels_last: bool = True,
) -> list[dict]:
    """Train ``distiller`` with ``loader`` (a ``data.BatchLoader``) on ``device``; returns
    per-epoch stats. The distiller (student, teachers and every extra part) is moved to
    ``device`` for training and back to the CPU when it ends; on the CPU it trains in
    channels-last memory layout unless ``channels_last`` is False (see ``channels_last_error``).

    If ``checkpoint`` exists, training resumes after the epoch it holds. Under torchrun, the
    other processes get the job and train with this one (``train.distributed``).
    """
    saved = _read_checkpoint(checkpoint) if checkpoint.exists() else None
    layout = _layout(device) if channels_last else torch.preserve_format
    job = TrainingJob(distiller, loader, cfg, checkpoint, saved, desc, layout)
    group = distributed.current()
    if group is not None:
        group.send_job({"job": job, "device_type": device.type, "rng": _rng_state(device)})
    return _train(job, write=True, progress=progress, device=device, group=group)


def train_job(group: distributed.Group, job: TrainingJob, device_type: str, rng: dict) -> None:
    """The other processes' side of ``fit``: the same training on this process's shards, with
    process 0's random state, without progress bar or checkpoints."""
    device = group.cuda_device("cuda") if device_type == "cuda" else CPU
    _set_rng_state(rng, device)
    _train(job, write=False, progress=False, device=device, group=group)


def serve(group: distributed.Group) -> None:
    """Processes 1..N-1: train every job process 0 sends, until it says stop."""
    while (job := group.receive_job()) is not None:
        train_job(group, **job)


def _train(
    job: TrainingJob,
    *,
    write: bool,
    progress: bool,
    device: torch.device,
    group: distributed.Group | None,
) -> list[dict]:
    distiller, cfg = job.distiller, job.cfg
    # before the optimizer is built: it keeps the parameters' devices
    distiller.to(device, memory_format=job.layout)
    optimizer = build_optimizer(distiller.parameter_groups(), cfg)
    scheduler = build_scheduler(optimizer, cfg, len(job.loader))
    if group is not None:
        group.busy = True  # until the last epoch: an error in between leaves the others waiting
    history: list[dict] = []
    start = 0
    if job.saved is not None:
        start, history = _restore(job, optimizer, scheduler, device)
    for epoch in range(start, cfg.epochs):
        job.loader.set_epoch(epoch)
        distiller.train()
        stats = _train_epoch(job, optimizer, scheduler, epoch, progress, device, group)
        if group is not None:
            group.average_running_statistics(distiller)
        history.append(stats.__dict__)
        if write:
            state = _checkpoint_state(distiller, optimizer, scheduler, epoch + 1, history, device)
            _write_checkpoint(job.checkpoint, state)
    if group is not None:
        group.busy = False
    distiller.to(CPU, memory_format=torch.contiguous_format).eval()
    return history


def _layout(device: torch.device) -> torch.memory_format:
    """Channels-last on the CPU, where oneDNN's convolutions train faster in it (the default
    run's teacher and float student stages took 17-20 % less time; QAT stages the same); the
    given layout elsewhere. Only 4-D tensors change (mid-training checkpoints keep the layout,
    which loading ignores), and ``fit`` hands the models back contiguous."""
    return torch.channels_last if device.type == "cpu" else torch.preserve_format


def channels_last_error(
    distiller: Distiller, images: torch.Tensor | None, labels: torch.Tensor | None
) -> str | None:
    """Why ``distiller``'s training step fails in channels-last layout, or None when it runs.

    Some models cannot: ``x.view(x.size(0), -1)`` on a convolution's output (a common way to
    flatten) needs the ordinary layout. Run on an untrained copy whose step already ran in the
    ordinary layout, so a failure here is the layout's; the copy goes back to that layout."""
    distiller.to(memory_format=torch.channels_last)
    try:
        if images is not None:
            images = images.contiguous(memory_format=torch.channels_last)
        distiller.forward_train(images, labels, 0.0)
    except Exception as error:  # noqa: BLE001 - whatever the layout breaks: train without it
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    finally:
        distiller.to(memory_format=torch.contiguous_format)
    return None


def _train_epoch(
    job: TrainingJob, optimizer, scheduler, epoch: int, progress: bool, device, group
) -> EpochStats:
    distiller, loader, cfg, desc = job.distiller, job.loader, job.cfg, job.desc
    total_steps = cfg.epochs * len(loader)
    seen = correct = 0
    loss_sum = 0.0
    term_sums: dict[str, float] = {}
    bar = tqdm(
        _process_batches(loader, group),
        total=len(loader),
        desc=f"{desc} {epoch + 1}/{cfg.epochs}",
        leave=True,
        disable=not progress,
        dynamic_ncols=True,
        mininterval=0.5,
    )
    for step, (images, labels, share) in enumerate(bar):
        done = (epoch * len(loader) + step) / total_steps
        if images is not None:  # data-free methods get None and generate on the model's device
            layout = job.layout if images.dim() == 4 else torch.preserve_format
            images, labels = images.to(device, memory_format=layout), labels.to(device)
        logits, terms = distiller.forward_train(images, labels, done)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise _diverged(job, terms, epoch, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if group is not None:
            group.average_gradients(optimizer, share)
        if cfg.grad_clip is not None:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        distiller.after_step()
        n = logits.shape[0]
        seen += n
        if labels is not None:  # data-free methods train on generated images
            correct += (logits.argmax(1) == labels).sum().item()
        loss_sum += loss.item() * n
        for name, value in terms.items():
            term_sums[name] = term_sums.get(name, 0.0) + value.item() * n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    if group is not None:  # the whole batch's statistics, not this process's shard's
        names = list(term_sums)
        seen, correct, loss_sum, *sums = group.sum(
            [seen, correct, loss_sum, *(term_sums[n] for n in names)]
        )
        term_sums = dict(zip(names, sums, strict=True))
    return EpochStats(
        epoch + 1, loss_sum / seen, correct / seen, {k: v / seen for k, v in term_sums.items()}
    )


def _diverged(job: TrainingJob, terms: dict, epoch: int, step: int) -> TrainingDiverged:
    """The error that stops a stage whose loss became NaN or infinite: which terms, where, what
    is kept and what to change."""
    bad = {name: v.item() for name, v in terms.items() if not torch.isfinite(v)}
    where = f"{job.desc}: loss {', '.join(f'{k}={v}' for k, v in bad.items()) or 'sum'}"
    kept = (
        f"the checkpoint of epoch {epoch} ({job.checkpoint}) is kept"
        if epoch > 0
        else "no epoch of this stage had finished"
    )
    return TrainingDiverged(
        f"{where} at epoch {epoch + 1}/{job.cfg.epochs}, step {step + 1}: training diverged; "
        f"{kept}. Lower this stage's learning rate (train.lr, now {job.cfg.lr}) or clip its "
        "gradients (train.grad_clip, e.g. 1.0) in a new run",
        job.checkpoint if epoch > 0 else None,
    )


def _process_batches(loader, group: distributed.Group | None):
    """(images, labels, share of the batch) of this process: every batch whole on one device;
    under torchrun the loader reads only this process's rows of each batch
    (``BatchLoader.shard``)."""
    if group is None:
        return ((images, labels, 1.0) for images, labels in loader)
    return loader.shard(group.rank, group.world)


def _checkpoint_state(
    distiller, optimizer, scheduler, epoch: int, history: list, device: torch.device
) -> dict:
    return {
        "epoch": epoch,
        "model": distiller.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": history,
        **_rng_state(device),
    }


def _write_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _read_checkpoint(path: Path) -> dict:
    return load_weights_only(path, "delete it to train that stage again")


def _restore(job: TrainingJob, optimizer, scheduler, device: torch.device) -> tuple[int, list]:
    state, distiller = job.saved, job.distiller
    try:
        distiller.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state, device)
        return int(state["epoch"]), list(state["history"])
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as error:
        raise UserError(
            f"checkpoint {job.checkpoint} does not match this run's model/config ({error!r}); "
            f"resume with the config it was made with, or delete it to start over"
        ) from error


def _rng_state(device: torch.device) -> dict:
    """torch's random state, and the GPU's when training on one."""
    state = {"rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)
