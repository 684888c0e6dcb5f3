"""User models (``package.module:factory``) and checkpoint loading."""

import copy
import pickle
import sys
import textwrap
import uuid

import pytest
import torch

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model, load_checkpoint, load_user_model
from qkd_deploy.models.features import (
    attach_feature_layers,
    forward_features,
    logits_and_pooled,
    pooled_width,
    stage_channels,
    stage_module,
    student_role,
    teacher_role,
)
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.modules import QuantConv2d

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(torch.flatten(self.bn(self.conv(x)).mean((2, 3)), 1))

    def build():
        return Net()

    def not_a_model():
        return 42

    def needs_width(width):
        return Net()

    NOT_CALLABLE = 3
""")


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Name of a fresh importable module holding USER_MODULE."""
    name = f"usernet_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.fixture
def trained(user_module):
    """A user model with non-default weights and BN statistics."""
    model = load_user_model(f"{user_module}:build")
    torch.manual_seed(1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 7},
        lambda sd: {"model": sd, "optimizer": {"lr": torch.tensor(0.1)}},
        lambda sd: {"model_state": sd},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "state_dict", "model", "model_state", "ddp", "nested-ddp"],
)
def test_checkpoint_formats_restore_weights(tmp_path, user_module, trained, wrap):
    path = tmp_path / "ckpt.pt"
    torch.save(wrap(trained.state_dict()), path)
    loaded = load_user_model(f"{user_module}:build", str(path))
    _assert_same_weights(loaded, trained)
    fresh = load_user_model(f"{user_module}:build")
    with pytest.raises(AssertionError):
        _assert_same_weights(fresh, trained)  # so the check above could fail


def test_load_checkpoint_into_a_zoo_model(tmp_path):
    torch.manual_seed(0)
    source = build_model("resnet8", 1, 10)
    for p in source.parameters():
        p.data.normal_()
    path = tmp_path / "resnet8.pt"
    torch.save({"model": source.state_dict()}, path)
    target = build_model("resnet8", 1, 10)
    assert load_checkpoint(target, str(path)) is target
    _assert_same_weights(target, source)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("resnet_like", "'package.module:factory'"),
        ("pkg.mod:", "'package.module:factory'"),
        ("no_such_module_qkd:build", "cannot import module 'no_such_module_qkd'.*No module named"),
    ],
)
def test_bad_specs(spec, message):
    with pytest.raises(UserError, match=message):
        load_user_model(spec)


def test_import_error_inside_user_module_is_reported(tmp_path, monkeypatch):
    name = f"broken_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text("import missing_dependency_qkd\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match=f"cannot import module '{name}'.*missing_dependency_qkd"):
        load_user_model(f"{name}:build")


@pytest.mark.parametrize(
    "factory, message",
    [
        ("missing", "has no attribute 'missing'"),
        ("NOT_CALLABLE", "int object is not callable"),
        ("needs_width", "calling it with no arguments failed.*width"),
        ("not_a_model", "returned a int, not a torch.nn.Module"),
    ],
)
def test_bad_factories(user_module, factory, message):
    with pytest.raises(UserError, match=message) as info:
        load_user_model(f"{user_module}:{factory}")
    assert f"{user_module}:{factory}" in str(info.value)


def _checkpoint_error(tmp_path, user_module, content) -> str:
    path = tmp_path / "ckpt.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(UserError) as info:
        load_user_model(f"{user_module}:build", str(path))
    assert str(path) in str(info.value)
    return str(info.value)


def test_missing_checkpoint_file(tmp_path, user_module):
    with pytest.raises(UserError, match="does not exist"):
        load_user_model(f"{user_module}:build", str(tmp_path / "nope.pt"))


def test_unreadable_checkpoints(tmp_path, user_module, trained):
    assert "cannot be read" in _checkpoint_error(tmp_path, user_module, b"not a checkpoint")
    # A pickled module is refused by weights_only=True: tell the user to save the state dict.
    message = _checkpoint_error(tmp_path, user_module, trained)
    assert "cannot be read" in message and "pickled Python objects" in message
    assert "state_dict()" in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ([1, 2, 3], "found list"),
        ({"epoch": 3, "lr": 0.1}, "found keys ['epoch', 'lr']"),
        ({"state_dict": {"fc.weight": 1.0}}, "not a state dict"),
        ({}, "not a state dict"),
    ],
)
def test_not_a_state_dict(tmp_path, user_module, content, expected):
    message = _checkpoint_error(tmp_path, user_module, content)
    assert "is not a state dict" in message and expected in message


def test_key_and_shape_mismatches_are_listed(tmp_path, user_module, trained):
    state = trained.state_dict()
    del state["fc.bias"]
    state["head.weight"] = torch.zeros(2)
    state["conv.weight"] = torch.zeros(8, 1, 3, 3)
    message = _checkpoint_error(tmp_path, user_module, state)
    assert "1 missing keys: fc.bias" in message
    assert "1 unexpected keys: head.weight" in message
    assert "conv.weight (8, 1, 3, 3) vs model (4, 1, 3, 3)" in message


def test_long_key_lists_are_shortened(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(build_model("resnet8", 1, 10).state_dict(), path)
    with pytest.raises(UserError, match=r"missing keys: .*\(\+\d+ more\)") as info:
        load_checkpoint(build_model("mobilenetv2", 1, 10), str(path))
    assert "MobileNetV2" in str(info.value)


def test_a_module_in_the_working_directory_is_found_as_python_m_finds_it(tmp_path, monkeypatch):
    """The qkd-deploy script's sys.path starts with its own folder, not the working directory."""
    name = f"herenet_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    model = load_user_model(f"{name}:build")
    assert isinstance(model, torch.nn.Module)
    assert str(tmp_path) not in sys.path  # the path is left as it was


# ---- stage layers of a user model (feature_layers) --------------------------------------------

STAGED_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def block(cin, cout, stride=1):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = block(1, 4)
            self.layer1 = block(4, 4)
            self.layer2 = block(4, 8, stride=2)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.layer1(x)
            x = self.layer2(x)
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))

    class Twice(Net):
        def forward(self, x):
            return super().forward(self.stem[2](x))

    def build():
        return Net()

    def twice():
        return Twice()
""")

STAGES = ["layer1", "layer2"]
ROLE = student_role("feed")


@pytest.fixture
def staged(tmp_path, monkeypatch):
    """Name of a fresh importable module holding STAGED_MODULE."""
    name = f"stagednet_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(STAGED_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _reference_stages(model, x):
    """The stage outputs computed by hand, as the model's forward computes them."""
    stem = model.stem(x)
    first = model.layer1(stem)
    return [first, model.layer2(stem + first)]


def test_feature_layers_give_the_named_layers_outputs_and_their_widths(staged):
    model = attach_feature_layers(load_user_model(f"{staged}:build"), STAGES, "opt", (1, 8, 8))
    model.eval()
    assert stage_channels(model, ROLE) == [4, 8]
    x = torch.randn(3, 1, 8, 8)
    logits, stages = forward_features(model, x, ROLE)
    torch.testing.assert_close(logits, model(x))
    for got, want in zip(stages, _reference_stages(model, x), strict=True):
        torch.testing.assert_close(got, want)
    assert all(not m._forward_hooks for m in model.modules())  # hooks only while reading
    assert stage_module(model, 1, ROLE) is model.layer2


def test_feature_layers_survive_deepcopy_quantization_and_pickling(staged):
    model = attach_feature_layers(load_user_model(f"{staged}:build"), STAGES, "opt", (1, 8, 8))
    quantized = quantize_model(model, QuantizeOptions(BitWidths(8, 8)))
    calibrate(quantized, [torch.randn(8, 1, 8, 8)])
    for copy_ in (copy.deepcopy(quantized), pickle.loads(pickle.dumps(quantized))):
        copy_.eval()
        x = torch.randn(2, 1, 8, 8)
        logits, stages = forward_features(copy_, x, ROLE)
        torch.testing.assert_close(logits, copy_(x))
        assert [s.shape[1] for s in stages] == stage_channels(copy_, ROLE) == [4, 8]
        assert isinstance(copy_.layer1[0], QuantConv2d)  # the quantized layers, by the same name


def test_a_model_without_stages_names_the_option_and_some_of_its_modules(staged):
    model = load_user_model(f"{staged}:build")
    role = teacher_role("indistill", 1)
    with pytest.raises(UserError, match=r"teachers\[1\]\.feature_layers") as info:
        stage_channels(model, role)
    assert "'layer1'" in str(info.value) and "no stage feature maps" in str(info.value)


@pytest.mark.parametrize(
    "factory, layers, message",
    [
        ("build", ["layer1", "layer9"], r"\['layer9'\] name no module of Net"),
        ("build", [], "is empty"),
        ("build", ["fc"], r"fc returns \(2, 3\), not an \(N, C, H, W\) feature map"),
        ("twice", ["stem.2"], "stem.2 runs 2 times per forward pass"),
    ],
)
def test_bad_feature_layers_are_refused_by_name(staged, factory, layers, message):
    model = load_user_model(f"{staged}:{factory}")
    with pytest.raises(UserError, match=message) as info:
        attach_feature_layers(model, layers, "student.feature_layers", (1, 8, 8))
    assert str(info.value).startswith("student.feature_layers")


def test_penultimate_features_are_the_input_of_the_last_linear(staged):
    model = load_user_model(f"{staged}:build").eval()
    x = torch.randn(2, 1, 8, 8)
    logits, pooled = logits_and_pooled(model, x, "dafl's teacher")
    stages = _reference_stages(model, x)
    torch.testing.assert_close(pooled, stages[-1].mean((2, 3)))
    assert pooled_width(model, "x") == 8
    with pytest.raises(UserError, match="dafl's teacher: Sequential has no nn.Linear"):
        logits_and_pooled(torch.nn.Sequential(torch.nn.Flatten()), x, "dafl's teacher")
