"""Every check before training, in one place: a mistake in the config, the data or the models
fails here, before a teacher trains, and a new run that stops here leaves no run directory.

``check_method`` needs only the config (the command runs it before the run directory is
claimed); ``check_before_training`` needs the data and untrained copies of the models.
"""

from __future__ import annotations

import sys

import torch

from qkd_deploy.config import Config
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import Distiller, checked_method_options, float_methods
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline.context import Context
from qkd_deploy.pipeline.models import (
    given_student,
    method_context,
    quantize_options,
    untrained_student,
    untrained_teachers,
)
from qkd_deploy.pipeline.plan import FloatStudent, Plan
from qkd_deploy.train import distributed
from qkd_deploy.train.loop import channels_last_error

PREFLIGHT_IMAGES = 4  # a BatchNorm in training mode needs more than one value per channel


def check_method(config: Config) -> dict:
    """The configured method's full options (defaults filled in), after the checks that need no
    training: a typo in a method option fails here, not after the teachers are trained."""
    plan = Plan.of(config)
    if not plan.trains and not plan.float_reference and not config.student.checkpoint:
        raise UserError(
            f"{plan.method} quantizes the trained float student without training it further, "
            "and student.float_reference=false skips that student; set it to true"
        )
    check_float_method(config, plan)
    return checked_method_options(plan.method, config.student.method_options, len(plan.teachers))


def check_float_method(config: Config, plan: Plan) -> None:
    """``student.float_method`` must train a float model, and there must be a float student."""
    name = plan.float_method
    if not plan.float_method_distils:
        raise UserError(
            f"student.float_method {name!r} cannot train the float student (it needs a quantized "
            f"student, or does not train); use one of {', '.join(float_methods())}"
        )
    if name != "none" and not plan.float_reference:
        raise UserError(
            f"student.float_method={name} distils the float student, and "
            "student.float_reference=false skips that student; set it to true, or the float "
            "method to none"
        )
    checked_method_options(name, config.student.float_method_options, len(plan.teachers))


def check_before_training(ctx: Context) -> None:
    """What must hold before the first stage trains, given the data: the training device,
    the quantization settings of every student, a full batch per epoch, what torchrun's
    processes can share, and models that fit the method."""
    _ = ctx.device  # a GPU asked for that is not there fails here
    for bits in ctx.plan.bits:
        quantize_options(ctx.config.quant, bits)
    check_batch_sizes(ctx)
    check_training_processes(ctx.plan)
    check_given_student(ctx)
    check_method_fits(ctx)


def check_given_student(ctx: Context) -> None:
    """The user's trained float student loads and classifies, before a teacher trains for it (a
    resumed run that kept its copy, ``student_float/model.pt``, needs the checkpoint no more)."""
    if ctx.plan.float_student is not FloatStudent.GIVEN:
        return
    if (ctx.run.root / "student_float" / "model.pt").exists():
        return
    with torch.random.fork_rng():
        given_student(ctx)


def check_batch_sizes(ctx: Context) -> None:
    """Every training stage that runs needs at least one full batch per epoch (an epoch drops its
    last partial batch): a small image folder with the default batch of 64 would otherwise train
    for no steps at all."""
    images = len(ctx.data.train)
    stages = ctx.plan.training_stages
    too_large = [(key, t.batch_size) for key, t in stages if t.batch_size > images]
    if too_large:
        named = ", ".join(f"{key}.batch_size {size}" for key, size in too_large)
        sets = " ".join(f"--set {key}.batch_size={images}" for key, _ in too_large)
        raise UserError(
            f"the training split has only {images} images, fewer than a batch ({named}), so an "
            f"epoch would have no full batch; set smaller ones (e.g. {sets}) or give more images"
        )


def check_training_processes(plan: Plan) -> None:
    """Under torchrun, every process trains on a share of each batch, and a data-free method
    (which generates its batches and steps its generator inside the step) cannot be split."""
    group = distributed.current()
    if group is None:
        return
    if plan.data_free:
        raise UserError(
            f"{plan.method} is data-free: it generates its batches inside the training "
            f"step and trains on one device; run it without torchrun"
        )
    for key, train in plan.training_stages:
        if train.batch_size < group.world:
            raise UserError(
                f"{key}.batch_size is {train.batch_size}, fewer images than the {group.world} "
                "training processes that share each batch; set a larger one"
            )


def check_method_fits(ctx: Context) -> None:
    """Build the method on untrained copies of the run's teachers and student and compute one
    training step's losses on a few training images (no optimizer step).

    A model that does not fit the method then fails before the teachers and the float student
    train, not hours later: a user's teacher without stage feature maps for ``feed``, stage sizes
    the student's cannot be compared with, teachers that ``cmt-kd`` cannot mix. The same for
    ``student.float_method`` on the float student. Untrained models have the trained ones'
    structure; the random state is restored afterwards, so the run's numbers do not change.

    The same step in channels-last layout then tells whether the run can train in it on the
    CPU (``Context.channels_last``).
    """
    with torch.random.fork_rng():
        steps = [untrained_method(ctx)]
        if ctx.plan.float_method != "none":  # check_float_method: then float_reference is on
            steps.append(untrained_float_method(ctx))
        for distiller, images, labels in steps:
            distiller.train()
            distiller.forward_train(images, labels, 0.0)
        if ctx.device.type == "cpu":
            check_channels_last(ctx, steps)


def check_channels_last(ctx: Context, steps: list) -> None:
    """Train in the ordinary layout, and say so, when a method's step fails in channels-last."""
    for distiller, images, labels in steps:
        error = channels_last_error(distiller, images, labels)
        if error is not None:
            ctx.channels_last = False
            print(
                f"note: training in the ordinary memory layout, not channels-last (faster on "
                f"the CPU), as a model fails in it: {error} (e.g. .view on a convolution's "
                "output: .reshape runs in both)",
                file=sys.stderr,
            )
            return


def untrained_method(ctx: Context) -> tuple[Distiller, torch.Tensor | None, torch.Tensor | None]:
    """The run's method built on untrained copies of its teachers and student (quantized at the
    first bit-width, calibrated on the batch), with ``PREFLIGHT_IMAGES`` augmented training
    images and labels to step it with (None, None for a data-free method, which generates as
    many: its ``batch_size`` option is cut to that, as 512 generated images through a large
    teacher on the CPU would take minutes and gigabytes)."""
    cfg, plan = ctx.config.student, ctx.plan
    method_options = dict(cfg.method_options)
    if plan.method_has_batch_size:
        method_options["batch_size"] = PREFLIGHT_IMAGES
    options = quantize_options(ctx.config.quant, plan.bits[0])
    teachers = untrained_teachers(ctx)
    start = untrained_student(ctx)
    images, labels = next(iter(ctx.train_loader(PREFLIGHT_IMAGES, 2)))
    batches = [] if plan.data_free else [images]
    context = method_context(ctx, start, options, batches, steps_per_epoch=1)
    distiller = build_distiller(
        plan.method, context.make_student(), teachers, method_options, context
    )
    return (distiller, None, None) if plan.data_free else (distiller, images, labels)


def untrained_float_method(ctx: Context) -> tuple[Distiller, torch.Tensor, torch.Tensor]:
    """``student.float_method`` built on untrained copies of the run's teachers and the float
    student, with ``PREFLIGHT_IMAGES`` augmented training images and labels to step it with."""
    cfg = ctx.config.student
    images, labels = next(iter(ctx.train_loader(PREFLIGHT_IMAGES, 1)))
    distiller = build_distiller(
        cfg.float_method, untrained_student(ctx), untrained_teachers(ctx), cfg.float_method_options
    )
    return distiller, images, labels
