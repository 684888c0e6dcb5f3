"""qkd_deploy.data.preprocess: normalisation spec, parsing, statistics, torch-free import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from qkd_deploy.data import Preprocess, normalization_stats, parse_normalize
from qkd_deploy.errors import UserError


def test_apply_matches_apply_numpy_and_formula() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 3, 5, 6), dtype=np.uint8)
    pre = Preprocess(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
    out_torch = pre.apply(torch.from_numpy(images))
    out_numpy = pre.apply_numpy(images)
    assert out_torch.dtype == torch.float32 and out_numpy.dtype == np.float32
    assert out_numpy.shape == images.shape
    np.testing.assert_allclose(out_torch.numpy(), out_numpy, rtol=0, atol=1e-6)
    mean, std = (np.array(v)[:, None, None] for v in (pre.mean, pre.std))
    expected = (images / 255.0 - mean) / std
    np.testing.assert_allclose(out_numpy, expected, rtol=0, atol=1e-5)


def test_apply_known_value_and_input_untouched() -> None:
    pre = Preprocess(mean=(0.5,), std=(0.25,))
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    assert pre.apply(images).flatten().tolist() == [-2.0, 2.0]
    assert images.flatten().tolist() == [0, 255]


@pytest.mark.parametrize("shape", [(2, 3, 4, 4), (3, 4, 4)])
def test_apply_rejects_wrong_channels(shape: tuple[int, ...]) -> None:
    pre = Preprocess(mean=(0.5,), std=(0.5,))
    with pytest.raises(UserError, match="1 mean/std value"):
        pre.apply(torch.zeros(shape, dtype=torch.uint8))
    with pytest.raises(UserError, match="1 mean/std value"):
        pre.apply_numpy(np.zeros(shape, dtype=np.uint8))


def test_apply_rejects_float_input() -> None:
    with pytest.raises(UserError, match="uint8"):
        Preprocess(mean=(0.5,), std=(0.5,)).apply(torch.zeros(1, 1, 2, 2))


def test_dict_round_trip_through_json() -> None:
    pre = Preprocess(mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
    d = json.loads(json.dumps(pre.to_dict()))
    assert d == {
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "scale": "1/255",
        "layout": "NCHW",
    }
    assert Preprocess.from_dict(d) == pre


@pytest.mark.parametrize(
    "d",
    [
        {"mean": [0.5], "std": [0.5], "layout": "NHWC"},
        {"mean": [0.5]},
        {"mean": [0.5], "std": [0.5], "scale": "1"},
        {"mean": [0.5, 0.5], "std": [0.5]},
    ],
)
def test_from_dict_rejects_bad_specs(d: dict) -> None:
    with pytest.raises(UserError):
        Preprocess.from_dict(d)


@pytest.mark.parametrize(
    ("text", "channels", "mean", "std"),
    [
        ("0.1307,0.3081", 1, (0.1307,), (0.3081,)),
        ("0.5,0.25", 3, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        (
            "0.4914/0.4822/0.4465,0.247/0.243/0.261",
            3,
            (0.4914, 0.4822, 0.4465),
            (0.247, 0.243, 0.261),
        ),
        (" 0.5 , 0.1/0.2/0.3 ", 3, (0.5, 0.5, 0.5), (0.1, 0.2, 0.3)),
    ],
)
def test_parse_normalize_accepts(text: str, channels: int, mean: tuple, std: tuple) -> None:
    pre = parse_normalize(text, channels)
    assert pre.mean == mean and pre.std == std


@pytest.mark.parametrize(
    ("text", "channels", "message"),
    [
        ("0.5", 1, "MEAN,STD"),
        ("0.5,0.2,0.1", 1, "MEAN,STD"),
        ("a,0.3", 1, "'a' is not a number"),
        ("0.1/0.2,0.3", 3, "has 2 values but the images have 3"),
        ("0.5,0", 1, "std <= 0"),
        ("0.5,-0.2/0.2/0.2", 3, "std <= 0"),
        ("nan,0.5", 1, "finite"),
    ],
)
def test_parse_normalize_rejects(text: str, channels: int, message: str) -> None:
    with pytest.raises(UserError, match=message) as info:
        parse_normalize(text, channels)
    assert "0.4914/0.4822/0.4465" in str(info.value)  # the message shows the format


def test_normalization_stats_known_array() -> None:
    images = np.zeros((2, 2, 1, 2), dtype=np.uint8)
    images[:, 0] = [[0, 255]]  # channel 0: half 0, half 1 -> mean 0.5, std 0.5
    images[:, 1] = [[[51, 102]], [[153, 204]]]  # channel 1: 0.2, 0.4, 0.6, 0.8
    pre = normalization_stats(images)
    assert pre.mean == pytest.approx((0.5, 0.5), abs=1e-12)
    assert pre.std == pytest.approx((0.5, np.std([0.2, 0.4, 0.6, 0.8])), abs=1e-12)


def test_normalization_stats_matches_numpy() -> None:
    images = np.random.default_rng(1).integers(0, 256, (7, 3, 5, 4), dtype=np.uint8)
    pre = normalization_stats(images)
    scaled = images / 255.0
    np.testing.assert_allclose(pre.mean, scaled.mean(axis=(0, 2, 3)), atol=1e-12)
    np.testing.assert_allclose(pre.std, scaled.std(axis=(0, 2, 3)), atol=1e-12)


def test_normalization_stats_rejects_constant_channel() -> None:
    with pytest.raises(UserError, match="channel 0 .* constant"):
        normalization_stats(np.full((3, 1, 2, 2), 7, dtype=np.uint8))


def test_preprocess_imports_without_torch() -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "import qkd_deploy.data.preprocess as p\n"
        "pre = p.parse_normalize('0.5,0.5', 1)\n"
        "out = pre.apply_numpy(np.full((1, 1, 2, 2), 255, np.uint8))\n"
        "assert out.max() == 1.0, out\n"
        "assert p.Preprocess.from_dict(pre.to_dict()) == pre\n"
        "assert sys.modules['torch'] is None\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
