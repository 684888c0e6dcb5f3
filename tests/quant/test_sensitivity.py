"""Per-layer sensitivity on a small real model: switching quantizers off and on is exact, and
a layer whose weights are quantized with a wrong scale ranks first."""

import torch

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions
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
    alone = measure(mixed, evaluator, "w4a4", model, within_model=False)
    assert [r.layer for r in alone.layers] == [r.layer for r in full.layers]
    for quick, whole in zip(alone.layers, full.layers, strict=True):
        assert (quick.alone, quick.alone_raised) == (whole.alone, whole.alone_raised)
        assert quick.float is None and quick.raised == {}
    row = next(line for line in markdown(alone).splitlines() if line.startswith("| conv2 |"))
    assert row.split(" | ")[3:6] == ["-", "-", "-"]  # float acc, float KL, w8a8 acc not measured
