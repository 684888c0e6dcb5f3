"""``report.json`` (schema in docs/design.md, stable keys) and its Markdown rendering."""

from __future__ import annotations

import json
from pathlib import Path

from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_json, atomic_write_text


def load_report(path: str | Path) -> dict:
    """A run's ``report.json``, given the run directory or the file itself."""
    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file} not found; give a finished run's directory or its report.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{file} is not valid JSON ({error})") from error


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
        for warning in student_warnings(s):
            lines.append(f"- **warning**: {warning}")
    return "\n".join(lines) + "\n"


def student_warnings(student: dict) -> list[str]:
    old_single = [student["warning"]] if "warning" in student else []  # reports before the list
    return student.get("warnings", old_single)


def write_report(run_dir: Path, report: dict) -> None:
    atomic_write_json(run_dir / "report.json", report)
    atomic_write_text(run_dir / "report.md", render_markdown(report))


def _training_device(env: dict) -> str:
    """``cpu``, ``cuda:0 (GPU)``, or ``... x N processes`` for a torchrun run."""
    device, processes = env.get("training_device", "cpu"), env.get("training_processes", 1)
    return device if processes == 1 else f"{device} x {processes} processes"
