"""Mixed precision under a budget: each kind of budget holds on a small model, a float layer
exports without Q/DQ (and lints as float), and the pipeline's choice survives --resume."""

import json
import shutil

import onnx
import pytest
import torch

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.config import load_config
from qkd_deploy.deploy.lint import lint_file
from qkd_deploy.errors import UserError
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.quant.budget import Budget, candidates, choose, weight_kb
from qkd_deploy.quant.convert import BitWidths
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.precision import PrecisionOptions, quantize
from qkd_deploy.quant.sensitivity import Evaluator, MixedPrecisionModel, measure
from qkd_deploy.train_and_export import main
from tests.support.trained_toy import trained_toy


def _model():
    return trained_toy()[0]


def _measured(bits="w2a2", twins=None):
    model, images, labels = trained_toy()
    options = PrecisionOptions(BitWidths.parse(bits), first_last_bits=None)
    if twins is None:
        twins = ["w4a4", "w8a8"] if bits == "w2a2" else []
    mixed = MixedPrecisionModel.build(model, options, twins, [images[:128]], calibrate)
    evaluator = Evaluator(model, images[128:], labels[128:])
    return measure(mixed, evaluator, bits, model), mixed, evaluator


@pytest.mark.parametrize("text", ["share:1.5", "size:10", "drop", "drop:-1", "share:x"])
def test_a_bad_budget_is_one_clear_error(text):
    with pytest.raises(UserError, match="quant.budget"):
        load_config(overrides=[f"quant.budget={text}"])


def test_a_share_budget_raises_that_share_of_layers_most_gain_first_to_8_bits():
    table, mixed, evaluator = _measured()
    choice = choose(Budget.parse("share:0.5"), table, mixed, evaluator)
    assert len(choice.layer_bits) == 2  # of conv1, conv2, add, fc
    gains = {layer: g["w8a8"] for layer, g in candidates(table, mixed).items()}
    assert set(choice.layer_bits) == set(sorted(gains, key=gains.get)[-2:])
    assert set(choice.layer_bits.values()) == {"w8a8"}  # a budget of layers: the top precision
    assert choice.predicted["kl"] < table.quantized.kl


def test_the_gain_is_the_damage_a_layer_does_alone_that_raising_it_removes():
    table, mixed, evaluator = _measured()
    assert table.quantized.accuracy < 0.5  # every layer at 2 bits, untrained: little is left
    row = {r.layer: r for r in table.layers}
    for layer, gains in candidates(table, mixed).items():
        for precision, gain in gains.items():
            left = row[layer].alone_raised[precision].kl
            assert gain == pytest.approx(row[layer].alone.kl - left)
    with torch.no_grad():  # conv2's 2-bit weights on a grid 20x too coarse: all round to zero
        mixed.model.conv2.weight_quantizer.scale.mul_(20)
    broken = measure(mixed, evaluator, "w2a2", trained_toy()[0])
    choice = choose(Budget.parse("share:0.25"), broken, mixed, evaluator)
    assert choice.layer_bits == {"conv2": "w8a8"}


def test_a_size_budget_keeps_the_weights_within_it():
    table, mixed, evaluator = _measured()
    base = weight_kb(mixed, {})
    for kb in (base, base + 1.0, base * 4):
        choice = choose(Budget.parse(f"size_kb:{kb}"), table, mixed, evaluator)
        assert weight_kb(mixed, choice.layer_bits) <= kb + 1e-9
    assert choice.layer_bits  # four times the 2-bit weights: room to raise some
    with pytest.raises(UserError, match="below the weights"):
        choose(Budget.parse(f"size_kb:{base / 2}"), table, mixed, evaluator)


def test_a_drop_budget_raises_the_fewest_layers_that_bring_the_model_within_it():
    table, mixed, evaluator = _measured()
    float_accuracy, quantized = table.float_model.accuracy, table.quantized.accuracy
    assert float_accuracy - quantized > 0.05  # W2A2 as it is misses 5 points
    everything = {layer: "w8a8" for layer in candidates(table, mixed)}
    with mixed.variant(everything):
        best = evaluator.score(mixed.model).accuracy
    assert best > quantized + 0.02
    points = 100 * (float_accuracy - (best + quantized) / 2)  # half way: needs some layers
    choice = choose(Budget.parse(f"drop:{points}"), table, mixed, evaluator)
    assert choice.met and choice.layer_bits
    floor = float_accuracy - points / 100
    assert choice.predicted["accuracy"] >= floor - 1e-9
    fewer = dict(list(choice.layer_bits.items())[:-1])
    with mixed.variant(fewer):  # the shortest prefix: one layer fewer misses the budget
        assert evaluator.score(mixed.model).accuracy < floor
    loose = choose(Budget.parse("drop:100"), table, mixed, evaluator)
    assert loose.met and loose.layer_bits == {}
    table, mixed, evaluator = _measured(twins=["w4a4"])  # nothing above 4 bits on offer
    unreachable = choose(Budget.parse("drop:0"), table, mixed, evaluator)
    assert not unreachable.met and set(unreachable.layer_bits.values()) == {"w4a4"}


def test_after_a_probe_the_gain_is_what_raising_a_layer_inside_the_model_removes():
    model, images, labels = trained_toy()
    student = quantize(model, PrecisionOptions(BitWidths.parse("w4a4"), first_last_bits=None))
    calibrate(student, [images[:128]])
    with torch.no_grad():  # conv2's 4-bit weights on a grid 20x too coarse: most round to zero
        student.conv2.weight_quantizer.scale.mul_(20)
    mixed = MixedPrecisionModel.from_trained(student, model, ["w8a8"], [images[:128]], calibrate)
    evaluator = Evaluator(model, images[128:], labels[128:])
    table = measure(mixed, evaluator, "w4a4", model, frozenset({"raised"}), trained_epochs=1)
    rows = {r.layer: r for r in table.layers}
    gains = candidates(table, mixed)
    for layer, gain in gains.items():
        assert gain["w8a8"] == pytest.approx(table.quantized.kl - rows[layer].raised["w8a8"].kl)
    choice = choose(Budget.parse("share:0.25"), table, mixed, evaluator)
    assert choice.layer_bits == {"conv2": "w8a8"}  # re-calibrated at 8 bits: the damage gone


def test_at_8_bits_the_higher_precision_is_float():
    table, mixed, evaluator = _measured("w8a8")
    choice = choose(Budget.parse("share:0.25"), table, mixed, evaluator)
    assert list(choice.layer_bits.values()) == ["float"]


def test_a_float_layer_exports_without_qdq_and_lints_as_float(tmp_path):
    options = PrecisionOptions(BitWidths.parse("w8a8"), float_layers=("conv2",))
    q = quantize(_model(), options)
    assert type(q.conv2) is torch.nn.Conv2d
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate(q, [x])
    path = export_onnx(to_deploy(q.eval()), x, tmp_path / "m.onnx")
    model = onnx.load(str(path))
    producers = {o: n for n in model.graph.node for o in n.output}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    fed_by_dq = [
        any(
            producers.get(i) is not None and producers[i].op_type == "DequantizeLinear"
            for i in conv.input[:2]
        )
        for conv in convs
    ]
    assert sorted(fed_by_dq) == [False, True]  # conv1 quantized, conv2 float
    float_conv = convs[fed_by_dq.index(False)]
    findings = lint_file(str(path))
    assert not [f for f in findings if f.severity == "error"]
    assert any(f.rule == "FUSE-FLOAT-LAYER" and f.node == float_conv.name for f in findings)


def test_a_float_pattern_that_names_no_layer_is_refused():
    options = PrecisionOptions(BitWidths.parse("w8a8"), float_layers=("nothing.*",))
    with pytest.raises(UserError, match="match no quantized layer"):
        quantize(_model(), options)


TINY = """
teachers: [{arch: resnet8}]
teacher_train: {epochs: 1, batch_size: 128, lr: 0.1}
student:
  arch: resnet8
  bits: [w2a2]
  float_train: {epochs: 2, batch_size: 128, lr: 0.1}
  train: {epochs: 1, batch_size: 128, lr: 0.01, warmup_epochs: 0}
data: {calibration_size: 128}
quant: {budget: "share:0.2", budget_probe_epochs: 1, layer_bits: {fc: w4a4}}
bench: {batch_sizes: [1], warmup: 1, iterations: 2}
progress: false
"""


def test_the_pipeline_writes_its_choice_into_the_config_and_resume_keeps_it(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    run = tmp_path / "run"
    assert main(["--config", str(config), "--out", str(run)]) == 0
    record = json.loads((run / "budget.json").read_text())
    chosen = record["layer_bits"]
    assert len(chosen) == 2 and set(chosen.values()) == {"w8a8"}  # 20 % of 13 layers, top bits
    assert record["probe_epochs"] == 1  # chosen inside the uniform student after 1 epoch of QAT
    assert (run / "budget_probe_w2a2" / "model.pt").is_file()
    table = json.loads((run / "sensitivity.json").read_text())
    assert table["trained_epochs"] == 1 and table["bits"] == "w2a2"
    assert all(row["raised"] and row["alone"] is None for row in table["layers"])
    stored = load_config(str(run / "config.yaml")).quant.layer_bits
    assert stored == {**chosen, "fc": "w4a4"}  # the user's own entry is kept
    assert (run / "sensitivity.json").is_file() and (run / "sensitivity.md").is_file()
    # resumed with the model gone: the choice is read back, nothing is measured again
    (run / "w2a2" / "model.pt").unlink()
    shutil.copy(run / "sensitivity.json", tmp_path / "before.json")
    assert main(["--resume", str(run)]) == 0
    assert load_config(str(run / "config.yaml")).quant.layer_bits == stored
    assert json.loads((run / "budget.json").read_text()) == record
    assert (run / "sensitivity.json").read_bytes() == (tmp_path / "before.json").read_bytes()
