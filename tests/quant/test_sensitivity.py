"""Per-layer sensitivity on a small real model: switching quantizers off and on is exact, and
a layer whose weights are quantized with a wrong scale ranks first."""

import torch
import torch.nn.functional as F

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions
from qkd_deploy.quant.precision import quantize
from qkd_deploy.quant.sensitivity import (
    Evaluator,
    MixedPrecisionModel,
    layer_quantizers,
    markdown,
    measure,
)
from tests.support.trained_toy import trained_toy


def _setup(bits="w4a4"):
    model, images, labels = trained_toy()
    options = QuantizeOptions(BitWidths.parse(bits))  # conv1 and fc at 8 bits
    mixed = MixedPrecisionModel.build(model, options, ["w8a8"], [images[:128]], calibrate)
    return model, mixed, Evaluator(model, images[128:], labels[128:])


def test_every_quantizer_holding_module_is_a_layer():
    _, mixed, _ = _setup()
    assert set(layer_quantizers(mixed.model)) == {"conv1", "conv2", "add", "fc"}
    assert mixed.selectable == {"conv1", "conv2", "add", "fc"}


def test_variants_leave_the_model_as_it_was():
    _, mixed, evaluator = _setup()
    before = evaluator.logits(mixed.model)
    with mixed.variant({"conv2": "w8a8", "fc": "float"}, only={"conv2", "fc"}):
        changed = evaluator.logits(mixed.model)
    assert not torch.equal(before, changed)
    assert torch.equal(before, evaluator.logits(mixed.model))


def test_every_layer_off_is_the_float_model_and_float_scores_perfectly():
    model, mixed, evaluator = _setup()
    with mixed.variant({}, only=set()):
        assert torch.equal(evaluator.logits(mixed.model), evaluator.logits(model))
    assert evaluator.score(model).accuracy > 0.8
    assert evaluator.score(model).kl == 0.0


def test_a_layer_with_wrongly_scaled_weights_ranks_first():
    model, mixed, evaluator = _setup()
    with torch.no_grad():  # conv2's weights on a grid 20x too coarse: most round to zero
        mixed.model.conv2.weight_quantizer.scale.mul_(20)
    table = measure(mixed, evaluator, "w4a4", model)
    assert table.layers[0].layer == "conv2"
    assert table.layers[0].alone.kl > 2 * table.layers[1].alone.kl
    broken = table.layers[0]
    assert broken.float.kl < table.quantized.kl  # leaving it float recovers most
    assert broken.alone_raised["w8a8"].kl < broken.alone.kl / 10  # at 8 bits it does little
    assert "| conv2 |" in markdown(table)


def test_measuring_layers_alone_only_gives_the_same_alone_columns():
    model, mixed, evaluator = _setup()
    full = measure(mixed, evaluator, "w4a4", model)
    alone = measure(mixed, evaluator, "w4a4", model, frozenset({"alone", "alone_raised"}))
    assert [r.layer for r in alone.layers] == [r.layer for r in full.layers]
    for quick, whole in zip(alone.layers, full.layers, strict=True):
        assert (quick.alone, quick.alone_raised) == (whole.alone, whole.alone_raised)
        assert quick.float is None and quick.raised == {}
    row = next(line for line in markdown(alone).splitlines() if line.startswith("| conv2 |"))
    assert row.split(" | ")[3:6] == ["-", "-", "-"]  # float acc, float KL, w8a8 acc not measured


def _briefly_trained(
    bits: str,
) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Tensor]:
    """The toy quantized at ``bits``, calibrated, then a few steps of QAT on the labels."""
    model, images, labels = trained_toy()
    student = quantize(model, QuantizeOptions(BitWidths.parse(bits), first_last_bits=None))
    calibrate(student, [images[:128]])
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    torch.manual_seed(0)
    student.train()
    for batch in torch.randperm(len(labels) - 128)[:320].add(128).split(64):
        optimizer.zero_grad()
        F.cross_entropy(student(images[batch]), labels[batch]).backward()
        optimizer.step()
    return student.eval(), model, images, labels


def test_a_trained_models_twin_keeps_its_weights_at_the_higher_bits():
    student, model, images, _ = _briefly_trained("w2a2")
    before = {k: v.clone() for k, v in student.state_dict().items()}
    mixed = MixedPrecisionModel.from_trained(student, model, ["w8a8"], [images[:128]], calibrate)
    twin = mixed.twins["w8a8"]
    assert mixed.model is student and mixed.selectable == {"conv1", "conv2", "add", "fc"}
    assert {q.bits for qs in layer_quantizers(twin).values() for _, q in qs} == {8}
    assert {q.bits for qs in layer_quantizers(student).values() for _, q in qs} == {2}
    assert torch.equal(twin.conv2.weight, student.conv2.weight)  # the trained weights
    after = student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the student is untouched


def test_inside_a_trained_model_the_rows_are_sorted_by_what_raising_leaves():
    student, model, images, labels = _briefly_trained("w2a2")
    mixed = MixedPrecisionModel.from_trained(student, model, ["w8a8"], [images[:128]], calibrate)
    evaluator = Evaluator(model, images[128:], labels[128:])
    table = measure(mixed, evaluator, "w2a2", model, frozenset({"raised"}), trained_epochs=1)
    assert table.trained_epochs == 1 and table.to_dict()["trained_epochs"] == 1
    left = [row.raised["w8a8"].kl for row in table.layers]
    assert left == sorted(left)  # the most to gain first
    assert all(row.alone is None and row.float is None for row in table.layers)
    with mixed.variant(dict.fromkeys(mixed.selectable, "w8a8")):
        assert evaluator.score(student).kl < table.quantized.kl  # 8 bits everywhere: closer
    text = markdown(table)
    assert "after 1 epoch(s) of QAT" in text
    row = next(line for line in text.splitlines() if line.startswith(f"| {table.layers[0].layer}"))
    assert row.split(" | ")[1:5] == ["-", "-", "-", "-"]  # alone and float not measured
