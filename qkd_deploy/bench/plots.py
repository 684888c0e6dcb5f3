"""A run's report as a picture: `report.png` beside `report.json` (`qkd-deploy report --plot`).

Left: the test accuracy of every exported model (float student and each low-bit student), with
the teacher as a line. Right: each model's ONNX Runtime p50 latency per batch size. matplotlib is
optional (``pip install 'qkd-deploy[plots]'``) and imported only here.
"""

from __future__ import annotations

import io
from pathlib import Path

from qkd_deploy.bench.report import exported_models
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import atomic_write_bytes

RUNTIME = "onnxruntime_cpu"


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise UserError(
            "plots need matplotlib: pip install 'qkd-deploy[plots]' (or pip install matplotlib)"
        ) from error
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_report(report: dict, path: Path) -> Path:
    """Draw ``report`` into the PNG file ``path`` (written atomically); returns ``path``."""
    plt = _pyplot()
    models = exported_models(report)
    names = list(models)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    accuracies = [100 * models[n]["accuracy_onnx"] for n in names]
    bars = left.bar(names, accuracies, color="tab:blue")
    left.bar_label(bars, fmt="%.2f", fontsize=8)
    teacher = report.get("teacher") or {}
    if "accuracy" in teacher:
        left.axhline(100 * teacher["accuracy"], color="tab:red", linestyle="--")
        left.annotate(
            f"teacher {teacher.get('arch', '')} {100 * teacher['accuracy']:.2f}",
            (0, 100 * teacher["accuracy"]),
            textcoords="offset points",
            xytext=(0, 4),
            color="tab:red",
            fontsize=8,
        )
    floor = min(accuracies + [100 * teacher.get("accuracy", 1.0)])
    left.set_ylim(max(0.0, floor - 5), 100.5)
    left.set_ylabel("ONNX test accuracy %")
    left.set_title(f"{report.get('dataset', '')}: accuracy of the exported models")
    left.tick_params(axis="x", labelrotation=20)
    _latency_panel(right, models)
    fig.suptitle(f"target {report.get('target', '?')}, {len(names)} exported models")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _latency_panel(axis, models: dict[str, dict]) -> None:
    """Grouped bars: one group per model, one bar per measured batch size (log scale)."""
    rows = {
        n: {r["batch"]: r["p50"] for r in (m.get("latency_ms") or {}).get(RUNTIME, [])}
        for n, m in models.items()
    }
    batches = sorted({b for r in rows.values() for b in r})
    if not batches:
        axis.text(0.5, 0.5, "no latency measured", ha="center", va="center")
        axis.set_axis_off()
        return
    width = 0.8 / len(batches)
    for j, batch in enumerate(batches):
        xs = [i + (j - (len(batches) - 1) / 2) * width for i in range(len(rows))]
        values = [rows[n].get(batch, float("nan")) for n in rows]
        axis.bar(xs, values, width, label=f"batch {batch}")
    axis.set_xticks(range(len(rows)), list(rows), rotation=20)
    axis.set_yscale("log")
    axis.set_ylabel("p50 latency ms (log)")
    axis.set_title("ONNX Runtime CPU latency")
    axis.legend(fontsize=8)
