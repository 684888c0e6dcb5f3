"""qkd_deploy.data.augment: vectorised random padded crop and horizontal flip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qkd_deploy.data import Augment
from qkd_deploy.errors import UserError


def batch(n: int = 64, c: int = 2, h: int = 5, w: int = 6) -> torch.Tensor:
    """Distinct, non-zero, left-right asymmetric values, so every crop offset and flip shows."""
    return torch.arange(1, n * c * h * w + 1, dtype=torch.float32).view(n, c, h, w)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_identity_when_off() -> None:
    x = batch()
    assert Augment()(x, gen(0)) is x


def test_negative_padding_refused() -> None:
    with pytest.raises(UserError, match="crop_padding"):
        Augment(crop_padding=-1)


@pytest.mark.parametrize("augment", [Augment(2, False), Augment(0, True), Augment(3, True)])
def test_deterministic_given_generator(augment: Augment) -> None:
    x = batch()
    first = augment(x, gen(7))
    assert torch.equal(first, augment(x, gen(7)))
    assert not torch.equal(first, augment(x, gen(8)))
    assert first.shape == x.shape and torch.equal(x, batch())  # input untouched


def test_crop_is_a_shifted_window_of_the_zero_padded_image() -> None:
    p = 2
    x = batch()
    out = Augment(crop_padding=p)(x, gen(0))
    assert out.shape == x.shape
    padded = F.pad(x, (p, p, p, p))
    offsets = []
    for i in range(len(x)):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, dy : dy + 5, dx : dx + 6])
        ]
        assert len(matches) == 1, f"sample {i} is not a window of its padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 10  # offsets vary across the batch
    assert sum(o != (p, p) for o in offsets) > 0  # content actually moved
    assert (out == 0).any()  # and zero padding came in


def test_flip_flips_exactly_the_chosen_samples() -> None:
    x = batch()
    out = Augment(hflip=True)(x, gen(3))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(out[i], x[i]) for i in range(len(x))]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each one or the other
    assert 10 < sum(flipped) < 54  # about half flipped
