"""SPEQ: the cosine loss, the stochastic-precision teacher pass, training and export."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch

import qkd_deploy.distill.speq  # noqa: F401  (registers speq)
from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.speq import activation_quantizers, cosine_kd_loss, stochastic_precision
from qkd_deploy.errors import UserError
from tests.support.hand_math import softmax
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    train_loader,
    training_lowers_loss,
)


def test_cosine_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
    t = [[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
    tau = 2.0
    expected = 0.0
    for rs, rt in zip(s, t, strict=True):
        ps, pt = softmax(rs, tau), softmax(rt, tau)
        dot = sum(a * b for a, b in zip(ps, pt, strict=True))
        norms = math.sqrt(sum(a * a for a in ps)) * math.sqrt(sum(b * b for b in pt))
        expected += 1.0 - dot / norms
    loss = cosine_kd_loss(torch.tensor(s), torch.tensor(t), tau)
    assert loss.item() == pytest.approx(expected / 2, rel=1e-6)
    assert cosine_kd_loss(torch.tensor(t), torch.tensor(t)).item() == pytest.approx(0.0, abs=1e-7)


@pytest.fixture(scope="module")
def student_float():
    return float_model("resnet8", 2)


@pytest.fixture(scope="module")
def calibrated_student(student_float):
    return quantized(student_float, 4)


@pytest.fixture(scope="module")
def batch():
    return next(iter(train_loader(32)))


@pytest.fixture
def make_speq(student_float, calibrated_student):
    def make(**options):
        torch.manual_seed(0)
        student = copy.deepcopy(calibrated_student)
        return build_distiller("speq", student, [], options, context(student_float, 4)).train()

    return make


def test_with_u_0_the_teacher_is_the_student(make_speq, batch):
    d = make_speq(u=0.0)
    images, labels = batch
    logits, terms = d.forward_train(images, labels, 0.0)
    assert set(terms) == {"ce", "cos"}
    assert terms["cos"].item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(d.teacher_logits(images), logits.detach())


def test_with_u_1_every_activation_quantizer_runs_at_high_bits_without_grad(make_speq, batch):
    d = make_speq(u=1.0, high_bits=8)
    calls = {q: [] for q in activation_quantizers(d.student)}
    for q, seen in calls.items():
        q.register_forward_pre_hook(
            lambda q, _, seen=seen: seen.append((q.active_bits or q.bits, torch.is_grad_enabled()))
        )
    images, labels = batch
    _, terms = d.forward_train(images, labels, 0.0)
    assert {q.bits for q in calls} == {4, 8}  # the first and last layers stay at 8 bits
    for q, seen in calls.items():  # teacher pass first (8 bits, no grad), then the student's
        assert seen == [(8, False), (q.bits, True)]
        assert q.active_bits is None
    assert terms["cos"].requires_grad and terms["cos"].item() > 0


def test_teacher_pass_has_no_grad_and_keeps_batchnorm_statistics(make_speq, batch):
    d = make_speq()
    before = {k: v.clone() for k, v in d.student.state_dict().items()}
    out = d.teacher_logits(batch[0])
    assert not out.requires_grad
    after = d.student.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_each_quantizer_draws_its_own_precision_with_probability_u(make_speq):
    d = make_speq()
    low = [q for q in activation_quantizers(d.student) if q.bits < 8]
    draws = []
    for _ in range(200):
        with stochastic_precision(d.student, 0.5, 8):
            draws.append([q.active_bits == 8 for q in low])
    fraction = sum(map(sum, draws)) / (200 * len(low))
    assert 0.4 < fraction < 0.6
    assert any(0 < sum(row) < len(low) for row in draws)  # layers are drawn independently
    assert all(q.active_bits is None for q in low)


def test_active_bits_and_batchnorm_are_restored_after_an_error(make_speq):
    d = make_speq(u=1.0)
    with pytest.raises(RuntimeError):
        d.teacher_logits(torch.zeros(2, 3, 8, 8))  # wrong channel count
    assert all(q.active_bits is None for q in activation_quantizers(d.student))
    norms = [m for m in d.student.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(m.track_running_stats for m in norms)


def test_options_are_checked(make_speq):
    with pytest.raises(UserError, match="probability"):
        make_speq(u=1.5)
    with pytest.raises(UserError, match="high_bits"):
        make_speq(high_bits=16)


def test_training_lowers_the_loss(make_speq):
    first, last = training_lowers_loss(make_speq(), steps=20)
    assert last < first


def test_exports_the_plain_student(make_speq, calibrated_student, tmp_path):
    assert_exports_plain_student(make_speq(), calibrated_student, tmp_path)


def test_main_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = (
        "import qkd_deploy.distill.speq; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--method", "speq", "--bits", "4", "--epochs", "1", "--no-progress", "--out", str(out)]
    args += ["--allow-low-accuracy"]  # one epoch: the student may end near chance
    args += ["--set", "bench.iterations=2", "--set", "bench.batch_sizes=[1]"]
    args += ["--teacher-arch", "resnet8"]
    # short: no float reference student, 11 steps of 128 images
    args += ["--set", "student.float_reference=false", "--set", "student.train.batch_size=128"]
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["students"][0]
    assert student["method"] == "speq" and report["data_free"] is False
    assert student["onnx_agreement"] >= 0.99
