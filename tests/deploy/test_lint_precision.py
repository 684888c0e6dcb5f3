"""The linter on a mixed-precision export for TensorRT: layers left in float on purpose (a conv
and a residual Add) have no Q/DQ and are reported as float (info), never as an error or a
warning about a missing Q/DQ; the per-layer table names every layer by its module."""

import json

import onnx
import pytest

from qkd_deploy.deploy.lint import lint_file, main
from tests.support.mixed_export import export_toy


@pytest.fixture(scope="module")
def float_add(tmp_path_factory):
    """W8A8, conv1 and the residual Add left in float: conv2 stays INT8 and feeds the float Add,
    which would be a missing Q/DQ on the skip input in a model without the exporter's record."""
    path = tmp_path_factory.mktemp("float_add") / "m.onnx"
    return export_toy(path, "w8a8", float_layers=("conv1", "add"))


def test_a_float_layer_has_no_qdq_and_lints_as_float_not_as_an_error(float_add):
    model = onnx.load(str(float_add))
    producers = {out: node for node in model.graph.node for out in node.output}
    conv1 = next(n for n in model.graph.node if n.op_type == "Conv")  # the first, on the images
    assert [producers.get(i) for i in conv1.input[:2]] == [None, None]  # no DQ: no Q/DQ at all
    findings = lint_file(str(float_add), tensorrt="10")
    at_float = [f for f in findings if "float on purpose" in f.message]
    assert {f.rule for f in at_float} == {"FUSE-FLOAT-LAYER", "FUSE-RESIDUAL-ADD"}
    assert all(f.severity == "info" for f in at_float)
    assert not [f for f in findings if f.severity != "info"]
    assert any("'conv1'" in f.message for f in at_float if f.rule == "FUSE-FLOAT-LAYER")


def test_the_same_graph_without_the_record_warns_about_the_skip_input(float_add, tmp_path):
    model = onnx.load(str(float_add))
    del model.metadata_props[:]
    onnx.save(model, str(tmp_path / "bare.onnx"))
    findings = lint_file(str(tmp_path / "bare.onnx"), tensorrt="10")
    assert [f.severity for f in findings if f.rule == "FUSE-RESIDUAL-ADD"] == ["warning"]


def test_lint_prints_each_layer_with_its_precision(float_add, capsys):
    assert main([str(float_add), "--tensorrt", "10", "--strict"]) == 0
    table = capsys.readouterr().out.split("layers and their precision:")[1]
    lines = {line.split()[0]: line.split() for line in table.strip().splitlines()[1:]}
    assert lines["conv1"][2] == "float" and lines["conv2"][2] == "w8a8"
    assert lines["add"][2] == "float" and lines["fc"][2] == "w8a8"


def test_lint_json_gives_the_layers(float_add, capsys):
    assert main([str(float_add), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    by_module = {layer["module"]: layer for layer in layers}
    assert by_module["conv1"]["float_on_purpose"] and by_module["conv1"]["weight"] == "float"
    assert by_module["conv2"]["precision"] == "w8a8"
    assert {"node", "op", "weight_bits", "activation", "activation_bits"} <= set(layers[0])
