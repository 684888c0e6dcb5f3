"""CDFKD-MFS: the loss terms against hand computation, the multi-level headers and the attention,
the asymmetric adversarial schedule, calibration on generated images, checkpoints, training and
export, never touching real images."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.cdfkd import (
    CDFKDMFSOptions,
    FeatureSharingHead,
    HeaderAttention,
    disagreement,
    ensemble_loss,
    ensemble_target,
    feature_loss,
    generator_objective,
    head_loss,
)
from qkd_deploy.distill.generators import BatchNormStatistics, bn_statistics_distance
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model
from qkd_deploy.quant.modules import quantizers
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    training_lowers_loss,
)

# ---------------------------------------------------------------------------------------------
# Loss terms by hand
# ---------------------------------------------------------------------------------------------

H1, H2 = [[1.0, 0.0], [2.0, -1.0]], [[0.0, 0.0], [1.0, 1.0]]  # two headers, batch 2, 2 classes
T1, T2 = [[0.0, 1.0], [2.0, 1.0]], [[2.0, 0.0], [1.0, 3.0]]  # their teachers
MAIN = [[1.0, 1.0], [0.0, 2.0]]


def _t(*rows):
    return [torch.tensor(r) for r in rows]


def test_logit_losses_match_hand_computation():
    # L1(H1, T1) = (1 + 1 + 0 + 2) / 4 = 1; L1(H2, T2) = (2 + 0 + 0 + 2) / 4 = 1
    assert head_loss(_t(H1, H2), _t(T1, T2)).item() == pytest.approx(1.0)
    target = [[1.0, 0.5], [1.5, 2.0]]
    torch.testing.assert_close(ensemble_target(_t(T1, T2)), torch.tensor(target))
    # |1-1| + |1-0.5| + |0-1.5| + |2-2| = 2, over 4 elements
    assert ensemble_loss(torch.tensor(MAIN), _t(T1, T2)).item() == pytest.approx(0.5)
    assert disagreement(torch.tensor(MAIN), _t(H1, H2), _t(T1, T2)).item() == pytest.approx(
        (1.0 + 1.0 + 0.5) / 3
    )
    assert disagreement(
        torch.tensor(MAIN), _t(H1, H2), _t(T1, T2), include_main=False
    ).item() == pytest.approx(1.0)


def test_feature_loss_sums_over_features_and_averages_over_batch_and_headers():
    f_h = _t([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    f_t = _t([[0.0, 0.0, 0.0], [1.0, -1.0, 0.0]], [[1.0, 1.0, 1.0], [0.0, 1.0, 4.0]])
    # header 1: rows 3 and 2 -> 2.5; header 2: rows 0 and 4 -> 2; mean 2.25
    assert feature_loss(f_h, f_t).item() == pytest.approx(2.25)


def test_bn_statistics_distance_on_a_tiny_batchnorm():
    bn = nn.BatchNorm2d(2).eval()
    bn.running_mean.copy_(torch.tensor([0.5, -1.0]))
    bn.running_var.copy_(torch.tensor([2.0, 0.5]))
    # channel 0 values 1, 3, 1, 3 (mean 2, biased var 1); channel 1 values 0, 0, 2, -2 (0, 2)
    x = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]], [[[1.0, 3.0]], [[2.0, -2.0]]]])
    expected = math.hypot(2 - 0.5, 0 + 1) + math.hypot(1 - 2, 2 - 0.5)
    distance = bn_statistics_distance(x, bn.running_mean, bn.running_var)
    assert distance.item() == pytest.approx(expected, rel=1e-6)
    # the recorder: every BatchNorm2d's input, the first one's term weighted
    second = nn.BatchNorm2d(2).eval()  # running mean 0, var 1
    model = nn.Sequential(bn, second).eval()
    with BatchNormStatistics(model, first_weight=5.0) as stats:
        y = model(x)
    second_expected = bn_statistics_distance(y, torch.zeros(2), torch.ones(2)).item()
    assert len(stats.distances) == 2
    assert stats.loss().item() == pytest.approx(5 * expected + second_expected, rel=1e-5)
    model(x)  # hooks are gone after the block
    assert len(stats.distances) == 2


def test_batchnorm_statistics_without_batchnorm_is_a_zero_on_the_models_device():
    """A teacher with no BatchNorm2d records nothing; its zero must live where the teacher
    does, or adding it to the other (GPU) terms fails. The meta device stands in for a GPU."""
    model = nn.Linear(3, 2, device="meta")
    with BatchNormStatistics(model) as stats:
        model(torch.zeros(1, 3, device="meta"))
    assert stats.distances == []
    assert stats.loss().device.type == "meta"


def test_generator_objective_maximises_the_disagreement():
    options = CDFKDMFSOptions(adversarial_weight=2.0, bn_weight=0.1)
    heads = [h.requires_grad_() for h in _t(H1, H2)]
    main = torch.tensor(MAIN, requires_grad=True)
    bn = [torch.tensor(3.0), torch.tensor(1.0)]
    terms = generator_objective(main, heads, _t(T1, T2), bn, options)
    assert terms["adv"].item() == pytest.approx(-2.0 * (1.0 + 1.0 + 0.5) / 3)
    assert terms["bn"].item() == pytest.approx(0.1 * 2.0)
    # a descent step on the generator's objective moves the headers away from their teachers
    terms["adv"].backward()
    with torch.no_grad():
        stepped = [h - 0.1 * h.grad for h in heads]
        before = disagreement(main, heads, _t(T1, T2))
        after = disagreement(main - 0.1 * main.grad, stepped, _t(T1, T2))
    assert after > before
    options.adversarial_main_head = False
    terms = generator_objective(main, heads, _t(T1, T2), bn, options)
    assert terms["adv"].item() == pytest.approx(-2.0)


# ---------------------------------------------------------------------------------------------
# Headers and attention
# ---------------------------------------------------------------------------------------------


def test_headers_read_every_stage_and_match_their_teachers_feature_width():
    head = FeatureSharingHead([16, 32, 64], feature_dim=256, num_classes=10)
    widths = [(e[1].in_channels, e[-3].out_channels) for e in head.encoders]
    assert widths == [(16, 32), (32 + 32, 64), (64 + 64, 256)]  # like the reference's 2 * ch
    stages = [torch.randn(3, 16, 8, 8), torch.randn(3, 32, 4, 4), torch.randn(3, 64, 2, 2)]
    logits, features = head(stages)
    assert logits.shape == (3, 10) and features.shape == (3, 256)
    # every level reaches the header
    stages = [s.requires_grad_() for s in stages]
    head(stages)[0].sum().backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in stages)


def test_attention_starts_as_the_mean_and_weights_headers_by_softmax():
    attention = HeaderAttention(2)
    logits = _t(H1, H2, MAIN)
    torch.testing.assert_close(attention(logits), torch.stack(logits).mean(0))
    with torch.no_grad():
        attention.score.weight.copy_(torch.tensor([[1.0, 0.0]]))  # score = first logit
    first = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]])  # per sample, per header
    w = torch.softmax(first, dim=1)
    expected = sum(w[:, i : i + 1] * logits[i] for i in range(3))
    torch.testing.assert_close(attention(logits), expected)


# ---------------------------------------------------------------------------------------------
# The method
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teachers():
    """Two teachers trained with their own seeds, as the pipeline does."""
    return [float_model("resnet8", 2, seed=0), float_model("resnet8", 2, seed=1)]


def _cdfkd(teachers, data_free=True, **options):
    torch.manual_seed(0)
    student = quantized(build_model("resnet8", 1, 10), 4, calibrate_on_data=False)
    ctx = context(teachers[0], 4, data_free=data_free)
    options = {"batch_size": 32, **options}
    return build_distiller("cdfkd-mfs", student, teachers, options, ctx).train()


class _Untouchable:
    """Stands for the real batch: any use of it fails."""

    def __getattr__(self, name):
        raise AssertionError(f"cdfkd-mfs read the real batch ({name})")


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_first_step_calibrates_the_student_and_its_loss_reaches_student_and_headers(teachers):
    d = _cdfkd(teachers)
    assert not any(bool(q.calibrated) for _, q in quantizers(d.student))
    generator = _params(d.generator)
    logits, terms = d.forward_train(_Untouchable(), _Untouchable(), 0.0)
    assert set(terms) == {"heads", "feat", "ens"} and logits.shape == (32, 10)
    assert all(bool(q.calibrated) for _, q in quantizers(d.student))
    assert _same(generator, _params(d.generator))  # no generator step before k student steps
    sum(terms.values()).backward()
    for part in (d.student, *d.heads):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in d.generator.parameters())
    assert all(p.grad is None for t in teachers for p in t.parameters())
    assert {id(p) for g in d.parameter_groups() for p in g["params"]} == {
        id(p) for p in [*d.student.parameters(), *d.heads.parameters()] if p.requires_grad
    }


def test_generator_steps_every_k_student_steps_and_reaches_the_generator_only(teachers):
    d = _cdfkd(teachers, student_steps_per_generator_step=2)
    changed = []
    for step in range(5):
        before = _params(d.generator)
        d.forward_train(None, None, step / 5)
        changed.append(not _same(before, _params(d.generator)))
        # the generator's objective leaves no gradient on the student, headers or teachers
        for part in (d.student, d.heads, *teachers):
            assert all(p.grad is None for p in part.parameters())
    assert changed == [False, False, True, False, True]
    assert d.generator_optimizer.state
    # the last generator step (progress 0.8) was past both milestones (1/3, 2/3): lr x 0.01
    assert d.generator_optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_checkpoint_resumes_the_generator_and_its_optimizer_exactly(teachers, tmp_path):
    stepped = _cdfkd(teachers, student_steps_per_generator_step=2)
    for step in range(3):
        stepped.forward_train(None, None, step / 10)
    torch.save(stepped.state_dict(), tmp_path / "c.pt")
    resumed = _cdfkd(teachers, student_steps_per_generator_step=2)
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    adam = resumed.generator_optimizer.state_dict()["state"]
    torch.testing.assert_close(adam, stepped.generator_optimizer.state_dict()["state"])
    assert int(resumed.batches_drawn) == 3
    results = []
    for model in (stepped, resumed):
        torch.manual_seed(1)
        losses = [model.forward_train(None, None, 0.5)[1]["ens"].item() for _ in range(2)]
        results.append((losses, _params(model.generator)))  # the second call stepped it
    assert results[0][0] == results[1][0] and _same(results[0][1], results[1][1])


def test_training_lowers_the_students_loss(teachers):
    first, last = training_lowers_loss(_cdfkd(teachers), steps=20)
    assert last < first


def test_exports_the_plain_student(teachers, tmp_path):
    d = _cdfkd(teachers)
    d.forward_train(None, None, 0.0)
    plain = quantized(build_model("resnet8", 1, 10), 4)
    assert_exports_plain_student(d, plain, tmp_path)


def test_attention_learns_from_teacher_labelled_real_samples_only_when_given(teachers):
    with pytest.raises(UserError, match="real_samples"):
        _cdfkd(teachers, real_samples=16)  # the data-free context has no real images
    d = _cdfkd(teachers, data_free=False, real_samples=16, student_steps_per_generator_step=1)
    assert d.real_images.shape == (16, 1, 8, 8)
    d.forward_train(None, None, 0.0)
    student_state = {k: v.clone() for k, v in d.student.state_dict().items()}
    attention = _params(d.attention)
    d._step_attention()
    assert not _same(attention, _params(d.attention)) and d.attention_optimizer.state
    # the student and its headers were frozen in eval mode: no BatchNorm saw a real image
    assert all(torch.equal(v, d.student.state_dict()[k]) for k, v in student_state.items())
    assert d.student.training and d.heads.training
    labels = ensemble_target([t(d.real_images) for t in teachers]).argmax(1)
    assert torch.equal(d._real_labels, labels)
    assert d.aggregated_logits(d.real_images).shape == (16, 10)


def test_rejects_one_teacher_a_bad_stage_and_a_student_without_stages(teachers):
    ctx = context(teachers[0], 4, data_free=True)
    student = build_model("resnet8", 1, 10)
    with pytest.raises(UserError, match="teacher"):
        build_distiller("cdfkd-mfs", student, teachers[:1], {}, ctx)
    with pytest.raises(UserError, match="first_shared_stage"):
        build_distiller("cdfkd-mfs", student, teachers, {"first_shared_stage": 3}, ctx)
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with pytest.raises(UserError, match="zoo student"):
        build_distiller("cdfkd-mfs", flat, teachers, {}, ctx)


def test_main_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = (
        "import qkd_deploy.distill.cdfkd; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--method", "cdfkd-mfs", "--bits", "4", "--epochs", "1", "--no-progress"]
    args += ["--allow-low-accuracy"]  # one epoch: the student may end near chance
    args += ["--out", str(out), "--set", "bench.iterations=2", "--set", "bench.batch_sizes=[1]"]
    args += ["--teacher-arch", "resnet8,resnet8"]
    # short: no float reference student; 11 student steps of 256 generated images, 2 generator
    args += ["--set", "student.float_reference=false", "--set", "student.train.batch_size=128"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["students"][0]
    assert student["method"] == "cdfkd-mfs" and report["data_free"] is True
    assert student["onnx_agreement"] >= 0.99
