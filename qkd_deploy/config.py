"""Typed configuration: dataclasses with defaults, loaded from YAML and ``key=value`` overrides.

Every field is reachable as a dotted key (``student.train.epochs=5``); an unknown key or a value
of the wrong type is one clear error naming the key.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qkd_deploy.bits import BitWidths
from qkd_deploy.errors import UserError


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 64
    optimizer: str = "sgd"  # "sgd" (momentum, Nesterov) or "adamw"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0  # linear warm-up, then cosine decay to 0
    grad_clip: float | None = None  # max global gradient norm per step (None: no clipping)

    def __post_init__(self) -> None:
        """A setting no run can use fails where the config is built, before any training
        (``from_dict`` puts the section's key in front of the message)."""
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.optimizer in ("sgd", "adamw"),
                f"optimizer {self.optimizer!r}: use 'sgd' or 'adamw'",
            ),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (
                self.grad_clip is None or self.grad_clip > 0,
                f"grad_clip must be a positive norm or null, got {self.grad_clip}",
            ),
        ]
        _check_all(checks)


@dataclass
class DataConfig:
    # digits | fashion-mnist[:DIR] | mnist:DIR | cifar10:DIR | cifar100:DIR | folder:DIR
    spec: str = "digits"
    image_size: int | None = None  # resize (folder images always; others only when set)
    normalize: str | None = (
        None  # "MEAN,STD" (per channel: "m1/m2/m3,s1/s2/s3"); None = train split stats
    )
    augment: bool = True
    calibration_size: int = 512
    train_limit: int | None = None  # a fixed stratified subset of the training split (budgets)
    workers: int | None = None  # processes decoding folder images (0: none; null: cores-1, <=4)

    def __post_init__(self) -> None:
        _check_all(
            [
                (
                    self.calibration_size >= 1,
                    f"calibration_size must be >= 1 image, got {self.calibration_size}",
                ),
                (
                    self.train_limit is None or self.train_limit >= 1,
                    f"train_limit must be >= 1 image or null (all), got {self.train_limit}",
                ),
                (
                    self.image_size is None or self.image_size >= 1,
                    f"image_size must be >= 1 pixel or null, got {self.image_size}",
                ),
            ]
        )


@dataclass
class TeacherConfig:
    """One teacher: a zoo architecture trained by the pipeline, or the user's own model."""

    arch: str | None = "resnet20"  # zoo model; null when module is set
    module: str | None = None  # "package.module:factory": the user's own teacher
    checkpoint: str | None = None  # its weights (weights_only torch.load)
    # the user teacher's stage layers (module names, shallowest first), for the methods that
    # distil stage feature maps (feed, indistill, ...); zoo teachers have their own stages
    feature_layers: list[str] | None = None

    def __post_init__(self) -> None:
        if self.module:
            self.arch = None  # the user's model replaces the zoo's
        _check_all(
            [
                (
                    bool(self.module or self.arch),
                    "a teacher's arch is null and its module unset; name a zoo model or your "
                    "own (module: 'package.module:factory')",
                )
            ]
        )


@dataclass
class StudentConfig:
    arch: str | None = "resnet8"  # zoo model; null when module is set
    # "package.module:factory": the user's own student (it replaces arch)
    module: str | None = None
    # the user student's trained float weights: the float stage evaluates and exports them
    # without training, and QAT starts from them
    checkpoint: str | None = None
    # the user student's stage layers (module names, shallowest first), for the methods that
    # distil stage feature maps (feed, indistill, cmt-kd, cdfkd-mfs)
    feature_layers: list[str] | None = None
    bits: list[str] = field(default_factory=lambda: ["w8a8", "w4a4"])
    method: str = "kd-decay"
    method_options: dict[str, Any] = field(default_factory=dict)
    float_reference: bool = True  # train the student in float first: QAT starts from it
    # how the float student trains: "none" on the labels alone, or distilled from the run's
    # teachers by a method that can train a float model (kd, kd-decay, avg-teachers, feed), with
    # its options in float_method_options; QAT then starts from that student
    float_method: str = "none"
    float_method_options: dict[str, Any] = field(default_factory=dict)
    float_train: TrainConfig = field(default_factory=TrainConfig)
    # QAT fine-tunes the trained float student: a few epochs at a low rate
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=5, lr=0.01, warmup_epochs=0.0)
    )
    # after QAT, recompute the final student's BatchNorm statistics on one more (augmented)
    # epoch of training images; data-free students, which never see them, skip it (ptq has its
    # own method option, on by default)
    bn_reestimate: bool = False
    # a student (or the float student) whose test accuracy ends below this fraction fails the
    # run (exit 1, every file kept); None: 5 points above chance; 0 accepts any accuracy
    min_accuracy: float | None = None

    def __post_init__(self) -> None:
        names = [BitWidths.parse(str(b)).name for b in self.bits]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if self.module:
            self.arch = None  # the user's model replaces the zoo's
        _check_all(
            [
                (
                    bool(self.module or self.arch),
                    "arch is null and module unset; name a zoo model or your own "
                    "(module: 'package.module:factory')",
                ),
                (
                    bool(self.module) or self.checkpoint is None,
                    "checkpoint needs its model: set student.module too (--student "
                    "MODULE:FACTORY --student-checkpoint PATH)",
                ),
                (
                    bool(self.module) or self.feature_layers is None,
                    "feature_layers names layers of your own student (student.module); a zoo "
                    "student has its stages",
                ),
                (
                    self.checkpoint is None or self.float_method == "none",
                    f"float_method={self.float_method} trains the float student, and checkpoint "
                    "gives it trained (the float stage does not train); set float_method to none",
                ),
                (bool(names), "bits names no student; give one or more, e.g. [w8a8, w4a4]"),
                (not repeated, f"bits names {repeated} more than once; give each student once"),
                (
                    self.min_accuracy is None or 0 <= self.min_accuracy <= 1,
                    f"min_accuracy is a fraction in [0, 1] or null, got {self.min_accuracy}",
                ),
            ]
        )
        self.bits = names


BUDGET_KINDS = {
    "drop": "accuracy points lost against the float student, at most",
    "size_kb": "kilobytes of weights, at most",
    "share": "fraction of the layers kept at higher precision, at most",
}


@dataclass(frozen=True)
class Budget:
    """``quant.budget`` parsed: ``drop:POINTS``, ``size_kb:KB`` or ``share:FRACTION``
    (``quant.budget`` chooses the layers within it)."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        kind, _, number = str(text).partition(":")
        kind = kind.strip().lower()
        try:
            value = float(number)
        except ValueError:
            value = math.nan
        if kind not in BUDGET_KINDS or not value >= 0 or (kind == "share" and value > 1):
            kinds = "; ".join(f"{k}:N ({v})" for k, v in BUDGET_KINDS.items())
            raise UserError(f"budget {text!r} not understood; write one of {kinds}, e.g. share:0.1")
        return cls(kind, value)


@dataclass
class QuantConfig:
    target: str = "tensorrt"  # "tensorrt" (signed INT8 Q/DQ) or "onnxruntime" (UINT8 post-ReLU)
    # tensorrt target: "skip" quantizes a residual Add's skip input only, so TensorRT fuses the
    # other input's Conv with the Add; "both" puts Q/DQ on both inputs (an extra INT8 kernel)
    residual_add_inputs: str = "skip"
    # place quantizers from the traced graph (torch.fx); false: quantize Conv2d/Linear only
    trace: bool = True
    first_last_bits: int | None = 8
    # fnmatch pattern -> "wXaY", or "float" (no Q/DQ: the layer runs in float)
    layer_bits: dict[str, str] = field(default_factory=dict)
    # choose layer_bits before QAT from the float student's per-layer sensitivity, within
    # "drop:POINTS" (accuracy drop), "size_kb:KB" (weights) or "share:FRACTION" (of layers
    # kept at higher precision); the choice is written into the run's config.yaml
    budget: str | None = None
    # 0: the budget measures the float student's layers alone, untrained; N: QAT epochs of the
    # uniform student before the budget measures what raising each layer is worth inside it
    budget_probe_epochs: int = 0
    learn_scales: bool = True  # LSQ; False keeps the calibrated step sizes fixed
    weight_calibrator: str = "mse"
    activation_calibrator: str = "percentile"
    percentile: float = 99.99

    def __post_init__(self) -> None:
        if self.budget is not None:
            Budget.parse(self.budget)  # a typo fails where the config is built
        _check_all(
            [
                (
                    self.budget_probe_epochs >= 0,
                    f"quant.budget_probe_epochs must be >= 0 (0: choose from the untrained "
                    f"float student), got {self.budget_probe_epochs}",
                )
            ]
        )


@dataclass
class ExportConfig:
    opset: int = 18  # 17 for TensorRT 8.6 (JetPack 6.0); INT4 weights make it 21
    int4_gemm_weights: bool = True  # Linear weights of <= 4 bits stored as INT4
    min_agreement: float = 0.99  # export fails when ONNX vs torch argmax agreement is lower

    def __post_init__(self) -> None:
        from onnx.defs import onnx_opset_version

        newest = onnx_opset_version()
        _check_all(
            [
                (
                    17 <= self.opset <= newest,
                    f"opset {self.opset}: the export writes opsets 17 (TensorRT 8.6) to {newest} "
                    "(the newest this onnx knows); the default 18 suits TensorRT 10",
                ),
                (
                    0 <= self.min_agreement <= 1,
                    f"min_agreement is a fraction in [0, 1], got {self.min_agreement}",
                ),
            ]
        )


def check_latency_settings(batch_sizes: list[int], warmup: int, iterations: int) -> None:
    """Batch sizes >= 1, warm-up >= 0 and iterations >= 1: anything else measures nothing."""
    bad = [b for b in batch_sizes if not isinstance(b, int) or b < 1]
    if not batch_sizes or bad:
        raise UserError(f"batch_sizes {bad or batch_sizes}: give whole numbers >= 1, e.g. 1,32")
    if warmup < 0:
        raise UserError(f"warmup must be >= 0, got {warmup}")
    if iterations < 1:
        raise UserError(f"iterations must be >= 1, got {iterations}")


@dataclass
class BenchConfig:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    warmup: int = 10
    iterations: int = 50
    threads: int = 0  # ONNX Runtime intra-op threads, 0 = ONNX Runtime's default

    def __post_init__(self) -> None:
        check_latency_settings(self.batch_sizes, self.warmup, self.iterations)
        if self.threads < 0:
            raise UserError(f"threads must be >= 0 (0: ONNX Runtime's default), got {self.threads}")


@dataclass
class Config:
    seed: int = 0
    out: str | None = None  # run directory; None = runs/<timestamp>
    progress: bool = True
    device: str = "auto"  # where models train: auto (a CUDA GPU if torch sees one), cpu, cuda:N
    # torch's CPU threads for training; 0 = chosen per run (qkd_deploy.train.threads: one for
    # images up to 32x32, else the idle cores); OMP_NUM_THREADS in the environment also sets it
    threads: int = 0
    # processes that train independent stages side by side on the CPU (the teachers beside a
    # float student trained on the labels; the low-bit students), one torch thread each; 0 = the
    # idle cores when the run trains at one thread, else 1
    jobs: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    # empty: the method's default teacher architectures, trained by the pipeline
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_train: TrainConfig = field(default_factory=TrainConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    bench: BenchConfig = field(default_factory=BenchConfig)

    def __post_init__(self) -> None:
        _check_all(
            [
                (self.threads >= 0, f"threads must be >= 0 (0: chosen), got {self.threads}"),
                (self.jobs >= 0, f"jobs must be >= 0 (0: chosen, 1: sequential), got {self.jobs}"),
                (
                    self.jobs <= 1 or self.threads <= 1,
                    f"jobs={self.jobs} trains stages side by side at one torch thread each (a "
                    f"forked process at more threads can hang in torch's OpenMP), but threads="
                    f"{self.threads}: set threads=1, or jobs=1 to train at {self.threads} threads "
                    f"one stage at a time",
                ),
            ]
        )


class _YamlLoader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where a float needs a dot: ``1e-4`` would load as the string
    ``"1e-4"`` and fail as a float setting. YAML 1.2 (and every user) reads it as a float."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_YamlLoader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where."""
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{problem}{where}"


def _check_all(checks: list[tuple[bool, str]]) -> None:
    """Raise the message of the first failed check (``from_dict`` puts the section's key in
    front of it): a setting no run can use fails where the config is built, before any
    training."""
    for ok, message in checks:
        if not ok:
            raise UserError(message)


def to_dict(config: Config) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(values: dict[str, Any], cls: type = Config, prefix: str = "") -> Any:
    """Build ``cls`` from nested dicts, checking keys and types."""
    if not isinstance(values, dict):
        raise UserError(f"config section {prefix or '<top>'!r} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        where = f" in {prefix!r}" if prefix else ""
        raise UserError(f"unknown config key(s) {unknown}{where}; valid keys: {sorted(names)}")
    kwargs = {}
    for name, value in values.items():
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = from_dict(value, hint, key)
        else:
            kwargs[name] = _coerce(value, hint, key)
    try:
        return cls(**kwargs)
    except UserError as error:  # a dataclass's own check names a field, not its section
        raise UserError(f"{prefix}.{error}" if prefix else str(error)) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides (values parsed as YAML)."""
    values: dict[str, Any] = {}
    if path:
        values = _read_yaml(Path(path))
    for item in overrides or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. student.train.epochs=5)")
        try:
            value = _parse_yaml(text)
        except yaml.YAMLError as error:
            raise UserError(
                f"override {item!r}: the value is not valid YAML ({_yaml_problem(error)}); "
                "quote a string value, e.g. --set 'data.spec=\"folder:my dir\"'"
            ) from None
        _set_dotted(values, key.strip(), value)
    merged = _merge(to_dict(Config()), values)
    return from_dict(merged)


def save_config(config: Config, path: Path) -> None:
    from qkd_deploy.fileio import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        values = _parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8 YAML") from None
    except OSError as error:
        raise UserError(f"config file {path} cannot be read ({error.strerror})") from None
    if not isinstance(values, dict):
        raise UserError(
            f"config file {path} must hold a mapping of sections (data:, student:, ...)"
        )
    return values


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if (
            isinstance(value, dict)
            and isinstance(merged.get(key), dict)
            and key
            not in (
                "method_options",
                "layer_bits",
            )
        ):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    node = values
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(
                f"config section {part!r} must be a mapping, got {node!r} (found while applying "
                f"the override {key!r})"
            )
    node[last] = value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, str, bool, optional, list, dict)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin is list:
        items = value if isinstance(value, list) else [value]
        if dataclasses.is_dataclass(args[0]):
            return [from_dict(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(items)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is Any or isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise UserError(f"config key {key!r} must be {getattr(hint, '__name__', hint)}, got {value!r}")
