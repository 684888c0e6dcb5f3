import math

import pytest
import torch
from torch import nn

from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import checked_method_options
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from tests.support.hand_math import softmax


def test_kd_kl_matches_hand_computation():
    s = [[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
    t = [[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
    tau = 2.0
    expected = 0.0
    for rs, rt in zip(s, t, strict=True):
        ps, pt = softmax(rs, tau), softmax(rt, tau)
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt, strict=True))
    expected = expected / 2 * tau**2
    assert kd_kl(torch.tensor(s), torch.tensor(t), tau).item() == pytest.approx(expected, rel=1e-6)
    assert kd_kl(torch.tensor(t), torch.tensor(t), tau).item() == pytest.approx(0.0, abs=1e-7)


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits


def test_kd_loss_terms():
    student, teacher = _Fixed([[1.0, 2.0, 0.0]]), _Fixed([[2.0, 1.0, 0.0]])
    labels = torch.tensor([1])
    kd = build_distiller("kd", student, [teacher], {"tau": 4.0, "alpha": 0.3})
    _, terms = kd.forward_train(torch.zeros(1), labels, 0.0)
    ce = -math.log(softmax([1.0, 2.0, 0.0], 1.0)[1])
    assert terms["ce"].item() == pytest.approx(0.3 * ce, rel=1e-6)
    soft = kd_kl(student.logits, teacher.logits, 4.0).item()
    assert terms["kd"].item() == pytest.approx(0.7 * soft, rel=1e-6)


@pytest.mark.parametrize(
    ("schedule", "progress", "weight"),
    [
        ("linear", 0.0, 0.5),
        ("linear", 0.5, 0.25),
        ("linear", 1.0, 0.0),
        ("cosine", 0.5, 0.25),
        ("cosine", 0.25, 0.5 * (1 + math.cos(math.pi / 4)) / 2),
    ],
)
def test_kd_decay_schedule(schedule, progress, weight):
    d = build_distiller(
        "kd-decay", _Fixed([[0.0, 1.0]]), [_Fixed([[1.0, 0.0]])], {"schedule": schedule}
    )
    assert d.soft_weight(progress) == pytest.approx(weight)
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([0]), progress)
    ce = -math.log(softmax([0.0, 1.0], 1.0)[0])
    assert terms["ce"].item() == pytest.approx((1 - weight) * ce, rel=1e-6)


def test_checked_method_options_fill_in_defaults_and_check_the_teacher_count():
    assert checked_method_options("kd-decay", {"tau": 2.0}, 1) == {
        "tau": 2.0,
        "soft_start": 0.5,
        "schedule": "linear",
    }
    indistill = checked_method_options("indistill", {"stage_lengths": (1, 2, 3)}, 1)
    assert indistill["stage_lengths"] == [1, 2, 3]  # YAML-safe: tuples become lists
    assert checked_method_options("cdfkd-mfs", {}, 2)["batch_size"] == 256
    with pytest.raises(UserError, match="needs at least 2 teacher"):
        checked_method_options("cdfkd-mfs", {}, 1)
    with pytest.raises(UserError, match="2 non-negative numbers"):
        checked_method_options("avg-teachers", {"weights": [1.0]}, 2)
    with pytest.raises(UserError, match="must be >= 2"):
        checked_method_options("dafl", {"batch_size": 1}, 1)


def test_method_errors_name_the_problem():
    with pytest.raises(UserError, match="unknown method 'kdd'"):
        build_distiller("kdd", _Fixed([[0.0]]), [])
    with pytest.raises(UserError, match="no option"):
        build_distiller("kd", _Fixed([[0.0]]), [_Fixed([[0.0]])], {"temperature": 3})
    with pytest.raises(UserError, match="teacher"):
        build_distiller("kd", _Fixed([[0.0]]), [])
    with pytest.raises(UserError, match="cosine"):
        build_distiller("kd-decay", _Fixed([[0.0]]), [_Fixed([[0.0]])], {"schedule": "step"})


def test_frozen_teachers_stay_in_eval_mode():
    teacher = nn.Sequential(nn.BatchNorm1d(3))
    d = build_distiller("kd", nn.Linear(3, 3), [teacher])
    d.train()
    assert d.student.training and not teacher.training
    params = [p for g in d.parameter_groups() for p in g["params"]]
    assert params and all(p is not teacher[0].weight for p in params)
