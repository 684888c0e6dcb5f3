"""Multi-teacher distillation (docs/methods/): the averaged-teachers baseline
(``avg-teachers``) and Collaborative Multi-Teacher KD for low bit-width students (``cmt-kd``).

The loss terms are small public functions so they can be checked against hand-computed numbers.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.calib.calibrate import calibrate_activations
from qkd_deploy.distill.base import (
    Distiller,
    MethodContext,
    MethodOptions,
    register_method,
    trainable,
)
from qkd_deploy.distill.feature import on_zero_batch, stage_maps
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from qkd_deploy.models.features import forward_features, require_stage_features, student_role
from qkd_deploy.quant.modules import quantizers
from qkd_deploy.quant.quantizer import LSQQuantizer
from qkd_deploy.targets import Target

FULL_PRECISION = 32  # a teacher bit-width meaning "not quantized"
STAGED_PARTS = ("stem", "stages", "pool", "fc")
CMT_STUDENT = student_role("cmt-kd")


# ---------------------------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------------------------


def average_soft_targets(
    teacher_logits: Sequence[torch.Tensor], tau: float, weights: Sequence[float] | None = None
) -> torch.Tensor:
    """``sum_i w_i * softmax(z_i / tau)``: the teachers' softened probabilities averaged with
    ``weights`` normalised to sum 1 (equal weights when ``None``)."""
    probs = torch.stack([F.softmax(z / tau, dim=1) for z in teacher_logits])
    if weights is None:
        w = torch.ones(len(teacher_logits), device=probs.device)
    else:
        w = torch.tensor(weights, dtype=torch.float32, device=probs.device)
    w = (w / w.sum()).to(probs.dtype)
    return torch.einsum("t,tbc->bc", w, probs)


def soft_kl(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(target || softmax(s / tau))``, batch mean (``kd_kl`` for a target that is
    already a probability vector)."""
    log_p_s = F.log_softmax(student_logits / tau, dim=1)
    return F.kl_div(log_p_s, target_probs, reduction="batchmean") * tau**2


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of Zagoruyko & Komodakis with ``p = 2``: the channel mean of ``A^2`` at
    each position, flattened per sample and L2-normalised; shape ``(N, H * W)``."""
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean over samples and positions of the squared difference of the two attention maps (the
    reference ``at_loss``); channel counts may differ, spatial sizes must match."""
    return (attention_map(student_features) - attention_map(teacher_features)).pow(2).mean()


def shared_knowledge(
    activations: Sequence[torch.Tensor], importance_logits: torch.Tensor
) -> torch.Tensor:
    """CMT-KD's ``F_k = sum_i softmax(pi_k)_i * A_i`` of (already quantized) activations."""
    weights = F.softmax(importance_logits, dim=0)
    return torch.einsum("t,t...->...", weights, torch.stack(list(activations)))


def mutual_kl(
    student_logits: torch.Tensor, ensemble_logits: torch.Tensor, tau: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(KL_S, KL_T)``: the student learns from the teacher ensemble,
    ``tau^2 KL(p_T || p_S)``, and the ensemble from the student, ``tau^2 KL(p_S || p_T)``; each
    side's target is detached (deep mutual learning), so ``KL_S`` trains only the student and
    ``KL_T`` only the teachers."""
    kl_student = kd_kl(student_logits, ensemble_logits.detach(), tau)
    kl_teachers = kd_kl(ensemble_logits, student_logits.detach(), tau)
    return kl_student, kl_teachers


# ---------------------------------------------------------------------------------------------
# avg-teachers
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class AvgTeachersOptions(MethodOptions):
    tau: float = 4.0  # softmax temperature
    alpha: float = 0.5  # weight of the hard (label) loss; the soft loss gets 1 - alpha
    weights: list[float] | None = None  # one weight per teacher, normalised; None = equal


@register_method
class AverageTeachers(Distiller):
    """Multi-teacher KD baseline: the target is the (optionally weighted) average of the frozen
    teachers' softened probabilities,
    ``L = alpha * CE(s, y) + (1 - alpha) * tau^2 * KL(sum_i w_i p_Ti || p_S)``.

    Probabilities are averaged, not logits (``kd`` with several teachers averages logits), so a
    confident teacher cannot dominate the target by the scale of its logits. The default teachers
    are two different CIFAR ResNets of the distillation literature's teacher zoo (CRD,
    mdistiller), a shallow-wide resnet8x4 and the deep resnet32x4: architectures that differ make
    different errors, which is what averaging gains from; the pipeline trains both on the data.
    """

    name = "avg-teachers"
    description = "KD from the (weighted) average of several teachers' softened probabilities"
    Options = AvgTeachersOptions
    needs_teachers = 2
    default_teachers = ("resnet8x4", "resnet32x4")
    distils_float = True

    @classmethod
    def check_teacher_count(cls, count, options):
        super().check_teacher_count(count, options)
        _check_weights(options.weights, count)

    def forward_train(self, images, labels, progress):
        o = self.options
        logits = self.student(images)
        with torch.no_grad():
            target = average_soft_targets([t(images) for t in self.teachers], o.tau, o.weights)
        return logits, {
            "ce": o.alpha * F.cross_entropy(logits, labels),
            "kd": (1.0 - o.alpha) * soft_kl(logits, target, o.tau),
        }


def _check_weights(weights: Sequence[float] | None, teachers: int) -> None:
    if weights is None:
        return
    if len(weights) != teachers or min(weights) < 0 or sum(weights) <= 0:
        raise UserError(
            f"avg-teachers weights {list(weights)}: give {teachers} non-negative numbers (one per "
            f"teacher, in teacher order) with a positive sum, or leave weights unset for equal ones"
        )


# ---------------------------------------------------------------------------------------------
# cmt-kd
# ---------------------------------------------------------------------------------------------


def stage_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The outputs of ``model.stages`` after ``model.stem`` (a zoo ``StagedClassifier``)."""
    out, outputs = model.stem(x), []
    for stage in model.stages:
        out = stage(out)
        outputs.append(out)
    return outputs


def classifier_head(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The logits from the last stage's output: global pool, flatten, ``fc``."""
    return model.fc(torch.flatten(model.pool(features), 1))


class SharedKnowledge(nn.Module):
    """One shared layer ``k``: ``F_k = sum_i softmax(pi_k)_i * Q_i(A_k^i)``.

    ``Q_i`` is an LSQ activation quantizer at teacher ``i``'s bit-width (identity for a
    full-precision teacher); ``pi_k`` starts at 0 (equal importance).
    """

    def __init__(self, bits: Sequence[int], target: str) -> None:
        super().__init__()
        self.importance = nn.Parameter(torch.zeros(len(bits)))
        self.quantizers = nn.ModuleList(
            nn.Identity() if b == FULL_PRECISION else LSQQuantizer(b, "activation", target=target)
            for b in bits
        )

    def forward(self, activations: Sequence[torch.Tensor]) -> torch.Tensor:
        quantized = [q(a) for q, a in zip(self.quantizers, activations, strict=True)]
        return shared_knowledge(quantized, self.importance)


class CollaborativeTeachers(nn.Module):
    """The quantized teachers run stage by stage; after each shared stage ``k`` the shared
    knowledge ``F_k`` replaces every teacher's own output as the input of its next stage (or of
    its pool and ``fc`` after the last stage)."""

    def __init__(
        self, teachers: Sequence[nn.Module], bits: Sequence[int], stages: Sequence[int], target: str
    ) -> None:
        super().__init__()
        self.teachers = nn.ModuleList(teachers)
        self.stages = tuple(stages)
        self.shared = nn.ModuleList(SharedKnowledge(bits, target) for _ in self.stages)

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """``(each teacher's logits, F_k at each shared stage)``."""
        shared = dict(zip(self.stages, self.shared, strict=True))
        hidden = [t.stem(images) for t in self.teachers]
        knowledge = []
        for k in range(max(len(t.stages) for t in self.teachers)):
            hidden = [
                t.stages[k](h) if k < len(t.stages) else h
                for t, h in zip(self.teachers, hidden, strict=True)
            ]
            if k in shared:
                knowledge.append(shared[k](hidden))
                hidden = [knowledge[-1]] * len(hidden)
        logits = [classifier_head(t, h) for t, h in zip(self.teachers, hidden, strict=True)]
        return logits, knowledge


class _SharedQuantizerProbe(nn.Module):
    """What ``calibrate_activations`` sees while the collaborative pass runs: only the shared
    layers' quantizers (the teachers' own quantizers keep their calibration)."""

    def __init__(self, shared: nn.ModuleList, run: Callable[[torch.Tensor], object]) -> None:
        super().__init__()
        self.shared = shared
        self.run = run

    def forward(self, images: torch.Tensor) -> object:
        return self.run(images)


@dataclasses.dataclass
class CMTKDOptions(MethodOptions):
    teacher_bits: list[int] = dataclasses.field(default_factory=lambda: [8, 6, 4])  # 32 = float
    shared_stages: list[int] | None = None  # stage outputs k that form F_k; None = every stage
    alpha: float = 1.0  # weight of CE_S + sum_i CE_Ti
    beta: float = 0.5  # weight of KL_S + KL_T (mutual learning)
    gamma: float = 100.0  # weight of the attention-transfer loss from F_k to the student
    tau: float = 4.0  # temperature of the mutual KL terms
    importance_lr_scale: float = 0.1  # the importance logits pi_k learn at lr / 10
    detach_shared: bool = True  # the student's attention loss trains neither teachers nor pi

    def __post_init__(self) -> None:
        bits = list(self.teacher_bits)
        if not bits or any(
            b != FULL_PRECISION and not (isinstance(b, int) and 2 <= b <= 8) for b in bits
        ):
            raise UserError(
                f"cmt-kd teacher_bits {bits}: give one bit-width per teacher, each an integer "
                f"from 2 to 8 or {FULL_PRECISION} (full precision), e.g. [8, 6, 4]"
            )


def cmt_kd_losses(
    student_logits: torch.Tensor,
    teacher_logits: Sequence[torch.Tensor],
    labels: torch.Tensor,
    student_features: Sequence[torch.Tensor],
    shared_features: Sequence[torch.Tensor],
    options: CMTKDOptions,
) -> dict[str, torch.Tensor]:
    """CMT-KD's weighted terms; they sum to
    ``alpha * (CE_S + sum_i CE_Ti) + beta * (KL_S + KL_T) + gamma * sum_k AT(S_k, F_k)``.

    The teacher ensemble's logits are the mean of the teachers' logits; ``student_features[j]``
    is the student's output at the stage of ``shared_features[j]``.
    """
    o = options
    ensemble = torch.stack(list(teacher_logits)).mean(0)
    kl_student, kl_teachers = mutual_kl(student_logits, ensemble, o.tau)
    attention = sum(
        attention_loss(s, f.detach() if o.detach_shared else f)
        for s, f in zip(student_features, shared_features, strict=True)
    )
    return {
        "ce_student": o.alpha * F.cross_entropy(student_logits, labels),
        "ce_teachers": o.alpha * sum(F.cross_entropy(z, labels) for z in teacher_logits),
        "kl_student": o.beta * kl_student,
        "kl_teachers": o.beta * kl_teachers,
        "attention": o.gamma * attention,
    }


@register_method
class CMTKD(Distiller):
    """Collaborative Multi-Teacher KD for low bit-width DNNs (Pham, Hoang and Do, WACV 2023,
    arXiv 2210.16103), as its paper describes it (docs/methods/cmt-kd.md).

    Algorithm, per batch:

    1. Quantized teachers at different bit-widths (``teacher_bits``, e.g. 8/6/4; 32 keeps a teacher
       in float) are made from the float teachers with ``context.quantize`` (first and last layer
       at the run's ``first_last_bits``, 8 by default, as is common) and trained jointly with
       the student; the float teachers given in stay frozen and unused after that.
    2. The teachers run stage by stage. At each shared stage ``k`` (``shared_stages``, default
       every stage) their outputs ``A_k^i`` form the importance-aware shared knowledge
       ``F_k = sum_i softmax(pi_k)_i * Q_i(A_k^i)`` (``SharedKnowledge``), which replaces every
       teacher's own output as the input of its next stage (collaborative learning).
    3. ``F_k`` guides the student's stage ``k`` by attention transfer (p = 2).
    4. Mutual learning: the teacher ensemble and the student distil into each other.
    5. ``L = alpha * (CE_S + sum_i CE_Ti) + beta * (KL_S + KL_T) + gamma * L_feat`` with the
       paper's ``alpha = 1, beta = 0.5, gamma = 100``; the optimizer steps the student, the
       quantized teachers (with their quantizer step sizes) and, at ``importance_lr_scale`` =
       0.1 of the learning rate, the importance logits ``pi_k``.

    Choices the paper leaves open, all stated here; config fields where useful:

    - ``Q_i``: the paper quantizes the activations before mixing them. Our teachers quantize a
      tensor where a layer consumes it, so each (shared stage, teacher) pair gets its own LSQ
      activation quantizer at that teacher's bit-width (identity for 32), initialised by the
      percentile calibrator on the calibration batches as they flow through the collaborative
      pass, its step size then learned with the teachers. The next stage re-quantizes ``F_k`` at
      its own input, as it would any input.
    - ``pi_k`` starts at 0 (equal importance); one logit per teacher and shared stage.
    - After the last stage, ``F_K`` is what every teacher's own pool and ``fc`` see.
    - The teacher ensemble's logits are the plain mean of the teachers' logits (the importance
      is learned on the features, where the teachers meet).
    - Mutual KL: temperature ``tau`` (default 4, as the package's other KD methods), scaled by
      ``tau^2``; each side's target is detached, as in deep mutual learning (Zhang et al. 2018),
      so ``KL_S`` trains the student and ``KL_T`` the teachers. (One third-party reading of the
      paper uses a KDCL "min-logit" ensemble of teachers and student as the common target; this
      follows the paper's two-way distillation instead.)
    - Attention transfer follows the reference code of Zagoruyko & Komodakis
      (szagoruyko/attention-transfer, ``at``/``at_loss``): channel mean of ``A^2``, flattened,
      L2-normalised, mean squared difference, summed over the shared stages. ``F_k`` is detached
      for it by default (``detach_shared``): the student is guided, the teachers are not pulled
      towards the student's features, and ``pi_k`` learns from the teachers' own losses through
      the collaborative pass.
    - ``CE_Ti`` is each teacher's cross-entropy on its own head; teachers learn at the student's
      learning rate; their BatchNorm statistics update in training (they switch train/eval with
      the distiller).
    - Teachers: one float teacher per bit-width, or a single float teacher quantized at every
      bit-width. They must have equal stage output shapes at the shared stages, and the
      student's stage outputs the same spatial size there (no resizing); anything else is one
      ``UserError`` naming the shapes.

    The default teachers are three resnet8x4 (the pipeline trains each with its own seed): one
    architecture has equal stage shapes by construction and is the cheapest good digits teacher.

    No code of the authors was found; the details follow the paper's abstract and
    introduction. ``export_model()`` is the student: no teacher, quantizer or ``pi`` is exported.
    """

    name = "cmt-kd"
    description = (
        "collaborative multi-teacher KD: quantized teachers trained jointly, importance-weighted "
        "shared features, mutual learning"
    )
    Options = CMTKDOptions
    needs_teachers = 1
    default_teachers = ("resnet8x4", "resnet8x4", "resnet8x4")

    @classmethod
    def check_teacher_count(cls, count, options):
        super().check_teacher_count(count, options)
        if count not in (1, len(options.teacher_bits)):
            raise UserError(
                f"cmt-kd got {count} teachers for teacher_bits {list(options.teacher_bits)}: give "
                f"one teacher per bit-width, or one teacher to quantize at every bit-width "
                f"(--set student.method_options.teacher_bits=[...])"
            )

    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        options: CMTKDOptions,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(student, teachers, options, context)
        bits = list(options.teacher_bits)
        if context is None or context.quantize is None or not context.calibration_batches:
            raise UserError(
                "cmt-kd makes its quantized teachers with a MethodContext (quantize and "
                "calibration_batches); build it through the pipeline or give such a context"
            )
        float_teachers = list(teachers) * len(bits) if len(teachers) == 1 else list(teachers)
        stages = _check_shapes(student, float_teachers, options.shared_stages, context.input_shape)
        quantized = [
            _trainable_copy(t, b, context) for t, b in zip(float_teachers, bits, strict=True)
        ]
        self.collaborative = CollaborativeTeachers(quantized, bits, stages, _target(quantized))
        self._calibrate_shared(context.calibration_batches)

    @torch.no_grad()
    def _calibrate_shared(self, batches: list[torch.Tensor]) -> None:
        """Initial step sizes of the ``Q_i`` from the activations of the collaborative pass."""
        self.collaborative.eval()
        probe = _SharedQuantizerProbe(self.collaborative.shared, self.collaborative.forward)
        calibrate_activations(probe, batches)
        self.collaborative.train(self.training)

    def forward_train(self, images, labels, progress):
        student_logits, student_stages = forward_features(self.student, images, CMT_STUDENT)
        teacher_logits, shared = self.collaborative(images)
        student_features = [student_stages[k] for k in self.collaborative.stages]
        terms = cmt_kd_losses(
            student_logits, teacher_logits, labels, student_features, shared, self.options
        )
        return student_logits, terms

    def importance_logits(self) -> list[nn.Parameter]:
        """``pi_k`` of every shared stage."""
        return [layer.importance for layer in self.collaborative.shared]

    def parameter_groups(self):
        teachers = list(self.collaborative.teachers.parameters()) + [
            p for layer in self.collaborative.shared for p in layer.quantizers.parameters()
        ]
        return [
            {"params": trainable(self.student.parameters()), "lr_scale": 1.0},
            {"params": trainable(teachers), "lr_scale": 1.0},
            {"params": self.importance_logits(), "lr_scale": self.options.importance_lr_scale},
        ]


def _missing_parts(model: nn.Module) -> list[str]:
    return [part for part in STAGED_PARTS if not hasattr(model, part)]


def _stage_shapes(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Each stage's output shape (C, H, W) for inputs of ``input_shape``."""
    return [tuple(o.shape[1:]) for o in on_zero_batch(model, input_shape, stage_outputs)]


def _check_shapes(
    student: nn.Module,
    teachers: Sequence[nn.Module],
    stages: Sequence[int] | None,
    input_shape: tuple[int, ...],
) -> list[int]:
    """The shared stages, after checking that the models are staged (the student may be a user
    model with ``feature_layers``), that the teachers' outputs agree there, and that the
    student's have the same spatial size."""
    models = [(f"teacher {i}", t) for i, t in enumerate(teachers)]
    not_staged = [
        f"{what} ({type(m).__name__}) has no {', '.join(_missing_parts(m))}"
        for what, m in models
        if _missing_parts(m)
    ]
    if not_staged:
        raise UserError(
            f"cmt-kd runs its teachers stage by stage, each stage's input the teachers' mixed "
            f"outputs, so each teacher needs {', '.join(STAGED_PARTS)} (a zoo model); "
            f"{'; '.join(not_staged)}. Use zoo teachers (--teacher-arch) or give your models "
            f"those parts"
        )
    require_stage_features(student, CMT_STUDENT)
    student_maps = stage_maps(student, input_shape, CMT_STUDENT)
    shapes = {"the student": [tuple(m.shape[1:]) for m in student_maps]}
    shapes.update((what, _stage_shapes(m, input_shape)) for what, m in models)
    count = min(len(s) for s in shapes.values())
    stages = list(range(count)) if stages is None else sorted(set(stages))
    if not stages or not all(0 <= k < count for k in stages):
        raise UserError(
            f"cmt-kd shared_stages {stages}: choose stage indices from 0 to {count - 1} (every "
            f"model has {count} stages), or leave it unset for every stage"
        )
    teacher_shapes = {w: s for w, s in shapes.items() if w != "the student"}
    mismatched = [k for k in stages if len({s[k] for s in teacher_shapes.values()}) > 1]
    if mismatched:
        listing = "; ".join(
            f"stage {k}: " + ", ".join(f"{w} {s[k]}" for w, s in teacher_shapes.items())
            for k in mismatched
        )
        raise UserError(
            f"cmt-kd mixes the teachers' stage outputs, so they need equal shapes (C, H, W) at "
            f"the shared stages; {listing}. Use teachers of one architecture (e.g. --teacher-arch "
            f"resnet8x4,resnet8x4,resnet8x4) or share only stages where they agree "
            f"(--set student.method_options.shared_stages=[...])"
        )
    reference = next(iter(teacher_shapes.values()))
    spatial = [k for k in stages if shapes["the student"][k][1:] != reference[k][1:]]
    if spatial:
        listing = "; ".join(
            f"stage {k}: student {shapes['the student'][k]}, teachers {reference[k]}"
            for k in spatial
        )
        raise UserError(
            f"cmt-kd compares attention maps position by position, so the student's stage "
            f"outputs need the teachers' spatial size at the shared stages; {listing}. Use a "
            f"student with the teachers' strides or other shared_stages"
        )
    return stages


def _trainable_copy(teacher: nn.Module, bits: int, context: MethodContext) -> nn.Module:
    """A calibrated fake-quant copy of ``teacher`` at ``bits`` (a float copy for 32) whose
    weights, biases and BatchNorm affines train; quantizer step sizes keep their own flag (fixed
    scales stay fixed)."""
    model = copy.deepcopy(teacher) if bits == FULL_PRECISION else context.quantize(teacher, bits)
    for module in model.modules():
        if not isinstance(module, LSQQuantizer):
            for p in module.parameters(recurse=False):
                p.requires_grad_(True)
    return model


def _target(models: Sequence[nn.Module]) -> Target:
    """The export target the quantized teachers were built for (their grids follow it)."""
    for model in models:
        for _, q in quantizers(model):
            return q.target
    return Target.TENSORRT
