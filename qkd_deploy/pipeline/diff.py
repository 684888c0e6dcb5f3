"""`qkd-deploy diff MODEL.onnx`: the first quantized tensor where the ONNX graph as written and
ONNX Runtime's fused kernels (and, with ``--run``, the run's fake-quant torch student; where
TensorRT and Polygraphy are installed, a TensorRT engine) part ways. Given a bundle folder, it
runs the bundle's model on the bundle's sample images, on the device.

Torch-free unless ``--run`` is given (then ``diff_reference`` rebuilds the student with torch),
so it also runs on the device from a bundle's ONNX file.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx

from qkd_deploy.bench import diff
from qkd_deploy.errors import UserError


def _images(args: argparse.Namespace, model: onnx.ModelProto) -> np.ndarray:
    if args.images:
        with np.load(args.images) as data:
            if "images" not in data:
                raise UserError(f"{args.images} holds no 'images' array")
            return np.asarray(data["images"], dtype=np.float32)[: args.count]
    dims = model.graph.input[0].type.tensor_type.shape.dim[1:]
    shape = [d.dim_value for d in dims]
    if not all(shape):
        raise UserError("the model's input has symbolic non-batch dims; give --images FILE.npz")
    return np.random.default_rng(0).standard_normal((args.count, *shape)).astype(np.float32)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="qkd-deploy diff",
        description="Run a Q/DQ ONNX model as written and on ONNX Runtime's fused kernels "
        "(and a run's fake-quant torch student with --run); name the first quantized tensor "
        "where they part ways.",
    )
    p.add_argument("model", help="the .onnx file, or a bundle folder (its model and images)")
    p.add_argument("--run", help="run directory: compare its fake-quant torch student too")
    p.add_argument("--student", help="with --run: the student (w4a4, ...); default the model's")
    p.add_argument(
        "--images",
        help=".npz with preprocessed 'images' (default: the run's test images with --run, a "
        "bundle's sample images, else seeded standard-normal inputs)",
    )
    p.add_argument("--count", type=int, default=64, help="images to run (default 64)")
    p.add_argument("--steps", type=int, default=diff.STEPS, help="levels of rounding tolerated")
    p.add_argument(
        "--share", type=float, default=diff.SHARE, help="share of elements tolerated off"
    )
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = p.parse_args(argv)
    model_path, bundled = args.model, None
    if Path(args.model).is_dir():
        from qkd_deploy.deploy.bundle import diff_inputs

        model_path, bundled = diff_inputs(args.model)
    model = diff.load(model_path)
    points = diff.checkpoints(model)
    student = None
    if args.run:
        from qkd_deploy.pipeline.diff_reference import run_student

        student, images = run_student(args.run, args.student, str(model_path), args.count)
        images = _images(args, model) if args.images else images
    elif bundled is not None and not args.images:
        images = bundled[: args.count]
    else:
        images = _images(args, model)
    names = [p.tensor for p in points]
    written = diff.run_onnxruntime(model, images, names, fused=False)
    fused = diff.run_onnxruntime(model, images, names, fused=True)
    comparisons = {"fused ORT kernels vs graph as written": (written, fused)}
    if student is not None:
        comparisons["graph as written vs torch fake-quant"] = (student(images, points), written)
    if diff.tensorrt_missing() is None:
        engine = diff.run_tensorrt(model, images, points)
        comparisons["TensorRT engine vs graph as written"] = (written, engine)
    elif not args.json:
        print(f"TensorRT engine: not compared, {diff.tensorrt_missing()}", file=sys.stderr)
    report = {}
    for title, (a, b) in comparisons.items():
        rows = diff.compare(diff.levels(a, points), diff.levels(b, points), points, args.steps)
        report[title] = rows
        if not args.json:
            print(diff.describe(title, rows, args.share, args.steps))
    if args.json:
        out = {t: [asdict(r) for r in rows] for t, rows in report.items()}
        print(json.dumps(out, indent=2))
    diverged = any(diff.first_divergence(rows, args.share) for rows in report.values())
    return 1 if diverged else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
