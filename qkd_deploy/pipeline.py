"""The stages of a run: data -> teacher -> float student -> KD-QAT students -> export -> bench.

Each stage writes its files into the run directory and is skipped when they exist, so a killed
run resumes where it stopped (a half-trained model resumes from its last epoch checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qkd_deploy.bench.accuracy import accuracy, parity
from qkd_deploy.bench.latency import measure_latency
from qkd_deploy.bits import BitWidths
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.config import Config, QuantConfig, StudentConfig, TeacherConfig, TrainConfig
from qkd_deploy.data import BatchLoader, DatasetSplits, Preprocess, stratified_subset
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import Distiller, MethodContext, method_class
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.fileio import atomic_write_bytes, sha256_file
from qkd_deploy.models import build_model, load_checkpoint, load_user_model
from qkd_deploy.models.features import attach_feature_layers
from qkd_deploy.quant.convert import QuantizeOptions
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.precision import PrecisionOptions, quantize, split_layer_bits
from qkd_deploy.rundir import RunDir, library_versions, machine_description
from qkd_deploy.runtime.base import run_in_batches
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner, fused_kernel_inexactness
from qkd_deploy.torch_files import load_weights_only, why
from qkd_deploy.train import distributed
from qkd_deploy.train.batchnorm import reestimate_batchnorm
from qkd_deploy.train.device import resolve_device
from qkd_deploy.train.evaluate import predict
from qkd_deploy.train.loop import StepsOnly, fit

EVAL_BATCH = 256


@dataclasses.dataclass
class Context:
    """What every stage needs: the config, the data, its preprocessing, the run directory."""

    config: Config
    data: DatasetSplits
    preprocess: Preprocess
    run: RunDir

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

    def test_images(self) -> np.ndarray:
        return np.concatenate([images.numpy() for images, _ in self.test_loader()])

    @property
    def test_labels(self) -> np.ndarray:
        return self.data.test.labels.numpy()


def save_state(model: nn.Module, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_state(model: nn.Module, path: Path) -> nn.Module:
    """``model`` with the weights a finished stage saved in ``path``; a damaged or foreign file
    is one clear error (its stage trains again once the file is deleted)."""
    fix = f"delete it to train that stage again (--resume {path.parent.parent})"
    state = load_weights_only(path, fix)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as error:
        raise UserError(f"{path} does not hold this stage's model ({why(error)}); {fix}") from None
    return model


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
    )
    save_state(model, final)
    return model.eval()


def teacher_configs(config: Config) -> list[TeacherConfig]:
    """The configured teachers, or the method's default architectures when none are configured
    (those of ``student.float_method`` when only the float student distils)."""
    if config.teachers:
        return config.teachers
    method = method_class(config.student.method)
    float_method = method_class(config.student.float_method)
    if not method.needs_teachers and float_method.needs_teachers:
        method = float_method
    return [TeacherConfig(arch=arch) for arch in method.default_teachers]


def teacher_stage(i: int) -> str:
    return "teacher" if i == 0 else f"teacher_{i}"


def trained_model_files(config: Config, root: Path) -> list[Path]:
    """The weights that a finished run's training stages leave in ``root``."""
    stages = [teacher_stage(i) for i, t in enumerate(teacher_configs(config)) if not t.module]
    if config.student.float_reference or config.student.checkpoint:
        stages.append("student_float")
    stages += [BitWidths.parse(b).name for b in config.student.bits]
    return [root / stage / "model.pt" for stage in stages]


def teachers_stage(ctx: Context, progress: bool) -> tuple[list[nn.Module], list[dict]]:
    """The run's teachers (``teacher_configs``: the user's, or zoo models trained here), each with
    its test accuracy."""
    teachers, infos = [], []
    for i, cfg in enumerate(teacher_configs(ctx.config)):
        stage = teacher_stage(i)
        torch.manual_seed(ctx.config.seed + 100 * i)
        teacher = teacher_model(ctx, cfg, i)
        if not cfg.module:
            plain = build_distiller("none", teacher, [])
            teacher = train_float(ctx, stage, plain, ctx.config.teacher_train, 100 * i, progress)
        teachers.append(teacher)
        infos.append(
            {
                "arch": cfg.module or cfg.arch,
                "accuracy": test_accuracy(ctx, teacher, None if cfg.module else stage),
            }
        )
    return teachers, infos


def teacher_model(ctx: Context, cfg: TeacherConfig, index: int) -> nn.Module:
    """Teacher ``index`` as configured: the user's model with its checkpoint (checked on two test
    images), or a freshly initialised zoo model for the teachers stage to train."""
    if cfg.module:
        teacher = load_user_model(cfg.module, cfg.checkpoint).eval()
        _check_classifier(teacher, ctx, f"teacher {cfg.module}")
        if cfg.feature_layers is not None:
            option = f"teachers[{index}].feature_layers"
            attach_feature_layers(teacher, cfg.feature_layers, option, input_shape(ctx.data))
        return teacher
    for key in ("checkpoint", "feature_layers"):
        if getattr(cfg, key) is not None:
            raise UserError(
                f"teachers[{index}].{key} belongs to your own teacher: set its module too "
                f"(--teacher MODULE:FACTORY --teacher-checkpoint PATH); zoo teachers are trained "
                "here and have their own stages"
            )
    return build_model(cfg.arch, ctx.data.in_channels, ctx.data.num_classes)


def input_shape(data: DatasetSplits) -> tuple[int, ...]:
    """``(C, H, W)`` of the data's images."""
    return (data.in_channels, *data.image_size)


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


def _check_classifier(model: nn.Module, ctx: Context, what: str) -> None:
    sample = ctx.preprocess.apply(ctx.data.test.first(2))
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as error:
        raise UserError(
            f"{what} failed on a {tuple(sample.shape)} batch of {ctx.data.name} ({error}); "
            f"check its input channels/size and the --normalize preprocessing"
        ) from error
    if out.dim() != 2 or out.shape[1] != ctx.data.num_classes:
        raise UserError(
            f"{what} returns shape {tuple(out.shape)}; expected (N, "
            f"{ctx.data.num_classes}) logits for {ctx.data.name}"
        )
    if not torch.isfinite(out).all():
        raise UserError(
            f"{what} returns NaN or infinite logits on test images of {ctx.data.name}; check "
            "its weights (its checkpoint) and the --normalize preprocessing"
        )


def student_model(config: Config, data: DatasetSplits) -> nn.Module:
    """The student architecture, freshly initialised by the caller's random state: the zoo's
    ``student.arch``, or the user's ``student.module`` (its factory called again, without the
    checkpoint) with its ``feature_layers``."""
    cfg = config.student
    if not cfg.module:
        return build_model(cfg.arch, data.in_channels, data.num_classes)
    model = load_user_model(cfg.module)
    if cfg.feature_layers is not None:
        option = "student.feature_layers"
        attach_feature_layers(model, cfg.feature_layers, option, input_shape(data))
    return model


def student_label(cfg: StudentConfig) -> str:
    """The student's name in the report: the zoo name, or the factory of the user's model."""
    return cfg.module.rpartition(":")[2] if cfg.module else cfg.arch


def untrained_student(ctx: Context) -> nn.Module:
    """The student architecture, freshly initialised (the same weights for the same seed); a
    user's student is first checked on two test images, as a user's teacher is."""
    torch.manual_seed(ctx.config.seed + 1)
    model = student_model(ctx.config, ctx.data)
    module = ctx.config.student.module
    if module:
        with torch.random.fork_rng(devices=[]):  # a user model may draw random numbers
            model.eval()
            _check_classifier(model, ctx, f"student {module}")
            model.train()
    return model


def given_float_student(ctx: Context) -> nn.Module:
    """The user's trained float student (``student.checkpoint``), checked on two test images and
    kept in the run as ``student_float/model.pt``: a resumed run and ``qkd-deploy export`` read
    that copy, not the checkpoint again."""
    cfg = ctx.config.student
    model = untrained_student(ctx)
    final = ctx.run.stage("student_float") / "model.pt"
    if final.exists():
        return load_state(model, final).eval()
    load_checkpoint(model, cfg.checkpoint).eval()
    _check_classifier(model, ctx, f"student {cfg.module} with checkpoint {cfg.checkpoint}")
    save_state(model, final)
    return model


def float_student_stage(ctx: Context, teachers: list[nn.Module], progress: bool) -> nn.Module:
    """The float student QAT starts from: the user's trained one (``student.checkpoint``), not
    trained further; else trained here (``student.float_method``: on the labels, or distilled
    from ``teachers``), or the untrained one when ``float_reference`` is off."""
    cfg = ctx.config.student
    if cfg.checkpoint:
        return given_float_student(ctx)
    model = untrained_student(ctx)
    if not cfg.float_reference:
        return model
    # the plain float student's distiller holds no teachers: its checkpoints stay as they were
    used = teachers if method_class(cfg.float_method).needs_teachers else []
    distiller = build_distiller(cfg.float_method, model, used, cfg.float_method_options)
    return train_float(ctx, "student_float", distiller, cfg.float_train, 1, progress)


def quantize_options(qcfg: QuantConfig, bits: BitWidths) -> PrecisionOptions:
    """How to quantize a student at ``bits``; raises on bad settings (the pipeline builds these
    before any training, so a typo costs nothing)."""
    widths, float_layers = split_layer_bits(qcfg.layer_bits)  # "float": no Q/DQ on the layer
    return PrecisionOptions(
        bits,
        qcfg.target,
        qcfg.first_last_bits,
        widths,
        qcfg.learn_scales,
        qcfg.residual_add_inputs,
        trace=qcfg.trace,
        float_layers=float_layers,
    )


def quantized_student_stage(
    ctx: Context,
    bits: BitWidths,
    float_student: nn.Module,
    teachers: list[nn.Module],
    progress: bool,
) -> nn.Module:
    """Quantize, calibrate and distil one student (``ptq``, which does not train, stops after
    calibrating); returns the eval-mode fake-quant model.

    The student starts from the float student, except for a data-free method: the float student
    learnt from the training images, so that student starts from fresh weights (the float
    student stays in the report as the reference). The BatchNorm statistics of the finished
    student may then be re-estimated (``bn_reestimation_batches``); a checkpoint keeps the last
    epoch's."""
    cfg, qcfg = ctx.config.student, ctx.config.quant
    folder = ctx.run.stage(bits.name)
    data_free = method_class(cfg.method).data_free
    start = untrained_student(ctx) if data_free else float_student
    torch.manual_seed(ctx.config.seed + 2)
    options = quantize_options(qcfg, bits)
    student = quantize(start, options)
    final = folder / "model.pt"
    if final.exists():
        _mark_calibrated(student)
        return load_state(student, final).eval()
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


def method_context(
    ctx: Context,
    start: nn.Module,
    options: QuantizeOptions,
    batches: list[torch.Tensor],
    steps_per_epoch: int,
) -> MethodContext:
    """What a method may build besides its student: more students quantized from ``start`` like
    it, quantized copies of other models, all calibrated on ``batches`` (none for a data-free
    method, which calibrates on the images it generates)."""
    qcfg = ctx.config.quant
    calibrate_on = functools.partial(
        calibrate,
        weight_method=qcfg.weight_calibrator,
        activation_method=qcfg.activation_calibrator,
        percentile=qcfg.percentile,
    )
    return MethodContext(
        num_classes=ctx.data.num_classes,
        input_shape=(ctx.data.in_channels, *ctx.data.image_size),
        steps_per_epoch=steps_per_epoch,
        epochs=ctx.config.student.train.epochs,
        make_student=functools.partial(_calibrated_copy, start, options, batches, calibrate_on),
        quantize=functools.partial(_quantized_at, options, batches, calibrate_on),
        calibration_batches=batches,
        calibrate=calibrate_on,
    )


# MethodContext's builders are partials of module-level functions, not closures, so a distiller
# holding its context can be pickled (sent to the other processes of a multi-GPU run).
def _calibrated_copy(
    model: nn.Module, options: QuantizeOptions, batches: list, calibrate_on
) -> nn.Module:
    """A fake-quant copy of ``model`` calibrated on ``batches`` (if any)."""
    quantized = quantize(model, options)
    if batches:
        calibrate_on(quantized, batches)
    return quantized


def _quantized_at(
    options: QuantizeOptions, batches: list, calibrate_on, model: nn.Module, bits: int
) -> nn.Module:
    """A calibrated fake-quant copy of ``model`` (a teacher) at ``bits``; ``quant.layer_bits``
    names the student's layers and would override ``bits`` in a teacher of the same
    architecture, so it does not apply."""
    at_bits = dataclasses.replace(
        options, bits=BitWidths(bits, bits), layer_bits={}, float_layers=()
    )
    return _calibrated_copy(model, at_bits, batches, calibrate_on)


def _training_stages(config: Config) -> list[tuple[str, TrainConfig]]:
    """The config keys and settings of the training stages this run has (``ptq`` students do
    not train, nor a float student given as ``student.checkpoint``)."""
    stages = []
    if any(not t.module for t in teacher_configs(config)):
        stages.append(("teacher_train", config.teacher_train))
    if config.student.float_reference and not config.student.checkpoint:
        stages.append(("student.float_train", config.student.float_train))
    if method_class(config.student.method).trains:
        stages.append(("student.train", config.student.train))
    return stages


def check_batch_sizes(ctx: Context) -> None:
    """Every training stage that runs needs at least one full batch per epoch (an epoch drops its
    last partial batch): a small image folder with the default batch of 64 would otherwise train
    for no steps at all."""
    images = len(ctx.data.train)
    stages = _training_stages(ctx.config)
    too_large = [(key, t.batch_size) for key, t in stages if t.batch_size > images]
    if too_large:
        named = ", ".join(f"{key}.batch_size {size}" for key, size in too_large)
        sets = " ".join(f"--set {key}.batch_size={images}" for key, _ in too_large)
        raise UserError(
            f"the training split has only {images} images, fewer than a batch ({named}), so an "
            f"epoch would have no full batch; set smaller ones (e.g. {sets}) or give more images"
        )


def check_training_processes(config: Config) -> None:
    """Under torchrun, every process trains on a share of each batch, and a data-free method
    (which generates its batches and steps its generator inside the step) cannot be split."""
    group = distributed.current()
    if group is None:
        return
    if method_class(config.student.method).data_free:
        raise UserError(
            f"{config.student.method} is data-free: it generates its batches inside the training "
            f"step and trains on one device; run it without torchrun"
        )
    for key, train in _training_stages(config):
        if train.batch_size < group.world:
            raise UserError(
                f"{key}.batch_size is {train.batch_size}, fewer images than the {group.world} "
                "training processes that share each batch; set a larger one"
            )


PREFLIGHT_IMAGES = 4  # a BatchNorm in training mode needs more than one value per channel


def check_method_fits(ctx: Context) -> None:
    """Build the method on untrained copies of the run's teachers and student and compute one
    training step's losses on a few training images (no optimizer step).

    A model that does not fit the method then fails before the teachers and the float student
    train, not hours later: a user's teacher without stage feature maps for ``feed``, stage sizes
    the student's cannot be compared with, teachers that ``cmt-kd`` cannot mix. The same for
    ``student.float_method`` on the float student. Untrained models have the trained ones'
    structure; the random state is restored afterwards, so the run's numbers do not change.
    """
    with torch.random.fork_rng():
        distiller, images, labels = untrained_method(ctx)
        distiller.train()
        distiller.forward_train(images, labels, 0.0)
        cfg = ctx.config.student
        if cfg.float_method != "none":  # check_float_method: then float_reference is on
            distiller, images, labels = untrained_float_method(ctx)
            distiller.train()
            distiller.forward_train(images, labels, 0.0)


def untrained_method(ctx: Context) -> tuple[Distiller, torch.Tensor | None, torch.Tensor | None]:
    """The run's method built on untrained copies of its teachers and student (quantized at the
    first bit-width, calibrated on the batch), with ``PREFLIGHT_IMAGES`` augmented training
    images and labels to step it with (None, None for a data-free method, which generates as
    many: its ``batch_size`` option is cut to that, as 512 generated images through a large
    teacher on the CPU would take minutes and gigabytes)."""
    cfg = ctx.config.student
    method = method_class(cfg.method)
    data_free = method.data_free
    method_options = dict(cfg.method_options)
    if "batch_size" in {f.name for f in dataclasses.fields(method.Options)}:
        method_options["batch_size"] = PREFLIGHT_IMAGES
    options = quantize_options(ctx.config.quant, BitWidths.parse(cfg.bits[0]))
    teachers = untrained_teachers(ctx)
    start = untrained_student(ctx)
    images, labels = next(iter(ctx.train_loader(PREFLIGHT_IMAGES, 2)))
    batches = [] if data_free else [images]
    context = method_context(ctx, start, options, batches, steps_per_epoch=1)
    distiller = build_distiller(
        cfg.method, context.make_student(), teachers, method_options, context
    )
    return (distiller, None, None) if data_free else (distiller, images, labels)


def untrained_float_method(ctx: Context) -> tuple[Distiller, torch.Tensor, torch.Tensor]:
    """``student.float_method`` built on untrained copies of the run's teachers and the float
    student, with ``PREFLIGHT_IMAGES`` augmented training images and labels to step it with."""
    cfg = ctx.config.student
    images, labels = next(iter(ctx.train_loader(PREFLIGHT_IMAGES, 1)))
    distiller = build_distiller(
        cfg.float_method, untrained_student(ctx), untrained_teachers(ctx), cfg.float_method_options
    )
    return distiller, images, labels


def untrained_teachers(ctx: Context) -> list[nn.Module]:
    """The run's teachers as configured, before the teachers stage trains them."""
    return [teacher_model(ctx, t, i) for i, t in enumerate(teacher_configs(ctx.config))]


def _mark_calibrated(model: nn.Module) -> None:
    """Loading a saved fake-quant model restores its step sizes; nothing to calibrate."""
    for name, buffer in model.named_buffers():
        if name.endswith("calibrated"):
            buffer.fill_(True)


def _logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [
                model(torch.from_numpy(images[i : i + EVAL_BATCH])).numpy()
                for i in range(0, len(images), EVAL_BATCH)
            ]
        )


def export_stage(ctx: Context, model: nn.Module, name: str, quantized: bool) -> dict:
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
    return ctx.run.cached(
        folder / "export.json",
        key,
        lambda: export_and_measure(ctx, model, name, quantized),
        outputs=(folder / "model.onnx",),
    )


def export_and_measure(ctx: Context, model: nn.Module, name: str, quantized: bool) -> dict:
    """``export_stage`` without its record.

    A quantized model is compared in its BN-folded form (with INT32-grid biases for the
    ``onnxruntime`` target), which is the arithmetic the exported model performs; the unfolded
    QAT model's accuracy is reported too.
    """
    images, labels = ctx.test_images(), ctx.test_labels
    folder = ctx.run.stage(name)
    extra = {}
    if quantized:
        extra["accuracy_qat"] = accuracy(_logits(model, images), labels)
        model = fold_batchnorm(model)
    reference = _logits(model, images)
    deploy = to_deploy(model) if quantized else model.eval()
    export = ctx.config.export
    path = export_onnx(
        deploy,
        torch.from_numpy(images[:2]),
        folder / "model.onnx",
        export.opset,
        export.int4_gemm_weights,
    )
    bench = ctx.config.bench
    graph_runner = OnnxRuntimeRunner(path, threads=bench.threads, optimize=False)
    logits = run_in_batches(graph_runner, images, EVAL_BATCH)
    graph_runner.close()
    match = parity(logits, reference)
    runner = OnnxRuntimeRunner(path, threads=bench.threads)
    kernel_logits = run_in_batches(runner, images, EVAL_BATCH)
    kernels = parity(kernel_logits, reference)
    result = {
        "accuracy_torch": accuracy(reference, labels),
        "accuracy_onnx": accuracy(logits, labels),
        "onnx_agreement": match.agreement,
        "onnx_max_abs_error": match.max_abs_error,
        "ort_cpu": {
            "accuracy": accuracy(kernel_logits, labels),
            "agreement": kernels.agreement,
            "max_abs_error": kernels.max_abs_error,
        },
        "onnx_path": str(path.relative_to(ctx.run.root)),
        "onnx_bytes": path.stat().st_size,
        **extra,
    }
    min_agreement = ctx.config.export.min_agreement
    if quantized and match.agreement < min_agreement:
        raise RuntimeError(
            f"{name}: the exported graph agrees with the torch fake-quant model on only "
            f"{100 * match.agreement:.2f} % of the test split (max logit error "
            f"{match.max_abs_error:.4g}); the export is wrong, see {path}"
        )
    if quantized and kernels.agreement < min_agreement:
        result["warning"] = ort_kernel_warning(name, kernels.agreement, ctx.config.quant.target)
        print(f"warning: {result['warning']}", file=sys.stderr)
    result["latency_ms"] = {
        "onnxruntime_cpu": measure_latency(
            runner, images[0], bench.batch_sizes, bench.warmup, bench.iterations
        )
    }
    runner.close()
    return result


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


def ort_kernel_warning(name: str, agreement: float, target: str) -> str:
    """Why ONNX Runtime's fused integer kernels disagree with a graph that is itself right."""
    causes = fused_kernel_inexactness(target)
    return (
        f"{name}: the exported graph is exact, but ONNX Runtime's fused CPU kernels agree with "
        f"the trained model on only {100 * agreement:.2f} % of the test split: "
        f"{'; '.join(causes) or 'they round differently on this CPU'}. TensorRT computes the "
        "graph as written; report.json has both accuracies"
    )


def timed(timings: dict, name: str):
    """Context manager recording a stage's wall time (seconds) in ``timings``."""

    class _Timer:
        def __enter__(self):
            self.start = time.perf_counter()

        def __exit__(self, *exc):
            timings[name] = round(time.perf_counter() - self.start, 2)

    return _Timer()


def write_report_files(ctx: Context, report: dict) -> None:
    from qkd_deploy.bench.report import write_report

    write_report(ctx.run.root, report)
