"""Multi-teacher methods: avg-teachers and cmt-kd (loss terms by hand, real training on digits,
joint training of the quantized teachers, export, shape errors, the main command)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from qkd_deploy.config import load_config
from qkd_deploy.data import load_dataset, normalization_stats
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import MethodContext
from qkd_deploy.distill.multi_teacher import (
    CMTKDOptions,
    SharedKnowledge,
    attention_loss,
    attention_map,
    average_soft_targets,
    cmt_kd_losses,
    mutual_kl,
    soft_kl,
)
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model
from qkd_deploy.pipeline import checks as pipeline
from qkd_deploy.quant.modules import quantizers
from qkd_deploy.rundir import RunDir
from tests.support.hand_math import softmax
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    training_lowers_loss,
)

S = [1.0, 2.0, 0.0]  # student logits
T1, T2 = [2.0, 1.0, 0.0], [0.0, 1.0, 3.0]  # teacher logits


def _kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def _ce(row, label):
    return -math.log(softmax(row)[label])


def _t(*rows):
    return torch.tensor([list(r) for r in rows])


class _Fixed(nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([logits]))

    def forward(self, x):
        return self.logits


# --- loss terms against hand-computed numbers ------------------------------------------------


def test_averaged_soft_targets_weighted_and_equal():
    tau = 2.0
    p1, p2 = softmax(T1, tau), softmax(T2, tau)
    weighted = average_soft_targets([_t(T1), _t(T2)], tau, [3.0, 1.0])
    expected = [0.75 * a + 0.25 * b for a, b in zip(p1, p2, strict=True)]
    assert weighted[0].tolist() == pytest.approx(expected, rel=1e-6)
    equal = average_soft_targets([_t(T1), _t(T2)], tau)
    assert equal[0].tolist() == pytest.approx([(a + b) / 2 for a, b in zip(p1, p2, strict=True)])
    kl = soft_kl(_t(S), weighted, tau).item()
    assert kl == pytest.approx(tau**2 * _kl(expected, softmax(S, tau)), rel=1e-5)


def test_avg_teachers_loss_terms():
    d = build_distiller(
        "avg-teachers",
        _Fixed(S),
        [_Fixed(T1), _Fixed(T2)],
        {"tau": 2.0, "alpha": 0.3, "weights": [3, 1]},
    )
    _, terms = d.forward_train(torch.zeros(1), torch.tensor([1]), 0.0)
    target = [0.75 * a + 0.25 * b for a, b in zip(softmax(T1, 2), softmax(T2, 2), strict=True)]
    assert terms["ce"].item() == pytest.approx(0.3 * _ce(S, 1), rel=1e-6)
    assert terms["kd"].item() == pytest.approx(0.7 * 4 * _kl(target, softmax(S, 2)), rel=1e-5)


@pytest.mark.parametrize("weights", [[1.0], [-1.0, 2.0], [0.0, 0.0]])
def test_avg_teachers_rejects_bad_weights(weights):
    with pytest.raises(UserError, match="2 non-negative numbers"):
        build_distiller("avg-teachers", _Fixed(S), [_Fixed(T1), _Fixed(T2)], {"weights": weights})


# channel 0 [[1, 0], [0, 2]], channel 1 [[1, 2], [0, 0]]: channel mean of squares [1, 2, 0, 2],
# L2 norm 3; the single-channel [[2, 0], [0, 0]] has the map [1, 0, 0, 0]
A = torch.tensor([[[[1.0, 0.0], [0.0, 2.0]], [[1.0, 2.0], [0.0, 0.0]]]])
B = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])


def test_attention_map_and_loss():
    assert attention_map(A)[0].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0, 2 / 3])
    assert attention_map(B)[0].tolist() == pytest.approx([1.0, 0.0, 0.0, 0.0])
    # differences (-2/3, 2/3, 0, 2/3): mean of squares (3 * 4/9) / 4
    assert attention_loss(A, B).item() == pytest.approx(1 / 3, rel=1e-6)
    assert attention_loss(3 * A, A).item() == pytest.approx(0.0, abs=1e-12)  # scale-free


def test_importance_weighted_shared_knowledge():
    layer = SharedKnowledge([2, 32], "tensorrt")  # a 2-bit teacher and a float one
    layer.quantizers[0].set_range(torch.tensor(3.0), non_negative=True)  # grid 0..3, step 1
    with torch.no_grad():
        layer.importance.copy_(torch.tensor([0.0, math.log(3.0)]))  # softmax = (1/4, 3/4)
    a1 = torch.tensor([[0.4, 1.6, 5.0]])  # Q -> [0, 2, 3] (5 clipped)
    a2 = torch.tensor([[1.0, 2.0, 3.0]])  # full precision: unchanged
    shared = layer([a1, a2])
    assert shared[0].tolist() == pytest.approx([0.75, 2.0, 3.0])
    shared.sum().backward()
    assert layer.importance.grad is not None and layer.importance.grad.abs().sum() > 0


def test_mutual_kl_both_ways():
    tau = 2.0
    student = _t(S).requires_grad_()
    teachers = [_t(T1).requires_grad_(), _t(T2).requires_grad_()]
    ensemble = torch.stack(teachers).mean(0)  # [1, 1, 1.5]
    kl_s, kl_t = mutual_kl(student, ensemble, tau)
    p_s, p_t = softmax(S, tau), softmax([1.0, 1.0, 1.5], tau)
    assert kl_s.item() == pytest.approx(tau**2 * _kl(p_t, p_s), rel=1e-5)
    assert kl_t.item() == pytest.approx(tau**2 * _kl(p_s, p_t), rel=1e-5)
    kl_s.backward()
    assert student.grad.abs().sum() > 0 and all(t.grad is None for t in teachers)
    student.grad = None
    kl_t.backward()
    assert student.grad is None and all(t.grad.abs().sum() > 0 for t in teachers)


@pytest.mark.parametrize("detach", [True, False])
def test_cmt_kd_weighted_total(detach):
    options = CMTKDOptions(alpha=2.0, beta=0.25, gamma=10.0, tau=2.0, detach_shared=detach)
    student, shared = A.clone().requires_grad_(), B.clone().requires_grad_()
    terms = cmt_kd_losses(_t(S), [_t(T1), _t(T2)], torch.tensor([1]), [student], [shared], options)
    p_s, p_t = softmax(S, 2), softmax([1.0, 1.0, 1.5], 2)
    expected = {
        "ce_student": 2 * _ce(S, 1),
        "ce_teachers": 2 * (_ce(T1, 1) + _ce(T2, 1)),
        "kl_student": 0.25 * 4 * _kl(p_t, p_s),
        "kl_teachers": 0.25 * 4 * _kl(p_s, p_t),
        "attention": 10 / 3,
    }
    assert {k: v.item() for k, v in terms.items()} == pytest.approx(expected, rel=1e-5)
    terms["attention"].backward()
    assert student.grad.abs().sum() > 0
    assert (shared.grad is None) == detach  # the student's loss reaches F_k only if not detached


# --- the collaborative pass and errors (untrained float models, no data) ---------------------


def _bare_context(quantize=lambda model, bits: model) -> MethodContext:
    return MethodContext(
        num_classes=10,
        input_shape=(1, 8, 8),
        steps_per_epoch=1,
        epochs=1,
        quantize=quantize,
        calibration_batches=[torch.randn(4, 1, 8, 8)],
    )


def _net(arch="resnet8", seed=0):
    torch.manual_seed(seed)
    return build_model(arch, 1, 10).eval()


def test_shared_knowledge_replaces_every_teachers_activation():
    """With pi one-hot on teacher 0 at every stage, teacher 0 runs as itself and teacher 1's head
    sees teacher 0's last features; the float teachers given in stay frozen and in eval mode."""
    t0, t1 = _net(seed=1), _net(seed=2)
    d = build_distiller("cmt-kd", _net(), [t0, t1], {"teacher_bits": [32, 32]}, _bare_context())
    assert d.collaborative.stages == (0, 1, 2)
    for pi in d.importance_logits():
        with torch.no_grad():
            pi.copy_(torch.tensor([100.0, -100.0]))
    d.eval()
    assert not any(t.training for t in d.collaborative.teachers)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        (z0, z1), shared = d.collaborative(x)
        last = t0.forward_features(x)[1]["stages"][-1]
        torch.testing.assert_close(z0, t0(x))
        torch.testing.assert_close(z1, t1.fc(torch.flatten(t1.pool(last), 1)))
        torch.testing.assert_close(shared[-1], last)
    d.train()
    assert all(t.training for t in d.collaborative.teachers)
    assert not t0.training and not any(p.requires_grad for p in t0.parameters())
    groups = d.parameter_groups()
    assert groups[2]["lr_scale"] == 0.1
    assert [id(p) for p in groups[2]["params"]] == [id(p) for p in d.importance_logits()]
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert not in_groups & {id(p) for p in d.teachers.parameters()}
    assert {id(p) for p in d.collaborative.parameters()} <= in_groups


@pytest.mark.parametrize(
    ("teachers", "options", "match"),
    [
        (
            ["resnet8", "resnet8x4"],
            {"teacher_bits": [8, 4]},
            r"stage 0: teacher 0 \(16, 8, 8\), "
            r"teacher 1 \(64, 8, 8\).*--teacher-arch",
        ),
        (["resnet8", "resnet8"], {}, "got 2 teachers for teacher_bits"),
        (["resnet8"], {"teacher_bits": [8, 16]}, "integer from 2 to 8 or 32"),
        (["resnet8"], {"shared_stages": [3]}, "stage indices from 0 to 2"),
    ],
)
def test_cmt_kd_rejects_mismatches(teachers, options, match):
    with pytest.raises(UserError, match=match):
        build_distiller("cmt-kd", _net(), [_net(a) for a in teachers], options, _bare_context())


def test_cmt_kd_rejects_unstaged_teachers():
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UserError, match=r"teacher 1 \(Sequential\) has no stem, stages, pool, fc"):
        build_distiller("cmt-kd", _net(), [_net(), flat], {"teacher_bits": [8, 4]}, _bare_context())


# --- real training on digits at 4 bits -------------------------------------------------------


@pytest.fixture(scope="module")
def student_float():
    return float_model("resnet8", 2, 0)


@pytest.fixture(scope="module")
def teachers():
    return [float_model("resnet8", 1, seed) for seed in (1, 2)]


def test_avg_teachers_training_lowers_loss(student_float, teachers):
    d = build_distiller("avg-teachers", quantized(student_float, 4), teachers)
    first, last = training_lowers_loss(d, steps=10)
    assert last < first
    assert d.export_model() is d.student  # the base class's export: the student alone


def test_cmt_kd_trains_teachers_and_importance_jointly(student_float, teachers, tmp_path):
    frozen = [{k: v.clone() for k, v in t.state_dict().items()} for t in teachers]
    d = build_distiller(
        "cmt-kd",
        quantized(student_float, 4),
        teachers,
        {"teacher_bits": [32, 4]},
        context(student_float, 4),
    )
    q = d.collaborative.shared[0].quantizers[1]  # Q of the 4-bit teacher, calibrated post-ReLU
    assert bool(q.calibrated) and bool(q.non_negative)
    before = {k: v.clone() for k, v in d.collaborative.state_dict().items()}
    first, last = training_lowers_loss(d, steps=10)
    assert last < first
    after = d.collaborative.state_dict()
    for name in [
        "shared.0.importance",
        "shared.2.importance",
        "shared.0.quantizers.1.scale",
        "teachers.0.stages.0.0.conv1.weight",  # the float (32-bit) teacher
        "teachers.1.stages.2.0.conv2.weight",  # the 4-bit teacher
        "teachers.1.stages.2.0.conv2.weight_quantizer.scale",
        "teachers.1.fc.weight",
    ]:
        assert not torch.equal(before[name], after[name]), name
    for teacher, state in zip(teachers, frozen, strict=True):
        assert all(torch.equal(state[k], v) for k, v in teacher.state_dict().items())
    assert_exports_plain_student(d, quantized(student_float, 4), tmp_path)


# --- the main command -----------------------------------------------------------------------


def test_main_command_with_cmt_kd(tmp_path):
    out = tmp_path / "run"
    code = (
        "import qkd_deploy.distill.multi_teacher; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    args = [
        "--method", "cmt-kd", "--bits", "4", "--epochs", "1", "--no-progress", "--out", str(out),
        "--allow-low-accuracy",  # one epoch: the student may end near chance
        "--teacher-arch", "resnet8",  # one float teacher, quantized at 8 and 4 bits
        "--set", "student.method_options.teacher_bits=[8,4]",
        "--set", "student.float_reference=false",
        "--set", "teacher_train.batch_size=128", "--set", "student.train.batch_size=128",
        "--set", "data.calibration_size=128",
        "--set", "bench.iterations=2", "--set", "bench.warmup=1", "--set", "bench.batch_sizes=[1]",
    ]  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["students"][0]
    assert student["method"] == "cmt-kd" and (student["w_bits"], student["a_bits"]) == (4, 4)
    assert student["onnx_agreement"] >= 0.99
    assert [t["arch"] for t in report["teachers"]] == ["resnet8"]


def test_cmt_kd_teachers_keep_their_bits_under_the_students_layer_bits(tmp_path):
    """``quant.layer_bits`` names the student's layers. The quantized teachers (resnet8, like
    the student, so the names match) must stay at their own ``teacher_bits``."""
    data = load_dataset("digits")
    config = load_config(
        overrides=[
            "student.method=cmt-kd",
            "student.bits=[w4a4]",
            "student.arch=resnet8",
            "teachers=[{arch: resnet8}]",
            "quant.layer_bits={'stages.*': w2a2}",
        ]
    )
    preprocess = normalization_stats(data.train.images.numpy())
    ctx = pipeline.Context(config, data, preprocess, RunDir(tmp_path))
    distiller, _, _ = pipeline.untrained_method(ctx)
    assert _stage_bits(distiller.student) == {2}
    assert [_stage_bits(t) for t in distiller.collaborative.teachers] == [{8}, {6}, {4}]


def _stage_bits(model: nn.Module) -> set[int]:
    return {q.bits for name, q in quantizers(model) if name.startswith("stages")}
