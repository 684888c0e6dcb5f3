"""A planted divergence for ``qkd-deploy diff``: one activation Q/DQ scale changed in a file."""

import onnx
from onnx import numpy_helper

from qkd_deploy.bench import diff


def plant_scale_change(path, out, index):
    """Triple the scale of activation checkpoint ``index``'s Q (and its DQ, which shares it)."""
    model = onnx.load(str(path))
    point = diff.checkpoints(model)[index]
    q = next(n for n in model.graph.node if n.name == point.node)
    scale = next(t for t in model.graph.initializer if t.name == q.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 3, scale.name))
    onnx.save(model, str(out))
    return point.node
