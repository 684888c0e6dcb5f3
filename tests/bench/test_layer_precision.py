"""Per-layer precision: the exporter records each layer's module, the reader gives weight and
input precision per layer (a mixed W8A8 export for TensorRT with a float conv and INT4 GEMM
weights, a W4A4 export on its 4-bit grid, a model without the record)."""

import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qkd_deploy.bench.layer_precision import format_table, is_mixed, layer_precision, summary
from qkd_deploy.export import layer_record
from tests.support.mixed_export import export_toy


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """W8A8 for TensorRT, conv2 left in float, fc's weights at 4 bits (INT4 for the GEMM)."""
    path = tmp_path_factory.mktemp("mixed") / "m.onnx"
    return export_toy(path, "w8a8", float_layers=("conv2",), layer_bits={"fc": "w4a8"})


def test_each_layer_is_named_by_its_module_with_its_precision(mixed):
    rows = {row.name: row for row in layer_precision(onnx.load(str(mixed)))}
    assert list(rows) == ["conv1", "conv2", "add", "fc"]
    assert rows["conv1"].precision == "w8a8" and rows["conv1"].weight == "int8"
    assert rows["conv2"].precision == "float" and rows["conv2"].float_on_purpose
    assert rows["add"].precision == "a8" and rows["add"].weight is None
    assert (rows["fc"].precision, rows["fc"].weight, rows["fc"].activation) == (
        "w4a8",
        "int4",
        "int8",
    )
    assert not rows["conv1"].float_on_purpose


def test_the_record_names_the_nodes_of_the_file(mixed):
    model = onnx.load(str(mixed))
    record = layer_record.read(model)
    names = {n.name for n in model.graph.node}
    assert record and set(record) <= names
    modules = {entry["module"] for entry in record.values()}
    assert {"conv1", "conv2", "fc", "conv1.input_quantizer"} <= modules


def test_a_low_bit_grid_in_an_int8_container_is_shown(tmp_path):
    rows = layer_precision(onnx.load(str(export_toy(tmp_path / "w4.onnx", "w4a4"))))
    precisions = {row.name: row.precision for row in rows}
    assert precisions == {"conv1": "w8a8", "conv2": "w4a4", "add": "a4", "fc": "w8a8"}
    conv2 = next(row for row in rows if row.name == "conv2")
    assert conv2.weight == "int8" and conv2.weight_bits == 4
    assert "int8 (4-bit grid)" in format_table(rows)
    assert is_mixed(rows)
    assert summary([(r.name, r.precision) for r in rows]) == "w8a8: conv1, fc; w4a4: conv2; a4: add"


def test_a_model_without_the_record_is_read_from_the_graph():
    """A Q/DQ model from elsewhere: layers named by node, the grid is the type's width."""
    weight = numpy_helper.from_array(torch.ones(4, 3, 1, 1, dtype=torch.int8).numpy(), "w")
    consts = [
        weight,
        numpy_helper.from_array(torch.ones(4).numpy(), "ws"),
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
        helper.make_tensor("z", TensorProto.INT8, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq"),
        helper.make_node("DequantizeLinear", ["w", "ws"], ["wd"], name="wdq", axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv"),
        helper.make_node("Conv", ["y", "wf"], ["out"], name="float_conv"),
    ]
    consts.append(numpy_helper.from_array(torch.ones(4, 4, 1, 1).numpy(), "wf"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 4, 4, 4])],
        consts,
    )
    rows = layer_precision(helper.make_model(graph))
    assert [(r.name, r.module, r.precision) for r in rows] == [
        ("conv", None, "w8a8"),
        ("float_conv", None, "float"),
    ]
    assert not any(r.float_on_purpose for r in rows)
