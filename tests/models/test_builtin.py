"""The model zoo's contract with quantization, BN folding, export and distillation."""

import math

import pytest
import torch
from torch import fx, nn

from qkd_deploy.errors import UserError
from qkd_deploy.models import MODELS, Add, available_models, build_model

CONFIGS = [(1, 10, 8), (3, 100, 32)]  # (in_channels, classes, input size)
STAGE_STRIDES = {"mobilenetv2": (1, 2, 4, 8), "resnet18": (1, 2, 4, 8)}  # CIFAR resnets: (1, 2, 4)
RESIDUAL_BLOCKS = {
    "resnet8": 3,
    "resnet14": 6,
    "resnet20": 9,
    "resnet32": 15,
    "resnet56": 27,
    "resnet8x4": 3,
    "resnet32x4": 15,
    "resnet18": 8,
    "mobilenetv2": 10,
}


def _record_calls(model: nn.Module, x: torch.Tensor) -> list[tuple[nn.Module, tuple, object]]:
    """(module, inputs, output) for every module call during one forward, in call order."""
    calls = []
    handles = [
        m.register_forward_hook(lambda m, i, o: calls.append((m, i, o))) for m in model.modules()
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return calls


def test_registry_lists_every_model():
    assert available_models() == list(MODELS)
    assert set(MODELS) == set(RESIDUAL_BLOCKS)


@pytest.mark.parametrize("in_channels, classes, size", CONFIGS)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_shapes_and_features(name, in_channels, classes, size):
    torch.manual_seed(0)
    model = build_model(name, in_channels, classes).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        plain = model(x)
    stage_outputs = []
    for stage in model.stages:
        stage.register_forward_hook(lambda m, i, o: stage_outputs.append(o))
    with torch.no_grad():
        logits, feats = model.forward_features(x)
    assert torch.equal(plain, logits)
    assert logits.shape == (2, classes)
    strides = STAGE_STRIDES.get(name, (1, 2, 4))
    assert len(model.stage_channels) == len(strides) == len(feats["stages"])
    for feat, channels, stride, actual in zip(
        feats["stages"], model.stage_channels, strides, stage_outputs, strict=True
    ):
        assert feat.shape == (2, channels, size // stride, size // stride)
        assert feat is actual  # the forward pass's own tensors, not recomputed copies
    assert feats["pooled"].shape == (2, model.stage_channels[-1])
    assert torch.allclose(feats["pooled"], feats["stages"][-1].mean((2, 3)), atol=1e-6)


@pytest.mark.parametrize(
    "name, classes, expected",
    [
        ("resnet20", 10, 0.27e6),
        ("resnet56", 10, 0.86e6),
        ("resnet8x4", 100, 1.23e6),
        ("resnet32x4", 100, 7.43e6),
        ("resnet18", 10, 11.17e6),  # the CIFAR ResNet-18 (3x3 stem, no max-pool)
    ],
)
def test_parameter_counts_match_references(name, classes, expected):
    count = sum(p.numel() for p in build_model(name, 3, classes).parameters())
    assert count == pytest.approx(expected, rel=0.02)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_module_runs_once_and_each_conv_feeds_only_its_bn(name):
    model = build_model(name, 3, 10).eval()
    with torch.no_grad():
        calls = _record_calls(model, torch.randn(1, 3, 16, 16))
    ids = [id(m) for m, _, _ in calls]
    callable_modules = [m for m in model.modules() if not isinstance(m, nn.ModuleList)]
    assert sorted(ids) == sorted(id(m) for m in callable_modules)  # each exactly once
    adds = [m for m in model.modules() if isinstance(m, Add)]
    assert len(adds) == RESIDUAL_BLOCKS[name]

    leaf_calls = [(m, i, o) for m, i, o in calls if not list(m.children())]
    order = [m for m in model.modules() if not list(m.children())]
    for index, (module, _, output) in enumerate(leaf_calls):
        if not isinstance(module, nn.Conv2d):
            continue
        assert module.bias is None
        consumers = [m for m, inputs, _ in leaf_calls if any(t is output for t in inputs)]
        assert len(consumers) == 1 and isinstance(consumers[0], nn.BatchNorm2d)
        assert leaf_calls[index + 1][0] is consumers[0]  # called right after the conv
        assert order[order.index(module) + 1] is consumers[0]  # and registered right after it
    conv_outputs = [o for m, _, o in leaf_calls if isinstance(m, nn.Conv2d)]
    for module, inputs, _ in leaf_calls:
        if isinstance(module, nn.BatchNorm2d):
            assert any(inputs[0] is o for o in conv_outputs)


class _AddIsLeaf(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Add) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_uses_modules_only(name):
    """fx trace: no functional ops but flatten (so no `a + b`, no F.relu), activations are
    non-inplace modules, and the head is a single Linear."""
    model = build_model(name, 3, 10)
    graph = _AddIsLeaf().trace(model)
    modules = dict(model.named_modules())
    functions = {n.target for n in graph.nodes if n.op == "call_function"}
    assert functions == {torch.flatten}
    assert not [n for n in graph.nodes if n.op == "call_method"]
    called = [modules[n.target] for n in graph.nodes if n.op == "call_module"]
    activations = [m for m in called if isinstance(m, (nn.ReLU, nn.ReLU6))]
    assert activations and not any(m.inplace for m in activations)
    assert len({id(m) for m in activations}) == len(activations)
    assert [type(m) for m in called if isinstance(m, nn.Linear)] == [nn.Linear]
    assert isinstance(called[-1], nn.Linear)


def test_init_is_kaiming_fan_out_with_unit_batchnorm():
    model = build_model("resnet32x4", 3, 100)
    conv = model.stages[2][1].conv2  # 256 -> 256, 3x3
    expected_std = math.sqrt(2 / (256 * 9))
    assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv2"])
def test_torch_export(name):
    torch.manual_seed(0)
    model = build_model(name, 3, 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        exported = torch.export.export(model, (x,))
        assert torch.allclose(exported.module()(x), model(x), atol=1e-5)


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError, match="unknown model 'resnet99'") as info:
        build_model("resnet99", 3, 10)
    for name in MODELS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "in_channels, classes, what", [(0, 10, "in_channels"), (3, -1, "num_classes")]
)
def test_bad_sizes_are_user_errors(in_channels, classes, what):
    with pytest.raises(UserError, match=what):
        build_model("resnet8", in_channels, classes)
