"""``lint_file``: lint an .onnx file for a TensorRT version, after checking its size (protobuf's
2 GiB limit) and the version; with the layers' precision (``lint_with_layers``).
"""

from __future__ import annotations

from pathlib import Path

from qkd_deploy.bench.layer_precision import LayerPrecision, layer_precision
from qkd_deploy.deploy.lint.check import run_rules
from qkd_deploy.deploy.lint.findings import Finding
from qkd_deploy.deploy.lint.graph import Graph
from qkd_deploy.errors import UserError
from qkd_deploy.fileio import load_onnx_graph

MAX_ONNX_BYTES = 2**31 - 1  # protobuf cannot parse a larger message: no valid .onnx is larger

# rules that hold for TensorRT 8.6 only: a model meant for TensorRT >= 10 skips them
TRT86_ONLY_RULES = ("OPSET-TRT86",)
TENSORRT_VERSIONS = ("8.6", "10")


def lint_file(path: str, tensorrt: str | None = None) -> list[Finding]:
    """Lint an .onnx file (external weight data is not read) for TensorRT ``tensorrt`` ("8.6",
    "10", or None for both). A file over protobuf's 2 GiB limit is refused before it is read:
    no valid .onnx is that large."""
    return lint_with_layers(path, tensorrt)[0]


def _check_file(path: str, tensorrt: str | None) -> None:
    size = Path(path).stat().st_size if Path(path).is_file() else 0
    if size > MAX_ONNX_BYTES:
        raise UserError(
            f"{path}: {size} bytes, over the 2 GiB protobuf limit of one .onnx file, so it is "
            "not a valid model; save a large model with its weights as external data "
            "(onnx.save(model, path, save_as_external_data=True))"
        )
    if tensorrt not in (None, *TENSORRT_VERSIONS):
        raise UserError(f"TensorRT version {tensorrt!r}: use one of {', '.join(TENSORRT_VERSIONS)}")


def lint_with_layers(
    path: str, tensorrt: str | None = None
) -> tuple[list[Finding], list[LayerPrecision]]:
    """``lint_file``'s findings and the model's layers with their precision
    (``bench.layer_precision``), from one read of the file."""
    _check_file(path, tensorrt)
    model = load_onnx_graph(path)
    findings = run_rules(Graph(model, Path(path)))
    if tensorrt == "10":
        findings = [f for f in findings if f.rule not in TRT86_ONLY_RULES]
    return findings, layer_precision(model)
