"""A run's report as typed values: what the pipeline measured, built stage by stage and written
as ``report.json`` (its schema in docs/design.md).

``to_json()`` gives exactly the keys, in the order, that ``report.json`` has always had, and
``from_json()`` reads them back. The readers on the deploy side (``bench/``, ``deploy/``) stay
torch-free and below the pipeline, so they read the JSON itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qkd_deploy.bits import BitWidths
from qkd_deploy.data.preprocess import Preprocess
from qkd_deploy.targets import Target

Json = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LatencyRow:
    """Milliseconds per batch of ``batch`` images."""

    batch: int
    p50: float
    p90: float
    mean: float

    def to_json(self) -> Json:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Json) -> LatencyRow:
        return cls(row["batch"], row["p50"], row["p90"], row["mean"])


Latency = dict[str, tuple[LatencyRow, ...]]  # runtime ("onnxruntime_cpu") -> rows


def latency_to_json(latency: Latency) -> Json:
    return {runtime: [row.to_json() for row in rows] for runtime, rows in latency.items()}


def latency_from_json(latency: Json) -> Latency:
    return {runtime: tuple(map(LatencyRow.from_json, rows)) for runtime, rows in latency.items()}


@dataclasses.dataclass(frozen=True)
class KernelParity:
    """ONNX Runtime's fused CPU kernels against the torch model (``ort_cpu``)."""

    accuracy: float
    agreement: float
    max_abs_error: float

    def to_json(self) -> Json:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Json) -> KernelParity:
        return cls(row["accuracy"], row["agreement"], row["max_abs_error"])


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One exported model checked and measured (a stage's ``export.json``): the graph as
    written against torch, the fused kernels, the file, and latency."""

    accuracy_torch: float
    accuracy_onnx: float
    onnx_agreement: float
    onnx_max_abs_error: float
    ort_cpu: KernelParity
    onnx_path: str  # relative to the run directory
    onnx_bytes: int
    latency_ms: Latency
    accuracy_qat: float | None = None  # a quantized model before BatchNorm folding
    warning: str | None = None  # why the fused kernels disagree, when they do

    def to_json(self) -> Json:
        out: Json = {
            "accuracy_torch": self.accuracy_torch,
            "accuracy_onnx": self.accuracy_onnx,
            "onnx_agreement": self.onnx_agreement,
            "onnx_max_abs_error": self.onnx_max_abs_error,
            "ort_cpu": self.ort_cpu.to_json(),
            "onnx_path": self.onnx_path,
            "onnx_bytes": self.onnx_bytes,
        }
        if self.accuracy_qat is not None:
            out["accuracy_qat"] = self.accuracy_qat
        if self.warning is not None:
            out["warning"] = self.warning
        out["latency_ms"] = latency_to_json(self.latency_ms)
        return out

    @classmethod
    def from_json(cls, row: Json) -> Measurement:
        return cls(
            accuracy_torch=row["accuracy_torch"],
            accuracy_onnx=row["accuracy_onnx"],
            onnx_agreement=row["onnx_agreement"],
            onnx_max_abs_error=row["onnx_max_abs_error"],
            ort_cpu=KernelParity.from_json(row["ort_cpu"]),
            onnx_path=row["onnx_path"],
            onnx_bytes=row["onnx_bytes"],
            latency_ms=latency_from_json(row["latency_ms"]),
            accuracy_qat=row.get("accuracy_qat"),
            warning=row.get("warning"),
        )


@dataclasses.dataclass(frozen=True)
class TeacherResult:
    arch: str  # the zoo name or the user's ``module:factory``
    accuracy: float

    def to_json(self) -> Json:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, row: Json) -> TeacherResult:
        return cls(row["arch"], row["accuracy"])


@dataclasses.dataclass(frozen=True)
class FloatReference:
    """The float student, exported and measured like the quantized ones."""

    name: str
    arch: str
    method: str  # its float method, or ``checkpoint`` for the user's trained weights
    measured: Measurement

    def to_json(self) -> Json:
        return {
            "name": self.name,
            "arch": self.arch,
            "method": self.method,
            **self.measured.to_json(),
        }

    @classmethod
    def from_json(cls, row: Json) -> FloatReference:
        return cls(row["name"], row["arch"], row["method"], Measurement.from_json(row))


@dataclasses.dataclass(frozen=True)
class StudentResult:
    """A quantized student; its warnings (fused kernels, a collapsed training) are listed in
    ``warnings``, and ``engine`` stays empty until a TensorRT engine is measured.
    ``layer_precision`` (the layers of a student whose layers run in more than one precision)
    is read from its ONNX file as the report is written (``bench.report.write_report``)."""

    name: str
    arch: str
    method: str
    bits: BitWidths
    measured: Measurement
    warnings: tuple[str, ...] = ()
    engine: Json | None = None
    layer_precision: tuple[Json, ...] | None = None

    def to_json(self) -> Json:
        out = {
            "name": self.name,
            "arch": self.arch,
            "method": self.method,
            "w_bits": self.bits.w,
            "a_bits": self.bits.a,
            **dataclasses.replace(self.measured, warning=None).to_json(),
            "warnings": list(self.warnings),
            "engine": self.engine,
        }
        if self.layer_precision is not None:
            out["layer_precision"] = list(self.layer_precision)
        return out

    @classmethod
    def from_json(cls, row: Json) -> StudentResult:
        return cls(
            name=row["name"],
            arch=row["arch"],
            method=row["method"],
            bits=BitWidths(row["w_bits"], row["a_bits"]),
            measured=Measurement.from_json(row),
            warnings=tuple(row["warnings"]),
            engine=row["engine"],
            layer_precision=tuple(row["layer_precision"]) if "layer_precision" in row else None,
        )


@dataclasses.dataclass(frozen=True)
class Environment:
    """Where the run trained and measured: the machine, threads, device, library versions."""

    machine: str
    threads: int  # torch's, for training
    onnxruntime_threads: int  # for latency; 0 = ONNX Runtime's default
    training_device: str
    training_processes: int
    versions: dict[str, str]  # package -> version
    # most training stages side by side (``jobs``); None in a report written before it existed
    stage_processes: int | None = None

    def to_json(self) -> Json:
        fields = dataclasses.asdict(self)
        versions = fields.pop("versions")
        if fields["stage_processes"] is None:
            del fields["stage_processes"]
        return {**fields, **versions}

    @classmethod
    def from_json(cls, row: Json) -> Environment:
        fields = [f for f in dataclasses.fields(cls) if f.name != "versions"]
        named = [f.name for f in fields]
        versions = {key: value for key, value in row.items() if key not in named}
        # a field with a default may be missing (a report written before the field existed)
        given = {
            f.name: row[f.name] for f in fields if f.name in row or f.default is dataclasses.MISSING
        }
        return cls(**given, versions=versions)


@dataclasses.dataclass(frozen=True)
class Report:
    """Everything ``report.json`` holds (accuracies are fractions of the test split)."""

    dataset: str
    test_samples: int
    num_classes: int
    class_names: list[str]
    preprocess: Preprocess
    input_shape: tuple[int, ...]
    target: Target
    teachers: tuple[TeacherResult, ...]
    data_free: bool  # the students never saw a training image
    float_references: tuple[FloatReference, ...]
    students: tuple[StudentResult, ...]
    timings_s: dict[str, float]  # stage -> wall time
    environment: Environment

    @property
    def teacher(self) -> TeacherResult:
        """The most accurate teacher, the one the report's table shows."""
        return max(self.teachers, key=lambda t: t.accuracy)

    def to_json(self) -> Json:
        return {
            "dataset": self.dataset,
            "test_samples": self.test_samples,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "preprocess": self.preprocess.to_dict(),
            "input_shape": list(self.input_shape),
            "target": self.target.value,
            "teacher": self.teacher.to_json(),
            "teachers": [t.to_json() for t in self.teachers],
            "data_free": self.data_free,
            "float_references": [r.to_json() for r in self.float_references],
            "students": [s.to_json() for s in self.students],
            "timings_s": dict(self.timings_s),
            "environment": self.environment.to_json(),
        }

    @classmethod
    def from_json(cls, report: Json) -> Report:
        return cls(
            dataset=report["dataset"],
            test_samples=report["test_samples"],
            num_classes=report["num_classes"],
            class_names=list(report["class_names"]),
            preprocess=Preprocess.from_dict(report["preprocess"]),
            input_shape=tuple(report["input_shape"]),
            target=Target.parse(report["target"]),
            teachers=tuple(map(TeacherResult.from_json, report["teachers"])),
            data_free=report["data_free"],
            float_references=tuple(map(FloatReference.from_json, report["float_references"])),
            students=tuple(map(StudentResult.from_json, report["students"])),
            timings_s=dict(report["timings_s"]),
            environment=Environment.from_json(report["environment"]),
        )
