"""BatchNorm re-estimation after QAT: the statistics by hand, the modes, and a failed pass."""

import pytest
import torch
from torch import nn

from qkd_deploy.train.batchnorm import reestimate_batchnorm


class ModeRecorder(nn.Module):
    """Identity that records whether it ran in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def forward(self, x):
        self.modes.append(self.training)
        return x


def small_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 1), ModeRecorder(), nn.BatchNorm2d(3, momentum=0.3))


def test_statistics_are_the_average_over_the_batches_of_each_batchs_statistics():
    model = small_model()
    batches = [torch.randn(4, 2, 3, 3) * (i + 1) + i for i in range(3)]
    with torch.no_grad():  # what the BatchNorm sees: the conv's output, per channel
        seen = [model[0](x).transpose(0, 1).flatten(1) for x in batches]
    expected_mean = torch.stack([s.mean(1) for s in seen]).mean(0)
    expected_var = torch.stack([s.var(1, unbiased=True) for s in seen]).mean(0)

    assert reestimate_batchnorm(model, batches) == 1
    norm = model[2]
    torch.testing.assert_close(norm.running_mean, expected_mean)
    torch.testing.assert_close(norm.running_var, expected_var)
    assert norm.num_batches_tracked.item() == 3


def test_only_batchnorm_runs_in_training_mode_and_modes_are_restored():
    model = small_model().train()
    reestimate_batchnorm(model, [torch.randn(2, 2, 3, 3)])
    assert model[1].modes == [False]  # everything but BatchNorm (quantizers, dropout) in eval
    assert model.training and all(m.training for m in model.modules())
    assert model[2].momentum == 0.3

    model.eval()
    reestimate_batchnorm(model, [torch.randn(2, 2, 3, 3)])
    assert not any(m.training for m in model.modules())


def test_no_batches_or_a_failing_pass_keeps_the_old_statistics():
    model = small_model()
    model[2].running_mean.fill_(0.5)
    model[2].running_var.fill_(2.0)
    model[2].num_batches_tracked.fill_(7)
    with pytest.raises(ValueError, match="no batches"):
        reestimate_batchnorm(model, [])
    with pytest.raises(RuntimeError):  # the second batch has the wrong channel count
        reestimate_batchnorm(model, [torch.randn(2, 2, 3, 3), torch.randn(2, 5, 3, 3)])
    assert torch.all(model[2].running_mean == 0.5) and torch.all(model[2].running_var == 2.0)
    assert model[2].num_batches_tracked.item() == 7
    assert model[2].momentum == 0.3


def test_a_model_without_running_statistics_is_left_alone():
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert reestimate_batchnorm(model, [torch.randn(2, 2, 3, 3)]) == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
