"""`qkd-deploy diff` with a TensorRT engine: what is marked (the DequantizeLinear output of each
quantized tensor), how the engine's dequantized tensors become levels and are aligned with the
graph's, and the first divergent layer named from per-tensor results. The engine itself runs
only where TensorRT, Polygraphy and a GPU exist."""

import numpy as np
import onnx
import pytest

from qkd_deploy.bench import diff
from qkd_deploy.errors import UserError
from tests.support.mixed_export import export_toy
from tests.support.planted import plant_scale_change


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = export_toy(tmp_path_factory.mktemp("trt") / "m.onnx", "w4a4")
    model = diff.load(path)
    images = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    return model, images, diff.checkpoints(model)


def _dequantized_run(model, images, points):
    """The graph as written, asked for what an engine is asked for: the DQ outputs."""
    dequantized = diff.dequantized_outputs(model, points)
    values = diff.run_onnxruntime(model, images, sorted(set(dequantized.values())), fused=False)
    return values, dequantized


def test_every_quantized_tensor_is_marked_by_the_dequantize_that_reads_it(exported):
    model, _, points = exported
    dequantized = diff.dequantized_outputs(model, points)
    assert set(dequantized) == {p.tensor for p in points}
    producers = {out: node for node in model.graph.node for out in node.output}
    for tensor, output in dequantized.items():
        node = producers[output]
        assert node.op_type == "DequantizeLinear" and node.input[0] == tensor


def test_dequantized_tensors_give_the_levels_of_the_quantized_ones(exported):
    model, images, points = exported
    written = diff.run_onnxruntime(model, images, [p.tensor for p in points], fused=False)
    values, dequantized = _dequantized_run(model, images, points)
    engine_like = diff.levels_from_dequantized(values, points, dequantized)
    rows = diff.compare(diff.levels(written, points), diff.levels(engine_like, points), points)
    assert all(row.max_steps == 0 for row in rows)
    assert diff.first_divergence(rows) is None


@pytest.mark.parametrize("index", [1, 2])
def test_the_first_divergent_layer_is_named_from_per_tensor_results(exported, index):
    """Engine results off by 3 levels in a third of one tensor, and in everything after it."""
    model, images, points = exported
    written = diff.run_onnxruntime(model, images, [p.tensor for p in points], fused=False)
    values, dequantized = _dequantized_run(model, images, points)
    for point in points[index:]:
        name = dequantized[point.tensor]
        every_third = np.arange(values[name].size).reshape(values[name].shape) % 3 == 0
        values[name] = values[name] + 3 * point.scale * every_third
    engine = diff.levels_from_dequantized(values, points, dequantized)
    rows = diff.compare(diff.levels(written, points), diff.levels(engine, points), points)
    first = diff.first_divergence(rows)
    assert first is not None and first.node == points[index].node
    assert first.max_steps == 3 and 0.3 < first.share_off < 0.4
    assert "first divergence at " + points[index].node in diff.describe("t", rows, 0.01, 1)


@pytest.mark.skipif(diff.tensorrt_missing() is None, reason="TensorRT and Polygraphy installed")
def test_without_tensorrt_the_engine_is_one_clear_error(exported):
    model, images, points = exported
    with pytest.raises(UserError, match="not installed"):
        diff.run_tensorrt(model, images, points)


@pytest.mark.skipif(
    diff.tensorrt_missing() is not None,
    reason=f"the engine needs TensorRT and a GPU: {diff.tensorrt_missing()}",
)
def test_the_engine_agrees_with_the_graph_and_names_a_planted_divergence(exported, tmp_path):
    model, images, points = exported
    written = diff.run_onnxruntime(model, images, [p.tensor for p in points], fused=False)
    rows = diff.compare(
        diff.levels(written, points),
        diff.levels(diff.run_tensorrt(model, images, points), points),
        points,
    )
    assert diff.first_divergence(rows) is None
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    planted = plant_scale_change(path, tmp_path / "planted.onnx", 2)
    bad = diff.load(tmp_path / "planted.onnx")
    rows = diff.compare(
        diff.levels(written, points),
        diff.levels(diff.run_tensorrt(bad, images, points), points),
        points,
    )
    assert diff.first_divergence(rows).node == planted
