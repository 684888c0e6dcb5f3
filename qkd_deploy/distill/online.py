"""Online distillation without a pre-trained teacher (docs/methods/): Deep Mutual Learning
(``dml``), Peer Collaborative Learning (``pcl``) and Decoupled Knowledge with Ensemble Learning
(``dkel``).

In qkd-deploy every peer is a quantized student: peer 0 is the student the pipeline gives, the
others come from ``MethodContext.make_student()`` (same architecture, bit-widths, calibration and
float initialisation), so each peer trains with the same fake quantization as the student.
Temporal-mean (EMA) models are frozen copies that are not in the optimizer; they change only in
``after_step``. ``export_model`` returns one model with the student's architecture (a peer, or a
peer's EMA copy for ``pcl``), so no second peer, ensemble head or EMA copy reaches the ONNX file.

Choices shared by the three methods:

- **Which model is exported.** The pipeline has no validation split during training, so the
  candidate with the lowest running training cross-entropy wins: an exponential moving average
  of each candidate's CE, horizon one epoch (``beta = 1 - 1 / steps_per_epoch``), so it measures
  roughly the last epoch. It is a buffer, so a resumed run keeps it. All candidates see inputs
  drawn from the same distribution, so their CEs compare fairly.
- **EMA updates** follow the mean-teacher code that both DKEL/PCL reference implementations use
  (Tarvainen & Valpola 2017, ``update_ema_variables``): after ``t`` earlier updates the decay is
  ``min(decay, 1 - 1 / (t + 1))``, a true average of the weights so far until the EMA horizon is
  reached (which matters for short QAT runs), then ``decay``. Parameters are averaged (weights,
  biases, BatchNorm affines and LSQ step sizes); an EMA model runs in train mode on its own input
  as in the reference code, so its BatchNorm running statistics are its own.
- **Per-peer views** (``pcl``, ``dkel``): every peer gets its own random re-augmentation of the
  (already augmented, normalised) batch: a random shift by zero-padding ``view_padding`` pixels
  and cropping back (``qkd_deploy.data.Augment``; the zero of a normalised image is the mean
  colour), plus a random horizontal flip only if ``view_hflip`` (off by default: flips corrupt
  digits and text; turn it on for natural images). ``view_padding`` defaults to
  ``max(1, H // 16)`` (2 pixels on 32 x 32 images), small because it comes on top of the data
  set's own augmentation. The random numbers come from the global torch RNG, which the trainer
  checkpoints, so a resumed run sees the same views.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from qkd_deploy.data.augment import Augment
from qkd_deploy.distill.base import (
    Distiller,
    MethodContext,
    MethodOptions,
    register_method,
    trainable,
)
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from qkd_deploy.models.features import logits_and_pooled, pooled_width

# ---------------------------------------------------------------------------------------------
# Loss terms and schedules (small functions, checked against hand-computed numbers in the tests)
# ---------------------------------------------------------------------------------------------


def kd_from_others(
    logits: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], tau: float
) -> list[torch.Tensor]:
    """For each peer ``j``: ``1/(K-1) * sum_{i != j} tau^2 * KL(softmax(t_i / tau) || p_j)``, the
    targets detached. DML's mutual term is ``kd_from_others(logits, logits, tau)``; PCL's
    peer-mean-teacher term is ``kd_from_others(logits, mean_teacher_logits, tau)``."""
    others = len(logits) - 1
    return [
        sum(kd_kl(z, t.detach(), tau) for i, t in enumerate(targets) if i != j) / others
        for j, z in enumerate(logits)
    ]


def rampup_weight(progress: float, length: float) -> float:
    """The mean-teacher ramp-up PCL uses: ``exp(-5 * (1 - progress / length)^2)`` until
    ``progress`` reaches ``length`` (both fractions of training), then 1."""
    if length <= 0 or progress >= length:
        return 1.0
    return math.exp(-5.0 * (1.0 - max(progress, 0.0) / length) ** 2)


def decaying_weight(progress: float, gamma: float) -> float:
    """DKEL's decaying-ensemble weight of the teacher, ``w(t) = (1 - t / t_total)^gamma``: 1 at the
    start, 0 at the end (``progress = t / t_total``)."""
    return (1.0 - min(max(progress, 0.0), 1.0)) ** gamma


def mixed_target(
    teacher_logits: torch.Tensor, ensemble_logits: torch.Tensor, weight: float
) -> torch.Tensor:
    """DKEL's supervising logits ``w * z_teacher + (1 - w) * z_ensemble`` (detached)."""
    return (weight * teacher_logits + (1.0 - weight) * ensemble_logits).detach()


def gradient_scaled(loss: torch.Tensor, scale: float) -> torch.Tensor:
    """``loss`` with its gradient multiplied by ``scale`` and its value unchanged. For SGD this
    is the same as multiplying the learning rate of the parameters only this loss reaches by
    ``scale`` (weight decay aside); Adam-type optimizers ignore the scale."""
    return loss * scale + (loss * (1.0 - scale)).detach()


def ema_decay(decay: float, updates: int) -> float:
    """The mean-teacher decay after ``updates`` earlier updates: ``min(decay, 1 - 1/(t + 1))``."""
    return min(decay, 1.0 - 1.0 / (updates + 1))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """``ema_p = decay * ema_p + (1 - decay) * p`` for every parameter (buffers are left alone:
    the EMA model keeps its own BatchNorm statistics)."""
    for ema_p, p in zip(ema.parameters(), model.parameters(), strict=True):
        ema_p.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy with no trainable parameter (an EMA model: never in the optimizer)."""
    return copy.deepcopy(model).requires_grad_(False)


@torch.no_grad()
def perturb_weights(model: nn.Module, relative_std: float) -> None:
    """Add Gaussian noise of ``relative_std`` times each weight tensor's std to every weight
    tensor (conv kernels, linear matrices; not biases, BatchNorm or quantizer step sizes)."""
    for p in model.parameters():
        if p.dim() > 1:
            p.add_(torch.randn_like(p) * (p.std() * relative_std))


def peer_views(images: torch.Tensor, count: int, augment: Augment) -> list[torch.Tensor]:
    """``count`` independent random augmentations of the batch, one per peer."""
    seed = int(torch.randint(0, 2**62, (), device="cpu"))  # from the global CPU RNG
    generator = torch.Generator().manual_seed(seed)
    return [augment(images, generator) for _ in range(count)]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


def check_online_options(method: str, options: MethodOptions) -> None:
    """The checks the online methods' options share: peers, temperature, EMA decay, view shift."""
    _require(options.peers >= 2, f"{method}: peers must be >= 2, got {options.peers}")
    _require(options.tau > 0, f"{method}: tau must be > 0, got {options.tau}")
    decay = getattr(options, "decay", 0.0)
    _require(0 <= decay < 1, f"{method}: decay must be in [0, 1), got {decay}")
    padding = getattr(options, "view_padding", None)
    _require(padding is None or padding >= 0, f"{method}: view_padding must be >= 0, got {padding}")


# ---------------------------------------------------------------------------------------------
# The shared machinery: quantized peers, the running measure, the step counter
# ---------------------------------------------------------------------------------------------


class OnlineDistiller(Distiller):
    """Base of the online methods: ``options.peers`` quantized students (peer 0 is the given
    student), a running training-CE measure per export candidate and a count of optimizer steps.
    Subclasses say which models are candidates (``candidates``) and call ``track`` with their
    CEs once per step."""

    needs_teachers = 0

    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        options: MethodOptions,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__(student, teachers, options, context)
        _require(
            context is not None and context.make_student is not None,
            f"method {self.name!r} builds its peers with MethodContext.make_student(); "
            f"build it through the pipeline (or pass a context that has make_student)",
        )
        self.extra_peers = nn.ModuleList(context.make_student() for _ in range(options.peers - 1))
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("running_ce", torch.full((options.peers,), math.nan))
        self.ce_momentum = 1.0 - 1.0 / max(1, context.steps_per_epoch)

    @property
    def peers(self) -> list[nn.Module]:
        return [self.student, *self.extra_peers]

    def candidates(self) -> list[nn.Module]:
        """The models ``export_model`` chooses from, in ``running_ce`` order."""
        return self.peers

    @torch.no_grad()
    def track(self, losses: Sequence[torch.Tensor]) -> None:
        """Fold this step's CE of each candidate into ``running_ce``."""
        ce = torch.stack([loss.detach() for loss in losses]).to(self.running_ce)
        blended = self.ce_momentum * self.running_ce + (1.0 - self.ce_momentum) * ce
        self.running_ce.copy_(torch.where(torch.isnan(self.running_ce), ce, blended))

    def running_statistics(self) -> list[torch.Tensor]:
        """Under torchrun each process's ``running_ce`` sees its share of each batch; averaged
        after every epoch, process 0 picks the export from all of them (an EMA is linear, so
        the average of the processes' EMAs is the EMA of their averaged CEs)."""
        return [self.running_ce]

    def best_index(self) -> int:
        """The candidate with the lowest running CE (0 before any training)."""
        return int(torch.nan_to_num(self.running_ce, nan=math.inf).argmin())

    def export_model(self) -> nn.Module:
        return self.candidates()[self.best_index()]

    def parameter_groups(self) -> list[dict]:
        params = [p for peer in self.peers for p in trainable(peer.parameters())]
        return [{"params": params, "lr_scale": 1.0}]

    def after_step(self) -> None:
        self.updates += 1

    def _view_augment(self, padding: int | None, hflip: bool) -> Augment:
        if padding is None:
            padding = max(1, self.context.input_shape[1] // 16)
        return Augment(crop_padding=padding, hflip=hflip)


# ---------------------------------------------------------------------------------------------
# DML
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DMLOptions(MethodOptions):
    peers: int = 2  # K networks trained together (the paper's main setting)
    tau: float = 1.0  # softmax temperature; the paper uses none (1)
    init_noise: float = 0.01  # weight noise of peers 1..K-1 (x each tensor's std); see docstring

    def __post_init__(self) -> None:
        check_online_options("dml", self)
        _require(self.init_noise >= 0, f"dml: init_noise must be >= 0, got {self.init_noise}")


@register_method
class DML(OnlineDistiller):
    """Deep Mutual Learning (Zhang, Xiang, Hospedales & Lu, CVPR 2018).

    ``K`` peers learn together on the same batch; peer ``k`` minimises
    ``CE(z_k, y) + 1/(K-1) * sum_{l != k} tau^2 * KL(p_l || p_k)`` with the other peers'
    predictions as fixed targets. Defaults: ``K = 2``, ``tau = 1`` (the paper uses no
    temperature). Terms: ``ce`` (sum over peers), ``mutual_kl`` (sum over peers).

    Open choices:

    - Simultaneous update: one forward per peer and one optimizer step for all peers, as the
      common reimplementations do (e.g. the DML baseline of DefangChen/OKDDip, ``train_DML.py``);
      the paper's Algorithm 1 updates the peers in turn and recomputes the predictions between
      updates, which costs ``K - 1`` more forward passes per step.
    - Different starting points: the paper's peers start from different random initialisations,
      and that is where their disagreement comes from. Here every peer starts from the same
      calibrated (normally float-pretrained) student, and identical peers fed identical batches
      stay identical, with KL terms of exactly 0. So peers ``1..K-1`` get Gaussian noise on their
      weight tensors (``init_noise`` x each tensor's std): different initial conditions that keep
      the pretraining. ``init_noise = 0`` gives identical peers. Measured on digits at w4a4 with
      the 2-epoch resnet8 of the tests: the default 0.01 leaves the CE unchanged (1.07) and makes
      6 % of the two peers' first predictions differ (mutual KL 0.018).
    - Export: the peer with the lowest running training CE (module docstring).
    """

    name = "dml"
    description = "Deep Mutual Learning: quantized peers trained together, each with CE + KL"
    Options = DMLOptions

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        for peer in self.extra_peers:
            perturb_weights(peer, options.init_noise)

    def forward_train(self, images, labels, progress):
        logits = [peer(images) for peer in self.peers]
        ce = [F.cross_entropy(z, labels) for z in logits]
        self.track(ce)
        return logits[0], {
            "ce": torch.stack(ce).sum(),
            "mutual_kl": torch.stack(kd_from_others(logits, logits, self.options.tau)).sum(),
        }


# ---------------------------------------------------------------------------------------------
# PCL
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PCLOptions(MethodOptions):
    peers: int = 3  # peer branches (the paper's default m = 3)
    tau: float = 3.0  # KD temperature of both distillation terms
    decay: float = 0.999  # EMA decay of the peer mean teachers
    rampup: float = 80 / 300  # fraction of training over which the KD weight ramps up to 1
    ensemble_head: bool = True  # the paper's head on concatenated features; False: mean logits
    view_padding: int | None = None  # shift of each peer's view; None: max(1, H // 16)
    view_hflip: bool = False  # also flip each view at random (natural images only)

    def __post_init__(self) -> None:
        check_online_options("pcl", self)


# the peers' pooled features feed the ensemble head (in its error message: the other choice)
PCL_PEER = "pcl's peer-ensemble head (or student.method_options.ensemble_head=false)"


@register_method
class PCL(OnlineDistiller):
    """Peer Collaborative Learning for online KD (Wu & Gong, AAAI 2021, arXiv:2006.04147).

    ``K`` peers (default 3), each fed its own random view of the batch (module docstring).

    - Peer ensemble teacher: the paper assembles the peers' *feature representations* with an
      additional classifier (rather than summing logits, which it argues cannot be optimised
      further): here a float linear layer on the concatenated pooled features of all peers. It
      learns with CE (that gradient also reaches the peers' features) and distils to every peer,
      ``tau^2 * KL(p_e || p_j)`` with ``p_e`` detached.
    - Peer mean teachers: a temporal-mean (EMA, ``decay = 0.999``) copy of every peer, run on
      that peer's view. Peer ``j`` learns from the mean teachers of the *other* peers (the
      paper's collaboration among peers, as in the reproduction below),
      ``1/(K-1) * sum_{l != j} tau^2 * KL(p_mt_l || p_j)``, not from its own mean teacher.
    - Loss ``sum_j CE_j + CE_e + w(t) * sum_j (KL_e,j + KL_mt,j)``, ``tau = 3``, all weights 1,
      with the mean-teacher ramp-up ``w(t) = exp(-5 (1 - t / r)^2)`` of the reproductions over
      the first 80 of 300 epochs (``rampup = 80/300`` of training, so it scales with the run's
      length). Terms: ``ce``, ``ensemble_ce``, ``ensemble_kd``, ``mean_teacher_kd``.
    - Stem sharing (optional in the paper, which shares the low-level layers to save compute):
      not used. Each peer is a complete quantized student, so any peer (or its mean teacher) can
      be exported with its own quantizers, and separate networks stay more diverse than branches.
    - Export: the peer mean teacher with the lowest running training CE (the reproduction
      likewise evaluates and saves the temporal-mean network, best of its branches).
      ``ensemble_head = False`` uses the peers' mean logits as the ensemble (no extra parameters,
      no ``ensemble_ce``) for models whose classifier head is not an ``nn.Linear``.

    Reference code read: shaoeric/Peer-Collaborative-Learning-for-Online-Knowledge-Distillation
    (a reproduction by the DKEL authors; PCL's own code is not public): ensemble head on
    concatenated features, mean teachers of the other peers, ramp-up on both KD terms, EMA 0.999.
    """

    name = "pcl"
    description = "Peer Collaborative Learning: peer-ensemble head and peer mean teachers"
    Options = PCLOptions

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        self.augment = self._view_augment(options.view_padding, options.view_hflip)
        self.mean_teachers = nn.ModuleList(frozen_copy(peer) for peer in self.peers)
        self.head = self._ensemble_head(student) if options.ensemble_head else None

    def _ensemble_head(self, student: nn.Module) -> nn.Linear:
        features = pooled_width(student, PCL_PEER) * self.options.peers
        return nn.Linear(features, self.context.num_classes)

    def candidates(self) -> list[nn.Module]:
        return list(self.mean_teachers)

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        if self.head is not None:
            groups[0]["params"] += list(self.head.parameters())
        return groups

    def after_step(self) -> None:
        decay = ema_decay(self.options.decay, int(self.updates))
        for mean_teacher, peer in zip(self.mean_teachers, self.peers, strict=True):
            ema_update(mean_teacher, peer, decay)
        super().after_step()

    def _peers_and_ensemble(
        self, views: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Each peer's logits on its view and the ensemble teacher's logits."""
        if self.head is None:
            logits = [peer(view) for peer, view in zip(self.peers, views, strict=True)]
            return logits, torch.stack(logits).mean(0)
        pairs = zip(self.peers, views, strict=True)
        outputs = [logits_and_pooled(peer, view, PCL_PEER) for peer, view in pairs]
        pooled = torch.cat([features for _, features in outputs], dim=1)
        return [logits for logits, _ in outputs], self.head(pooled)

    def forward_train(self, images, labels, progress):
        views = peer_views(images, len(self.peers), self.augment)
        logits, ensemble = self._peers_and_ensemble(views)
        with torch.no_grad():
            means = [m(view) for m, view in zip(self.mean_teachers, views, strict=True)]
        self.track([F.cross_entropy(z, labels) for z in means])
        tau, weight = self.options.tau, rampup_weight(progress, self.options.rampup)
        ensemble_kd = [kd_kl(z, ensemble.detach(), tau) for z in logits]
        terms = {
            "ce": torch.stack([F.cross_entropy(z, labels) for z in logits]).sum(),
            "ensemble_kd": weight * torch.stack(ensemble_kd).sum(),
            "mean_teacher_kd": weight * torch.stack(kd_from_others(logits, means, tau)).sum(),
        }
        if self.head is not None:
            terms["ensemble_ce"] = F.cross_entropy(ensemble, labels)
        return logits[0], terms


# ---------------------------------------------------------------------------------------------
# DKEL
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class DKELOptions(MethodOptions):
    peers: int = 3  # peer students (the reference code trains 3 branches)
    tau: float = 3.0  # KD temperature
    decay: float = 0.999  # EMA decay of the teacher's temporal mean
    gamma: float = 0.5  # decaying-ensemble exponent: w(t) = (1 - t / t_total) ** gamma
    warmup_epochs: float = 1.0  # teacher initialisation: epochs at a small learning rate
    warmup_lr_scale: float = 0.01  # its learning rate during the warm-up (reference: lr / 100)
    view_padding: int | None = None  # shift of each peer's view; None: max(1, H // 16)
    view_hflip: bool = False  # also flip each view at random (natural images only)

    def __post_init__(self) -> None:
        check_online_options("dkel", self)
        _require(self.gamma >= 0, f"dkel: gamma must be >= 0, got {self.gamma}")
        _require(
            self.warmup_epochs >= 0 and self.warmup_lr_scale > 0,
            "dkel: warmup_epochs must be >= 0 and warmup_lr_scale > 0",
        )


@register_method
class DKEL(OnlineDistiller):
    """Decoupled Knowledge with Ensemble Learning for online distillation (Shao & Chen 2023,
    arXiv:2312.11218).

    PCL collapses at times because its mean teacher is an average of the student itself (too
    homogeneous). DKEL's knowledge comes from an *independent* teacher instead:

    - The teacher is a network of its own (``teacher_net``, trained on the labels only, never on
      the peers' outputs), and the supervising model is its temporal mean (``teacher_ema``, EMA
      decay 0.999), not an EMA of any student.
    - Initialisation scheme: the teacher is warmed up for ``warmup_epochs`` (one) at
      ``warmup_lr_scale`` (1/100, the reference code's ``lr / 100``) of the learning rate, so its
      knowledge is decoupled from the peers early. Labelled batches only arrive in
      ``forward_train`` (the calibration batches have no labels), so the warm-up runs during the
      first ``warmup_epochs * steps_per_epoch`` optimizer steps, concurrently with the peers,
      instead of before them as in the reference code. The small rate is applied by scaling the
      gradient of the teacher's CE (``gradient_scaled``; the reported ``teacher_ce`` is the true
      CE): identical to a smaller SGD learning rate (the paper's optimizer and the default)
      except for weight decay; with ``adamw`` the warm-up runs at the full rate.
    - Decaying ensemble: peer ``j`` learns from ``w(t) * z_teacher + (1 - w(t)) * z_ensemble``
      with ``w(t) = (1 - t / t_total)^gamma``, ``gamma = 0.5``: a strong teacher early, the peers'
      ensemble (mean logits of all peers, detached) late, when the teacher may have overfitted.
      Mixing is done on logits, as the reference code forms its ensembles.
    - Loss ``sum_j [CE_j + tau^2 KL(softmax(target / tau) || p_j)] + CE_teacher``, ``tau = 3``.
      Terms: ``ce``, ``kd``, ``teacher_ce``.
    - Published CIFAR-100 recipe: 300 epochs, batch 128, SGD lr 0.1, Nesterov momentum, weight
      decay 5e-4, KD tau 3, EMA 0.999.

    Open choices:

    - Teacher architecture: the student's (``make_student()``: same quantization and float
      initialisation as the peers), as in the reference code, whose teacher is a ``deepcopy`` of
      the student network: the decoupling comes from the teacher's own training, not from more
      capacity, and a student-sized teacher costs one more student.
    - Peers each see their own random view (the reference code feeds each branch its own
      augmentation); the teacher trains and predicts on the loader's batch, so its targets are
      cross-view, as the reference code's are.
    - Export: the peer with the lowest running training CE. The teacher is not a candidate: it
      never learns from the distillation (exporting it would export plain QAT), and its CE is
      measured on different inputs than the peers'.

    Reference code read: shaoeric/Decoupled-Knowledge-with-Ensemble-Learning-for-Online-
    Distillation. It differs from the paper's description in ways worth knowing: its teacher is the
    temporal mean of the *student* network (``update_ema_variables(model, mean_model)``), whose
    first update (mean-teacher decay 0 at step 0) overwrites the warmed-up weights; its warm-up
    stops after ``--init`` batches (default 1); and its decaying weight ``exp(-0.5 * epoch)``
    mixes the ensemble of the other teacher branches with the individual branches (on top of a
    PCL-style ensemble head). This implementation follows the paper's description.
    """

    name = "dkel"
    description = "Decoupled Knowledge with Ensemble Learning: independent EMA teacher + peers"
    Options = DKELOptions

    def __init__(self, student, teachers, options, context=None):
        super().__init__(student, teachers, options, context)
        self.augment = self._view_augment(options.view_padding, options.view_hflip)
        self.teacher_net = context.make_student()
        self.teacher_ema = frozen_copy(self.teacher_net)
        self.warmup_steps = round(options.warmup_epochs * context.steps_per_epoch)

    def teacher_lr_scale(self) -> float:
        """The teacher's learning-rate factor at the current step (small during the warm-up)."""
        return self.options.warmup_lr_scale if int(self.updates) < self.warmup_steps else 1.0

    def parameter_groups(self) -> list[dict]:
        groups = super().parameter_groups()
        groups[0]["params"] += trainable(self.teacher_net.parameters())
        return groups

    def after_step(self) -> None:
        decay = ema_decay(self.options.decay, int(self.updates))
        ema_update(self.teacher_ema, self.teacher_net, decay)
        super().after_step()

    def forward_train(self, images, labels, progress):
        views = peer_views(images, len(self.peers), self.augment)
        logits = [peer(view) for peer, view in zip(self.peers, views, strict=True)]
        teacher_ce = F.cross_entropy(self.teacher_net(images), labels)
        with torch.no_grad():
            teacher = self.teacher_ema(images)
        ensemble = torch.stack(logits).mean(0)
        target = mixed_target(teacher, ensemble, decaying_weight(progress, self.options.gamma))
        ce = [F.cross_entropy(z, labels) for z in logits]
        self.track(ce)
        return logits[0], {
            "ce": torch.stack(ce).sum(),
            "kd": torch.stack([kd_kl(z, target, self.options.tau) for z in logits]).sum(),
            "teacher_ce": gradient_scaled(teacher_ce, self.teacher_lr_scale()),
        }
