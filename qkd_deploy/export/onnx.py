"""torch -> ONNX with QuantizeLinear/DequantizeLinear, through the torch.export-based exporter.

The deploy model (``quant.integer.to_deploy``) marks quantization with ``qkd::`` custom ops; this
module translates them: an activation becomes ``[Clip ->] QuantizeLinear -> DequantizeLinear``
(the Clip only when the integer grid is narrower than its INT8/UINT8 container, which ONNX Q
would otherwise not enforce), and integer weights become an INT8 initializer feeding a
per-channel ``DequantizeLinear``. Export runs under ``torch.no_grad()`` in eval mode.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from onnx import version_converter
from onnxscript import opset18 as op
from torch import nn

import qkd_deploy.quant.ops  # noqa: F401  (registers torch.ops.qkd.*)
from qkd_deploy.errors import UserError
from qkd_deploy.export import layer_names, layer_record
from qkd_deploy.export.passes import INT4_OPSET, pack_int4_weights, to_opset17
from qkd_deploy.export.passes import opset as model_opset
from qkd_deploy.fileio import atomic_write_bytes
from qkd_deploy.quant.integer import DeployLinear

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
MIN_OPSET = 18


def _quantize_dequantize(x, scale, zero_point, qmin: int, qmax: int, axis: int, clip: bool):
    if clip:
        x = op.Clip(
            x, op.Mul(scale, op.CastLike(qmin, scale)), op.Mul(scale, op.CastLike(qmax, scale))
        )
    q = op.QuantizeLinear(x, scale, zero_point, axis=axis)
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _dequantize(q, scale, zero_point, axis: int):
    return op.DequantizeLinear(q, scale, zero_point, axis=axis)


def _global_average_pool(x):
    return op.GlobalAveragePool(x)


TRANSLATIONS = {
    torch.ops.qkd.quantize_dequantize.default: _quantize_dequantize,
    torch.ops.qkd.dequantize.default: _dequantize,
    torch.ops.qkd.global_average_pool.default: _global_average_pool,
}


def export_onnx(
    model: nn.Module,
    sample: torch.Tensor,
    path: str | os.PathLike,
    opset: int = MIN_OPSET,
    int4_gemm_weights: bool = True,
    verbose: bool = False,
) -> Path:
    """Export ``model`` (deploy form or float, eval mode) to one self-contained ``.onnx`` file
    with a dynamic batch dimension; written atomically.

    The exporter writes opset 18; ``opset=17`` down-converts for TensorRT 8.6 (JetPack 6.0), a
    higher one up-converts. With ``int4_gemm_weights``, Linear weights of <= 4 bits that feed a
    MatMul/Gemm are stored as INT4 (which needs opset >= 21, TensorRT >= 10; the default opset 18
    then becomes 21); others stay INT8 (``passes.pack_int4_weights``). The model's metadata
    records the torch module of each layer (``layer_record``).
    """
    if model.training:
        raise UserError("refusing to export a model in train mode; call model.eval() first")
    if opset < 17:
        raise UserError(f"opset {opset} is not supported; use 17 (TensorRT 8.6) or >= 18")
    int4 = _int4_weight_names(model) if int4_gemm_weights else set()
    if int4 and opset != MIN_OPSET and opset < INT4_OPSET:
        raise UserError(
            f"INT4 weights need opset {INT4_OPSET} or later, not {opset}; export with opset "
            f"{INT4_OPSET} or set export.int4_gemm_weights=false"
        )
    batch = torch.export.Dim("batch", min=1, max=4096)
    sample = sample[:2] if sample.shape[0] >= 2 else torch.cat([sample, sample])
    # canonical strides: torch.export traces the sample's layout, and an odd one (e.g. a
    # 1-channel tensor with channel stride 1) becomes Range/Gather "as_strided" nodes
    sample = torch.zeros(sample.shape, dtype=torch.float32).copy_(sample)
    with torch.no_grad(), _quiet(verbose), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (sample,),
            dynamo=True,
            opset_version=MIN_OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            custom_translation_table=TRANSLATIONS,
            verbose=verbose,
        )
    program.optimize()
    node_scopes = layer_names.scopes(program.model)
    proto = program.model_proto
    if not verbose:
        _strip_debug_info(proto)
    if int4:
        proto = pack_int4_weights(proto, int4)  # opset 21 if any weight became INT4
    if opset == 17:
        proto = to_opset17(proto)
    elif opset > model_opset(proto):
        proto = version_converter.convert_version(proto, opset)
    layer_record.write(proto, layer_names.layers(proto, node_scopes, model))
    onnx.checker.check_model(proto)
    return atomic_write_bytes(path, proto.SerializeToString())


def _int4_weight_names(model: nn.Module) -> set[str]:
    """Initializer names of Linear weights quantized to <= 4 bits (the exporter names buffers
    by their qualified name)."""
    return {
        f"{name}.weight_int"
        for name, m in model.named_modules()
        if isinstance(m, DeployLinear) and m.bits <= 4
    }


def _strip_debug_info(model: onnx.ModelProto) -> None:
    """Drop the exporter's bookkeeping (torch stack traces, export signatures, doc strings) and
    its shapes of intermediate tensors (``value_info``: ONNX shape inference, ONNX Runtime and
    TensorRT infer them): on a small model they outweigh the INT8 weights. Export with
    ``verbose=True`` to keep them."""
    graph = model.graph
    del graph.value_info[:]
    for item in [*graph.node, *graph.initializer, *graph.input, *graph.output]:
        del item.metadata_props[:]
        item.doc_string = ""
    del graph.metadata_props[:]


@contextlib.contextmanager
def _quiet(verbose: bool):
    """The exporter prints progress lines to stdout; keep them out of the pipeline's output."""
    if verbose:
        yield
        return
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)  # "torchvision is not installed" x4 per export
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        registration.setLevel(level)
