"""Speed targets: INT8 ONNX speed in ONNX Runtime (CPU); file sizes are listed, not checked.

For each network: the float ONNX, our W8A8 export for each target (`onnxruntime`: UINT8
post-ReLU activations; `tensorrt`: signed INT8 only, conv branches of residual adds unquantized)
and ONNX Runtime's own `quantize_static` QDQ model of the same float network (its CPU defaults:
UINT8 activations, INT8 per-channel weights, MinMax calibration on the same images). Latency is
ONNX Runtime CPU p50 per batch, all models measured in the same process, one after another.
Speed does not depend on what the weights are, so the networks are freshly initialised and
calibrated on random images. Also counted: convolutions ONNX Runtime runs as integer kernels.

    python benchmarks/export_speed.py [--rounds 7] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from ort_baseline import ort_quantize_static
from results_io import machine_line, targets_table, write_results
from torch import nn

from qkd_deploy.bench.latency import measure_latency
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.export.onnx import INPUT_NAME, export_onnx
from qkd_deploy.models import build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

NETWORKS = {  # name -> (zoo arch, input C, H, W, timed runs per round and batch)
    "resnet18 (64-512 ch, 3x32x32)": ("resnet18", (3, 32, 32), 20),
    "default student resnet8 (1x8x8)": ("resnet8", (1, 8, 8), 300),
}


def integer_convs(path: Path) -> tuple[int, int]:
    """(convs ONNX Runtime runs as integer kernels, all convs) after its graph optimizations."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    integer = ops.count("QLinearConv") + ops.count("ConvInteger")
    return integer, integer + ops.count("Conv") + ops.count("FusedConv")


def build_variants(arch: str, shape: tuple[int, int, int], folder: Path) -> dict[str, Path]:
    torch.manual_seed(0)
    model: nn.Module = build_model(arch, shape[0], 10).eval()
    images = torch.randn(128, *shape)
    paths = {"float": export_onnx(model, images, folder / "float.onnx")}
    for target in ("onnxruntime", "tensorrt"):
        q = quantize_model(model, QuantizeOptions(BitWidths(8, 8), target=target))
        calibrate(q, [images[:64], images[64:]])
        paths[f"ours int8 ({target} target)"] = export_onnx(
            to_deploy(q.eval()), images, folder / f"ours_{target}.onnx"
        )
    paths["onnxruntime quantize_static"] = ort_quantize_static(
        paths["float"], folder / "ort_static.onnx", images.numpy(), INPUT_NAME, "MinMax", 16
    )
    return paths


def measure(paths: dict[str, Path], shape, iterations: int, rounds: int) -> dict[str, dict]:
    """Latency of every model, in ``rounds`` interleaved rounds (model A, B, C, A, B, C, ...):
    a slow spell of the machine then hits every model alike. Reported: the median over rounds
    of each round's p50 / p90 / mean."""
    sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    runners = {name: OnnxRuntimeRunner(path) for name, path in paths.items()}
    per_round: dict[str, list[list[dict]]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, runner in runners.items():
            per_round[name].append(
                measure_latency(runner, sample, [1, 32], warmup=20, iterations=iterations)
            )
    rows = {}
    for name, path in paths.items():
        fused, convs = integer_convs(path)
        rows[name] = {
            "latency_ms": _median_over_rounds(per_round[name]),
            "bytes": path.stat().st_size,
            "integer_convs": f"{fused}/{convs}",
        }
    return rows


def _median_over_rounds(rounds: list[list[dict]]) -> list[dict]:
    return [
        {"batch": entries[0]["batch"]}
        | {k: round(float(np.median([e[k] for e in entries])), 4) for k in ("p50", "p90", "mean")}
        for entries in zip(*rounds, strict=True)
    ]


def p50(row: dict, batch: int) -> float:
    return next(r["p50"] for r in row["latency_ms"] if r["batch"] == batch)


def targets(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for net, rows in results.items():
        ours, static = rows["ours int8 (onnxruntime target)"], rows["onnxruntime quantize_static"]
        for b in (1, 32):
            ratio = p50(ours, b) / p50(static, b)
            checks.append(
                (
                    f"{net}: ours / quantize_static latency <= 1.05 at batch {b}",
                    ratio <= 1.05,
                    f"{ratio:.2f}",
                )
            )
        speedup = p50(rows["float"], 32) / p50(ours, 32)
        goal = 1.6 if net.startswith("resnet18") else 1.0
        checks.append(
            (
                f"{net}: float / ours (onnxruntime target) at batch 32 >= {goal}",
                speedup >= goal,
                f"{speedup:.2f}x",
            )
        )
        trt = p50(rows["float"], 32) / p50(rows["ours int8 (tensorrt target)"], 32)
        checks.append(
            (f"{net}: float / ours (tensorrt target) at batch 32 (reported)", True, f"{trt:.2f}x")
        )
    return checks


def markdown(results: dict, checks: list, args: argparse.Namespace) -> str:
    lines = [
        "# INT8 ONNX speed in ONNX Runtime (CPU)",
        "",
        machine_line(),
        f"ONNX Runtime CPU, all cores; per batch (ms): median over {args.rounds} interleaved "
        "rounds of the p50 of "
        + ", ".join(f"{n} runs ({net.split()[0]})" for net, (*_, n) in NETWORKS.items())
        + ".",
        "",
    ]
    for net, rows in results.items():
        lines += [
            f"## {net}",
            "",
            "| model | batch 1 ms | batch 32 ms | integer convs | KiB |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {p50(row, 1):.3f} | {p50(row, 32):.3f} | "
                f"{row['integer_convs']} | {row['bytes'] / 1024:.0f} |"
            )
        lines.append("")
    lines += targets_table(checks)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds over the models")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for net, (arch, shape, iterations) in NETWORKS.items():
            folder = Path(tmp) / arch
            folder.mkdir()
            paths = build_variants(arch, shape, folder)
            results[net] = measure(paths, shape, iterations, args.rounds)
    checks = targets(results)
    text = markdown(results, checks, args)
    write_results(args.out, "export_speed", {"results": results}, checks, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
