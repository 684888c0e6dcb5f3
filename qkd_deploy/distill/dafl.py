"""DAFL: data-free distillation with a generator and the teacher as a fixed discriminator
(Chen et al., "Data-Free Learning of Student Networks", ICCV 2019; docs/methods/dafl.md).

What follows the paper, and where the paper is silent, the authors' code
(huawei-noah/Data-Efficient-Model-Compression, ``DAFL/DAFL-train.py`` and its README), read to
understand, not copied:

- Each step draws ``batch_size`` noise vectors, generates images and runs the frozen teacher on
  them. The generator minimises ``L_G = oh * L_oh + a * L_act + b * L_ie`` with ``L_oh`` the
  cross-entropy of the teacher's logits against their own argmax, ``L_act = -mean |f_T|`` on the
  teacher's penultimate features and ``L_ie = -H(mean_batch softmax(z_T))``. Weights ``oh = 1,
  a = 0.1, b = 5``: the reference code's defaults, used by its CIFAR-10 runs too.
- ``L_ie`` is computed as ``sum p * log10(p)`` in the reference code: base-10 entropy, which is
  what ``b = 5`` was tuned with. ``entropy_log_base`` keeps 10 (``e`` gives the textbook entropy).
- Departure from the paper (``bn_weight``): ``L_G`` gets a fourth term, ``bn * L_bn``, the
  distance of the generated batch's per-channel statistics at every BatchNorm2d input of the
  teacher to that layer's running statistics (DeepInversion, Yin et al., CVPR 2020; CDFKD-MFS
  uses the same term). With the paper's three terms alone the generator learns images that make
  the teacher confident but look nothing like its data. On the embedded digits (resnet8x4 teacher
  at 99.7 %, a float resnet8 student, 250 steps of 256 images) the student then scored 36 % and
  two classes were never generated; with ``bn = 1`` it scored 97 %. The main command on the
  digits (30 epochs of 23 steps, 512 images each) gave 50.83 / 48.33 % (W8A8 / W4A4) before
  and 91.39 / 91.39 % with the term. Every BatchNorm counts alike (DeepInversion's choice;
  CDFKD-MFS weights the first one 5x). ``bn_weight = 0`` is the paper's objective. The term
  needs a teacher with BatchNorm2d layers.
- The generator has its own Adam (default betas), stepped inside ``forward_train`` at a constant
  learning rate. The student is then trained by the pipeline's optimizer with KD on the *same*
  images, detached, against the teacher logits computed before the generator step, exactly as the
  reference does in one combined backward.
- Student loss: ``KL(softmax(z_T) || softmax(z_S))`` at temperature 1, batch mean (the reference's
  ``kdloss``; the paper writes the cross-entropy to the teacher's outputs, whose gradient is the
  same). ``tau`` can soften it (scaled by ``tau^2``). No label loss: there are no labels.
- Defaults are the reference's MNIST settings (the pipeline's default data are small grayscale
  digits): ``batch_size = 512``, ``latent_dim = 100``, ``generator_lr = 0.2``. Its CIFAR settings
  are ``batch_size = 1024, latent_dim = 1000, generator_lr = 0.02`` (and ``oh = 0.5`` for
  CIFAR-100), the student on SGD lr 0.1.

Quantization: the pipeline hands a data-free method a quantized but uncalibrated student (no real
images). Before the student's first forward pass, ``forward_train`` calibrates it on that step's
generated batch (``batch_size`` images; MSE weight ranges, 99.99th percentile activation ranges,
the pipeline's default calibrators). Those images come from the untrained generator, so the ranges
are only a start; LSQ learns the step sizes from there as the images improve.
Calibration state lives in the quantizers' buffers, so a resumed run does not calibrate again.

Checkpoints: the generator is a submodule and its Adam state is the module's extra state, so both
are in ``state_dict()`` and a resumed run continues them exactly (the noise comes from torch's
global RNG, which the trainer saves). Nothing of the generator reaches the exported student.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.distill.base import Distiller, MethodOptions, register_method
from qkd_deploy.distill.generators import BatchNormStatistics, ImageGenerator, calibrate_once
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from qkd_deploy.models.features import logits_and_pooled


@dataclasses.dataclass
class DAFLOptions(MethodOptions):
    onehot_weight: float = 1.0  # oh: weight of L_oh (reference CIFAR-100: 0.5)
    activation_weight: float = 0.1  # a: weight of L_act
    entropy_weight: float = 5.0  # b: weight of L_ie
    entropy_log_base: float = 10.0  # the reference's log10; math.e for natural-log entropy
    batch_size: int = 512  # generated images per step (reference CIFAR: 1024)
    latent_dim: int = 100  # noise dimension (reference CIFAR: 1000)
    generator_lr: float = 0.2  # Adam, constant (reference CIFAR: 0.02)
    tau: float = 1.0  # KD temperature (the reference uses none, i.e. 1)
    bn_weight: float = 1.0  # BatchNorm-statistics prior (not in the paper; 0 = the paper's L_G)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise UserError(f"dafl batch_size must be >= 2 (BatchNorm), got {self.batch_size}")


def one_hot_loss(teacher_logits: torch.Tensor) -> torch.Tensor:
    """``L_oh``: cross-entropy of the teacher's logits against their own argmax."""
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(1))


def activation_loss(features: torch.Tensor) -> torch.Tensor:
    """``L_act = -mean |f_T|`` over the teacher's penultimate features."""
    return -features.abs().mean()


def information_entropy_loss(teacher_logits: torch.Tensor, log_base: float = 10.0) -> torch.Tensor:
    """``L_ie = -H(p)`` with ``p`` the batch mean of the teacher's softmax, entropy in
    ``log_base`` units (minimal when the generated classes are balanced)."""
    p = F.softmax(teacher_logits, dim=1).mean(0)
    return torch.special.xlogy(p, p).sum() / math.log(log_base)


def generator_losses(
    teacher_logits: torch.Tensor,
    features: torch.Tensor,
    bn_distance: torch.Tensor,
    options: DAFLOptions,
) -> dict[str, torch.Tensor]:
    """The weighted terms of ``L_G``; ``bn_distance`` is the teacher's summed BatchNorm-statistics
    distance on the generated batch (``BatchNormStatistics.loss()``)."""
    return {
        "oh": options.onehot_weight * one_hot_loss(teacher_logits),
        "act": options.activation_weight * activation_loss(features),
        "ie": options.entropy_weight
        * information_entropy_loss(teacher_logits, options.entropy_log_base),
        "bn": options.bn_weight * bn_distance,
    }


def logits_and_features(
    model: nn.Module, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A teacher's logits and penultimate features: ``forward_features``' "pooled" for zoo models,
    otherwise the input of the model's last ``nn.Linear`` (a user's classifier)."""
    return logits_and_pooled(model, images, "dafl's teacher")


@register_method
class DAFL(Distiller):
    """Data-free KD: a generator trained against the fixed teacher makes the student's images."""

    name = "dafl"
    description = "data-free KD: a generator trained against the fixed teacher (DAFL + BN prior)"
    Options = DAFLOptions
    max_teachers = 1
    data_free = True

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        if context is None:
            raise UserError("dafl needs the method context (the input shape to generate)")
        if options.bn_weight and not any(
            isinstance(m, nn.BatchNorm2d) for m in teachers[0].modules()
        ):
            raise UserError(
                "dafl's bn_weight needs a teacher with BatchNorm2d layers (their running "
                "statistics are the prior); set student.method_options.bn_weight=0 for this teacher"
            )
        self.generator = ImageGenerator(context.input_shape, options.latent_dim)
        self.generator_optimizer = torch.optim.Adam(
            self.generator.parameters(), lr=options.generator_lr
        )

    def forward_train(self, images, labels, progress):
        """One generator step, then the student's KD loss on the same (detached) images. The real
        ``images``/``labels`` are never read (the trainer passes None)."""
        generated = self.generator.sample(self.options.batch_size)
        statistics = BatchNormStatistics(self.teachers[0])  # records nothing unless opened
        with statistics if self.options.bn_weight else contextlib.nullcontext():
            teacher_logits, features = logits_and_features(self.teachers[0], generated)
        terms = generator_losses(teacher_logits, features, statistics.loss(), self.options)
        self._step_generator(sum(terms.values()))
        generated = generated.detach()
        calibrate_once(self.student, generated, self.context)
        logits = self.student(generated)
        return logits, {"kd": kd_kl(logits, teacher_logits.detach(), self.options.tau)}

    def _step_generator(self, loss: torch.Tensor) -> None:
        self.generator_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.generator_optimizer.step()
        self.generator_optimizer.zero_grad(set_to_none=True)

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's Adam state, saved with the module's ``state_dict``."""
        return {"generator_optimizer": self.generator_optimizer.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
