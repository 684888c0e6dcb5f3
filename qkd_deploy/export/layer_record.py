"""The exporter's record of which torch module each node of an exported model computes.

``export_onnx`` keeps it in the model's ``metadata_props`` under ``qkd.layers`` (JSON), so that
readers without torch (the linter, the report) name layers by their module and tell a layer left
in float on purpose (``quant.layer_bits: float``) from a missing Q/DQ. One entry per weighted op
(Conv, Gemm, MatMul), activation QuantizeLinear and Add/Concat/pool op whose module is known::

    {"node_conv2d": {"module": "stages.0.0.conv1", "bits": 4},
     "node_QuantizeLinear_1": {"module": "stages.0.0.conv1.input_quantizer", "bits": 4},
     "node_Conv_29": {"module": "stages.0.0.conv2", "float": true}}

``bits`` is the integer grid within the stored type (weights of a weighted op, the activations
of a QuantizeLinear): a 4-bit weight is stored in INT8 unless it feeds a GEMM. ``float`` marks a
layer that quantization would have replaced but that was left in float. Torch-free.
"""

from __future__ import annotations

import json

import onnx

KEY = "qkd.layers"


def write(model: onnx.ModelProto, layers: dict[str, dict]) -> None:
    """Put ``layers`` (node name -> entry) into ``model``'s metadata, replacing any record."""
    props = {p.key: p.value for p in model.metadata_props}
    props[KEY] = json.dumps(layers, sort_keys=True, separators=(",", ":"))
    onnx.helper.set_model_props(model, props)


def read(model: onnx.ModelProto) -> dict[str, dict]:
    """The record (node name -> entry); empty when the model has none (not made by qkd-deploy,
    or exported before the record) or when it is not a JSON object of entries with a module."""
    text = next((p.value for p in model.metadata_props if p.key == KEY), None)
    try:
        record = json.loads(text) if text else {}
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    return {
        str(node): entry
        for node, entry in record.items()
        if isinstance(entry, dict) and isinstance(entry.get("module"), str)
    }
