"""SPEQ: self-distillation of a quantized student from itself at stochastic activation precision
(Boo, Shin, Choi, Sung, "Stochastic Precision Ensemble: Self-Knowledge Distillation for Quantized
Deep Neural Networks", AAAI 2021; docs/methods/speq.md).

There is no teacher network. Each step the student's own weights are run once more, without
gradient, with every activation quantizer independently switched, with probability ``u``, from
its target bit-width to ``high_bits`` (same clipping range, finer grid; ``LSQQuantizer
.active_bits``). ``u`` is the probability of the *high* precision: ``u = 0`` makes the teacher the
student itself, ``u = 1`` a fixed ``high_bits``-activation teacher; the paper found ``u = 0.5``
best, a new random teacher each step (the "stochastic ensemble"). The student, at its target
bit-widths, learns from the teacher's softmax with a cosine-similarity loss instead of KL.

Choices the paper leaves open (we could not consult its full text here; no public reference code
was found), each an option:

- ``L = alpha * CE(z_s, y) + (1 - alpha) * mean_batch(1 - cos(softmax(z_t / tau),
  softmax(z_s / tau)))`` with ``alpha = 0.5`` and ``tau = 1``: the hard/soft mix the same
  authors use for quantized-student KD (Shin et al., the ``kd``/``kd-decay`` methods here); the
  cosine loss is scale-free, so no ``tau^2`` factor.
- The draw is per activation *quantizer* (a residual add's two inputs are drawn separately);
  quantizers already at ``high_bits`` or more (the 8-bit first and last layers) keep their bits.
- The teacher pass runs in training mode, so BatchNorm uses the batch's statistics exactly as the
  student pass does (``u = 0`` then reproduces the student), but it does not update the running
  statistics: those (folded into the exported model) come from the student's passes only.
- The draws use torch's global RNG, whose state the trainer checkpoints, so a resumed run draws
  the same teachers.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.bits import check_bits
from qkd_deploy.distill.base import Distiller, MethodOptions, register_method
from qkd_deploy.errors import UserError
from qkd_deploy.quant.modules import quantizers
from qkd_deploy.quant.quantizer import LSQQuantizer


@dataclasses.dataclass
class SPEQOptions(MethodOptions):
    u: float = 0.5  # probability that a teacher-pass activation quantizer runs at high_bits
    high_bits: int = 8  # the teacher's high activation precision
    tau: float = 1.0  # softmax temperature of the cosine loss
    alpha: float = 0.5  # weight of the hard (label) loss; the cosine loss gets 1 - alpha

    def __post_init__(self) -> None:
        if not 0.0 <= self.u <= 1.0:
            raise UserError(f"speq u is a probability in [0, 1], got {self.u}")
        check_bits(self.high_bits, "speq high_bits")


def cosine_kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """``mean_batch(1 - cos(softmax(z_s / tau), softmax(z_t / tau)))``."""
    p_s = F.softmax(student_logits / tau, dim=1)
    p_t = F.softmax(teacher_logits / tau, dim=1)
    return (1.0 - F.cosine_similarity(p_s, p_t, dim=1)).mean()


def activation_quantizers(model: nn.Module) -> list[LSQQuantizer]:
    return [q for _, q in quantizers(model) if q.kind == "activation"]


@contextlib.contextmanager
def stochastic_precision(model: nn.Module, u: float, high_bits: int) -> Iterator[None]:
    """Inside, each activation quantizer below ``high_bits`` runs at ``high_bits`` with
    probability ``u`` (one draw each from the global RNG); ``active_bits`` is reset to None on
    the way out, also on an exception."""
    chosen = activation_quantizers(model)
    draws = torch.rand(len(chosen), device="cpu") < u
    try:
        for q, high in zip(chosen, draws.tolist(), strict=True):
            if high and q.bits < high_bits:
                q.active_bits = high_bits
        yield
    finally:
        for q in chosen:
            q.active_bits = None


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm keeps normalising with the batch's statistics in training mode but leaves its
    running statistics (and batch counter) untouched."""
    norms = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        for m in norms:
            m.track_running_stats = False
        yield
    finally:
        for m in norms:
            m.track_running_stats = True


@register_method
class SPEQ(Distiller):
    """Self-KD from the student at stochastic activation precision, cosine-similarity loss."""

    name = "speq"
    description = "self-distillation from the student at random higher activation bits (SPEQ)"
    Options = SPEQOptions
    needs_teachers = 0  # like ``none``: the pipeline still trains its default teacher (reference)

    def teacher_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The student's logits with stochastic activation precision, no gradient, running
        BatchNorm statistics untouched."""
        with (
            torch.no_grad(),
            frozen_batchnorm_statistics(self.student),
            stochastic_precision(self.student, self.options.u, self.options.high_bits),
        ):
            return self.student(images)

    def forward_train(self, images, labels, progress):
        target = self.teacher_logits(images)
        logits = self.student(images)
        alpha = self.options.alpha
        return logits, {
            "ce": alpha * F.cross_entropy(logits, labels),
            "cos": (1.0 - alpha) * cosine_kd_loss(logits, target, self.options.tau),
        }
