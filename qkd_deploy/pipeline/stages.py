"""The stages of a run: teachers -> float student -> KD-QAT students -> export and measure.

Each stage writes its files into the run directory and is skipped when they exist, so a killed
run resumes where it stopped (a half-trained model resumes from its last epoch checkpoint).
"""

from __future__ import annotations

import dataclasses
import io
import json
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qkd_deploy.bench.accuracy import accuracy, parity
from qkd_deploy.bench.latency import measure_latency
from qkd_deploy.bits import BitWidths
from qkd_deploy.config import StudentConfig, TrainConfig
from qkd_deploy.data import BatchLoader, stratified_subset
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import Distiller
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.fileio import atomic_write_bytes, atomic_write_json, sha256_file
from qkd_deploy.pipeline.context import EVAL_BATCH, Context
from qkd_deploy.pipeline.models import (
    given_student,
    load_state,
    mark_calibrated,
    method_context,
    quantize_options,
    save_state,
    teacher_model,
    untrained_student,
)
from qkd_deploy.pipeline.plan import FloatStudent, teacher_stage
from qkd_deploy.pipeline.report import (
    KernelParity,
    LatencyRow,
    Measurement,
    TeacherResult,
)
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.precision import quantize
from qkd_deploy.rundir import DATA_RECORD, SAMPLE_BATCH, library_versions, machine_description
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner, fused_kernel_inexactness
from qkd_deploy.targets import Target
from qkd_deploy.train.batchnorm import reestimate_batchnorm
from qkd_deploy.train.evaluate import predict
from qkd_deploy.train.loop import StepsOnly, fit


def train_float(
    ctx: Context,
    stage: str,
    distiller: Distiller,
    cfg: TrainConfig,
    seed_offset: int,
    progress: bool,
) -> nn.Module:
    """Train ``distiller.student`` in float with the distiller's losses (``none``: cross-entropy;
    a method that ``distils_float``: distilled from its teachers), or load it if this stage
    already finished."""
    model = distiller.student
    folder = ctx.run.stage(stage)
    final = folder / "model.pt"
    if final.exists():
        return load_state(model, final).eval()
    fit(
        distiller,
        ctx.train_loader(cfg.batch_size, seed_offset),
        cfg,
        folder / "checkpoint.pt",
        desc=stage,
        progress=progress,
        device=ctx.device,
        channels_last=ctx.channels_last,
    )
    save_state(model, final)
    return model.eval()


def teachers_stage(ctx: Context, progress: bool) -> tuple[list[nn.Module], list[TeacherResult]]:
    """The run's teachers (the plan's: the user's, or zoo models trained here), each with its
    test accuracy."""
    teachers, results = [], []
    for i, cfg in enumerate(ctx.plan.teachers):
        stage = teacher_stage(i)
        torch.manual_seed(ctx.config.seed + 100 * i)
        teacher = teacher_model(ctx, cfg, i)
        if not cfg.module:
            plain = build_distiller("none", teacher, [])
            teacher = train_float(ctx, stage, plain, ctx.config.teacher_train, 100 * i, progress)
        teachers.append(teacher)
        score = test_accuracy(ctx, teacher, None if cfg.module else stage)
        results.append(TeacherResult(cfg.module or cfg.arch, score))
    return teachers, results


def evaluation_key(ctx: Context, weights: Path, **settings) -> dict:
    """What measuring the model saved in ``weights`` on the test split depends on."""
    return {
        "weights": sha256_file(weights),
        "data": [ctx.config.data.spec, ctx.config.data.image_size, len(ctx.data.test)],
        "preprocess": ctx.preprocess.to_dict(),
        "versions": library_versions(),
        "machine": machine_description(),
        **settings,
    }


def test_accuracy(ctx: Context, model: nn.Module, stage: str | None) -> float:
    """``model``'s test accuracy; remembered in the folder of a ``stage`` trained here."""

    def evaluate() -> dict:
        logits, labels = predict(model, ctx.test_loader())
        return {"accuracy": accuracy(logits, labels)}

    if stage is None:
        return evaluate()["accuracy"]
    folder = ctx.run.stage(stage)
    key = evaluation_key(ctx, folder / "model.pt")
    return ctx.run.cached(folder / "accuracy.json", key, evaluate)["accuracy"]


def given_float_student(ctx: Context) -> nn.Module:
    """The user's trained float student (``student.checkpoint``), checked on two test images and
    kept in the run as ``student_float/model.pt``: a resumed run and ``qkd-deploy export`` read
    that copy, not the checkpoint again."""
    final = ctx.run.stage("student_float") / "model.pt"
    if final.exists():
        return load_state(untrained_student(ctx), final).eval()
    model = given_student(ctx)
    save_state(model, final)
    return model


def float_student_stage(ctx: Context, teachers: list[nn.Module], progress: bool) -> nn.Module:
    """The float student QAT starts from: the user's trained one (``student.checkpoint``), not
    trained further; else trained here (``student.float_method``: on the labels, or distilled
    from ``teachers``), or the untrained one when ``float_reference`` is off."""
    cfg, plan = ctx.config.student, ctx.plan
    if plan.float_student is FloatStudent.GIVEN:
        return given_float_student(ctx)
    model = untrained_student(ctx)
    if plan.float_student is FloatStudent.UNTRAINED:
        return model
    # the plain float student's distiller holds no teachers: its checkpoints stay as they were
    used = teachers if plan.float_method_uses_teachers else []
    distiller = build_distiller(cfg.float_method, model, used, cfg.float_method_options)
    return train_float(ctx, "student_float", distiller, cfg.float_train, 1, progress)


def quantized_student_stage(
    ctx: Context,
    bits: BitWidths,
    float_student: nn.Module,
    teachers: list[nn.Module],
    progress: bool,
    folder: Path | None = None,
    train: TrainConfig | None = None,
) -> nn.Module:
    """Quantize, calibrate and distil one student (``ptq``, which does not train, stops after
    calibrating); returns the eval-mode fake-quant model. ``folder`` and ``train`` replace the
    stage's folder and the student's training settings (the budget's probe).

    The student starts from the float student, except for a data-free method: the float student
    learnt from the training images, so that student starts from fresh weights (the float
    student stays in the report as the reference). The BatchNorm statistics of the finished
    student may then be re-estimated (``bn_reestimation_batches``); a checkpoint keeps the last
    epoch's."""
    cfg, qcfg = ctx.config.student, ctx.config.quant
    if train is not None:
        cfg = dataclasses.replace(cfg, train=train)
    folder = folder or ctx.run.stage(bits.name)
    data_free = ctx.plan.data_free
    start = untrained_student(ctx) if data_free else float_student
    torch.manual_seed(ctx.config.seed + 2)
    options = quantize_options(qcfg, bits)
    student = quantize(start, options)
    final = folder / "model.pt"
    if final.exists():
        return load_state(mark_calibrated(student), final).eval()
    subset = stratified_subset(ctx.data.train, ctx.config.data.calibration_size, ctx.config.seed)
    calibration = BatchLoader(subset, ctx.preprocess, EVAL_BATCH, workers=ctx.config.data.workers)
    batches = [] if data_free else [x for x, _ in calibration]
    real_loader = ctx.train_loader(cfg.train.batch_size, 2)
    loader = StepsOnly(len(real_loader)) if data_free else real_loader
    context = method_context(ctx, start, options, batches, len(loader))
    if batches:
        context.calibrate(student, batches)
    distiller = build_distiller(cfg.method, student, teachers, cfg.method_options, context)
    if distiller.trains:
        fit(
            distiller,
            loader,
            cfg.train,
            folder / "checkpoint.pt",
            desc=f"{bits.name} {cfg.method}",
            progress=progress,
            device=ctx.device,
            channels_last=ctx.channels_last,
        )
    exported = distiller.export_model()
    reestimation = bn_reestimation_batches(cfg, distiller, real_loader, batches, data_free)
    if reestimation is not None:
        reestimate_batchnorm(exported, reestimation)
    save_state(exported, final)
    return load_state(student, final).eval()


def bn_reestimation_batches(
    cfg: StudentConfig,
    distiller: Distiller,
    loader: BatchLoader,
    calibration: list[torch.Tensor],
    data_free: bool,
) -> Iterable[torch.Tensor] | None:
    """The images a finished student's BatchNorm statistics are re-estimated on, or None: one
    more epoch of the training stream for a trained student with ``student.bn_reestimate``, the
    calibration images for ``ptq`` with its ``bn_reestimate`` option; never for a data-free
    student, which must not see the training images."""
    if data_free:
        return None
    if distiller.trains:
        if not cfg.bn_reestimate:
            return None
        loader.set_epoch(cfg.train.epochs)  # the epoch after the last one trained
        return (x for x, _ in loader)
    return calibration if getattr(distiller.options, "bn_reestimate", False) else None


def logits_on_test_split(
    ctx: Context, models: dict[str, nn.Module | None], runners: dict[str, OnnxRuntimeRunner]
) -> dict[str, np.ndarray]:
    """The logits of every torch model and ONNX Runtime session over the test split, streamed
    batch by batch (a folder's test split need not fit in memory; its logits do)."""
    models = {name: model for name, model in models.items() if model is not None}
    outputs: dict[str, list[np.ndarray]] = {name: [] for name in [*models, *runners]}
    with torch.no_grad():
        for images, _ in ctx.test_loader():
            for name, model in models.items():
                outputs[name].append(model(images).numpy())
            for name, runner in runners.items():
                outputs[name].append(runner.run(images.numpy()))
    return {name: np.concatenate(batches) for name, batches in outputs.items()}


def export_stage(ctx: Context, model: nn.Module, name: str, quantized: bool) -> Measurement:
    """Export to ONNX, check parity in ONNX Runtime, measure accuracy and latency; read back
    from the stage folder when the model, the settings and the machine are those of the last
    time."""
    folder = ctx.run.stage(name)
    config = ctx.config
    key = evaluation_key(
        ctx,
        folder / "model.pt",
        quant=dataclasses.asdict(config.quant),
        export=dataclasses.asdict(config.export),
        bench=dataclasses.asdict(config.bench),
    )
    recorded = ctx.run.cached(
        folder / "export.json",
        key,
        lambda: export_and_measure(ctx, model, name, quantized).to_json(),
        outputs=(folder / "model.onnx",),
    )
    return Measurement.from_json(recorded)


def onnx_stage(ctx: Context, model: nn.Module, name: str, quantized: bool) -> Path:
    """The stage's ``model.onnx``, exported from ``model`` (a quantized one BN-folded, in its
    deploy form), or the file an earlier export of the same weights with the same settings left
    (``onnx.json``): the ONNX file depends on neither the machine nor the bench settings, so a
    stage process writes it beside the training of another, and the measuring reads it back."""
    folder = ctx.run.stage(name)
    path = folder / "model.onnx"
    key = {
        "weights": sha256_file(folder / "model.pt"),
        "quant": dataclasses.asdict(ctx.config.quant),
        "export": dataclasses.asdict(ctx.config.export),
        "versions": library_versions(),
    }

    def export() -> dict:
        deploy = to_deploy(fold_batchnorm(model)) if quantized else model.eval()
        export = ctx.config.export
        sample, _ = next(iter(ctx.test_loader()))  # traced for its shape only
        export_onnx(deploy, sample[:2], path, export.opset, export.int4_gemm_weights)
        return {}

    ctx.run.cached(folder / "onnx.json", key, export, outputs=(path,))
    return path


def export_and_measure(ctx: Context, model: nn.Module, name: str, quantized: bool) -> Measurement:
    """``export_stage`` without its record.

    A quantized model is compared in its BN-folded form (with INT32-grid biases for the
    ``onnxruntime`` target), which is the arithmetic the exported model performs; the unfolded
    QAT model's accuracy is reported too.
    """
    labels = ctx.test_labels
    path = onnx_stage(ctx, model, name, quantized)
    bench = ctx.config.bench
    graph_runner = OnnxRuntimeRunner(path, threads=bench.threads, optimize=False)
    runner = OnnxRuntimeRunner(path, threads=bench.threads)
    folded = fold_batchnorm(model) if quantized else model
    models = {"reference": folded, "qat": model if quantized else None}
    outputs = logits_on_test_split(ctx, models, {"graph": graph_runner, "kernels": runner})
    graph_runner.close()
    reference, logits, kernel_logits = outputs["reference"], outputs["graph"], outputs["kernels"]
    accuracy_qat = accuracy(outputs["qat"], labels) if quantized else None
    match = parity(logits, reference)
    kernels = parity(kernel_logits, reference)
    min_agreement = ctx.config.export.min_agreement
    if quantized and match.agreement < min_agreement:
        raise RuntimeError(
            f"{name}: the exported graph agrees with the torch fake-quant model on only "
            f"{100 * match.agreement:.2f} % of the test split (max logit error "
            f"{match.max_abs_error:.4g}); the export is wrong, see {path}"
        )
    warning = None
    if quantized and kernels.agreement < min_agreement:
        warning = ort_kernel_warning(name, kernels.agreement, ctx.plan.target)
        print(f"warning: {warning}", file=sys.stderr)
    first, _ = next(iter(ctx.test_loader()))
    sample = first[0].numpy()
    rows = measure_latency(runner, sample, bench.batch_sizes, bench.warmup, bench.iterations)
    runner.close()
    return Measurement(
        accuracy_torch=accuracy(reference, labels),
        accuracy_onnx=accuracy(logits, labels),
        onnx_agreement=match.agreement,
        onnx_max_abs_error=match.max_abs_error,
        ort_cpu=KernelParity(
            accuracy(kernel_logits, labels), kernels.agreement, kernels.max_abs_error
        ),
        onnx_path=str(path.relative_to(ctx.run.root)),
        onnx_bytes=path.stat().st_size,
        latency_ms={"onnxruntime_cpu": tuple(map(LatencyRow.from_json, rows))},
        accuracy_qat=accuracy_qat,
        warning=warning,
    )


def check_data_unchanged(ctx: Context) -> None:
    """A resumed run trains on the data it started with. The splits' fingerprints go into
    ``data.json`` when the run starts; a resume on other data (images added, removed or moved
    to another class since) is refused, as its finished stages were trained and measured on the
    old data and the report would mix both."""
    path = ctx.run.root / DATA_RECORD
    splits = {"train": ctx.data.train, "test": ctx.data.test}
    now = {name: {"images": len(s), "sha256": s.fingerprint()} for name, s in splits.items()}
    if not path.is_file():
        atomic_write_json(path, now)
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(
            f"{path} cannot be read ({error}): it records the data this run started on; delete "
            "it to resume without that check"
        ) from None
    changed = [
        f"{name} split {before.get(name, {}).get('images')} -> {now[name]['images']} images"
        for name in splits
        if before.get(name) != now[name]
    ]
    if changed:
        raise UserError(
            f"the data {ctx.config.data.spec} changed since this run started ({'; '.join(changed)}"
            ", or the same number of other images): its finished stages saw the old data. "
            f"Restore it to resume, or start a new run (--out); {path.name} holds the fingerprints"
        )


def save_sample_batch(ctx: Context) -> None:
    """A few raw test images with labels, for deploy bundles and quick checks."""
    buffer = io.BytesIO()
    np.savez(
        buffer, images=ctx.data.test.first(16).numpy(), labels=ctx.data.test.labels[:16].numpy()
    )
    atomic_write_bytes(ctx.run.root / SAMPLE_BATCH, buffer.getvalue())


def collapse_warning(name: str, accuracy: float, num_classes: int, trained: bool) -> str | None:
    """A warning when a student ends within 5 points of chance: its training collapsed (a
    2-bit student can die in a few steps at a high learning rate), which the accuracy column
    alone does not tell apart from a merely poor method. A student that was not trained
    (``ptq``) lost its accuracy to rounding alone: it needs training, not other settings."""
    chance = 1 / num_classes
    if accuracy >= chance + 0.05:
        return None
    ends = (
        f"{name}: the student ends at {100 * accuracy:.1f} % test accuracy, chance level for "
        f"{num_classes} classes"
    )
    if not trained:
        return (
            f"{ends}: post-training quantization alone loses the model at this bit-width. "
            "Train it: --method none (plain QAT) or a distillation method"
        )
    return (
        f"{ends}: its training collapsed (per-epoch loss and train accuracy: "
        f"'history' in {name}/checkpoint.pt). Try a lower student.train.lr, gradient clipping "
        "(student.train.grad_clip, e.g. 1.0) or another method for this bit-width"
    )


def ort_kernel_warning(name: str, agreement: float, target: Target) -> str:
    """Why ONNX Runtime's fused integer kernels disagree with a graph that is itself right."""
    causes = fused_kernel_inexactness(target)
    return (
        f"{name}: the exported graph is exact, but ONNX Runtime's fused CPU kernels agree with "
        f"the trained model on only {100 * agreement:.2f} % of the test split: "
        f"{'; '.join(causes) or 'they round differently on this CPU'}. TensorRT computes the "
        "graph as written; report.json has both accuracies"
    )
