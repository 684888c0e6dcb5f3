"""Feature-level distillation: FEED and InDistill (docs/methods/feed.md, indistill.md).

Both read intermediate feature maps through ``models.features``: a zoo model's stages, or the
layers a user model names in ``feature_layers`` (a fake-quant student keeps its float model's
structure and module names). Whatever a method adds for training
(FEED's translators, InDistill's kept-channel indices) lives in the distiller, never in the
student, so the exported model is the plain quantized student.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.distill.base import Distiller, MethodOptions, register_method, trainable
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from qkd_deploy.models.features import (
    Role,
    forward_features,
    stage_channels,
    stage_module,
    student_role,
    teacher_role,
)
from qkd_deploy.quant.quantizer import LSQQuantizer


def check_spatial(student_map: torch.Tensor, teacher_map: torch.Tensor, what: str) -> None:
    """Feature maps compared element-wise must have the same height and width."""
    if student_map.shape[2:] != teacher_map.shape[2:]:
        raise UserError(
            f"{what}: the student's feature map is {tuple(student_map.shape[2:])} but the "
            f"teacher's is {tuple(teacher_map.shape[2:])} (height, width); pick a teacher whose "
            "stages downsample like the student's (e.g. a CIFAR ResNet for a CIFAR ResNet)"
        )


@torch.no_grad()
def on_zero_batch(model: nn.Module, input_shape: tuple[int, ...], compute: Callable) -> Any:
    """``compute(model, x)`` for ``x`` a zero batch of two ``input_shape`` images, in eval mode
    (the model's mode is restored): enough to compare stage shapes when a distiller is built."""
    was_training = model.training
    model.eval()
    try:
        return compute(model, torch.zeros(2, *input_shape))
    finally:
        model.train(was_training)


def stage_maps(model: nn.Module, input_shape: tuple[int, ...], role: Role) -> list[torch.Tensor]:
    """A model's stage outputs on a zero batch."""
    return on_zero_batch(model, input_shape, lambda m, x: forward_features(m, x, role)[1])


# ---------------------------------------------------------------------------------------------
# FEED


def normalized_l1(student_map: torch.Tensor, teacher_map: torch.Tensor) -> torch.Tensor:
    """Factor-transfer distance ``mean |s / ||s||_2 - t / ||t||_2|``.

    Each sample's map is flattened (C*H*W) and L2-normalised, then the absolute difference is
    averaged over batch and elements (``F.l1_loss`` with its default mean), as the Factor Transfer
    code that FEED extends does (``F.normalize(x.view(B, -1))`` + ``nn.L1Loss()``).
    """
    check_spatial(student_map, teacher_map, "feed")
    s = F.normalize(student_map.flatten(1), dim=1)
    t = F.normalize(teacher_map.flatten(1), dim=1)
    return F.l1_loss(s, t)


def pooled_to_common_size(
    student_map: torch.Tensor, teacher_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both maps at the smaller height and the smaller width of the two: the larger map is
    average-pooled (``adaptive_avg_pool2d``; windows overlap when the sizes do not divide).
    Maps of equal size are returned unchanged."""
    size = tuple(
        min(a, b) for a, b in zip(student_map.shape[2:], teacher_map.shape[2:], strict=True)
    )

    def pooled(m: torch.Tensor) -> torch.Tensor:
        return m if tuple(m.shape[2:]) == size else F.adaptive_avg_pool2d(m, size)

    return pooled(student_map), pooled(teacher_map)


class Translator(nn.Sequential):
    """FEED's non-linear translator: conv-BN-ReLU-conv from the student's last feature map to one
    teacher's channels (``kernel_size`` with "same" padding, so the spatial size is kept)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        pad = kernel_size // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size, padding=pad, bias=False),
        )


@dataclasses.dataclass
class FEEDOptions(MethodOptions):
    beta: float = 500.0  # weight of the feature loss (Factor Transfer code's default, CIFAR)
    mode: str = "parallel"  # "parallel": all teachers every step; "sequential": one per stage
    translator_kernel: int = 3  # kernel size of the translators' two convs
    resize: str = "pool"  # maps of different sizes: "pool" the larger one, or "none" (refuse)

    def __post_init__(self) -> None:
        if self.mode not in ("parallel", "sequential"):
            raise UserError(f"feed mode {self.mode!r}: use 'parallel' or 'sequential'")
        if self.resize not in ("pool", "none"):
            raise UserError(f"feed resize {self.resize!r}: use 'pool' or 'none'")


@register_method
class FEED(Distiller):
    """FEED: Feature-level Ensemble for Knowledge Distillation (Park & Kwak, arXiv 1909.10754).

    The student carries one translator per teacher on its last feature map ``f_s`` (last stage
    output); translator ``i`` maps it to teacher ``i``'s last-stage channels. Loss::

        CE(z_s, y) + beta * sum_i mean | norm(translator_i(f_s)) - norm(f_Ti) |

    with ``norm`` the per-sample L2 normalisation of the flattened map (``normalized_l1``).
    Teachers are frozen; translators are trained with the student (their own parameter group,
    the student's learning rate, as in the Factor Transfer code) and never reach the export.

    Modes:
    - ``parallel`` (default, the paper's main method): every teacher, through its own translator,
      in every step; the ensemble effect comes from the parallel non-linear translators.
    - ``sequential``: the run is split into equal shares of ``progress``, one per teacher in the
      given order; stage ``i`` uses teacher ``i`` and its translator only, and starts from the
      student where stage ``i - 1`` left it (it is the same student object, trained on).

    Choices the paper leaves open, with what we follow:
    - ``beta = 500`` and the normalisation/averaging: the official Factor Transfer code
      (``train_student.py``: ``--beta 500``, ``nn.L1Loss()`` on ``F.normalize(x.view(B, -1))``),
      the method FEED extends. The target is the teacher's raw last feature map (as in FEED),
      with no FT paraphraser on the teacher side.
    - Translator: conv-BN-ReLU-conv (non-linear, as in FEED), 3x3 kernels as FT's, hidden width =
      the teacher's channels; ``translator_kernel`` changes the kernel.
    - No logit KD term (the paper's loss is CE + feature term only).
    - Sequential stages share the trainer's single learning-rate schedule (the paper retrains
      each stage with its own schedule); stage lengths are equal.
    - Teacher and student last feature maps of different height or width (a MobileNetV2
      student's 4x4 against a CIFAR ResNet teacher's 7x7 on 28x28 images): the paper pairs
      networks of one downsampling, so it never says. With ``resize = "pool"`` (default) the
      larger of the two maps (the translated student's or the teacher's) is average-pooled to
      the smaller size before the distance, which keeps each position's mean activation and adds
      no parameters. ``resize = "none"`` refuses a mismatch with a ``UserError`` when the
      distiller is built with a context (the pipeline's input shape), else at the first step.
    - Default teachers: two ``resnet8x4`` (seeds differ: the pipeline trains teacher ``i`` with
      seed + 100 i). The paper's teachers are several networks of one architecture, so the
      ensemble gain comes from their different solutions; resnet8x4 is the project's cheap
      default teacher (99.7-100 % on digits), and its 4x-wide stages have the student's spatial
      sizes. ``resnet32x4`` works too (pass ``--teacher-arch resnet8x4,resnet32x4``) at about
      four times the teacher-training cost.
    """

    name = "feed"
    description = "FEED: feature-map distillation from an ensemble of teachers via translators"
    Options = FEEDOptions
    default_teachers = ("resnet8x4", "resnet8x4")
    distils_float = True

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        width = stage_channels(student, student_role("feed"))[-1]
        self.translators = nn.ModuleList(
            Translator(
                width, stage_channels(t, teacher_role("feed", i))[-1], options.translator_kernel
            )
            for i, t in enumerate(self.teachers)
        )
        if context is not None and options.resize == "none":
            last = stage_maps(student, context.input_shape, student_role("feed"))[-1]
            for i, teacher in enumerate(self.teachers):
                maps = stage_maps(teacher, context.input_shape, teacher_role("feed", i))
                check_spatial(last, maps[-1], "feed")

    def parameter_groups(self):
        return [
            {"params": trainable(self.student.parameters()), "lr_scale": 1.0},
            {"params": list(self.translators.parameters()), "lr_scale": 1.0},
        ]

    def active_teachers(self, progress: float) -> list[int]:
        """Indices of the teachers used at ``progress``: all (parallel) or the current stage's."""
        n = len(self.teachers)
        if self.options.mode == "parallel":
            return list(range(n))
        return [min(max(int(progress * n), 0), n - 1)]

    def forward_train(self, images, labels, progress):
        logits, stages = forward_features(self.student, images, student_role("feed"))
        last = stages[-1]
        feature_loss = logits.new_zeros(())
        for i in self.active_teachers(progress):
            with torch.no_grad():
                target = forward_features(self.teachers[i], images, teacher_role("feed", i))[1][-1]
            translated = self.translators[i](last)
            if self.options.resize == "pool":
                translated, target = pooled_to_common_size(translated, target)
            feature_loss = feature_loss + normalized_l1(translated, target)
        return logits, {
            "ce": F.cross_entropy(logits, labels),
            "feed": self.options.beta * feature_loss,
        }


# ---------------------------------------------------------------------------------------------
# InDistill


def largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices (ascending) of the ``keep`` largest scores."""
    return scores.topk(keep).indices.sort().values


def l1_keep(weight: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` output filters of largest L1 norm (ascending indices): structured L1 pruning
    along dim 0 (``torch.nn.utils.prune.ln_structured(n=1, dim=0)`` in the reference code)."""
    return largest(weight.detach().abs().flatten(1).sum(1), keep)


SKIP_BRANCHES = {"shortcut", "downsample"}  # module names of a residual block's skip convs


def producing_conv(stage: nn.Module) -> nn.Conv2d:
    """The conv whose filters make a stage's output channels: the last ``Conv2d`` registered in
    the stage outside a skip branch (``shortcut``, or torchvision's ``downsample``): a ResNet
    block's ``conv2``, MobileNetV2's projection or final 1x1 conv."""
    convs = [
        m
        for name, m in stage.named_modules()
        if isinstance(m, nn.Conv2d) and not SKIP_BRANCHES & set(name.split("."))
    ]
    if not convs:
        raise UserError(
            "indistill: a teacher stage has no Conv2d to rank its channels by; set "
            "indistill option prune_by=activation"
        )
    return convs[-1]


INDISTILL_STUDENT = student_role("indistill")
INDISTILL_TEACHER = teacher_role("indistill", 0)


@dataclasses.dataclass
class InDistillOptions(MethodOptions):
    tau: float = 4.0  # KD temperature of the last phase
    alpha: float = 0.5  # weight of CE in the last phase; KD gets 1 - alpha
    warmup_share: float = 0.17  # share of the run for the layer curriculum (ref.: 12 of 70 epochs)
    stage_lengths: tuple[float, ...] | None = None  # relative lengths; None = 3, 4, 5, ...
    order: str = "shallow-first"  # "shallow-first" (reference code) or "deep-first"
    layers: tuple[int, ...] | None = None  # stage indices to distil; None = all stages
    feature_weight: float = 1.0  # weight of the MSE feature loss during the curriculum
    prune_by: str = "filter"  # "filter": L1 of the producing conv's filters; "activation"
    freeze_step_sizes: bool = True  # quantizer step sizes not trained during the curriculum

    def __post_init__(self) -> None:
        if self.order not in ("shallow-first", "deep-first"):
            raise UserError(f"indistill order {self.order!r}: use 'shallow-first' or 'deep-first'")
        if not 0.0 <= self.warmup_share < 1.0:
            raise UserError(f"indistill warmup_share {self.warmup_share}: use 0 <= share < 1")
        if self.prune_by not in ("filter", "activation"):
            raise UserError(f"indistill prune_by {self.prune_by!r}: use 'filter' or 'activation'")


@register_method
class InDistill(Distiller):
    """InDistill: information flow-preserving KD (Sarridis et al., arXiv 2205.10003, WACV 2025;
    reference code github.com/gsarridis/InDistill).

    1. Pruning (at construction): each distilled teacher stage is pruned to the student's width
       by L1-norm structured channel pruning: keep the student-width channels whose producing
       conv filters have the largest L1 norm (``l1_keep``). As in the reference code, a pruned
       layer reads the *unpruned* teacher's previous layer, so pruning the output filters (and
       their BatchNorm) gives exactly the kept channels of the teacher's stage output: the pruned
       teacher is the frozen teacher plus the kept indices (``pruned_teacher_stages``), with no
       weight copy and no training (the reference does not fine-tune it either). Unlike the
       reference, which rebuilds the pruned BatchNorm with fresh bias and statistics, the kept
       channels keep the teacher's BatchNorm, so the pruning is exact.
    2. Curriculum (the first ``warmup_share`` of the run): the matched stages are distilled one
       at a time, student stage ``k`` vs the pruned teacher stage ``k``, by MSE on the feature
       maps (the only loss, as in the reference); each curriculum stage is longer than the last
       (``stage_lengths``, relative; default 3, 4, 5, ... as the reference's 3, 4, 5 epochs).
    3. Then the whole student trains with ``alpha * CE + (1 - alpha) * tau^2 * KL`` (Hinton KD
       against the unpruned teacher's logits) until the end.

    For a quantized student the curriculum trains the weights but not the quantizers' learned
    step sizes (``freeze_step_sizes``). The reference distils float networks; with learned step
    sizes, the feature MSE has a shortcut. It can grow an activation step until the input
    rounds to 0, which shrinks the student's map towards a smaller teacher map and kills the
    student. At W2A2 on Fashion-MNIST (learning rate 0.05, seed 0), the input's step grew to
    5.8e8 in the first epoch and the run ended at 10 %.

    Choices, with what we follow:
    - Order: the reference code (``kd_from_aux_to_student.py``) lists layers as [4, 3, 2, 1, 0]
      but weights the *last* entry first, i.e. it distils layer 0 (the shallowest conv) first,
      then 1, then 2, matching the paper's argument (distillation difficulty grows with depth;
      early layers form in the critical learning period). Read in list order it is deepest first;
      ``order = "deep-first"`` gives that.
    - ``warmup_share = 0.17``: the reference spends 3 + 4 + 5 = 12 of its 60 + 10 epochs on the
      curriculum (the rest goes to the main distillation).
    - Pruning criterion: the reference prunes conv weights (``ln_structured``, n=1, dim=0);
      ``prune_by = "activation"`` ranks channels by the L1 norm of the teacher's stage output
      on the calibration images instead (for models whose producing conv is unclear).
    - Distilled layers: every stage output (``layers`` picks a subset); teacher and student need
      the same number of stages, teacher width >= student width, equal spatial sizes.
    - Last phase: Hinton KD with the project's defaults (tau 4, alpha 0.5);
      the paper uses InDistill as a warm-up before any main KD method (the retrieval-oriented
      reference code follows it with PKT on the penultimate layer).
    - No auxiliary teacher (the paper adds one for extreme capacity gaps, distilled from the
      big teacher before pruning): give a teacher of the student's family instead.
    - One teacher (the paper's setting); more is a ``UserError``.
    """

    name = "indistill"
    description = "InDistill: pruned-teacher feature curriculum, then KD"
    Options = InDistillOptions
    max_teachers = 1

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        widths = stage_channels(student, INDISTILL_STUDENT)
        teacher_widths = stage_channels(self.teachers[0], INDISTILL_TEACHER)
        if len(widths) != len(teacher_widths):
            raise UserError(
                f"indistill: the student has {len(widths)} stages, the teacher "
                f"{len(teacher_widths)}; pick a teacher of the student's family"
            )
        self.layer_order = self._layer_order(len(widths))
        self.lengths = self._stage_lengths(len(self.layer_order))
        for k in self.layer_order:
            if teacher_widths[k] < widths[k]:
                raise UserError(
                    f"indistill: teacher stage {k} has {teacher_widths[k]} channels, fewer than "
                    f"the student's {widths[k]}; pruning can only narrow the teacher"
                )
        if context is not None:
            maps = stage_maps(student, context.input_shape, INDISTILL_STUDENT)
            teacher_maps = stage_maps(self.teachers[0], context.input_shape, INDISTILL_TEACHER)
            for k in self.layer_order:
                check_spatial(maps[k], teacher_maps[k], f"indistill stage {k}")
        ranking = self._channel_ranking()
        for k in self.layer_order:
            self.register_buffer(f"kept_{k}", ranking(k, widths[k]), persistent=False)
        self.step_sizes = [
            m.scale
            for m in student.modules()
            if isinstance(m, LSQQuantizer) and m.scale.requires_grad
        ]

    def _layer_order(self, n_stages: int) -> list[int]:
        opts = self.options
        layers = sorted(opts.layers) if opts.layers is not None else list(range(n_stages))
        if not layers or any(k < 0 or k >= n_stages for k in layers):
            raise UserError(
                f"indistill layers {opts.layers}: pick stage indices in 0..{n_stages - 1}"
            )
        return layers if opts.order == "shallow-first" else layers[::-1]

    def _stage_lengths(self, n_layers: int) -> list[float]:
        opts = self.options
        if opts.stage_lengths is None:
            return [3.0 + i for i in range(n_layers)]
        lengths = [float(v) for v in opts.stage_lengths]
        if len(lengths) != n_layers or min(lengths) <= 0:
            raise UserError(
                f"indistill stage_lengths {opts.stage_lengths}: give {n_layers} positive numbers, "
                "one per distilled layer in distillation order"
            )
        return lengths

    def _channel_ranking(self):
        """``(stage, keep) -> kept indices`` for the configured pruning criterion."""
        teacher = self.teachers[0]
        if self.options.prune_by == "filter":
            return lambda k, keep: l1_keep(
                producing_conv(stage_module(teacher, k, INDISTILL_TEACHER)).weight, keep
            )
        batches = self.context.calibration_batches if self.context else []
        if not batches:
            raise UserError("indistill prune_by=activation needs calibration images")
        teacher.eval()
        sums = [torch.zeros(c) for c in stage_channels(teacher, INDISTILL_TEACHER)]
        with torch.no_grad():
            for x in batches:
                for k, s in enumerate(forward_features(teacher, x, INDISTILL_TEACHER)[1]):
                    sums[k] += s.abs().sum((0, 2, 3))
        return lambda k, keep: largest(sums[k], keep)

    def kept(self, stage: int) -> torch.Tensor:
        """The teacher channels kept at ``stage`` (ascending indices)."""
        return getattr(self, f"kept_{stage}")

    def pruned_teacher_stages(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The teacher's logits and its pruned stage outputs ``{stage: kept channels}``."""
        with torch.no_grad():
            logits, stages = forward_features(self.teachers[0], images, INDISTILL_TEACHER)
        return logits, {k: stages[k].index_select(1, self.kept(k)) for k in self.layer_order}

    def curriculum_layer(self, progress: float) -> int | None:
        """The stage distilled at ``progress``, or None once the curriculum is over (KD phase)."""
        done, total = 0.0, sum(self.lengths)
        for layer, length in zip(self.layer_order, self.lengths, strict=True):
            done += length
            if progress < self.options.warmup_share * done / total:
                return layer
        return None

    def forward_train(self, images, labels, progress):
        layer = self.curriculum_layer(progress)
        for step_size in self.step_sizes:  # before the forward pass, which records it
            step_size.requires_grad_(layer is None or not self.options.freeze_step_sizes)
        logits, stages = forward_features(self.student, images, INDISTILL_STUDENT)
        zero = logits.new_zeros(())
        terms = {"feature": zero, "ce": zero, "kd": zero}
        teacher_logits, pruned = self.pruned_teacher_stages(images)
        if layer is not None:
            student_map = stages[layer]
            check_spatial(student_map, pruned[layer], f"indistill stage {layer}")
            terms["feature"] = self.options.feature_weight * F.mse_loss(student_map, pruned[layer])
        else:
            alpha = self.options.alpha
            terms["ce"] = alpha * F.cross_entropy(logits, labels)
            terms["kd"] = (1 - alpha) * kd_kl(logits, teacher_logits, self.options.tau)
        return logits, terms
