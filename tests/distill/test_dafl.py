"""DAFL: the generator's loss terms, the generator, one training step, calibration on generated
images, checkpoints, training and export, never touching real images."""

import json
import math
import subprocess
import sys

import pytest
import torch

from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.dafl import DAFLOptions, generator_losses, logits_and_features
from qkd_deploy.distill.generators import BatchNormStatistics, ImageGenerator, calibrate_once
from qkd_deploy.distill.speq import frozen_batchnorm_statistics
from qkd_deploy.errors import UserError
from qkd_deploy.models import build_model
from qkd_deploy.quant.modules import quantizers
from tests.support.hand_math import softmax
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    training_lowers_loss,
)


def test_generator_loss_terms_match_hand_computation():
    logits = [[2.0, 0.0, 1.0], [0.0, 3.0, 0.0]]
    features = [[1.0, -2.0], [0.5, 0.0]]
    probs = [softmax(row) for row in logits]
    one_hot = -(math.log(probs[0][0]) + math.log(probs[1][1])) / 2
    mean_p = [(a + b) / 2 for a, b in zip(*probs, strict=True)]
    neg_entropy = sum(p * math.log(p) for p in mean_p)
    options = DAFLOptions(
        onehot_weight=2.0, activation_weight=0.1, entropy_weight=5.0, bn_weight=0.5
    )
    z, f, bn = torch.tensor(logits), torch.tensor(features), torch.tensor(3.0)
    terms = generator_losses(z, f, bn, options)
    assert terms["oh"].item() == pytest.approx(2.0 * one_hot, rel=1e-6)
    assert terms["act"].item() == pytest.approx(0.1 * -(1.0 + 2.0 + 0.5 + 0.0) / 4, rel=1e-6)
    assert terms["ie"].item() == pytest.approx(5.0 * neg_entropy / math.log(10), rel=1e-6)
    assert terms["bn"].item() == pytest.approx(0.5 * 3.0)
    options.entropy_log_base = math.e
    terms = generator_losses(z, f, bn, options)
    assert terms["ie"].item() == pytest.approx(5.0 * neg_entropy, rel=1e-6)


def test_penultimate_features_of_a_classifier_without_forward_features():
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2)
    )
    x = torch.randn(5, 1, 2, 2)
    logits, features = logits_and_features(model, x)
    torch.testing.assert_close(features, model[:3](x))
    torch.testing.assert_close(logits, model(x))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 10, 7)])
def test_generator_makes_standardised_images_of_the_input_shape(shape):
    torch.manual_seed(0)
    images = ImageGenerator(shape, latent_dim=16).sample(6)
    assert images.shape == (6, *shape) and torch.isfinite(images).all()
    per_channel = images.transpose(0, 1).reshape(shape[0], -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(shape[0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        per_channel.var(1, unbiased=False), torch.ones(shape[0]), atol=1e-2, rtol=0
    )


def test_generator_has_the_reference_layout_for_cifar():
    g = ImageGenerator((3, 32, 32), latent_dim=1000)
    assert g.sizes == [(8, 8), (16, 16), (32, 32)]
    assert g.project.out_features == 128 * 8 * 8 and g.to_image.in_channels == 64


@pytest.fixture(scope="module")
def teacher():
    return float_model("resnet8", 2)


def _dafl(teacher, batch_size=32, **options):
    torch.manual_seed(0)
    student = quantized(build_model("resnet8", 1, 10), 4, calibrate_on_data=False)
    ctx = context(teacher, 4, data_free=True)
    options = {"batch_size": batch_size, **options}
    return build_distiller("dafl", student, [teacher], options, ctx).train()


class _Untouchable:
    """Stands for the real batch: any use of it fails."""

    def __getattr__(self, name):
        raise AssertionError(f"dafl read the real batch ({name})")


def test_first_step_calibrates_the_student_and_trains_the_generator_only(teacher):
    d = _dafl(teacher)
    assert not any(bool(q.calibrated) for _, q in quantizers(d.student))
    before = [p.detach().clone() for p in d.generator.parameters()]
    logits, terms = d.forward_train(_Untouchable(), _Untouchable(), 0.0)
    assert set(terms) == {"kd"} and logits.shape == (32, 10)
    # the student was calibrated on the generated batch before its forward pass
    assert all(bool(q.calibrated) for _, q in quantizers(d.student))
    # the generator took one Adam step of its own
    after = list(d.generator.parameters())
    assert not torch.equal(before[-1], after[-1].detach())  # the output conv's bias moved
    assert sum(not torch.equal(a, b.detach()) for a, b in zip(before, after, strict=True)) > 1
    assert d.generator_optimizer.state
    # the returned loss reaches the student only
    sum(terms.values()).backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in d.student.parameters())
    assert all(p.grad is None for p in d.generator.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert {id(p) for g in d.parameter_groups() for p in g["params"]} == {
        id(p) for p in d.student.parameters() if p.requires_grad
    }
    # later steps do not calibrate again
    scales = [q.scale.detach().clone() for _, q in quantizers(d.student)]
    d.forward_train(None, None, 0.1)
    assert all(
        torch.equal(s, q.scale) for s, (_, q) in zip(scales, quantizers(d.student), strict=True)
    )


@pytest.fixture
def stepped(teacher):
    """A distiller after one step (calibrated student, generator with Adam state); one per test,
    as exporting the student changes its mode."""
    d = _dafl(teacher)
    d.forward_train(None, None, 0.0)
    return d


def test_checkpoint_resumes_generator_and_its_optimizer_exactly(stepped, teacher, tmp_path):
    torch.save(stepped.state_dict(), tmp_path / "c.pt")
    resumed = _dafl(teacher)
    resumed.load_state_dict(torch.load(tmp_path / "c.pt", weights_only=True))
    adam = resumed.generator_optimizer.state_dict()["state"][0]
    torch.testing.assert_close(adam, stepped.generator_optimizer.state_dict()["state"][0])
    results = []
    for model in (stepped, resumed):
        torch.manual_seed(1)
        _, terms = model.forward_train(None, None, 0.5)
        results.append(
            (terms["kd"].item(), [p.detach().clone() for p in model.generator.parameters()])
        )
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1], strict=True))


def test_exports_the_plain_student(stepped, tmp_path):
    plain = quantized(build_model("resnet8", 1, 10), 4)
    assert_exports_plain_student(stepped, plain, tmp_path)


def test_training_lowers_the_students_kd_loss(teacher):
    first, last = training_lowers_loss(_dafl(teacher), steps=20)
    assert last < first


def _teacher_bn_distance(distiller) -> float:
    torch.manual_seed(1)
    with torch.no_grad(), BatchNormStatistics(distiller.teachers[0]) as statistics:
        distiller.teachers[0](distiller.generator.sample(128))
    return statistics.loss().item()


def test_batchnorm_prior_draws_the_generated_statistics_to_the_teachers(teacher):
    """With the prior, generator steps bring the generated batches' statistics at the teacher's
    BatchNorm inputs closer to its running statistics, and closer than the paper's objective
    alone (``bn_weight = 0``) leaves them. Measured after 20 steps: 0.45-0.63 of the first
    distance with the prior, 1.4-1.9 without, depending on the thread count (which changes the
    teacher's training) and the CPU, so the test compares the two rather than a threshold."""
    ratios = {}
    for bn_weight in (1.0, 0.0):
        d = _dafl(teacher, bn_weight=bn_weight)
        before = _teacher_bn_distance(d)
        for step in range(20):
            d.forward_train(None, None, step / 20)
        ratios[bn_weight] = _teacher_bn_distance(d) / before
    assert ratios[1.0] < 1.0 and ratios[1.0] < ratios[0.0], ratios


def test_batchnorm_prior_needs_a_teacher_with_batchnorm():
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    student = build_model("resnet8", 1, 10)
    ctx = context(plain, 4, data_free=True)
    with pytest.raises(UserError, match="bn_weight=0"):
        build_distiller("dafl", student, [plain], {}, ctx)
    assert build_distiller("dafl", student, [plain], {"bn_weight": 0.0}, ctx).generator


def test_needs_exactly_one_teacher(teacher):
    student = build_model("resnet8", 1, 10)
    ctx = context(teacher, 4, data_free=True)
    with pytest.raises(UserError, match="one teacher"):
        build_distiller("dafl", student, [teacher, teacher], {}, ctx)
    with pytest.raises(UserError, match="teacher"):
        build_distiller("dafl", student, [], {}, ctx)


def test_main_command_end_to_end(tmp_path):
    out = tmp_path / "run"
    code = (
        "import qkd_deploy.distill.dafl; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    args = ["--method", "dafl", "--bits", "4", "--epochs", "1", "--no-progress", "--out", str(out)]
    args += ["--allow-low-accuracy"]  # one epoch: the student may end near chance
    args += ["--set", "bench.iterations=2", "--set", "bench.batch_sizes=[1]"]
    args += ["--teacher-arch", "resnet8"]
    # short: no float reference student, 11 steps of 64 generated images (the paper: 512)
    args += ["--set", "student.float_reference=false", "--set", "student.train.batch_size=128"]
    args += ["--set", "student.method_options.batch_size=64"]
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    student = report["students"][0]
    assert student["method"] == "dafl" and report["data_free"] is True
    assert student["onnx_agreement"] >= 0.99


class _Stop(Exception):
    pass


@pytest.mark.parametrize(("method", "starts_from_float"), [("dafl", False), ("kd", True)])
def test_data_free_student_does_not_start_from_the_float_student(
    method, starts_from_float, tmp_path, monkeypatch
):
    """The float student learnt from the training images, so a data-free method must not
    start from it."""
    from qkd_deploy.config import load_config
    from qkd_deploy.data import load_dataset, normalization_stats
    from qkd_deploy.pipeline import stages as P
    from qkd_deploy.quant.convert import BitWidths
    from qkd_deploy.rundir import RunDir

    data = load_dataset("digits")
    config = load_config(overrides=[f"student.method={method}", "progress=false"])
    ctx = P.Context(config, data, normalization_stats(data.train.images.numpy()), RunDir(tmp_path))
    float_student = P.untrained_student(ctx)
    with torch.no_grad():
        for p in float_student.parameters():
            p.add_(1.0)  # stands for training
    captured = {}

    def capture(name, student, teachers, options, context):
        captured["student"] = student
        raise _Stop

    monkeypatch.setattr(P, "build_distiller", capture)
    with pytest.raises(_Stop):
        P.quantized_student_stage(ctx, BitWidths.parse("w4a4"), float_student, [], False)
    started = captured["student"].state_dict()
    trained = float_student.state_dict()
    fresh = P.untrained_student(ctx).state_dict()
    key = next(k for k in trained if k.endswith("conv.weight") or k.endswith(".weight"))
    assert torch.equal(started[key], trained[key]) is starts_from_float
    assert torch.equal(started[key], fresh[key]) is not starts_from_float


def test_calibration_sees_the_activations_of_training_mode():
    """An untrained student's BatchNorms hold placeholders (mean 0, variance 1); calibrated in
    eval mode as they are, its activation ranges would be a fraction of what training-mode
    passes produce. The ranges must cover the training-mode activations of the same images."""
    torch.manual_seed(0)
    student = quantized(build_model("resnet8", 1, 10), 4, calibrate_on_data=False)
    images = torch.randn(64, 1, 8, 8) * 5 + 1
    calibrate_once(student, images, None)
    ranges, peaks = {}, {}
    for name, q in quantizers(student):
        if q.kind == "activation":
            ranges[name] = q.step_size().item() * q.grid.qmax
            q.register_forward_pre_hook(
                lambda q, args, name=name: peaks.__setitem__(name, args[0].abs().max().item())
            )
    with torch.no_grad(), frozen_batchnorm_statistics(student):
        student.train()(images)
    ratios = [ranges[name] / peaks[name] for name in ranges]
    assert 0.75 < min(ratios) and max(ratios) < 1.05, ratios
