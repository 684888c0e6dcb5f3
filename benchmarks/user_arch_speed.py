"""Networks written as torchvision writes them, quantized with placement from the traced graph:
ONNX Runtime CPU speed of the `onnxruntime` export and the TensorRT lint of the `tensorrt` one.

ResNet-18 and MobileNetV2 exactly as torchvision lays them out (`out += identity`,
`x + self.conv(x)`, in-place ReLUs, functional pooling, `torch.flatten`; the code is in
`tests/support/torchvision_style.py`), freshly initialised (speed does not depend on the weights),
3x224x224, 1000 classes. For each: the float ONNX, our W8A8 `onnxruntime` export and ONNX
Runtime's own `quantize_static` of the same float model (QDQ, UINT8 activations, per-channel
INT8 weights, MinMax on the same random calibration images), timed at batch 8 in interleaved
rounds (ONNX Runtime CPU, all cores). Counted in ONNX Runtime's optimized graph: convolutions
run as QLinearConv and residual adds run as QLinearAdd. Our W8A8 `tensorrt` export (opset 17)
goes through `qkd-deploy lint --strict`, and every residual Add must read a quantized skip input.

    python benchmarks/user_arch_speed.py [--rounds 5] [--iterations 10] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from export_speed import _median_over_rounds
from ort_baseline import ort_quantize_static
from results_io import machine_line, targets_table, write_results
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests package
from qkd_deploy.bench.latency import measure_latency  # noqa: E402
from qkd_deploy.calib.calibrate import calibrate  # noqa: E402
from qkd_deploy.deploy import lint  # noqa: E402
from qkd_deploy.export.onnx import INPUT_NAME, export_onnx  # noqa: E402
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model  # noqa: E402
from qkd_deploy.quant.integer import to_deploy  # noqa: E402
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner  # noqa: E402
from tests.support.torchvision_style import mobilenet_v2, resnet18  # noqa: E402

NETWORKS = {"ResNet-18": resnet18, "MobileNetV2": mobilenet_v2}
SHAPE = (3, 224, 224)
BATCH = 8
CALIBRATION_IMAGES = 16
FLOAT, OURS, STATIC = "float", "ours int8 (onnxruntime target)", "onnxruntime quantize_static"


def optimized_ops(path: Path) -> list[str]:
    """Op types of ONNX Runtime's optimized graph of ``path`` (CPU, all optimizations)."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.log_severity_level = 3
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


def residual_adds(model: nn.Module) -> int:
    """Residual adds of a torchvision ResNet/MobileNetV2: one per block that keeps its input."""
    return sum(
        getattr(m, "use_res_connect", False) or type(m).__name__ == "BasicBlock"
        for m in model.modules()
    )


def build(name: str, folder: Path) -> tuple[dict[str, Path], Path, dict]:
    """(timed models, the tensorrt export, counts of the float network)."""
    torch.manual_seed(0)
    model = NETWORKS[name]().eval()
    images = torch.randn(CALIBRATION_IMAGES, *SHAPE, generator=torch.Generator().manual_seed(1))
    paths = {FLOAT: export_onnx(model, images, folder / "float.onnx")}
    exports = {}
    for target, opset in (("onnxruntime", 18), ("tensorrt", 17)):
        q = quantize_model(model, QuantizeOptions(BitWidths(8, 8), target=target))
        calibrate(q, [images[:8], images[8:]])
        exports[target] = export_onnx(
            to_deploy(q.eval()), images, folder / f"ours_{target}.onnx", opset=opset
        )
    paths[OURS] = exports["onnxruntime"]
    paths[STATIC] = ort_quantize_static(
        paths[FLOAT], folder / "ort_static.onnx", images.numpy(), INPUT_NAME, "MinMax", 8
    )
    counts = {
        "convs": sum(isinstance(m, nn.Conv2d) for m in model.modules()),
        "residual_adds": residual_adds(model),
    }
    return paths, exports["tensorrt"], counts


def measure(paths: dict[str, Path], iterations: int, rounds: int) -> dict[str, dict]:
    sample = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
    runners = {name: OnnxRuntimeRunner(path) for name, path in paths.items()}
    per_round: dict[str, list[list[dict]]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, runner in runners.items():
            per_round[name].append(
                measure_latency(runner, sample, [BATCH], warmup=3, iterations=iterations)
            )
    rows = {}
    for name, path in paths.items():
        ops = optimized_ops(path)
        rows[name] = {
            "p50_ms": _median_over_rounds(per_round[name])[0]["p50"],
            "QLinearConv": ops.count("QLinearConv"),
            "float_convs": ops.count("Conv") + ops.count("FusedConv"),
            "QLinearAdd": ops.count("QLinearAdd"),
            "float_adds": ops.count("Add"),
        }
    return rows


def tensorrt_check(path: Path) -> dict:
    """``qkd-deploy lint --strict`` exit status and output; residual Adds whose skip input is
    quantized (one input a DequantizeLinear, the other a Conv or a DequantizeLinear)."""
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        status = lint.main([str(path), "--strict"])
    graph = onnx.load(path).graph
    producers = {o: n.op_type for n in graph.node for o in n.output}
    adds = [
        sorted(producers.get(i, "input") for i in n.input) for n in graph.node if n.op_type == "Add"
    ]
    quantized = [k in (["Conv", "DequantizeLinear"], ["DequantizeLinear"] * 2) for k in adds]
    return {
        "lint_strict_exit": status,
        "lint_output": output.getvalue().strip(),
        "adds": len(adds),
        "adds_with_quantized_skip": sum(quantized),
    }


def targets(results: dict) -> list[tuple[str, bool, str]]:
    checks = []
    for net, r in results.items():
        rows, counts, trt = r["latency"], r["counts"], r["tensorrt"]
        ours, static, float_ = rows[OURS]["p50_ms"], rows[STATIC]["p50_ms"], rows[FLOAT]["p50_ms"]
        checks += [
            (
                f"{net}: ours / quantize_static latency <= 1.05 (batch {BATCH})",
                ours / static <= 1.05,
                f"{ours / static:.2f}",
            ),
            (
                f"{net}: float / ours >= 1.5 (batch {BATCH})",
                float_ / ours >= 1.5,
                f"{float_ / ours:.2f}x",
            ),
            (
                f"{net}: every Conv a QLinearConv",
                rows[OURS]["QLinearConv"] == counts["convs"] and not rows[OURS]["float_convs"],
                f"{rows[OURS]['QLinearConv']}/{counts['convs']}",
            ),
            (
                f"{net}: every residual Add a QLinearAdd",
                rows[OURS]["QLinearAdd"] == counts["residual_adds"]
                and not rows[OURS]["float_adds"],
                f"{rows[OURS]['QLinearAdd']}/{counts['residual_adds']}",
            ),
            (
                f"{net} tensorrt export: qkd-deploy lint --strict passes",
                trt["lint_strict_exit"] == 0,
                f"exit {trt['lint_strict_exit']}",
            ),
            (
                f"{net} tensorrt export: every residual Add's skip input quantized",
                trt["adds_with_quantized_skip"] == trt["adds"] == counts["residual_adds"],
                f"{trt['adds_with_quantized_skip']}/{counts['residual_adds']}",
            ),
        ]
    return checks


def markdown(results: dict, checks: list, args: argparse.Namespace) -> str:
    lines = [
        "# torchvision-style networks: graph-placed quantizers in ONNX Runtime and TensorRT lint",
        "",
        machine_line(),
        f"Date: {datetime.date.today().isoformat()}. ONNX Runtime CPU, all cores; "
        f"{'x'.join(map(str, SHAPE))}, batch {BATCH}; p50 ms per batch, median over "
        f"{args.rounds} interleaved rounds of {args.iterations} runs.",
        "",
    ]
    for net, r in results.items():
        lines += [
            f"## {net}",
            "",
            "| model | p50 ms | QLinearConv | float Conv | QLinearAdd | float Add |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for name, row in r["latency"].items():
            lines.append(
                f"| {name} | {row['p50_ms']:.1f} | {row['QLinearConv']} | {row['float_convs']} "
                f"| {row['QLinearAdd']} | {row['float_adds']} |"
            )
        trt = r["tensorrt"]
        summary = (trt["lint_output"].splitlines() or ["no findings"])[-1]
        lines += [
            "",
            f"`tensorrt` export (opset 17): `qkd-deploy lint --strict` exit "
            f"{trt['lint_strict_exit']} ({summary}); "
            f"{trt['adds_with_quantized_skip']} of {trt['adds']} Adds read a quantized skip input.",
            "",
        ]
    lines += targets_table(checks)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the models")
    p.add_argument("--iterations", type=int, default=10, help="timed runs per round")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for net in NETWORKS:
            folder = Path(tmp) / net
            folder.mkdir()
            paths, trt_path, counts = build(net, folder)
            results[net] = {
                "latency": measure(paths, args.iterations, args.rounds),
                "counts": counts,
                "tensorrt": tensorrt_check(trt_path),
            }
    checks = targets(results)
    text = markdown(results, checks, args)
    payload = {"date": datetime.date.today().isoformat(), "results": results}
    write_results(args.out, "user_arch_speed", payload, checks, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
