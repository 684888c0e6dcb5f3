"""Logit distillation: plain QAT (``none``), Hinton KD (``kd``) and KD with a decaying soft-loss
coefficient for quantized students (``kd-decay``); docs/methods/ has a page for each."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from qkd_deploy.distill.base import Distiller, MethodOptions, register_method
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError


@register_method
class NoDistillation(Distiller):
    """Plain QAT: cross-entropy with the labels, no teacher."""

    name = "none"
    description = "plain quantization-aware training with cross-entropy"
    needs_teachers = 0
    distils_float = True  # as student.float_method: the float student on the labels alone

    def forward_train(self, images, labels, progress):
        logits = self.student(images)
        return logits, {"ce": F.cross_entropy(logits, labels)}


@dataclasses.dataclass
class PTQOptions(MethodOptions):
    bn_reestimate: bool = True  # BatchNorm statistics recomputed on the calibration images


@register_method
class PostTrainingQuantization(NoDistillation):
    """Post-training quantization: the float student quantized and calibrated with the run's
    calibrators (``quant.*``), then exported without a training step, so ``student.train`` is
    not used. The baseline that shows what QAT and distillation add at each bit-width.

    With ``bn_reestimate`` (default) the pipeline then recomputes the BatchNorm running
    statistics of the quantized model on the calibration images (``train.batchnorm``): the
    float model's statistics describe activations that its quantized weights no longer produce.
    Only statistics change, no weight; the quantizers keep their calibrated step sizes."""

    name = "ptq"
    description = "post-training quantization: calibrate and export, no training"
    Options = PTQOptions
    trains = False
    distils_float = False


@dataclasses.dataclass
class KDOptions(MethodOptions):
    tau: float = 4.0  # softmax temperature
    alpha: float = 0.5  # weight of the hard (label) loss; the soft loss gets 1 - alpha


@register_method
class KD(Distiller):
    """Hinton KD: ``alpha * CE(s, y) + (1 - alpha) * tau^2 * KL(p_t || p_s)``.

    With several teachers the target is the mean of their logits (``avg-teachers`` averages
    probabilities instead).
    """

    name = "kd"
    description = "Hinton knowledge distillation from the teacher's softened logits"
    Options = KDOptions
    distils_float = True

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([t(images) for t in self.teachers]).mean(0)

    def soft_weight(self, progress: float) -> float:
        return 1.0 - self.options.alpha

    def forward_train(self, images, labels, progress):
        logits = self.student(images)
        soft = self.soft_weight(progress)
        return logits, {
            "ce": (1.0 - soft) * F.cross_entropy(logits, labels),
            "kd": soft * kd_kl(logits, self.teacher_logits(images), self.options.tau),
        }


@dataclasses.dataclass
class KDDecayOptions(MethodOptions):
    tau: float = 4.0
    soft_start: float = 0.5  # soft-loss weight at the first step (hard weight is 1 - soft)
    schedule: str = "linear"  # "linear" or "cosine" decay of the soft weight to 0 at the end

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine"):
            raise UserError(f"kd-decay schedule {self.schedule!r}: use 'linear' or 'cosine'")


@register_method
class KDDecay(KD):
    """KD for quantized students with gradual soft-loss reducing (Shin et al., "Empirical analysis
    of knowledge distillation technique for optimization of quantized deep neural networks").

    ``L = (1 - w(t)) * CE + w(t) * tau^2 * KL(p_t || p_s)`` with ``w(0) = soft_start`` decaying to
    0 at the end of training, so the student finishes on the hard loss. Open choices: the paper
    does not fix the curve, so linear is the default and cosine an option; ``soft_start = 0.5``
    makes the first step equal to ``kd`` with its default ``alpha``.
    """

    name = "kd-decay"
    description = "KD with the soft-loss weight decaying to 0 (for quantized students)"
    Options = KDDecayOptions

    def soft_weight(self, progress: float) -> float:
        progress = min(max(progress, 0.0), 1.0)
        if self.options.schedule == "linear":
            remaining = 1.0 - progress
        else:
            remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.options.soft_start * remaining
