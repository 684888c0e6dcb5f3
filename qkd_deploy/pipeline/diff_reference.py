"""The fake-quant torch side of ``qkd-deploy diff``: a run's student in deploy form, with the
integer levels of every activation quantizer it applies, matched to the ONNX model's activation
QuantizeLinear nodes in the order the model computes them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qkd_deploy.bench.diff import Checkpoint
from qkd_deploy.errors import UserError
from qkd_deploy.quant.integer import FrozenQuantizer, to_deploy

Levels = Callable[[np.ndarray, list[Checkpoint]], dict[str, np.ndarray]]


@torch.no_grad()
def quantizer_levels(deploy: nn.Module, images: np.ndarray) -> list[torch.Tensor]:
    """The integer levels each activation quantizer writes, in call order. The same
    quantization of the same tensor counts once (a shared quantizer used again, or two with
    equal scales): the export computes it once."""
    calls: list[tuple[torch.Tensor, tuple, torch.Tensor]] = []

    def record(module: FrozenQuantizer, inputs: tuple, output: torch.Tensor) -> None:
        grid = (float(module.scale), int(module.zero_point), module.qmin, module.qmax)
        if not any(seen is inputs[0] and g == grid for seen, g, _ in calls):
            calls.append((inputs[0], grid, torch.round(output / module.scale).to(torch.int64)))

    handles = [
        m.register_forward_hook(record) for m in deploy.modules() if isinstance(m, FrozenQuantizer)
    ]
    try:
        deploy.eval()(torch.from_numpy(images))
    finally:
        for handle in handles:
            handle.remove()
    return [levels for _, _, levels in calls]


def levels_of(deploy: nn.Module) -> Levels:
    """``images, checkpoints -> {checkpoint tensor: levels + zero point}`` for ``diff.levels``."""

    def compute(images: np.ndarray, points: list[Checkpoint]) -> dict[str, np.ndarray]:
        found = quantizer_levels(deploy, images)
        if len(found) != len(points):
            raise UserError(
                f"the torch student applies {len(found)} activation quantizers, the ONNX model "
                f"has {len(points)}: it is not this student's export"
            )
        return {p.tensor: t.numpy() + p.zero_point for p, t in zip(points, found, strict=True)}

    return compute


def run_student(
    run_dir: str, student: str | None, model_path: str, count: int
) -> tuple[Levels, np.ndarray]:
    """The run's fake-quant student (``student``, else the one whose folder holds the model)
    and ``count`` of the run's preprocessed test images."""
    from qkd_deploy.pipeline.finished import FinishedRun

    run = FinishedRun.open(run_dir)
    bits = run.student_bits(student or Path(model_path).resolve().parent.name)
    deploy = to_deploy(run.quantized_student(bits))
    images = run.preprocess.apply(run.data.test.first(count)).numpy()
    return levels_of(deploy), images
