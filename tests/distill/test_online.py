"""Online distillation (dml, pcl, dkel): loss terms against hand-computed numbers, the EMA math,
the DKEL teacher's warm-up and independence, real training steps on digits, the exported model,
and the main command end to end."""

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from qkd_deploy.distill import build_distiller
from qkd_deploy.distill.base import MethodContext
from qkd_deploy.distill.online import (  # importing registers dml, pcl and dkel
    decaying_weight,
    ema_decay,
    kd_from_others,
    mixed_target,
    rampup_weight,
)
from qkd_deploy.errors import UserError
from tests.support.hand_math import softmax
from tests.support.method_helpers import (
    assert_exports_plain_student,
    context,
    float_model,
    quantized,
    training_lowers_loss,
)
from tests.support.toy import ToyResNet

# ---------------------------------------------------------------------------------------------
# Hand computation and stub peers
# ---------------------------------------------------------------------------------------------


def _ce(rows, labels):
    return sum(-math.log(softmax(r)[y]) for r, y in zip(rows, labels, strict=True)) / len(rows)


def _kl(target_rows, student_rows, tau):
    """tau^2 * KL(softmax(t / tau) || softmax(s / tau)), batch mean."""
    total = 0.0
    for t, s in zip(target_rows, student_rows, strict=True):
        pt, ps = softmax(t, tau), softmax(s, tau)
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps, strict=True))
    return total / len(target_rows) * tau**2


def _mean_rows(*matrices):
    """Element-wise mean of equally shaped nested lists."""
    rows = zip(*matrices, strict=True)
    return [[sum(v) / len(v) for v in zip(*r, strict=True)] for r in rows]


class _Fixed(nn.Module):
    """A 'network' whose logits are a parameter (the input is ignored)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor(logits))

    def forward(self, x):
        return self.logits


class _FixedStaged(_Fixed):
    """Also has fixed pooled features, for PCL's peer-ensemble head."""

    stage_channels = [2]

    def __init__(self, logits, pooled):
        super().__init__(logits)
        self.pooled = torch.tensor(pooled)

    def forward_features(self, x):
        return self.logits, {"pooled": self.pooled}


def _context(models, steps_per_epoch=4):
    """A context whose make_student() hands out ``models`` in order."""
    models = iter(models)
    return MethodContext(
        num_classes=3,
        input_shape=(1, 4, 4),
        steps_per_epoch=steps_per_epoch,
        epochs=1,
        make_student=lambda: next(models),
    )


IMAGES = torch.zeros(2, 1, 4, 4)
LABELS = torch.tensor([1, 0])
A = [[1.0, 2.0, 0.0], [0.5, 0.5, 0.5]]
B = [[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]
C = [[0.0, 0.0, 1.5], [1.0, -1.0, 0.5]]


# ---------------------------------------------------------------------------------------------
# Loss terms and schedules
# ---------------------------------------------------------------------------------------------


def test_dml_terms_match_hand_computation():
    d = build_distiller(
        "dml", _Fixed(A), [], {"tau": 2.0, "init_noise": 0.0}, _context([_Fixed(B)])
    )
    logits, terms = d.forward_train(IMAGES, LABELS, 0.3)
    assert logits.tolist() == A
    assert terms["ce"].item() == pytest.approx(_ce(A, [1, 0]) + _ce(B, [1, 0]), rel=1e-6)
    mutual = _kl(B, A, 2.0) + _kl(A, B, 2.0)
    assert terms["mutual_kl"].item() == pytest.approx(mutual, rel=1e-6)


def test_kd_from_others_averages_the_other_peers_and_detaches_them():
    peers = [torch.tensor(x, requires_grad=True) for x in (A, B, C)]
    terms = kd_from_others(peers, peers, 3.0)
    for j, (own, others) in enumerate([(A, (B, C)), (B, (A, C)), (C, (A, B))]):
        expected = sum(_kl(t, own, 3.0) for t in others) / 2
        assert terms[j].item() == pytest.approx(expected, rel=1e-6)
    terms[0].backward()
    assert peers[0].grad is not None and peers[1].grad is None and peers[2].grad is None


def test_dml_peers_start_apart_with_init_noise():
    student = nn.Linear(3, 3)
    d = build_distiller(
        "dml", student, [], {"peers": 3}, _context([copy.deepcopy(student), copy.deepcopy(student)])
    )
    before = copy.deepcopy(student.state_dict())
    for peer in d.extra_peers:
        assert not torch.equal(peer.weight, student.weight)
        assert torch.equal(peer.bias, student.bias)  # only weight tensors are perturbed
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("progress", "length", "weight"),
    [
        (0.0, 0.25, math.exp(-5)),
        (0.125, 0.25, math.exp(-1.25)),
        (0.25, 0.25, 1.0),
        (0.9, 0.25, 1.0),
        (0.0, 0.0, 1.0),
    ],
)
def test_pcl_rampup(progress, length, weight):
    assert rampup_weight(progress, length) == pytest.approx(weight)


def test_pcl_terms_match_hand_computation():
    pooled = [[[1.0, 0.0], [0.0, 2.0]], [[0.5, 0.5], [1.0, 1.0]], [[2.0, -1.0], [0.0, 0.0]]]
    peers = [_FixedStaged(z, f) for z, f in zip((A, B, C), pooled, strict=True)]
    d = build_distiller("pcl", peers[0], [], {"rampup": 0.25}, _context(peers[1:]))
    # the ensemble head: e = W [f_1, f_2, f_3] + b, with W and b set by hand
    w = [[0.1 * (i + j) for j in range(6)] for i in range(3)]
    b = [0.5, -0.5, 0.0]
    d.head.weight.data = torch.tensor(w)
    d.head.bias.data = torch.tensor(b)
    features = [sum((p[n] for p in pooled), []) for n in range(2)]
    ensemble = [
        [
            sum(wi * x for wi, x in zip(row, f, strict=True)) + bi
            for row, bi in zip(w, b, strict=True)
        ]
        for f in features
    ]
    # the peer mean teachers, different from their peers
    means = [[[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]], [[1.0, 1.0, -1.0], [0.0, 2.0, 0.0]], B]
    for m, values in zip(d.mean_teachers, means, strict=True):
        m.logits.data = torch.tensor(values)

    logits, terms = d.forward_train(IMAGES, LABELS, 0.125)
    ramp = math.exp(-1.25)
    peers_logits = (A, B, C)
    assert logits.tolist() == A
    assert terms["ce"].item() == pytest.approx(sum(_ce(z, [1, 0]) for z in peers_logits))
    assert terms["ensemble_ce"].item() == pytest.approx(_ce(ensemble, [1, 0]), rel=1e-6)
    ensemble_kd = ramp * sum(_kl(ensemble, z, 3.0) for z in peers_logits)
    assert terms["ensemble_kd"].item() == pytest.approx(ensemble_kd, rel=1e-5)
    mean_kd = ramp * sum(
        sum(_kl(m, z, 3.0) for i, m in enumerate(means) if i != j) / 2
        for j, z in enumerate(peers_logits)
    )
    assert terms["mean_teacher_kd"].item() == pytest.approx(mean_kd, rel=1e-6)
    # the running measure follows the mean teachers; the best one is exported
    mean_ce = [_ce(m, [1, 0]) for m in means]
    assert d.running_ce.tolist() == pytest.approx(mean_ce, rel=1e-6)
    assert d.export_model() is d.mean_teachers[mean_ce.index(min(mean_ce))]


@pytest.mark.parametrize(
    ("progress", "gamma", "weight"),
    [(0.0, 0.5, 1.0), (0.36, 0.5, 0.8), (0.75, 0.5, 0.5), (1.0, 0.5, 0.0), (0.5, 1.0, 0.5)],
)
def test_dkel_decaying_weight(progress, gamma, weight):
    assert decaying_weight(progress, gamma) == pytest.approx(weight)


def test_dkel_mixed_target():
    target = mixed_target(torch.tensor([[4.0, 0.0, 0.0]]), torch.tensor([[0.0, 4.0, 0.0]]), 0.25)
    assert target.tolist() == [[1.0, 3.0, 0.0]]


def test_dkel_terms_match_hand_computation():
    teacher = _Fixed([[0.0, 3.0, 0.0], [1.0, 1.0, 0.0]])
    d = build_distiller(
        "dkel", _Fixed(A), [], {}, _context([_Fixed(B), _Fixed(C), teacher], steps_per_epoch=4)
    )
    ema = [[2.0, 0.0, 1.0], [0.0, 1.0, 3.0]]
    d.teacher_ema.logits.data = torch.tensor(ema)
    progress = 0.36
    logits, terms = d.forward_train(IMAGES, LABELS, progress)
    w = 0.8
    ensemble = _mean_rows(A, B, C)
    target = [
        [w * t + (1 - w) * e for t, e in zip(tr, er, strict=True)]
        for tr, er in zip(ema, ensemble, strict=True)
    ]
    assert logits.tolist() == A
    assert terms["ce"].item() == pytest.approx(sum(_ce(z, [1, 0]) for z in (A, B, C)))
    assert terms["kd"].item() == pytest.approx(sum(_kl(target, z, 3.0) for z in (A, B, C)))
    teacher_ce = _ce(teacher.logits.tolist(), [1, 0])
    assert terms["teacher_ce"].item() == pytest.approx(teacher_ce, rel=1e-6)
    # during the warm-up the teacher's gradient is warmup_lr_scale (1/100) of its CE gradient
    terms["teacher_ce"].backward()
    probs = torch.softmax(teacher.logits.detach(), 1)
    full = (probs - nn.functional.one_hot(LABELS, 3)) / 2
    torch.testing.assert_close(teacher.logits.grad, 0.01 * full)
    d.updates.fill_(4)  # one epoch done: full rate
    assert d.teacher_lr_scale() == 1.0


# ---------------------------------------------------------------------------------------------
# EMA updates
# ---------------------------------------------------------------------------------------------


def test_ema_decay_is_a_true_average_until_the_horizon():
    assert ema_decay(0.999, 0) == 0.0
    assert ema_decay(0.999, 1) == 0.5
    assert ema_decay(0.999, 10**6) == 0.999


def test_pcl_ema_update_is_exact_and_outside_the_optimizer():
    student = nn.Linear(2, 2)
    d = build_distiller(
        "pcl",
        student,
        [],
        {"peers": 2, "decay": 0.75, "ensemble_head": False},
        _context([copy.deepcopy(student)]),
    )
    mean = d.mean_teachers[0]
    optimized = {id(p) for g in d.parameter_groups() for p in g["params"]}
    assert not any(id(p) in optimized or p.requires_grad for p in d.mean_teachers.parameters())
    assert {id(p) for p in d.peers[1].parameters()} <= optimized
    with torch.no_grad():
        mean.weight.fill_(1.0)
        mean.bias.fill_(-2.0)
        student.weight.copy_(torch.tensor([[3.0, 5.0], [-1.0, 0.5]]))
        student.bias.fill_(2.0)
    d.updates.fill_(10)  # past the true-average start: the decay is 0.75
    d.after_step()
    assert torch.equal(mean.weight, 0.75 * torch.ones(2, 2) + 0.25 * student.weight)
    assert torch.equal(mean.bias, torch.full((2,), 0.75 * -2.0 + 0.25 * 2.0))
    assert int(d.updates) == 11
    d.updates.fill_(0)  # the first update copies the peer (mean-teacher start)
    d.after_step()
    assert torch.equal(mean.weight, student.weight)


# ---------------------------------------------------------------------------------------------
# DKEL: the independent teacher and its warm-up
# ---------------------------------------------------------------------------------------------


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_dkel_teacher_warms_up_and_is_independent_of_the_peers():
    torch.manual_seed(0)
    student = ToyResNet(1, 3)
    copies = [copy.deepcopy(student) for _ in range(2)]  # peer 1 and the teacher network
    d = build_distiller("dkel", student, [], {"peers": 2, "decay": 0.5}, _context(copies, 3))
    d.train()
    assert d.teacher_net is copies[1] and d.warmup_steps == 3
    optimized = {id(p) for g in d.parameter_groups() for p in g["params"]}
    assert {id(p) for p in d.teacher_net.parameters()} <= optimized
    assert not any(id(p) in optimized or p.requires_grad for p in d.teacher_ema.parameters())
    optimizer = torch.optim.SGD(d.parameter_groups()[0]["params"], lr=0.1)
    images, labels = torch.randn(8, 1, 4, 4), torch.randint(0, 3, (8,))
    initial = _params(d.teacher_net)
    scales = []
    for step in range(4):
        scales.append(d.teacher_lr_scale())
        _, terms = d.forward_train(images, labels, step / 4)
        optimizer.zero_grad()
        # no peer loss reaches the teacher: it learns from the labels only
        (terms["ce"] + terms["kd"]).backward(retain_graph=True)
        assert all(p.grad is None for p in d.teacher_net.parameters())
        terms["teacher_ce"].backward()
        optimizer.step()
        ema_before, teacher_now = _params(d.teacher_ema), _params(d.teacher_net)
        d.after_step()
        # the teacher's temporal mean follows the teacher network, not a peer
        decay = ema_decay(0.5, step)
        for e, old, t in zip(d.teacher_ema.parameters(), ema_before, teacher_now, strict=True):
            torch.testing.assert_close(e, decay * old + (1 - decay) * t)
    assert scales == [0.01, 0.01, 0.01, 1.0]
    assert any(not torch.equal(a, b) for a, b in zip(initial, _params(d.teacher_net), strict=True))
    for peer in d.peers:
        for model in (d.teacher_net, d.teacher_ema):
            pairs = zip(model.parameters(), peer.parameters(), strict=True)
            assert any(not torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("method", ["dml", "pcl", "dkel"])
def test_state_survives_a_resume(method):
    """What a checkpoint restores: peers, EMA models, the step count and the running measure."""

    def build():
        torch.manual_seed(0)
        models = [ToyResNet(1, 3) for _ in range(4)]
        options = {"peers": 3, **({"ensemble_head": False} if method == "pcl" else {})}
        return build_distiller(method, models[0], [], options, _context(models[1:], 3)).train()

    trained, fresh = build(), build()
    _, terms = trained.forward_train(torch.randn(4, 1, 4, 4), torch.tensor([0, 1, 2, 0]), 0.0)
    sum(terms.values()).backward()
    trained.after_step()
    fresh.load_state_dict(trained.state_dict())
    assert int(fresh.updates) == 1 and torch.equal(fresh.running_ce, trained.running_ce)
    for a, b in zip(fresh.state_dict().values(), trained.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert fresh.best_index() == trained.best_index()


def test_options_are_checked():
    with pytest.raises(UserError, match="peers must be >= 2"):
        build_distiller("dml", _Fixed(A), [], {"peers": 1}, _context([]))
    with pytest.raises(UserError, match="make_student"):
        build_distiller("pcl", _Fixed(A), [])
    with pytest.raises(UserError, match="ensemble_head=false"):
        build_distiller("pcl", _Fixed(A), [], {}, _context([_Fixed(B), _Fixed(C)]))
    with pytest.raises(UserError, match="decay"):
        build_distiller("dkel", _Fixed(A), [], {"decay": 1.0}, _context([_Fixed(B)] * 3))


# ---------------------------------------------------------------------------------------------
# Real training on digits at 4 bits, and what is exported
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_float():
    return float_model("resnet8", 2)


# PCL's KD weight ramps up over the first 27 % of training, which raises the loss it reports;
# without the ramp the objective is fixed and must fall.
OPTIONS = {"dml": {}, "pcl": {"rampup": 0.0}, "dkel": {}}


@pytest.fixture(scope="module", params=sorted(OPTIONS))
def trained(request, student_float):
    torch.manual_seed(0)
    method = request.param
    distiller = build_distiller(
        method, quantized(student_float, 4), [], OPTIONS[method], context(student_float, 4)
    )
    first, last = training_lowers_loss(distiller, steps=10)
    return distiller, first, last


def test_training_lowers_the_loss(trained):
    _, first, last = trained
    assert last < first


def test_exports_a_plain_student(trained, student_float, tmp_path):
    distiller, *_ = trained
    distiller.eval()
    exported = distiller.export_model()
    assert any(exported is c for c in distiller.candidates())
    assert_exports_plain_student(distiller, quantized(student_float, 4), tmp_path)


def test_main_command_with_dkel(tmp_path):
    code = (
        "import qkd_deploy.distill.online; from qkd_deploy.train_and_export import main; "
        "import sys; sys.exit(main(sys.argv[1:]))"
    )
    out = tmp_path / "run"
    args = (
        "--method dkel --bits 4 --epochs 1 --no-progress --allow-low-accuracy "
        "--set bench.iterations=2 "
        "--set bench.batch_sizes=[1] --teacher-arch resnet8"
    ).split() + ["--out", str(out)]
    # speed only: no float pre-training of the student, bigger batches, fewer calibration images
    args += (
        "--set student.float_reference=false --set student.train.batch_size=128 "
        "--set teacher_train.batch_size=128 --set data.calibration_size=128 --set bench.warmup=1"
    ).split()
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-3000:]
    student = json.loads((out / "report.json").read_text())["students"][0]
    assert student["method"] == "dkel"
    assert student["onnx_agreement"] >= 0.99
