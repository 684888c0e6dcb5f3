"""Which torch module each node of an exported model computes, for ``layer_record``.

torch.onnx writes the module path of every node it translates into the node's metadata
(``pkg.torch.onnx.name_scopes``: the modules from the root down, then the op), which the graph
optimizer keeps; a node it fuses (Conv + BatchNormalization) takes the scope of the last node
fused, so a weighted op is named by the module that owns its weight instead (the exporter names
initializers by the qualified names of parameters and buffers).
"""

from __future__ import annotations

import ast

import onnx
from torch import nn

from qkd_deploy.models.layers import Add
from qkd_deploy.quant.integer import DeployConv2d, DeployLinear, FrozenQuantizer

SCOPES = "pkg.torch.onnx.name_scopes"
WEIGHT_INPUT = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
LAYER_OPS = {"QuantizeLinear", "Add", "Concat", "GlobalAveragePool", "AveragePool", "MaxPool"}
# ops between a stored weight and the op that uses it
WEIGHT_PATH = {"DequantizeLinear", "Transpose", "Identity", "Reshape", "Cast"}
# the float modules quantization replaces: one left in a quantized model is float on purpose
QUANTIZABLE = (nn.Conv2d, nn.Linear, Add)


def scopes(ir_model) -> dict[str, str]:
    """Node name -> the innermost module torch.onnx recorded for it (of an ``onnx_ir`` model,
    before it is serialized: the serialized model drops node metadata)."""
    found = {}
    for node in ir_model.graph:
        text = node.metadata_props.get(SCOPES)
        try:
            path = ast.literal_eval(text) if text else []
        except (ValueError, SyntaxError):
            continue
        if isinstance(path, list) and len(path) >= 2 and path[-2]:
            found[node.name] = str(path[-2])
    return found


def layers(model: onnx.ModelProto, node_scopes: dict[str, str], torch_model: nn.Module) -> dict:
    """The ``layer_record`` entries of ``model``, exported from ``torch_model``."""
    modules = dict(torch_model.named_modules())
    owners = _weight_owners(torch_model)
    quantized = any(isinstance(m, FrozenQuantizer) for m in modules.values())
    producer = {out: node for node in model.graph.node for out in node.output}
    record = {}
    for node in model.graph.node:
        if node.op_type in WEIGHT_INPUT and len(node.input) > WEIGHT_INPUT[node.op_type]:
            stored = _stored(node.input[WEIGHT_INPUT[node.op_type]], producer)
            name = owners.get(stored, node_scopes.get(node.name))
        elif node.op_type in LAYER_OPS:
            name = node_scopes.get(node.name)
        else:
            continue
        if name in modules:
            record[node.name] = _entry(name, modules[name], quantized)
    return record


def _weight_owners(torch_model: nn.Module) -> dict[str, str]:
    """Initializer name -> module, for weights (float ``weight``, integer ``weight_int``)."""
    tensors = [*torch_model.named_parameters(), *torch_model.named_buffers()]
    return {
        name: name.rpartition(".")[0]
        for name, _ in tensors
        if name.rpartition(".")[2] in ("weight", "weight_int")
    }


def _stored(name: str, producer: dict[str, onnx.NodeProto]) -> str:
    """The tensor a weight input comes from, behind DequantizeLinear, Transpose and the like."""
    seen = set()
    while name in producer and producer[name].op_type in WEIGHT_PATH and name not in seen:
        seen.add(name)
        name = producer[name].input[0]
    return name


def _entry(name: str, module: nn.Module, quantized: bool) -> dict:
    entry: dict = {"module": name}
    if isinstance(module, FrozenQuantizer):
        entry["bits"] = (module.qmax - module.qmin).bit_length()
    elif isinstance(module, (DeployConv2d, DeployLinear)):
        entry["bits"] = int(module.bits)
    elif quantized and isinstance(module, QUANTIZABLE):
        entry["float"] = True
    return entry
