"""CDFKD-MFS: collaborative data-free distillation of several teachers into one multi-header
student (Hao, Luo, Wang, Hu, An, "CDFKD-MFS: Collaborative Data-free Knowledge Distillation via
Multi-level Feature Sharing", arXiv 2205.11845, 2022; docs/methods/cdfkd-mfs.md).

Followed: the paper and, where it is silent, the authors' code (github.com/Hao840/CDFKD-MFS:
``CDFKD_MFS.py``, ``nets/mhresnet8x.py``, ``utils/forward.py``; and the attention of the earlier
CDFKD, github.com/Hao840/pytorch-CDFKD, ``attention-train.py``), read to understand, not copied.

The algorithm, per call of ``forward_train`` (one student step; ``N`` teachers ``T_i``):

- Multi-header student. One backbone, the quantized student, with ``N`` extra headers ``h_i``
  (one per teacher, as the reference's ``headers = num_t``). Multi-level feature sharing: header
  ``i`` reads *every* stage output ``s_1..s_L`` of the backbone (``forward_features``), through a
  chain of separable-conv encoders ``a_1 = E_1(s_1)``, ``a_l = E_l([s_l, a_{l-1}])``, then global
  pooling (its feature ``f_hi``, as wide as teacher ``i``'s penultimate feature ``f_Ti``) and a
  linear classifier. The student's own ``fc`` is the *main header* ``m``: the model exported.
- Student losses, on a batch generated without gradient:
  ``heads = 1 * mean_i L1(h_i, T_i)`` (L1 = mean absolute logit difference),
  ``feat = 0.2 * mean_i mean_batch sum_d |f_hi - f_Ti|``,
  ``ens = 5 * L1(m, mean_i T_i)`` (the teachers' ensemble: the plain mean of their logits).
- Asymmetric adversarial training: after every ``student_steps_per_generator_step`` (5) student
  steps, one generator step (Adam 1e-3) on a fresh batch *maximises* the headers' disagreement
  with their teachers while matching the teachers' BatchNorm statistics (DeepInversion):
  ``L_G = -1 * D + 0.1 * mean_i sum_l w_l (||mu_l - mu_l^run||_2 + ||var_l - var_l^run||_2)``,
  ``D = mean over headers of L1(header, its target)``; ``mu_l``, ``var_l`` are the batch mean
  and (biased) variance per channel of the input of teacher ``i``'s ``l``-th BatchNorm2d, and
  ``w_l`` is 5 for the first BatchNorm and 1 for the others (the reference's ``rescale``).
  Asymmetric: the student minimises more than the generator maximises (features, ensemble) and
  steps more often.
- Attention-based aggregation (optional, needs real samples): ``HeaderAttention`` scores each
  header's logits with one linear layer, softmax over headers, and sums the headers' logits with
  those weights; it is trained with cross-entropy on a few real samples, the student frozen.

Choices the paper leaves open, each an ``Options`` field:

- The main header (``fc``) learns from the teachers' ensemble (``ens``). The reference has no main
  header: it applies ``ens`` to the mean of its ``N`` headers and evaluates that mean. In qkd-deploy
  the exported student must stand alone, so the ensemble target goes to its own head and the extra
  headers carry the per-teacher and feature losses into the shared backbone.
- ``adversarial_main_head`` (True): the generator also attacks the main header against the
  ensemble, so its hard samples target the exported model (the reference attacks the per-teacher
  headers only, whose mean is its evaluated output). False gives the reference's objective.
- ``first_shared_stage`` (0): the headers read the stage outputs from this stage on (0 = every
  stage, as the reference's four levels).
- Encoders: the reference's ``SepConv`` (depthwise 3x3 + pointwise conv, BN, ReLU, twice), but with
  stride 1: the previous encoder's output is average-pooled to the next stage's size before the
  concatenation (the reference's stride 2 assumes every stage halves the resolution). Widths as
  the reference: ``E_l`` outputs the width of stage ``l + 1``; the last one, the teacher's feature
  width (so ``feat`` compares like with like). The headers stay float: they never reach export.
- Generator: DAFL's ``ImageGenerator`` (same layout as the reference's CIFAR generator),
  ``latent_dim = 256`` and ``batch_size = 256`` (reference ``nz``, ``bsz``); its Adam learning
  rate is multiplied by 0.1 at each of ``generator_lr_milestones`` (fractions of training; the
  reference's epochs 100 and 200 of 300). Each student step and each generator step draws fresh
  noise, as the reference does. The generator's forward pass also runs the student in training
  mode (its BatchNorm statistics follow the generated images, as in the reference); only the
  generator's parameters get gradients from ``L_G`` (``torch.autograd.grad``).
- The student's optimizer is the run's: the trainer steps the student and the headers with the
  configured optimizer and schedule. The reference uses SGD lr 0.1, momentum 0.9, weight decay
  5e-4, x0.1 at epochs 100 and 200 of 300, 50 generator steps per epoch (250 student steps).
- Attention: the reference trains it *after* distillation on 600 labelled real images (Adam lr
  0.01, 100 epochs). qkd-deploy's data-free mode has no real images (``calibration_batches`` is
  empty) and exports only the main header, so by default (``real_samples = 0``) the attention is
  left untrained and unused. With ``real_samples > 0`` (a context that carries real, unlabelled
  images, e.g. a user's script), the first ``real_samples`` of ``context.calibration_batches`` are
  labelled by the teachers' ensemble argmax and the attention takes one Adam step
  (``attention_lr``) on them, student and headers frozen in eval mode, after each generator step.
  The attention is zero-initialised, so untrained it is the plain mean of the headers (the
  reference's evaluation output). ``aggregated_logits`` gives its prediction; it is never exported.

Quantization: as in DAFL, the student arrives quantized but uncalibrated and is calibrated on the
first generated batch, before its first forward pass (the run's calibrators via
``context.calibrate``). Checkpoints: the generator, headers, attention and the count of student
batches (which says when the generator steps) are in ``state_dict()``; the generator's and the
attention's Adam states are the module's extra state, so a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.distill.base import (
    Distiller,
    MethodContext,
    MethodOptions,
    register_method,
    trainable,
)
from qkd_deploy.distill.generators import BatchNormStatistics, ImageGenerator, calibrate_once
from qkd_deploy.errors import UserError
from qkd_deploy.models.features import (
    forward_features,
    has_stage_features,
    logits_and_pooled,
    module_names,
    pooled_width,
    stage_channels,
    student_role,
    teacher_role,
)

LR_DECAY = 0.1  # the reference's MultiStepLR gamma
NAME = "cdfkd-mfs"
STUDENT = student_role(NAME)


@dataclasses.dataclass
class CDFKDMFSOptions(MethodOptions):
    head_weight: float = 1.0  # L1 of each extra header to its teacher (reference weight_s)
    feature_weight: float = 0.2  # L1 of each header's feature to its teacher's (weight_feat)
    ensemble_weight: float = 5.0  # L1 of the main header to the teachers' mean (weight_ens)
    adversarial_weight: float = 1.0  # generator: weight of -disagreement (weight_g)
    bn_weight: float = 0.1  # generator: weight of the BN-statistics loss (weight_bns)
    first_bn_weight: float = 5.0  # the first BatchNorm's term is multiplied by this (rescale)
    student_steps_per_generator_step: int = 5
    adversarial_main_head: bool = True  # the generator also attacks the exported head
    first_shared_stage: int = 0  # headers read the stage outputs from this one on
    batch_size: int = 256  # generated images per step (bsz)
    latent_dim: int = 256  # noise dimension (nz)
    generator_lr: float = 1e-3  # Adam (lr_g)
    generator_lr_milestones: tuple[float, ...] = (1 / 3, 2 / 3)  # fractions of training; x0.1
    real_samples: int = 0  # > 0: train the attention on this many calibration images
    attention_lr: float = 0.01  # Adam, the attention's (CDFKD attention-train.py)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise UserError(f"cdfkd-mfs batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        if self.student_steps_per_generator_step < 1:
            raise UserError(
                "cdfkd-mfs student_steps_per_generator_step must be >= 1, got "
                f"{self.student_steps_per_generator_step}"
            )
        if self.real_samples < 0:
            raise UserError(f"cdfkd-mfs real_samples must be >= 0, got {self.real_samples}")


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def ensemble_target(teacher_logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """The teachers' ensemble: the plain mean of their logits."""
    return torch.stack(list(teacher_logits)).mean(0)


def head_loss(
    head_logits: Sequence[torch.Tensor], teacher_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``mean_i L1(h_i, T_i)``, L1 the mean absolute difference over batch and classes."""
    pairs = zip(head_logits, teacher_logits, strict=True)
    return torch.stack([F.l1_loss(h, t) for h, t in pairs]).mean()


def feature_loss(
    head_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``mean_i mean_batch sum_d |f_hi - f_Ti|`` (the reference's ``criterion_feat``)."""
    pairs = zip(head_features, teacher_features, strict=True)
    return torch.stack([(h - t).abs().sum(1).mean() for h, t in pairs]).mean()


def ensemble_loss(
    main_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor]
) -> torch.Tensor:
    """``L1(m, mean_i T_i)``: the main header against the teachers' ensemble."""
    return F.l1_loss(main_logits, ensemble_target(teacher_logits))


def disagreement(
    main_logits: torch.Tensor,
    head_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    include_main: bool = True,
) -> torch.Tensor:
    """``D``: the mean over headers of L1 to their targets (teacher ``i`` for header ``i``, the
    ensemble for the main header when ``include_main``)."""
    terms = [F.l1_loss(h, t) for h, t in zip(head_logits, teacher_logits, strict=True)]
    if include_main:
        terms.append(F.l1_loss(main_logits, ensemble_target(teacher_logits)))
    return torch.stack(terms).mean()


def generator_objective(
    main_logits: torch.Tensor,
    head_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    bn_losses: Sequence[torch.Tensor],
    options: CDFKDMFSOptions,
) -> dict[str, torch.Tensor]:
    """The generator's weighted terms (minimised): ``adv = -a * D`` (so the generator maximises
    the disagreement) and ``bn = b * mean_i`` of each teacher's BatchNorm-statistics loss."""
    d = disagreement(main_logits, head_logits, teacher_logits, options.adversarial_main_head)
    return {
        "adv": -options.adversarial_weight * d,
        "bn": options.bn_weight * torch.stack(list(bn_losses)).mean(),
    }


# ---------------------------------------------------------------------------------------------
# Headers and attention
# ---------------------------------------------------------------------------------------------


class SepConv(nn.Sequential):
    """Twice (depthwise 3x3, pointwise 1x1, BatchNorm, ReLU), stride 1: the reference's encoder."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, in_channels, 1, bias=False),
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, in_channels, 3, padding=1, groups=in_channels, bias=False),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
        )


class FeatureSharingHead(nn.Module):
    """One extra header reading every shared stage output (multi-level feature sharing).

    ``a_1 = E_1(s_1)``, ``a_l = E_l([s_l, pool(a_{l-1})])`` with ``pool`` the average pool to
    ``s_l``'s size; ``E_l`` outputs stage ``l + 1``'s width, the last one ``feature_dim``. Returns
    the logits and the pooled feature of the last encoder.
    """

    def __init__(self, stage_channels: Sequence[int], feature_dim: int, num_classes: int) -> None:
        super().__init__()
        outs = [*stage_channels[1:], feature_dim]
        ins = [
            stage_channels[0],
            *(c + o for c, o in zip(stage_channels[1:], outs[:-1], strict=True)),
        ]
        self.encoders = nn.ModuleList(SepConv(i, o) for i, o in zip(ins, outs, strict=True))
        self.fc = nn.Linear(feature_dim, num_classes)

    def forward(self, stages: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoders[0](stages[0])
        for encoder, stage in zip(self.encoders[1:], stages[1:], strict=True):
            out = encoder(torch.cat([stage, F.adaptive_avg_pool2d(out, stage.shape[-2:])], 1))
        features = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        return self.fc(features), features


class HeaderAttention(nn.Module):
    """Aggregates the headers' logits: a linear score per header's logits, softmax over headers,
    the weighted sum of the logits (CDFKD's attention). Zero-initialised: the plain mean."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.score = nn.Linear(num_classes, 1)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, header_logits: Sequence[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(list(header_logits), 1)  # (batch, headers, classes)
        weights = F.softmax(self.score(stacked), dim=1)
        return (weights * stacked).sum(1)


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside the block, their modes restored after it."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@register_method
class CDFKDMFS(Distiller):
    """Data-free KD from several teachers: a multi-header student against an adversarial generator
    with a BatchNorm-statistics prior; the main header (the student's ``fc``) is exported."""

    name = NAME
    description = (
        "data-free KD from several teachers: multi-header student, asymmetric adversarial "
        "generator with BN-statistics prior (CDFKD-MFS)"
    )
    Options = CDFKDMFSOptions
    needs_teachers = 2
    default_teachers = ("resnet8x4", "resnet8x4")
    data_free = True

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        _check(student, options, context)
        classes = context.num_classes
        shared = stage_channels(student, STUDENT)[options.first_shared_stage :]
        self.heads = nn.ModuleList(
            FeatureSharingHead(shared, pooled_width(t, teacher_role(NAME, i).what), classes)
            for i, t in enumerate(teachers)
        )
        self.attention = HeaderAttention(context.num_classes)
        self.generator = ImageGenerator(context.input_shape, options.latent_dim)
        self.generator_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=options.generator_lr
        )
        self.attention_optimizer = torch.optim.Adam(
            self.attention.parameters(), lr=options.attention_lr
        )
        self.register_buffer("batches_drawn", torch.tensor(0))
        self.register_buffer(
            "real_images", _real_images(context, options.real_samples), persistent=False
        )
        self._real_labels: torch.Tensor | None = None

    def forward_train(self, images, labels, progress):
        """A generator (and attention) step when due, then the student's losses on a fresh
        generated batch. The real ``images``/``labels`` are never read (the trainer passes None)."""
        if self.generator_step_due():
            self._step_generator(progress)
            self._step_attention()
        self.batches_drawn.add_(1)
        with torch.no_grad():
            generated = self.generator.sample(self.options.batch_size)
            teacher_logits, teacher_features = zip(
                *(
                    logits_and_pooled(t, generated, teacher_role(NAME, i).what)
                    for i, t in enumerate(self.teachers)
                ),
                strict=True,
            )
        calibrate_once(self.student, generated, self.context)
        main, head_logits, head_features = self.headers(generated)
        o = self.options
        return main, {
            "heads": o.head_weight * head_loss(head_logits, teacher_logits),
            "feat": o.feature_weight * feature_loss(head_features, teacher_features),
            "ens": o.ensemble_weight * ensemble_loss(main, teacher_logits),
        }

    def headers(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """The main header's logits, and each extra header's logits and pooled features."""
        logits, stages = forward_features(self.student, images, STUDENT)
        shared = stages[self.options.first_shared_stage :]
        outs = [head(shared) for head in self.heads]
        return logits, [z for z, _ in outs], [f for _, f in outs]

    def aggregated_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The multi-header student's attention-aggregated prediction (the paper's output; only
        the main header is exported)."""
        main, head_logits, _ = self.headers(images)
        return self.attention([main, *head_logits])

    def generator_step_due(self) -> bool:
        """True after every ``student_steps_per_generator_step`` student batches."""
        drawn = int(self.batches_drawn)
        return drawn > 0 and drawn % self.options.student_steps_per_generator_step == 0

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The student and the extra headers (the generator and attention have their own Adam)."""
        params = [*self.student.parameters(), *self.heads.parameters()]
        return [{"params": trainable(params), "lr_scale": 1.0}]

    def _step_generator(self, progress: float) -> None:
        passed = sum(progress >= m for m in self.options.generator_lr_milestones)
        for group in self.generator_optimizer.param_groups:
            group["lr"] = self.options.generator_lr * LR_DECAY**passed
        generated = self.generator.sample(self.options.batch_size)
        main, head_logits, _ = self.headers(generated)
        teacher_logits, bn_losses = [], []
        for teacher in self.teachers:
            with BatchNormStatistics(teacher, self.options.first_bn_weight) as stats:
                teacher_logits.append(teacher(generated))
            bn_losses.append(stats.loss())
        terms = generator_objective(main, head_logits, teacher_logits, bn_losses, self.options)
        params = list(self.generator.parameters())
        grads = torch.autograd.grad(sum(terms.values()), params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)

    def _step_attention(self) -> None:
        """One Adam step of the attention on the teacher-labelled real samples, if any."""
        if self.real_images is None:
            return
        with torch.no_grad(), evaluating(self.student, self.heads):
            if self._real_labels is None:
                teacher_logits = [t(self.real_images) for t in self.teachers]
                self._real_labels = ensemble_target(teacher_logits).argmax(1)
            main, head_logits, _ = self.headers(self.real_images)
        loss = F.cross_entropy(self.attention([main, *head_logits]), self._real_labels)
        self.attention_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.attention_optimizer.step()
        self.attention_optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's and the attention's Adam states, saved with ``state_dict``."""
        return {
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "attention_optimizer": self.attention_optimizer.state_dict(),
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.attention_optimizer.load_state_dict(state["attention_optimizer"])


def _check(student: nn.Module, options: CDFKDMFSOptions, context: MethodContext | None) -> None:
    if context is None:
        raise UserError("cdfkd-mfs needs the method context (input shape and class count)")
    if not has_stage_features(student):
        raise UserError(
            "cdfkd-mfs branches its headers from the student's stages: use a zoo student, or "
            f"name your student's stage layers with {STUDENT.option} (module names such as "
            f"{module_names(student)})"
        )
    stages = len(stage_channels(student, STUDENT))
    if not 0 <= options.first_shared_stage < stages:
        raise UserError(
            f"cdfkd-mfs first_shared_stage must be in 0..{stages - 1} (the student has {stages} "
            f"stages), got {options.first_shared_stage}"
        )


def _real_images(context: MethodContext, count: int) -> torch.Tensor | None:
    """The first ``count`` images of the context's calibration batches (None when ``count`` is 0);
    the data-free pipeline has none, so asking for some there is a user error."""
    if count == 0:
        return None
    if not context.calibration_batches:
        raise UserError(
            f"cdfkd-mfs real_samples={count} needs real images in the method context's "
            "calibration batches, and a data-free run has none; set real_samples=0 (the attention "
            "then stays unused: only the main header is exported)"
        )
    return torch.cat(context.calibration_batches)[:count]
