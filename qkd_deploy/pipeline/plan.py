"""What a run will do, read once from its config: the method's declarations looked up a single
time and turned into the stages, teachers, students and flags the rest of the pipeline reads."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from qkd_deploy.bits import BitWidths
from qkd_deploy.config import Config, TeacherConfig, TrainConfig
from qkd_deploy.distill.base import Distiller, method_class
from qkd_deploy.targets import Target


class FloatStudent(enum.Enum):
    """Where the float student QAT starts from comes from."""

    GIVEN = "given"  # the user's trained weights (student.checkpoint), not trained further
    TRAINED = "trained"  # trained here with student.float_method
    UNTRAINED = "untrained"  # student.float_reference=false: fresh weights


@dataclasses.dataclass(frozen=True)
class Plan:
    """A run's stages and the method flags they branch on."""

    method: str
    trains: bool  # the QAT method trains (``ptq`` only calibrates)
    data_free: bool  # the QAT method never sees a training image
    method_has_batch_size: bool  # its options set how many images it generates per step
    float_method: str
    float_method_distils: bool  # the float method can train a float model
    float_method_uses_teachers: bool
    float_student: FloatStudent
    float_reference: bool  # the float student is exported and reported
    teachers: tuple[TeacherConfig, ...]
    bits: tuple[BitWidths, ...]
    target: Target
    training_stages: tuple[tuple[str, TrainConfig], ...]  # (config key, settings)
    student_arch: str  # the zoo name or the user's ``module:factory``
    student_label: str  # the students' names in the report start with it

    @classmethod
    def of(cls, config: Config) -> Plan:
        cfg = config.student
        method = method_class(cfg.method)
        float_method = method_class(cfg.float_method)
        teachers = tuple(config.teachers) or _default_teachers(method, float_method)
        if cfg.checkpoint:
            float_student = FloatStudent.GIVEN
        elif cfg.float_reference:
            float_student = FloatStudent.TRAINED
        else:
            float_student = FloatStudent.UNTRAINED
        stages = []
        if any(not t.module for t in teachers):
            stages.append(("teacher_train", config.teacher_train))
        if float_student is FloatStudent.TRAINED:
            stages.append(("student.float_train", cfg.float_train))
        if method.trains:
            stages.append(("student.train", cfg.train))
        options = {f.name for f in dataclasses.fields(method.Options)}
        return cls(
            method=cfg.method,
            trains=method.trains,
            data_free=method.data_free,
            method_has_batch_size="batch_size" in options,
            float_method=cfg.float_method,
            float_method_distils=float_method.distils_float,
            float_method_uses_teachers=float_method.needs_teachers,
            float_student=float_student,
            float_reference=cfg.float_reference,
            teachers=teachers,
            bits=tuple(BitWidths.parse(b) for b in cfg.bits),
            target=Target.parse(config.quant.target),
            training_stages=tuple(stages),
            student_arch=cfg.module or cfg.arch,
            student_label=cfg.module.rpartition(":")[2] if cfg.module else cfg.arch,
        )

    @property
    def float_row_method(self) -> str:
        """How the float student came about, as the report names it: its float method, or
        ``checkpoint`` for the user's trained weights, which the run exports as given."""
        return "checkpoint" if self.float_student is FloatStudent.GIVEN else self.float_method

    def trained_model_files(self, root: Path) -> list[Path]:
        """The weights that a finished run's training stages leave in ``root``."""
        stages = [teacher_stage(i) for i, t in enumerate(self.teachers) if not t.module]
        if self.float_reference or self.float_student is FloatStudent.GIVEN:
            stages.append("student_float")
        stages += [bits.name for bits in self.bits]
        return [root / stage / "model.pt" for stage in stages]


def _default_teachers(
    method: type[Distiller], float_method: type[Distiller]
) -> tuple[TeacherConfig, ...]:
    """The method's default teacher architectures (those of the float method when only the
    float student distils)."""
    if not method.needs_teachers and float_method.needs_teachers:
        method = float_method
    return tuple(TeacherConfig(arch=arch) for arch in method.default_teachers)


def teacher_stage(index: int) -> str:
    """The run-directory folder of teacher ``index``."""
    return "teacher" if index == 0 else f"teacher_{index}"


def teacher_configs(config: Config) -> tuple[TeacherConfig, ...]:
    """The configured teachers, or the method's default architectures when none are configured
    (those of ``student.float_method`` when only the float student distils)."""
    return Plan.of(config).teachers


def training_stages(config: Config) -> tuple[tuple[str, TrainConfig], ...]:
    """The config keys and settings of the training stages the run has (``ptq`` students do not
    train, nor a float student given as ``student.checkpoint``)."""
    return Plan.of(config).training_stages
