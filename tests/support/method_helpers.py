"""Shared fixtures for distillation-method tests: real digits data, a quantized resnet8 student,
float teachers, a MethodContext like the pipeline's, and the checks every method must pass."""

from __future__ import annotations

import functools
from collections import Counter

import onnx
import torch
from torch import nn

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.config import TrainConfig
from qkd_deploy.data import BatchLoader, load_dataset, normalization_stats, stratified_subset
from qkd_deploy.distill.base import Distiller, MethodContext
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.models import build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.train.loop import StepsOnly, fit


@functools.cache
def digits():
    data = load_dataset("digits")
    return data, normalization_stats(data.train.images.numpy())


def train_loader(batch_size: int = 64, seed: int = 0) -> BatchLoader:
    data, preprocess = digits()
    return BatchLoader(
        data.train,
        preprocess,
        batch_size,
        shuffle=True,
        augment=data.augment,
        seed=seed,
        drop_last=True,
    )


def calibration_batches(size: int = 128) -> list[torch.Tensor]:
    data, preprocess = digits()
    subset = stratified_subset(data.train, size)
    return [x for x, _ in BatchLoader(subset, preprocess, size)]


@functools.cache
def _trained_float(arch: str, epochs: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(arch, 1, 10)
    import pathlib
    import tempfile

    from qkd_deploy.distill import build_distiller

    with tempfile.TemporaryDirectory() as tmp:
        fit(
            build_distiller("none", model, []),
            train_loader(128, seed),
            TrainConfig(epochs=epochs, batch_size=128, lr=0.1),
            pathlib.Path(tmp) / "c.pt",
            progress=False,
        )
    return {k: v.clone() for k, v in model.state_dict().items()}


def float_model(arch: str = "resnet8", epochs: int = 2, seed: int = 0) -> nn.Module:
    """A float zoo model trained ``epochs`` on digits (cached per arch/epochs/seed)."""
    model = build_model(arch, 1, 10)
    model.load_state_dict(_trained_float(arch, epochs, seed))
    return model.eval()


def quantized(model: nn.Module, bits: int, calibrate_on_data: bool = True) -> nn.Module:
    q = quantize_model(model, QuantizeOptions(BitWidths(bits, bits)))
    if calibrate_on_data:
        calibrate(q, calibration_batches())
    return q


def context(
    student_float: nn.Module,
    bits: int,
    steps_per_epoch: int = 5,
    epochs: int = 1,
    data_free: bool = False,
) -> MethodContext:
    """What the pipeline gives a method (see ``pipeline.quantized_student_stage``)."""
    return MethodContext(
        num_classes=10,
        input_shape=(1, 8, 8),
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        make_student=lambda: quantized(student_float, bits, not data_free),
        quantize=lambda model, b: quantized(model, b, not data_free),
        calibration_batches=[] if data_free else calibration_batches(),
    )


def training_lowers_loss(
    distiller: Distiller, steps: int = 20, lr: float = 0.02
) -> tuple[float, float]:
    """(mean total loss of the first 5 steps, of the last 5) over ``steps`` real training steps
    with the method's own parameter groups; data-free methods get (None, None) batches."""
    from qkd_deploy.train.optim import build_optimizer

    optimizer = build_optimizer(distiller.parameter_groups(), TrainConfig(lr=lr, optimizer="sgd"))
    loader = StepsOnly(steps) if distiller.data_free else train_loader(64)
    distiller.train()
    losses = []
    batches = iter(loader)
    for step in range(steps):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        _, terms = distiller.forward_train(images, labels, step / steps)
        loss = sum(terms.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        distiller.after_step()
        losses.append(loss.item())
    return sum(losses[:5]) / 5, sum(losses[-5:]) / 5


def onnx_signature(model: nn.Module, tmp_path, name: str) -> tuple[dict, set, list]:
    """What would show a leaked teacher/translator/head/generator in the exported deploy model:
    counts of compute ops, the set of op types, and the shapes of the integer weights. (Q/DQ
    counts are left out: the exporter merges Q/DQ pairs whose scales happen to be equal.)"""
    path = export_onnx(to_deploy(model.eval()), torch.zeros(2, 1, 8, 8), tmp_path / f"{name}.onnx")
    graph = onnx.load(path).graph
    ops = Counter(n.op_type for n in graph.node)
    compute = {op: ops[op] for op in ("Conv", "Gemm", "MatMul", "Add")}
    weights = sorted(
        tuple(i.dims)
        for i in graph.initializer
        if i.data_type == onnx.TensorProto.INT8 and len(i.dims) >= 2
    )
    return compute, set(ops), weights


def assert_exports_plain_student(distiller: Distiller, plain_student: nn.Module, tmp_path) -> None:
    """The exported model has the graph of a plain quantized student: no teacher, translator,
    head or generator reaches the ONNX file."""
    exported = onnx_signature(distiller.export_model(), tmp_path, "method")
    plain = onnx_signature(plain_student, tmp_path, "plain")
    assert exported == plain
