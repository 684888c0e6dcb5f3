"""The library for people with their own training loop: quantize, distil, export, lint.

(``export_onnx``, not ``export``: ``qkd_deploy.export`` is the package of the exporter.)

    import qkd_deploy as qd

    student = qd.quantize(model, bits="w4a4", target="tensorrt", calibration=batches)
    kd = qd.distiller("kd-decay", student, teachers=[teacher])
    for step, (images, labels) in enumerate(loader):           # your loop
        logits, losses = kd.forward_train(images, labels, step / steps)
        ...                                                    # sum(losses.values()).backward()
    qd.export_onnx(student.eval(), images[:8], "student.onnx") # Q/DQ ONNX, parity checked
    assert not [f for f in qd.lint("student.onnx") if f.severity == "error"]

The pipeline (``python -m qkd_deploy.train_and_export``) does the same with these pieces.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.deploy.lint import Finding, lint_file
from qkd_deploy.distill.base import Distiller, build_distiller
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import MIN_OPSET
from qkd_deploy.export.onnx import export_onnx as export_deploy_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.modules import quantizers
from qkd_deploy.quant.precision import PrecisionOptions, split_layer_bits
from qkd_deploy.quant.precision import quantize as quantize_with_precision
from qkd_deploy.targets import Target


def quantize(
    model: nn.Module,
    bits: str | int = "w8a8",
    target: Target | str = Target.TENSORRT,
    calibration: Iterable[Any] | None = None,
    *,
    first_last_bits: int | None = 8,
    layer_bits: dict[str, str] | None = None,
    learn_scales: bool = True,
    weight_calibrator: str = "mse",
    activation_calibrator: str = "percentile",
) -> nn.Module:
    """A fake-quant copy of ``model`` for ``target`` ("tensorrt" or "onnxruntime"), its
    quantizers placed from the traced graph and calibrated on ``calibration``: input batches,
    or ``(inputs, labels)`` pairs as a DataLoader yields them. ``bits`` is "w4a8", or one number
    for both. ``layer_bits`` maps fnmatch patterns of module names to a bit-width or "float".
    The copy trains like any module (the LSQ step sizes are parameters); ``model`` is not
    changed."""
    widths, float_layers = split_layer_bits(layer_bits or {})
    options = PrecisionOptions(
        BitWidths.parse(str(bits)),
        target,
        first_last_bits,
        widths,
        learn_scales,
        float_layers=float_layers,
    )
    student = quantize_with_precision(model, options)
    batches = [_inputs(batch) for batch in calibration or []]
    if not batches:
        raise UserError(
            "quantize needs calibration batches (a few hundred representative inputs, e.g. "
            "calibration=[images for images, _ in itertools.islice(loader, 8)])"
        )
    was_training = student.training
    calibrate(student, batches, weight_calibrator, activation_calibrator)
    return student.train(was_training)


def distiller(
    method: str,
    student: nn.Module,
    teachers: Sequence[nn.Module] = (),
    **options: Any,
) -> Distiller:
    """The distillation ``method`` (``qkd-deploy methods`` lists them and their options) around
    ``student`` and ``teachers``, to call inside your own loop::

        logits, losses = d.forward_train(images, labels, progress)  # progress in [0, 1]
        sum(losses.values()).backward(); optimizer.step(); d.after_step()

    Optimise ``d.parameter_groups()`` (the student and any part the method trains). Methods
    that need the pipeline's context (online peers, generated images, quantized teachers) say
    so when built; run those with the main command."""
    return build_distiller(method, student, list(teachers), options)


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset: int = MIN_OPSET,
    int4_gemm_weights: bool = True,
    check: bool = True,
) -> Path:
    """Write ``model`` (a ``quantize``d model, or a float one) as one self-contained ``.onnx``:
    BatchNorm folded, weights stored as integers with DequantizeLinear, Q/DQ on activations.
    With ``check``, the file runs in ONNX Runtime on ``sample`` (a batch of inputs) and must give
    the torch model's argmax on every input: an export that changed the numbers is an error, not
    a file."""
    quantized = bool(quantizers(model))
    model = fold_batchnorm(model.eval()) if quantized else model.eval()
    deploy = to_deploy(model) if quantized else model
    written = export_deploy_model(deploy, sample, path, opset, int4_gemm_weights)
    if check:
        _check_parity(model, written, sample)
    return written


def _check_parity(model: nn.Module, path: Path, sample: torch.Tensor) -> None:
    from qkd_deploy.bench.accuracy import parity
    from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    with torch.no_grad():
        reference = model(sample).numpy()
    runner = OnnxRuntimeRunner(path, optimize=False)
    try:
        logits = runner.run(np.ascontiguousarray(sample.numpy(), dtype=np.float32))
    finally:
        runner.close()
    match = parity(logits, reference)
    if match.agreement < 1.0:
        path.unlink(missing_ok=True)
        raise UserError(
            f"the ONNX graph of {path} agrees with the torch model on only "
            f"{100 * match.agreement:.1f} % of the sample (max logit error "
            f"{match.max_abs_error:.3g}); the file was removed. Lint the model's layers or "
            "report the model"
        )


def lint(path: str | os.PathLike, tensorrt: str | None = None) -> list[Finding]:
    """The linter's findings for a Q/DQ ONNX file (TensorRT's rules, ONNX's checker):
    ``Finding.severity`` is "error", "warning" or "info". ``tensorrt="10"`` skips the checks
    that hold for TensorRT 8.6 only."""
    return lint_file(str(path), tensorrt)


def _inputs(batch: Any) -> torch.Tensor:
    """The inputs of a calibration batch: a tensor, or the first item of a (inputs, ...) pair."""
    if isinstance(batch, (tuple, list)):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise UserError(
            f"a calibration batch is a {type(batch).__name__}; give tensors of inputs or "
            "(inputs, labels) pairs"
        )
    return batch
