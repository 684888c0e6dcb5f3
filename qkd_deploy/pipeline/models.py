"""The run's models: teachers and students built as configured and checked on test images,
their weight files saved and read back, students quantized as the run quantizes them, and what
a method may build besides its student."""

from __future__ import annotations

import dataclasses
import functools
import io
from pathlib import Path

import torch
from torch import nn

from qkd_deploy.bits import BitWidths
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.config import Config, QuantConfig, TeacherConfig
from qkd_deploy.data import DatasetSplits
from qkd_deploy.distill.base import MethodContext
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_bytes
from qkd_deploy.models import build_model, load_checkpoint, load_user_model
from qkd_deploy.models.features import attach_feature_layers
from qkd_deploy.pipeline.context import Context
from qkd_deploy.quant.convert import QuantizeOptions
from qkd_deploy.quant.precision import PrecisionOptions, quantize, split_layer_bits
from qkd_deploy.torch_files import load_weights_only, why


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


def mark_calibrated(model: nn.Module) -> nn.Module:
    """A fake-quant model about to load saved weights: those restore its step sizes, so nothing
    is left to calibrate."""
    for name, buffer in model.named_buffers():
        if name.endswith("calibrated"):
            buffer.fill_(True)
    return model


def input_shape(data: DatasetSplits) -> tuple[int, ...]:
    """``(C, H, W)`` of the data's images."""
    return (data.in_channels, *data.image_size)


def teacher_model(ctx: Context, cfg: TeacherConfig, index: int) -> nn.Module:
    """Teacher ``index`` as configured: the user's model with its checkpoint (checked on two test
    images), or a freshly initialised zoo model for the teachers stage to train."""
    if cfg.module:
        teacher = load_user_model(cfg.module, cfg.checkpoint).eval()
        check_classifier(teacher, ctx, f"teacher {cfg.module}")
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


def untrained_teachers(ctx: Context) -> list[nn.Module]:
    """The run's teachers as configured, before the teachers stage trains them."""
    return [teacher_model(ctx, t, i) for i, t in enumerate(ctx.plan.teachers)]


def check_classifier(model: nn.Module, ctx: Context, what: str) -> None:
    """``model`` runs on two test images and returns finite logits, one per class."""
    sample = ctx.preprocess.apply(ctx.data.test.first(2))
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as error:
        raise UserError(
            f"{what} failed on a {tuple(sample.shape)} batch of {ctx.data.name} ({error}); "
            f"check its input channels/size and the --normalize preprocessing"
        ) from error
    if not isinstance(out, torch.Tensor):
        raise UserError(
            f"{what} returns a {type(out).__name__}, not a tensor; expected (N, "
            f"{ctx.data.num_classes}) logits: make its factory return a model whose forward "
            "returns the logits alone (e.g. a wrapper module that picks them out)"
        )
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


def untrained_student(ctx: Context) -> nn.Module:
    """The student architecture, freshly initialised (the same weights for the same seed); a
    user's student is first checked on two test images, as a user's teacher is."""
    torch.manual_seed(ctx.config.seed + 1)
    model = student_model(ctx.config, ctx.data)
    module = ctx.config.student.module
    if module:
        with torch.random.fork_rng(devices=[]):  # a user model may draw random numbers
            model.eval()
            check_classifier(model, ctx, f"student {module}")
            model.train()
    return model


def given_student(ctx: Context) -> nn.Module:
    """The user's trained float student: its model with ``student.checkpoint`` loaded, checked
    on two test images."""
    cfg = ctx.config.student
    model = untrained_student(ctx)
    load_checkpoint(model, cfg.checkpoint).eval()
    check_classifier(model, ctx, f"student {cfg.module} with checkpoint {cfg.checkpoint}")
    return model


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
        input_shape=input_shape(ctx.data),
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
