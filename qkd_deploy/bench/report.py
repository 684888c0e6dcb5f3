"""``report.json`` (schema in docs/design.md, stable keys) and its Markdown rendering.

``load_report`` checks the keys its reader uses before anything reads them: every key present
must have its type, and the keys a reader needs must be there (``COMPARED`` for compare,
``RENDERED`` for the report command, ``BUNDLED`` for bundle). Keys a later version added are
never required, so the reports of older versions still load (``layer_precision``, the layers of
a mixed-precision student, is one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qkd_deploy.bench.layer_precision import is_mixed, layer_precision, summary
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json, atomic_write_text, load_onnx_graph

MAX_REPORT_BYTES = 64 * 2**20  # a run's report.json is a few KB
NUMBER = (int, float)
REPORT_FIX = (
    "give the report.json of a finished qkd-deploy run (an edited or foreign file cannot be "
    "read; qkd-deploy export RUN_DIR writes a run's report again)"
)
# key -> type, wherever the key appears (whether it must be there: ``Needs``)
TOP_TYPES = {
    "dataset": str,
    "test_samples": int,
    "num_classes": int,
    "class_names": list,
    "preprocess": dict,
    "target": str,
    "teacher": dict,
    "float_references": list,
    "students": list,
    "environment": dict,
}
MODEL_TYPES = {
    "name": str,
    "arch": str,
    "method": str,
    "w_bits": int,
    "a_bits": int,
    "accuracy_torch": NUMBER,
    "accuracy_onnx": NUMBER,
    "onnx_agreement": NUMBER,
    "onnx_max_abs_error": NUMBER,
    "onnx_path": str,
    "onnx_bytes": int,
    "ort_cpu": dict,
    "latency_ms": dict,
    "engine": (dict, type(None)),
    "warnings": list,
    "warning": str,
    "layer_precision": list,  # a student whose layers run in more than one precision
}
TEACHER_TYPES = {"arch": str, "accuracy": NUMBER}
ENVIRONMENT_TYPES = {
    "machine": str,
    "onnxruntime_threads": int,
    "training_device": str,
    "training_processes": int,
    "stage_processes": int,
}
ROW_TYPES = {"batch": int, "p50": NUMBER, "p90": NUMBER}


@dataclass(frozen=True)
class Needs:
    """The keys a reader of a report needs."""

    top: tuple[str, ...] = ("students",)
    teacher: tuple[str, ...] = ()
    model: tuple[str, ...] = ("name", "accuracy_onnx")  # float references and students
    student: tuple[str, ...] = ()
    reference: tuple[str, ...] = ()
    latency_row: tuple[str, ...] = ("batch", "p50")


COMPARED = Needs()
RENDERED = Needs(
    top=("dataset", "teacher", "students"),
    teacher=("arch", "accuracy"),
    student=(
        "method",
        "w_bits",
        "a_bits",
        "accuracy_torch",
        "onnx_agreement",
        "onnx_max_abs_error",
        "onnx_path",
        "onnx_bytes",
        "latency_ms",
    ),
    reference=("arch", "accuracy_torch", "onnx_bytes", "latency_ms"),
    latency_row=("batch", "p50", "p90"),
)
BUNDLED = Needs(
    top=("dataset", "class_names", "preprocess", "students"),
    student=("method", "w_bits", "a_bits", "accuracy_torch", "onnx_agreement", "onnx_path"),
)


def load_report(path: str | Path, needs: Needs = COMPARED) -> dict:
    """A run's ``report.json``, given the run directory or the file itself; one UserError
    naming the file when it is not a report that a reader with ``needs`` can read."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} not found; give a finished run's directory or its report.json")
    size = file.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise UserError(f"{file} is {size} bytes, too large for a report.json; {REPORT_FIX}")
    try:
        report = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{file} is not valid JSON ({error}); {REPORT_FIX}") from error
    except RecursionError:  # nested deeper than the JSON parser follows
        raise UserError(f"{file} is nested too deeply for a report.json; {REPORT_FIX}") from None
    _check_report(report, needs, file)
    return report


def _check_report(report: Any, needs: Needs, file: Path) -> None:
    _check_keys(report, TOP_TYPES, needs.top, "the report", file)
    _check_keys(report.get("environment") or {}, ENVIRONMENT_TYPES, (), "environment", file)
    if "teacher" in report:
        _check_keys(report["teacher"], TEACHER_TYPES, needs.teacher, "teacher", file)
    for group, required in (("float_references", needs.reference), ("students", needs.student)):
        for index, model in enumerate(report.get(group, [])):
            where = f"{group}[{index}]"
            _check_model(model, (*needs.model, *required), needs.latency_row, where, file)


def _check_model(
    model: Any, required: tuple[str, ...], row_keys: tuple[str, ...], where: str, file: Path
) -> None:
    _check_keys(model, MODEL_TYPES, required, where, file)
    _check_latency(model.get("latency_ms") or {}, row_keys, f"{where}.latency_ms", file)
    engine = model.get("engine") or {}
    engine_latency = _typed(engine, "latency_ms", dict, f"{where}.engine", file) or {}
    _check_latency(engine_latency, row_keys, f"{where}.engine.latency_ms", file)
    for index, warning in enumerate(model.get("warnings", [])):
        if not isinstance(warning, str):
            raise UserError(f"{file}: {where}.warnings[{index}] is not text; {REPORT_FIX}")


def _check_latency(latency: dict, row_keys: tuple[str, ...], where: str, file: Path) -> None:
    """``{runtime: [{"batch": 1, "p50": ms, "p90": ms}, ...]}``."""
    for runtime, rows in latency.items():
        if not isinstance(rows, list):
            raise UserError(f"{file}: {where}.{runtime} is not a list of rows; {REPORT_FIX}")
        for index, row in enumerate(rows):
            _check_keys(row, ROW_TYPES, row_keys, f"{where}.{runtime}[{index}]", file)


def _check_keys(
    value: Any, types: dict[str, Any], required: tuple[str, ...], where: str, file: Path
) -> None:
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise UserError(f"{file}: {where} is a JSON {kind}, not an object; {REPORT_FIX}")
    missing = [key for key in required if key not in value]
    if missing:
        raise UserError(f"{file}: {where} lacks {', '.join(map(repr, missing))}; {REPORT_FIX}")
    for key, kind in types.items():
        _typed(value, key, kind, where, file)


def _typed(value: dict, key: str, kind: Any, where: str, file: Path) -> Any:
    """``value[key]`` (None when absent) after checking its type (a bool is not a number)."""
    if key not in value:
        return None
    item = value[key]
    if not isinstance(item, kind) or (isinstance(item, bool) and kind in (int, NUMBER)):
        shown = json.dumps(item)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise UserError(f"{file}: {where}.{key} is {shown}, not {_type_names(kind)}; {REPORT_FIX}")
    return item


def _type_names(kind: Any) -> str:
    if kind == NUMBER:
        return "a number"
    names = {str: "text", int: "a whole number", dict: "an object", list: "a list"}
    names[type(None)] = "null"
    return " or ".join(names[k] for k in (kind if isinstance(kind, tuple) else (kind,)))


def exported_models(report: dict) -> dict[str, dict]:
    """Every exported model of a report by name: float references, then students."""
    return {m["name"]: m for m in report.get("float_references", []) + report.get("students", [])}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def _latency_cell(latency: dict, batch: int) -> str:
    for row in latency.get("onnxruntime_cpu", []):
        if row["batch"] == batch:
            return f"{row['p50']:.3f} / {row['p90']:.3f}"
    return "-"


def _ort_cpu_accuracy(model: dict) -> str:
    return _pct(model.get("ort_cpu", {}).get("accuracy"))


def _float_method(reference: dict) -> str:
    """How the float student trained: "-" on the labels alone (reports before
    ``student.float_method`` have no key), else the method it was distilled with."""
    method = reference.get("method", "none")
    return "-" if method == "none" else method


def summary_table(report: dict) -> str:
    """A Markdown table: one row per model (teacher, float references, students)."""
    measured = report.get("float_references", []) + report["students"]
    batches = sorted(
        {r["batch"] for m in measured for r in m.get("latency_ms", {}).get("onnxruntime_cpu", [])}
    )
    head = ["model", "method", "bits", "acc torch %", "acc onnx %", "agreement %"]
    head += ["acc ORT CPU %", "onnx KiB"]
    head += [f"ORT b{b} p50/p90 ms" for b in batches]
    rows = [head, ["---"] * len(head)]
    teacher = report["teacher"]
    rows.append(
        [f"teacher {teacher['arch']}", "-", "float", _pct(teacher["accuracy"]), "-", "-", "-", "-"]
        + ["-"] * len(batches)
    )
    for ref in report.get("float_references", []):
        rows.append(
            [
                f"{ref['name']} {ref['arch']}",
                _float_method(ref),
                "float",
                _pct(ref["accuracy_torch"]),
                _pct(ref.get("accuracy_onnx")),
                "-",
                _ort_cpu_accuracy(ref),
                f"{ref['onnx_bytes'] / 1024:.1f}",
            ]
            + [_latency_cell(ref["latency_ms"], b) for b in batches]
        )
    for s in report["students"]:
        rows.append(
            [
                s["name"],
                s["method"],
                f"w{s['w_bits']}a{s['a_bits']}",
                _pct(s["accuracy_torch"]),
                _pct(s["accuracy_onnx"]),
                _pct(s["onnx_agreement"]),
                _ort_cpu_accuracy(s),
                f"{s['onnx_bytes'] / 1024:.1f}",
            ]
            + [_latency_cell(s["latency_ms"], b) for b in batches]
        )
    return "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows)


def onnxruntime_threads(environment: dict) -> str:
    """How many threads ONNX Runtime measured latency with (``bench.threads``)."""
    threads = environment.get("onnxruntime_threads")
    if threads is None:  # a report from before the key: its thread count is unknown
        return "threads not recorded"
    return "ONNX Runtime's default threads" if threads == 0 else f"{threads} threads"


def render_markdown(report: dict) -> str:
    env = report.get("environment", {})
    lines = [
        f"# qkd-deploy report: {report['dataset']}",
        "",
        f"Test split: {report.get('test_samples', '?')} images. Accuracies in %, latency in ms per "
        f"batch (ONNX Runtime CPU, {onnxruntime_threads(env)}). acc onnx: the exported "
        "graph as written (ONNX Runtime, graph optimizations off); agreement: its argmax vs the "
        "torch fake-quant model on the test split. acc ORT CPU: ONNX Runtime's fused integer "
        "kernels on this machine (they round a tensorrt-target model's biases to INT32 and "
        "saturate on x86 CPUs without VNNI).",
        "",
        summary_table(report),
        "",
        f"Machine: {env.get('machine', '?')}; trained on {_training_device(env)}; "
        f"torch {env.get('torch', '?')}, onnxruntime {env.get('onnxruntime', '?')}.",
        "",
    ]
    for s in report["students"]:
        lines.append(
            f"- `{s['name']}`: max |logit| error ONNX vs torch {s['onnx_max_abs_error']:.4g}, "
            f"file `{s['onnx_path']}`"
        )
        if s.get("layer_precision"):
            lines.append(f"  - per-layer precision: {_precision_summary(s['layer_precision'])}")
        for warning in student_warnings(s):
            lines.append(f"- **warning**: {warning}")
    return "\n".join(lines) + "\n"


def _precision_summary(layers: list) -> str:
    """``layer_precision`` in one line; entries that are not layers (an edited file) are left
    out."""
    pairs = [
        (str(layer.get("module") or layer.get("node")), str(layer.get("precision")))
        for layer in layers
        if isinstance(layer, dict)
    ]
    return summary(pairs)


def add_layer_precision(run_dir: Path, report: dict) -> None:
    """Give each student whose layers run in more than one precision ``layer_precision``: its
    layers (``bench.layer_precision``), read from its ONNX file; a student whose file is gone
    keeps what the report had."""
    for student in report["students"]:
        path = run_dir / student.get("onnx_path", "")
        if not path.is_file():
            continue
        rows = layer_precision(load_onnx_graph(path))
        student.pop("layer_precision", None)
        if is_mixed(rows):
            student["layer_precision"] = [row.to_dict() for row in rows]


def student_warnings(student: dict) -> list[str]:
    old_single = [student["warning"]] if "warning" in student else []  # reports before the list
    return student.get("warnings", old_single)


def write_report(run_dir: Path, report: dict) -> None:
    """``report.json`` and ``report.md``, with the students' per-layer precision."""
    add_layer_precision(run_dir, report)
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))


def _training_device(env: dict) -> str:
    """``cpu``, ``cuda:0 (GPU)``, ``... x N processes`` for a torchrun run, ``..., up to N
    stages side by side`` for a run whose stages trained in parallel (``jobs``)."""
    device, processes = env.get("training_device", "cpu"), env.get("training_processes", 1)
    described = device if processes == 1 else f"{device} x {processes} processes"
    stages = env.get("stage_processes", 1)
    return described if stages == 1 else f"{described}, up to {stages} stages side by side"
