"""`qkd-deploy lint MODEL.onnx`: the command line (``main``): findings as text or JSON, the
layers' precision, the exit status.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from qkd_deploy.bench.layer_precision import format_table
from qkd_deploy.deploy.lint.files import TENSORRT_VERSIONS, lint_with_layers
from qkd_deploy.deploy.lint.findings import SEVERITIES, format_findings


def _parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="qkd-deploy lint",
        description="Check a Q/DQ ONNX model against TensorRT's explicit-quantization rules.",
    )
    parser.add_argument("model", help="path of the .onnx model")
    parser.add_argument("--json", action="store_true", help="print the findings as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument(
        "--tensorrt",
        choices=TENSORRT_VERSIONS,
        help="the TensorRT the model is for: 10 skips the checks that hold for 8.6 only "
        "(opset > 17); default: both",
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    """`qkd-deploy lint`: print the findings and the layers' precision; 1 on any error (or
    warning with --strict), else 0."""
    args = _parse_args(argv)
    findings, layers = lint_with_layers(args.model, args.tensorrt)
    if args.json:
        counts = {s: sum(f.severity == s for f in findings) for s in SEVERITIES}
        report = {
            "model": args.model,
            "counts": counts,
            "findings": [asdict(f) for f in findings],
            "layers": [layer.to_dict() for layer in layers],
        }
        print(json.dumps(report, indent=2))
    else:
        print(format_findings(findings))
        if any(layer.precision != "float" for layer in layers):
            print(f"\nlayers and their precision:\n{format_table(layers)}")
    failing = ("error", "warning") if args.strict else ("error",)
    return int(any(f.severity in failing for f in findings))
