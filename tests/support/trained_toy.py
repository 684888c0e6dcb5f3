"""A toy residual classifier trained for a few seconds on the digits, with held-out images: a
real classifier for the tests that measure what quantizing its layers does."""

import functools

import torch
import torch.nn.functional as F

from qkd_deploy.data import load_dataset, normalization_stats
from tests.support.toy import ToyResNet


@functools.cache
def _trained_state() -> tuple[dict, torch.Tensor, torch.Tensor]:
    data = load_dataset("digits")
    preprocess = normalization_stats(data.train.images.numpy())
    images, labels = preprocess.apply(data.train.images), data.train.labels
    torch.manual_seed(0)
    model = ToyResNet(width=16)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(4):
        for batch in torch.randperm(len(labels)).split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(images[batch]), labels[batch]).backward()
            optimizer.step()
    return model.state_dict(), preprocess.apply(data.test.images), data.test.labels


def trained_toy() -> tuple[ToyResNet, torch.Tensor, torch.Tensor]:
    """The trained model (eval mode, a fresh copy) and the digits test images and labels."""
    state, images, labels = _trained_state()
    model = ToyResNet(width=16)
    model.load_state_dict(state)
    return model.eval(), images, labels
