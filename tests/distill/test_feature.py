"""Feature-level distillation: FEED and InDistill (qkd_deploy.distill.feature)."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkd_deploy.distill.feature as feature
from qkd_deploy.config import TrainConfig
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import MethodContext
from qkd_deploy.distill.losses import kd_kl
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model
from qkd_deploy.models.base import StagedClassifier, conv_bn
from qkd_deploy.train.optim import build_optimizer
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    training_lowers_loss,
)


class _FixedStaged(nn.Module):
    """A staged model whose features and logits are given tensors; stage ``k`` is a 1x1 conv
    whose weights (used to rank channels) are ``filters[k]``."""

    def __init__(self, maps, logits, filters=None):
        super().__init__()
        self.maps, self.logits = maps, nn.Parameter(torch.tensor(logits))
        self.stage_channels = [m.shape[1] for m in maps]
        self.stages = nn.ModuleList(nn.Conv2d(1, m.shape[1], 1, bias=False) for m in maps)
        for stage, w in zip(self.stages, filters or [], strict=False):
            stage.weight.data = torch.tensor(w).view(-1, 1, 1, 1)

    def forward_features(self, x):
        return self.logits, {"stages": [m * 1.0 for m in self.maps]}


def _tiny(widths, stem_stride=1):
    """A tiny StagedClassifier: stem, then one 1x1 conv-BN-ReLU per stage (no downsampling)."""
    chans = [4, *widths]
    pairs = zip(chans, widths, strict=False)
    stages = [nn.Sequential(*conv_bn(a, b, 1), nn.ReLU()) for a, b in pairs]
    stem = nn.Sequential(*conv_bn(1, 4, 3, stem_stride), nn.ReLU())
    return StagedClassifier(stem, stages, list(widths), 10).eval()


# ---- loss terms against hand-computed numbers ------------------------------------------------


def test_normalized_l1_matches_hand_computation():
    # per sample: flatten, divide by the L2 norm, then mean |difference| over all elements
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    t = torch.tensor([[0.0, 2.0], [-1.0, 0.0]]).view(2, 2, 1, 1)
    # [.6, .8] vs [0, 1] and [1, 0] vs [-1, 0]: |diff| = .6, .2, 2, 0
    assert feature.normalized_l1(s, t).item() == pytest.approx(0.7)
    s = torch.ones(1, 2, 1, 2)  # -> all 0.5
    t = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # -> [1, 0, 0, 0]
    assert feature.normalized_l1(s, t).item() == pytest.approx(0.5)
    assert feature.normalized_l1(3 * t, t).item() == pytest.approx(0.0, abs=1e-7)


def _feed_with_identity_translators(options):
    s_map = torch.tensor([[3.0, 4.0]]).view(1, 2, 1, 1)
    t_maps = [torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, 3.0]])]
    student = _FixedStaged([s_map], [[2.0, 0.0]])
    teachers = [_FixedStaged([m.view(1, 2, 1, 1)], [[0.0, 0.0]]) for m in t_maps]
    d = build_distiller("feed", student, teachers, options)
    d.translators = nn.ModuleList([nn.Identity(), nn.Identity()])
    return d


def test_feed_loss_terms():
    d = _feed_with_identity_translators({"beta": 10.0})
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([1]), 0.3)
    # [.6, .8] vs [0, 1] -> (.6 + .2) / 2 = .4;  [.6, .8] vs [.8, .6] -> .2
    assert terms["feed"].item() == pytest.approx(10.0 * (0.4 + 0.2))
    assert terms["ce"].item() == pytest.approx(
        F.cross_entropy(torch.tensor([[2.0, 0.0]]), torch.tensor([1])).item()
    )


@pytest.mark.parametrize(
    ("progress", "expected"), [(0.0, 0.4), (0.49, 0.4), (0.5, 0.2), (1.0, 0.2)]
)
def test_feed_sequential_uses_one_teacher_per_equal_share(progress, expected):
    d = _feed_with_identity_translators({"beta": 1.0, "mode": "sequential"})
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([1]), progress)
    assert terms["feed"].item() == pytest.approx(expected)


def test_feed_sequential_trains_only_the_current_teachers_translator():
    student = _FixedStaged([torch.randn(2, 2, 2, 2)], [[2.0, 0.0], [0.0, 1.0]])
    teachers = [_FixedStaged([torch.randn(2, c, 2, 2)], [[0.0, 0.0]] * 2) for c in (3, 5)]
    d = build_distiller("feed", student, teachers, {"mode": "sequential"})
    d.train()
    for progress, active in ((0.2, 0), (0.7, 1)):
        d.zero_grad(set_to_none=True)
        _, terms = d.forward_train(torch.zeros(2), torch.tensor([0, 1]), progress)
        sum(terms.values()).backward()
        for i, translator in enumerate(d.translators):
            grads = [p.grad for p in translator.parameters()]
            assert all((g is not None) == (i == active) for g in grads)


def _indistill_fixed(options):
    student = _FixedStaged([torch.tensor([[[[1.0, 2.0]], [[0.0, -1.0]]]])], [[1.0, 2.0, 0.0]])
    teacher_map = torch.tensor([[[[5.0, 5.0]], [[1.0, 0.0]], [[2.0, 2.0]]]])
    # filter L1 norms 0.1, 3, 2: channels 1 and 2 are kept
    teacher = _FixedStaged([teacher_map], [[2.0, 1.0, 0.0]], filters=[[0.1, -3.0, 2.0]])
    return build_distiller("indistill", student, [teacher], options)


def test_indistill_feature_mse_then_kd():
    d = _indistill_fixed({"warmup_share": 0.5})
    assert d.kept(0).tolist() == [1, 2]
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([1]), 0.2)
    # student [1, 2], [0, -1] vs kept teacher [1, 0], [2, 2]: (0 + 4 + 4 + 9) / 4
    assert terms["feature"].item() == pytest.approx(17 / 4)
    assert terms["ce"].item() == 0 and terms["kd"].item() == 0
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([1]), 0.6)
    s, t = torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[2.0, 1.0, 0.0]])
    assert terms["feature"].item() == 0
    assert terms["ce"].item() == pytest.approx(0.5 * F.cross_entropy(s, torch.tensor([1])).item())
    assert terms["kd"].item() == pytest.approx(0.5 * kd_kl(s, t, 4.0).item())


@pytest.mark.parametrize(
    ("options", "schedule"),
    [
        # defaults: 17 % of the run, lengths 3:4:5 -> edges .0425, .0992, .17; shallowest first
        (
            {},
            [
                (0.0, 0),
                (0.04, 0),
                (0.05, 1),
                (0.099, 1),
                (0.1, 2),
                (0.169, 2),
                (0.17, None),
                (0.9, None),
            ],
        ),
        ({"order": "deep-first"}, [(0.0, 2), (0.05, 1), (0.1, 0), (0.5, None)]),
        (
            {"warmup_share": 0.4, "stage_lengths": [1, 1, 2]},
            [(0.05, 0), (0.15, 1), (0.25, 2), (0.39, 2), (0.41, None)],
        ),
        (
            {"warmup_share": 0.3, "layers": [2, 0], "stage_lengths": [1, 2]},
            [(0.05, 0), (0.15, 2), (0.31, None)],
        ),
        ({"warmup_share": 0.0}, [(0.0, None), (0.5, None)]),
    ],
)
def test_indistill_curriculum_schedule(options, schedule):
    d = build_distiller("indistill", _tiny((2, 3, 4)), [_tiny((4, 6, 8))], options)
    assert [d.curriculum_layer(p) for p, _ in schedule] == [layer for _, layer in schedule]


# ---- L1 channel pruning ----------------------------------------------------------------------

FILTERS = [  # 1x1 conv, 6 filters over 4 inputs; L1 norms 2, 6, .5, 5, 1.5, 4
    [1.0, 1.0, 0.0, 0.0],
    [3.0, -3.0, 0.0, 0.0],  # sums to 0 but has the largest L1 norm
    [0.5, 0.0, 0.0, 0.0],
    [-2.0, -2.0, -1.0, 0.0],
    [1.0, 0.0, 0.0, 0.5],
    [0.0, 0.0, 4.0, 0.0],
]


def test_l1_pruning_keeps_the_largest_l1_filters_and_selects_their_channels():
    teacher = _tiny((4, 6, 8))
    conv, bn = teacher.stages[1][0], teacher.stages[1][1]
    conv.weight.data = torch.tensor(FILTERS).view(6, 4, 1, 1)
    torch.manual_seed(0)
    for p in (bn.weight, bn.bias, bn.running_mean):
        p.data = torch.randn(6)
    bn.running_var.data = torch.rand(6) + 0.5
    assert feature.l1_keep(conv.weight, 3).tolist() == [1, 3, 5]
    assert feature.producing_conv(teacher.stages[1]) is conv

    d = build_distiller("indistill", _tiny((2, 3, 4)), [teacher], {})
    assert d.kept(1).tolist() == [1, 3, 5]
    x = torch.randn(5, 1, 8, 8)
    _, pruned = d.pruned_teacher_stages(x)
    with torch.no_grad():
        _, full = teacher.forward_features(x)
        # the physically pruned layer: kept filters and their BatchNorm, on the unpruned input
        kept = torch.tensor([1, 3, 5])
        small = nn.Conv2d(4, 3, 1, bias=False)
        small.weight.data = conv.weight[kept]
        small_bn = nn.BatchNorm2d(3).eval()
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(small_bn, name).data = getattr(bn, name)[kept]
        by_hand = torch.relu(small_bn(small(full["stages"][0])))
    assert torch.allclose(pruned[1], full["stages"][1][:, kept])
    assert torch.allclose(pruned[1], by_hand, atol=1e-6)


def test_producing_conv_of_a_resnet_stage_is_the_residual_branch():
    stage = build_model("resnet8x4", 1, 10).stages[1]  # has a 1x1 shortcut conv, registered last
    assert feature.producing_conv(stage) is stage[-1].conv2


def test_activation_pruning_ranks_channels_by_mean_activation():
    teacher = _tiny((4, 6, 8))
    batches = [torch.randn(16, 1, 8, 8)]
    ctx = MethodContext(10, (1, 8, 8), 1, 1, calibration_batches=batches)
    d = build_distiller("indistill", _tiny((2, 3, 4)), [teacher], {"prune_by": "activation"}, ctx)
    with torch.no_grad():
        stage = teacher.forward_features(batches[0])[1]["stages"][2]
    expected = stage.abs().sum((0, 2, 3)).topk(4).indices.sort().values
    assert d.kept(2).tolist() == expected.tolist()


# ---- errors ----------------------------------------------------------------------------------


def test_spatial_size_mismatch_is_one_clear_user_error():
    student = _tiny((16, 32, 64))  # maps 8x8
    teacher = _tiny((64, 128, 256), stem_stride=2)  # maps 4x4
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    mismatch = r"\(8, 8\) but the teacher's is \(4, 4\)"
    for method, options in (("feed", {"resize": "none"}), ("indistill", {})):
        d = build_distiller(method, student, [teacher], options)
        with pytest.raises(UserError, match=mismatch):
            d.forward_train(x, y, 0.0)
        with pytest.raises(UserError, match=mismatch):  # with the input shape: when built
            build_distiller(method, student, [teacher], options, MethodContext(2, (1, 8, 8), 1, 1))
    # sequential FEED reaches its second teacher late in the run: still caught when built
    with pytest.raises(UserError, match=mismatch):
        build_distiller(
            "feed",
            student,
            [student, teacher],
            {"mode": "sequential", "resize": "none"},
            MethodContext(2, (1, 8, 8), 1, 1),
        )


def test_pooling_to_the_common_size_averages_the_larger_map():
    big = torch.arange(16.0).view(1, 1, 4, 4)
    small = torch.zeros(1, 3, 2, 2)
    pooled_big, same_small = feature.pooled_to_common_size(big, small)
    # 2x2 blocks of 0..15 in rows of 4: means 2.5, 4.5, 10.5, 12.5
    assert pooled_big.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert same_small is small
    same_small, pooled_big = feature.pooled_to_common_size(small, big)  # either side
    assert pooled_big.flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    # 3x3 -> 2x2 overlaps: windows rows/cols {0, 1} and {1, 2}
    odd = torch.arange(9.0).view(1, 1, 3, 3)
    assert feature.pooled_to_common_size(odd, small)[0].flatten().tolist() == [2, 3, 5, 6]
    # height and width are taken separately: 4x2 against 2x4 meet at 2x2
    wide, tall = torch.ones(1, 1, 2, 4), torch.ones(1, 1, 4, 2)
    assert [m.shape[2:] for m in feature.pooled_to_common_size(wide, tall)] == [(2, 2)] * 2
    assert feature.pooled_to_common_size(big, big)[0] is big


def test_feed_pools_a_larger_student_map_to_the_teachers_size():
    student = _tiny((16, 32, 64))  # maps 8x8
    teacher = _tiny((64, 128, 256), stem_stride=2)  # maps 4x4
    shape = MethodContext(2, (1, 8, 8), 1, 1)
    d = build_distiller("feed", student, [teacher], {"beta": 1.0}, shape)
    d.eval()
    x, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 1])
    _, terms = d.forward_train(x, y, 0.0)
    translated = d.translators[0](student.forward_features(x)[1]["stages"][-1])
    target = teacher.forward_features(x)[1]["stages"][-1]
    expected = feature.normalized_l1(F.avg_pool2d(translated, 2), target)
    assert terms["feed"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_option_and_model_errors_name_the_problem():
    s, t = _tiny((2, 3, 4)), _tiny((4, 6, 8))
    with pytest.raises(UserError, match="parallel"):
        build_distiller("feed", s, [t], {"mode": "both"})
    with pytest.raises(UserError, match="'pool' or 'none'"):
        build_distiller("feed", s, [t], {"resize": "bilinear"})
    with pytest.raises(UserError, match="shallow-first"):
        build_distiller("indistill", s, [t], {"order": "random"})
    with pytest.raises(UserError, match="stage_lengths"):
        build_distiller("indistill", s, [t], {"stage_lengths": [1, 2]})
    with pytest.raises(UserError, match="fewer than the student's"):
        build_distiller("indistill", t, [s])
    with pytest.raises(UserError, match="one teacher"):
        build_distiller("indistill", s, [t, t])
    with pytest.raises(UserError, match="no stage feature maps"):
        build_distiller("feed", s, [nn.Linear(3, 3)])


# ---- real training on digits at 4 bits -------------------------------------------------------


@pytest.fixture(scope="module")
def models():
    """A float resnet8 (QAT starts from it) and FEED's default teachers: two resnet8x4 of
    different seeds (InDistill prunes the first from 64/128/256 to 16/32/64 channels)."""
    return {
        "student": float_model("resnet8", 1),
        "teachers": [float_model("resnet8x4", 1, seed) for seed in (0, 1)],
    }


def _distiller(models, method, options, teachers=2):
    torch.manual_seed(0)
    s = models["student"]
    teachers = models["teachers"][:teachers]
    return build_distiller(method, quantized(s, 4), teachers, options, context(s, 4))


@pytest.mark.parametrize(
    ("method", "options", "teachers"),
    [
        ("feed", {}, 2),
        ("feed", {"mode": "sequential"}, 2),
        ("indistill", {"warmup_share": 0.99, "layers": [2]}, 1),  # the MSE curriculum alone
        ("indistill", {"warmup_share": 0.0}, 1),  # the KD + CE phase alone
    ],
)
def test_training_lowers_the_loss(models, method, options, teachers):
    first, last = training_lowers_loss(
        _distiller(models, method, options, teachers), steps=16, lr=0.05
    )
    assert last < first, (first, last)


def test_translators_train_and_stay_out_of_the_student(models, tmp_path):
    d = _distiller(models, "feed", {})
    before = [p.detach().clone() for p in d.translators.parameters()]
    grouped = {id(p) for g in d.parameter_groups() for p in g["params"]}
    assert all(id(p) in grouped for p in d.translators.parameters())
    assert not {id(p) for p in d.translators.parameters()} & {id(p) for p in d.student.parameters()}
    optimizer = build_optimizer(d.parameter_groups(), TrainConfig(lr=0.02))
    d.train()
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    _, terms = d.forward_train(images, labels, 0.0)
    sum(terms.values()).backward()
    optimizer.step()
    after = list(d.translators.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert not any("translator" in name for name in d.export_model().state_dict())
    assert_exports_plain_student(d, quantized(models["student"], 4), tmp_path)


@pytest.mark.parametrize("freeze", [True, False])
def test_indistill_trains_step_sizes_only_after_the_curriculum(models, freeze):
    """The curriculum's feature MSE must not reach the quantizers' learned step sizes (it can
    shrink a map by rounding it to 0); the KD phase trains them as any QAT does."""
    d = _distiller(models, "indistill", {"freeze_step_sizes": freeze}, teachers=1)
    steps = d.step_sizes
    assert steps and all(s in set(d.student.parameters()) for s in steps)
    d.train()
    images, labels = torch.randn(8, 1, 8, 8), torch.arange(8)
    for progress, trained in ((0.0, not freeze), (0.5, True)):
        d.zero_grad(set_to_none=True)
        _, terms = d.forward_train(images, labels, progress)
        sum(terms.values()).backward()
        moved = [s.grad is not None and bool(s.grad.abs().sum() > 0) for s in steps]
        # the curriculum's loss reaches only the layers up to its stage; KD reaches them all
        assert (any(moved), all(moved)) == (trained, trained and progress > 0)


# ---- the main command, end to end ------------------------------------------------------------


def test_main_command_with_feed(tmp_path):
    code = (
        "import qkd_deploy.distill.feature; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "run"
    flags = "--method feed --bits 4 --epochs 1 --no-progress --teacher-arch resnet8x4"
    flags += " --allow-low-accuracy"  # one epoch: the student may end near chance
    sets = "bench.iterations=2", "bench.batch_sizes=[1]", "student.float_reference=false"
    # float_reference=false: QAT from scratch, skipping the float student's training and export
    args = [*flags.split(), "--out", str(out), *(a for v in sets for a in ("--set", v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["students"][0]
    assert student["method"] == "feed" and (student["w_bits"], student["a_bits"]) == (4, 4)
    assert student["onnx_agreement"] >= 0.99
    assert report["teacher"]["arch"] == "resnet8x4"
