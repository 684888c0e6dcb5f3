"""`qkd-deploy lint MODEL.onnx`: check Q/DQ ONNX models against TensorRT's explicit quantization.

Torch-free (stdlib, numpy, onnx), so it runs on a Jetson and on models qkd-deploy did not make
(e.g. ONNX Runtime's ``quantize_static`` output). Each rule is one small function registered with
its severity, documentation source and default fix (``RULES`` lists them); every finding names the
node, the rule and the fix. Only the top-level graph is checked; weights stored as external data
are never read (the rules need their dims, not their values).

Sources, cited per rule as [KEY: section]:
  TRT-EQ   TensorRT Developer Guide, "Explicit Quantization" (8.6 and 10.x): sections "Quantized
           Weights", "ONNX Support", "TensorRT Processing of Q/DQ Networks", "Q/DQ Layer-Placement
           Recommendations"; 8.6 "Per-Tensor and Per-Channel Quantization".
  TRT-QT   TensorRT Developer Guide, "Working with Quantized Types" (10.x): supported types, INT4
           weight-only quantization, block quantization.
  TRT-OPS  TensorRT operator reference "Quantize" / "Dequantize" (IQuantizeLayer /
           IDequantizeLayer API docs): scale, zero point, types, granularity.
  TRT-DYN  TensorRT Developer Guide, "Working with Dynamic Shapes": "Optimization Profiles",
           "Restrictions for Dynamic Shapes".
  OTRT     onnx-tensorrt docs/operators.md (QuantizeLinear/DequantizeLinear rows, type notes,
           max opset per release) and its QuantizeLinear/DequantizeLinear importer checks.
  ONNX     ONNX operator specs QuantizeLinear/DequantizeLinear (opsets 10, 13, 19, 21, 23).
  DESIGN   this project's export rules (not TensorRT's).

The linter never raises on a malformed model: ONNX's checker (full, with shape inference) runs
first and what it rejects is an error; every rule reads attributes by their declared type, walks
the graph without following cycles, and a rule that still fails is reported as an error of that
rule instead of a traceback.

Modules: ``graph`` (the graph view the rules read), ``qdq`` (Q/DQ node helpers), ``registry``
(``RULES`` and the ``lint_rule`` decorator), ``rules`` (the rules, one module per family), ``check``
(``lint_model``), ``files`` (``lint_file``, the size limit), ``findings`` (``Finding``,
``format_findings``), ``cli`` (``main``, the ``qkd-deploy lint`` command).
"""

from qkd_deploy.deploy.lint.check import lint_model
from qkd_deploy.deploy.lint.cli import main
from qkd_deploy.deploy.lint.files import (
    MAX_ONNX_BYTES,
    TENSORRT_VERSIONS,
    TRT86_ONLY_RULES,
    lint_file,
    lint_with_layers,
)
from qkd_deploy.deploy.lint.findings import SEVERITIES, Finding, format_findings
from qkd_deploy.deploy.lint.registry import INTERNAL_RULE, RULES

__all__ = [
    "INTERNAL_RULE",
    "MAX_ONNX_BYTES",
    "RULES",
    "SEVERITIES",
    "TENSORRT_VERSIONS",
    "TRT86_ONLY_RULES",
    "Finding",
    "format_findings",
    "lint_file",
    "lint_model",
    "lint_with_layers",
    "main",
]
