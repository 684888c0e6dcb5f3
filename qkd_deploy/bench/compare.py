"""``qkd-deploy compare BASE NEW``: catch a regression between two runs before it ships.

Models are matched by name (``student_float``, ``resnet8_w4a4``, ...) in two runs on the same
test data. For each, the exported model's accuracy (``accuracy_onnx``) and its p50 latency at
every (runtime, batch) both runs measured are compared. A regression is an accuracy drop of more
than ``max_accuracy_drop`` points, a p50 latency more than ``max_latency_increase`` (a fraction)
above the base's (only when that fraction is given: one run's latencies on a shared CPU vary by
a third from run to run, measured: 2.33 and 3.09 ms p50 for the same W8A8 model at batch 32),
or a model the new run no longer has. Latency is judged only when both runs measured on the
same machine description: times from two machines say nothing about the code.

Torch-free (``report.json`` files only), so it runs on the device and in CI alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from qkd_deploy.bench.report import exported_models, load_report
from qkd_deploy.errors import UserError


@dataclasses.dataclass
class Change:
    """One compared quantity of one model."""

    model: str
    quantity: str  # "accuracy %" or "p50 ms <runtime> b<batch>"
    base: float | None
    new: float | None
    regression: bool
    note: str = ""


def p50_latencies(model: dict) -> dict[tuple[str, int], float]:
    """``(runtime, batch) -> p50 ms`` from the model's ``latency_ms`` and, when an engine was
    built and measured, the engine's."""
    sources = [model.get("latency_ms") or {}]
    engine = model.get("engine")
    if isinstance(engine, dict):
        sources.append(engine.get("latency_ms") or {})
    return {
        (runtime, row["batch"]): row["p50"]
        for source in sources
        for runtime, rows in source.items()
        for row in rows
    }


def compare_reports(
    base: dict, new: dict, max_accuracy_drop: float, max_latency_increase: float | None
) -> list[Change]:
    """The changes from ``base`` to ``new`` (see the module docstring for what regresses)."""
    data = [(r.get("dataset"), r.get("test_samples")) for r in (base, new)]
    if data[0] != data[1]:
        raise UserError(
            f"the runs were measured on different test data ({data[0][0]}, {data[0][1]} images "
            f"vs {data[1][0]}, {data[1][1]}); compare runs of one data set"
        )
    if max_latency_increase is None:
        latency_note = "not judged (give --max-latency-increase)"
    elif _machine(base) != _machine(new):
        latency_note = "other machine: not judged"
    elif _latency_threads(base) != _latency_threads(new):
        latency_note = "other ONNX Runtime thread count: not judged"
    else:
        latency_note = ""
    base_models, new_models = exported_models(base), exported_models(new)
    changes = []
    for name, before in base_models.items():
        after = new_models.get(name)
        if after is None:
            changes.append(Change(name, "model", None, None, True, "missing in the new run"))
            continue
        # rounded: 100 * (0.9 - 0.895) is 0.5000000000000004, a drop of exactly the tolerance
        drop = round(100 * (before["accuracy_onnx"] - after["accuracy_onnx"]), 9)
        changes.append(
            Change(
                name,
                "accuracy %",
                100 * before["accuracy_onnx"],
                100 * after["accuracy_onnx"],
                drop > max_accuracy_drop,
            )
        )
        old_times, new_times = p50_latencies(before), p50_latencies(after)
        for key in sorted(old_times.keys() & new_times.keys()):
            slower = not latency_note and (
                new_times[key] > old_times[key] * (1 + max_latency_increase)
            )
            changes.append(
                Change(
                    name,
                    f"p50 ms {key[0]} b{key[1]}",
                    old_times[key],
                    new_times[key],
                    slower,
                    latency_note,
                )
            )
    for name in new_models.keys() - base_models.keys():
        changes.append(Change(name, "model", None, None, False, "new in this run"))
    return changes


def _machine(report: dict) -> str | None:
    return (report.get("environment") or {}).get("machine")


def _latency_threads(report: dict) -> int | None:
    return (report.get("environment") or {}).get("onnxruntime_threads")


def markdown(changes: list[Change]) -> str:
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    lines = [
        "| model | quantity | base | new | change | |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for c in changes:
        delta = "-" if c.base is None or c.new is None else f"{c.new - c.base:+.3f}"
        verdict = "**REGRESSION**" if c.regression else ""
        note = "; ".join(part for part in (verdict, c.note) if part)
        lines.append(
            f"| {c.model} | {c.quantity} | {cell(c.base)} | {cell(c.new)} | {delta} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy compare",
        description="compare two runs' exported models; exit 1 on a regression",
    )
    p.add_argument("base", help="the reference run (directory or report.json)")
    p.add_argument("new", help="the run to check")
    p.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=0.5,
        help="points of ONNX accuracy a model may lose (default 0.5)",
    )
    p.add_argument(
        "--max-latency-increase",
        type=float,
        help="fraction a p50 latency may grow on the same machine, e.g. 0.5 (default: latency "
        "is shown, not judged; one run's timings are noisy)",
    )
    p.add_argument("--json", action="store_true", help="print the changes as JSON")
    args = p.parse_args(argv)
    if args.max_accuracy_drop < 0 or (args.max_latency_increase or 0) < 0:
        raise UserError("--max-accuracy-drop and --max-latency-increase must be >= 0")
    changes = compare_reports(
        load_report(args.base),
        load_report(args.new),
        args.max_accuracy_drop,
        args.max_latency_increase,
    )
    if args.json:
        print(json.dumps([dataclasses.asdict(c) for c in changes], indent=2))
    else:
        print(markdown(changes))
    regressions = [c for c in changes if c.regression]
    if regressions and not args.json:
        print(f"\n{len(regressions)} regression(s)")
    return 1 if regressions else 0
