"""Data-parallel training over the processes that ``torchrun`` starts (several GPUs of a machine).

``torchrun --nproc-per-node N -m qkd_deploy.train_and_export ...`` starts N copies of the
command. Process 0 runs the pipeline as on one device: it alone reads and writes the run
directory, evaluates, calibrates, exports and measures. The other processes only train: each
``fit`` on process 0 sends them the job (the distiller with all its models, the loader, the
settings, the checkpoint to resume from), all N train it together, and process 0 goes on alone
with the trained models.

Every process sees the same shuffled, augmented batch (the loader depends only on seed and
epoch) and trains on its shard of it (images ``rank::N``). Before each optimizer step the
gradients of everything the optimizer steps are averaged, weighted by shard size: for a loss
that averages over images this is the gradient of the whole batch, so ``batch_size``, learning
rate and schedule mean what they mean on one device. What differs is BatchNorm in training
mode, which normalises each shard with its own statistics (as DDP without SyncBatchNorm); the
running statistics are averaged over the processes after every epoch.

Why not ``torch.nn.parallel.DistributedDataParallel``: it hooks the gradients of one module's
``forward``, and a distiller trains several (online peers, translators, heads); averaging at
the optimizer works for every method unchanged. Data-free methods step a generator with an
optimizer of their own inside the step, so they train on one device.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from qkd_deploy.errors import UserError

if TYPE_CHECKING:
    from qkd_deploy.distill.base import Distiller

# process 0 may evaluate and export for hours between two training jobs while the others wait
JOB_WAIT = timedelta(days=2)


@dataclass
class Group:
    """This process's place among the training processes."""

    rank: int
    world: int
    local_rank: int
    control: Any  # a gloo group for the jobs (pickled objects on the CPU)
    busy: bool = False  # inside a training job: the processes are in collectives together

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def cuda_device(self, name: str) -> torch.device:
        """Each process trains on the GPU of its local rank; a named GPU cannot be shared."""
        if name not in ("auto", "cuda", f"cuda:{self.local_rank}"):
            raise UserError(
                f"device {name!r} under torchrun: each process trains on the GPU of its local "
                f"rank (cuda:LOCAL_RANK); use device=auto or cuda, and CUDA_VISIBLE_DEVICES to "
                "choose the GPUs"
            )
        return torch.device("cuda", self.local_rank)

    def send_job(self, job: dict | None) -> None:
        """Process 0: the next training job for the others (``None``: stop)."""
        dist.broadcast_object_list([job], src=0, group=self.control)

    def receive_job(self) -> dict | None:
        received: list[Any] = [None]
        dist.broadcast_object_list(received, src=0, group=self.control)
        return received[0]

    def average_gradients(self, optimizer: torch.optim.Optimizer, weight: float) -> None:
        """Every process ends with ``sum over processes of weight * gradient``. A parameter
        that got no gradient here but did elsewhere (a branch this shard's step skipped)
        counts as zero here; one that got none anywhere keeps none, as on one device."""
        params = [p for g in optimizer.param_groups for p in g["params"]]
        anywhere = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(anywhere)
        grads = []
        for param, count in zip(params, anywhere.tolist(), strict=True):
            if count and param.grad is None:
                param.grad = torch.zeros_like(param)
            if count:
                grads.append(param.grad)
        if not grads:
            return
        flat = _flatten_dense_tensors(grads).mul_(weight)
        dist.all_reduce(flat)
        for grad, averaged in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
            grad.copy_(averaged)

    def average_running_statistics(self, distiller: Distiller) -> None:
        """The running mean and variance of every BatchNorm in training mode, and the
        distiller's own ``running_statistics()``, averaged."""
        stats = list(distiller.running_statistics())
        for module in distiller.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
                stats += [s for s in (module.running_mean, module.running_var) if s is not None]
        for stat in stats:
            dist.all_reduce(stat)
            stat.div_(self.world)

    def sum(self, values: list[float]) -> list[float]:
        """Numbers summed over the processes (epoch statistics)."""
        total = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(total)
        return total.tolist()


_current: Group | None = None


def current() -> Group | None:
    """The group of this run's training processes, or None when training on one device."""
    return _current


def world_size() -> int:
    """How many processes train: 1 without torchrun."""
    return 1 if _current is None else _current.world


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextmanager
def session() -> Iterator[Group | None]:
    """Joins the processes torchrun started for the block (``None`` without torchrun). On
    leaving, process 0 tells the others to stop, unless it leaves in the middle of a training
    job: then it exits with an error and torchrun stops the others."""
    global _current
    if not launched_by_torchrun():
        yield None
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)  # NCCL's communicator uses the current GPU
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    group = Group(
        rank=dist.get_rank(),
        world=dist.get_world_size(),
        local_rank=local_rank,
        control=dist.new_group(backend="gloo", timeout=JOB_WAIT),
    )
    _current = group
    try:
        yield group
    finally:
        _current = None
        if not group.busy:
            if group.leader:
                group.send_job(None)
            _shut_down(group)


def _shut_down(group: Group) -> None:
    """Every process at once: a barrier, then the process groups destroyed and released while
    the interpreter still runs. Left to interpreter exit, a gloo group's threads could end in
    ``std::terminate`` (a SIGABRT after all work was done, about 1 launch in 15 here)."""
    dist.barrier(group=group.control)
    dist.destroy_process_group()
    group.control = None
    gc.collect()
