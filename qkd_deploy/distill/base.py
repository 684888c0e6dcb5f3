"""The Distiller interface (mdistiller style) and the method registry.

A distiller owns the student, its teachers and any extra trainable parts (online peers, EMA
teachers, translators, generators, importance weights). ``forward_train`` returns the student's
logits and a dict of named loss terms; the trainer sums the terms, steps the optimizer over
``parameter_groups()``, then calls ``after_step()`` (EMA updates). The trainer knows nothing of
methods. ``progress`` (0 at the first step, 1 at the end) drives schedules. Only
``export_model()`` (the student, unless a method says otherwise) is exported: no teacher,
translator, head or generator reaches the ONNX file.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from qkd_deploy.errors import UserError


@dataclasses.dataclass
class MethodOptions:
    """Base of every method's config fields (a dataclass per method, defaults from the paper)."""


@dataclasses.dataclass
class MethodContext:
    """What the pipeline offers a method beyond the student and the teachers.

    ``make_student()`` builds another student exactly like the one given (same architecture,
    quantized the same way, calibrated, same float initialisation), e.g. for online peers.
    ``quantize(model, bits)`` gives a calibrated fake-quant copy of any float model at ``bits``
    everywhere but the 8-bit first and last layer, without the student's ``layer_bits`` (e.g.
    CMT-KD's quantized teachers). ``calibration_batches`` are real, preprocessed training
    images (empty for data-free methods, which must calibrate on what they generate, with
    ``calibrate(model, batches)``: the run's calibrator settings).
    """

    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    steps_per_epoch: int
    epochs: int
    make_student: Callable[[], nn.Module] | None = None
    quantize: Callable[[nn.Module, int], nn.Module] | None = None
    calibration_batches: list[torch.Tensor] = dataclasses.field(default_factory=list)
    calibrate: Callable[[nn.Module, list[torch.Tensor]], None] | None = None


class Distiller(nn.Module, metaclass=abc.ABCMeta):
    name: ClassVar[str]
    description: ClassVar[str]
    Options: ClassVar[type[MethodOptions]] = MethodOptions
    needs_teachers: ClassVar[int] = 1  # how many teachers the method wants at least (0 = none)
    max_teachers: ClassVar[int | None] = None  # the most it distils from (None: any number)
    default_teachers: ClassVar[tuple[str, ...]] = ("resnet8x4",)  # archs the pipeline trains
    data_free: ClassVar[bool] = False  # True: the trainer passes no real images (None, None)
    trains: ClassVar[bool] = True  # False: the calibrated student is exported untrained (PTQ)
    # True: it can also train the float student (student.float_method): it needs no quantized
    # student and no MethodContext
    distils_float: ClassVar[bool] = False

    def __init__(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        options: MethodOptions,
        context: MethodContext | None = None,
    ) -> None:
        super().__init__()
        self.check_teacher_count(len(teachers), options)
        self.student = student
        self.teachers = nn.ModuleList(teachers)
        for teacher in self.teachers:
            teacher.requires_grad_(False)
        self.options = options
        self.context = context

    @classmethod
    def check_teacher_count(cls, count: int, options: MethodOptions) -> None:
        """A ``UserError`` unless the method can distil from ``count`` teachers with ``options``
        (checked before any training, and again when the distiller is built)."""
        if count < cls.needs_teachers:
            raise UserError(
                f"method {cls.name!r} needs at least {cls.needs_teachers} teacher(s), got "
                f"{count}; give more (--teacher-arch resnet8x4,resnet20, or --teacher repeated), "
                "or leave the teachers out for the method's own defaults"
            )
        if cls.max_teachers is not None and count > cls.max_teachers:
            most = "one teacher" if cls.max_teachers == 1 else f"{cls.max_teachers} teachers"
            raise UserError(f"method {cls.name!r} distils {most} at most, got {count}")

    @abc.abstractmethod
    def forward_train(
        self, images: torch.Tensor | None, labels: torch.Tensor | None, progress: float
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's logits and the named loss terms (summed by the trainer)."""

    def parameter_groups(self) -> list[dict[str, Any]]:
        """What the optimizer steps, as groups ``{"params": [...], "lr_scale": float}``; by
        default the student only (teachers are frozen)."""
        return [{"params": trainable(self.student.parameters()), "lr_scale": 1.0}]

    def after_step(self) -> None:
        """Called after each optimizer step (EMA teachers update here)."""

    def running_statistics(self) -> list[torch.Tensor]:
        """Buffers that average what this process's steps saw (besides BatchNorm's running
        statistics), averaged over the processes after every epoch under torchrun."""
        return []

    def export_model(self) -> nn.Module:
        """The model to export and evaluate: the student unless the method picks another."""
        return self.student

    def train(self, mode: bool = True) -> Distiller:
        """Frozen teachers stay in eval mode (BatchNorm statistics fixed)."""
        super().train(mode)
        for teacher in self.teachers:
            teacher.eval()
        return self


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


METHODS: dict[str, type[Distiller]] = {}


def register_method(cls: type[Distiller]) -> type[Distiller]:
    METHODS[cls.name] = cls
    return cls


def parse_options(cls: type[Distiller], values: dict[str, Any]) -> MethodOptions:
    """The method's options from a config dict; an unknown key names the valid ones."""
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(
            f"method {cls.name!r} has no option(s) {unknown}; "
            f"its options are {sorted(fields) or 'none'}"
        )
    return cls.Options(**values)


def checked_method_options(name: str, values: dict[str, Any], teachers: int) -> dict[str, Any]:
    """Every option of method ``name``, defaults filled in, after checking what can be checked
    before any training: the name, the option names and values, and the number of teachers.

    A run's config stores this full set, so a resumed run keeps the options it started with even
    when a default changes in a later version.
    """
    cls = method_class(name)
    options = parse_options(cls, values)
    cls.check_teacher_count(teachers, options)
    resolved = dataclasses.asdict(options)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in resolved.items()}


def float_methods() -> list[str]:
    """The methods that can train the float student (``student.float_method``)."""
    return sorted(name for name, cls in METHODS.items() if cls.distils_float)


def method_class(name: str) -> type[Distiller]:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_distiller(
    name: str,
    student: nn.Module,
    teachers: list[nn.Module],
    options: dict[str, Any] | None = None,
    context: MethodContext | None = None,
) -> Distiller:
    cls = method_class(name)
    return cls(student, teachers, parse_options(cls, options or {}), context)
