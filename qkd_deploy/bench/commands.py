"""`qkd-deploy bench MODEL.onnx` and `qkd-deploy report RUN_DIR` (torch-free)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from qkd_deploy.errors import UserError

ENGINE_SUFFIXES = (".engine", ".plan")


def bench_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy bench",
        description="latency of an ONNX classifier in ONNX Runtime or of a TensorRT engine",
    )
    p.add_argument("model", help="an .onnx model, or a TensorRT .engine/.plan with its sidecar")
    p.add_argument("--batch-sizes", default="1,32", help="comma-separated (default 1,32)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iterations", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = all cores")
    p.add_argument(
        "--providers",
        default="cpu",
        help="ONNX Runtime: cpu (default), auto (CUDA/TensorRT EPs if present) or provider "
        "names, comma-separated (e.g. CUDAExecutionProvider,CPUExecutionProvider)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    args = p.parse_args(argv)
    from qkd_deploy.bench.latency import measure_latency

    try:
        batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError as error:
        raise UserError(f"--batch-sizes {args.batch_sizes!r}: give integers like 1,8,32") from error
    runner = _open_runner(args.model, args.providers, args.threads)
    try:
        sample = np.random.default_rng(0).standard_normal(runner.input_shape).astype(np.float32)
        rows = measure_latency(runner, sample, batch_sizes, args.warmup, args.iterations)
    finally:
        runner.close()
    if args.json:
        print(json.dumps({"model": args.model, "runner": runner.name, "latency_ms": rows}))
    else:
        for r in rows:
            print(
                f"{runner.name} batch {r['batch']:>4}: p50 {r['p50']:.3f} ms, p90 {r['p90']:.3f} ms"
            )
    return 0


def _open_runner(model: str, providers: str, threads: int):
    """A TensorRT runner for a serialized engine, else an ONNX Runtime runner."""
    if Path(model).suffix in ENGINE_SUFFIXES:
        from qkd_deploy.runtime.tensorrt import TensorRTRunner

        return TensorRTRunner(model)
    from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(model, providers=providers, threads=threads)


def report_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy report", description="re-render report.md of a run and print its table"
    )
    p.add_argument("run_dir")
    p.add_argument(
        "--plot",
        action="store_true",
        help="also draw report.png (accuracy and latency; needs matplotlib: the 'plots' extra)",
    )
    args = p.parse_args(argv)
    from qkd_deploy.bench.report import (
        RENDERED,
        load_report,
        student_warnings,
        summary_table,
        write_report,
    )

    run_dir = Path(args.run_dir)
    report = load_report(run_dir / "report.json", RENDERED)
    write_report(run_dir, report)
    if args.plot:
        from qkd_deploy.bench.plots import plot_report

        print(f"wrote {plot_report(report, run_dir / 'report.png')}")
    print(summary_table(report))
    for student in report["students"]:
        for warning in student_warnings(student):
            print(f"warning: {student['name']}: {warning}")
    return 0
