"""A killed training run resumes from its last checkpoint and ends where an unbroken run ends."""

import pytest
import torch

from qkd_deploy.config import TrainConfig
from qkd_deploy.data import BatchLoader, load_dataset, normalization_stats
from qkd_deploy.distill import build_distiller
from qkd_deploy.errors import TrainingDiverged, UserError
from qkd_deploy.models import build_model
from qkd_deploy.train.loop import fit
from qkd_deploy.train.optim import warmup_cosine


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits")
    return data, normalization_stats(data.train.images.numpy())


def _setup(digits):
    data, preprocess = digits
    torch.manual_seed(0)
    model = build_model("resnet8", 1, 10)
    loader = BatchLoader(data.train, preprocess, 128, shuffle=True, augment=data.augment, seed=3)
    return build_distiller("none", model, []), loader


class _Killed(Exception):
    pass


class _DyingLoader:
    """Behaves like the loader, but the process "dies" when epoch ``die_at`` starts."""

    def __init__(self, loader, die_at):
        self.loader, self.die_at, self.epoch = loader, die_at, 0

    def set_epoch(self, epoch):
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        if self.epoch == self.die_at:
            raise _Killed
        return iter(self.loader)


def test_resume_gives_the_same_weights_as_an_unbroken_run(tmp_path, digits):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05, warmup_epochs=0.5)
    distiller, loader = _setup(digits)
    unbroken = fit(distiller, loader, cfg, tmp_path / "a.pt", progress=False)
    expected = {k: v.clone() for k, v in distiller.state_dict().items()}

    distiller, loader = _setup(digits)
    with pytest.raises(_Killed):
        fit(distiller, _DyingLoader(loader, die_at=2), cfg, tmp_path / "b.pt", progress=False)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["epoch"] == 2
    distiller, loader = _setup(digits)  # a new process: fresh model, same config
    resumed = fit(distiller, loader, cfg, tmp_path / "b.pt", progress=False)

    assert [h["loss"] for h in resumed] == [h["loss"] for h in unbroken]
    for key, value in distiller.state_dict().items():
        assert torch.equal(value, expected[key]), key
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave no temporaries


def test_training_lowers_the_loss(tmp_path, digits):
    distiller, loader = _setup(digits)
    history = fit(
        distiller, loader, TrainConfig(epochs=3, lr=0.05), tmp_path / "c.pt", progress=False
    )
    assert history[-1]["loss"] < 0.7 * history[0]["loss"]


def test_training_hands_back_contiguous_weights(tmp_path, digits):
    """The CPU trains in channels-last; the model that comes back (for calibration, export and
    the stage's saved model) is in the ordinary layout again."""
    distiller, loader = _setup(digits)
    fit(distiller, loader, TrainConfig(epochs=1), tmp_path / "e.pt", progress=False)
    convs = [p for p in distiller.student.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous() for p in convs)


def test_checkpoint_of_another_model_is_refused_and_kept(tmp_path, digits):
    distiller, loader = _setup(digits)
    fit(distiller, loader, TrainConfig(epochs=1), tmp_path / "d.pt", progress=False)
    before = (tmp_path / "d.pt").read_bytes()
    other = build_distiller("none", build_model("resnet14", 1, 10), [])
    with pytest.raises(UserError, match="does not match"):
        fit(other, loader, TrainConfig(epochs=2), tmp_path / "d.pt", progress=False)
    assert (tmp_path / "d.pt").read_bytes() == before


def test_warmup_then_cosine():
    factor = warmup_cosine(total_steps=10, warmup_steps=2)
    assert [round(factor(s), 3) for s in (0, 1, 2, 6, 10)] == [0.5, 1.0, 1.0, 0.5, 0.0]


class _OneBatch:
    """A loader of one fixed batch per epoch."""

    def __init__(self, loader):
        self.batch = next(iter(loader))

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return 1

    def __iter__(self):
        return iter([self.batch])


@pytest.mark.parametrize("grad_clip", [None, 0.01])
def test_grad_clip_bounds_the_norm_of_each_step(tmp_path, digits, grad_clip):
    """One plain SGD step (lr 1, no momentum or decay) moves the weights by the gradient, so
    the step's norm is the clipped gradient norm."""
    distiller, loader = _setup(digits)
    before = [p.detach().clone() for p in distiller.parameters()]
    cfg = TrainConfig(
        epochs=1, lr=1.0, momentum=0.0, weight_decay=0.0, warmup_epochs=0, grad_clip=grad_clip
    )
    fit(distiller, _OneBatch(loader), cfg, tmp_path / "d.pt", progress=False)
    step = torch.cat(
        [(p.detach() - b).flatten() for p, b in zip(distiller.parameters(), before, strict=True)]
    )
    if grad_clip is None:
        assert step.norm() > 0.1  # the unclipped gradient is far larger than the clip below
    else:
        assert step.norm() == pytest.approx(grad_clip, rel=1e-3)


def test_grad_clip_must_be_positive(tmp_path, digits):
    distiller, loader = _setup(digits)
    with pytest.raises(UserError, match="grad_clip"):
        fit(distiller, loader, TrainConfig(grad_clip=0.0), tmp_path / "e.pt", progress=False)
    assert not (tmp_path / "e.pt").exists()


class _PoisonedLoader(_DyingLoader):
    """Behaves like the loader, but from epoch ``die_at`` on the images are NaN."""

    def __iter__(self):
        for images, labels in self.loader:
            yield (images * float("nan") if self.epoch >= self.die_at else images), labels


def test_a_nan_loss_stops_the_stage_naming_where_and_keeps_the_last_epoch(tmp_path, digits):
    cfg = TrainConfig(epochs=3, batch_size=128, lr=0.05)
    distiller, loader = _setup(digits)
    checkpoint = tmp_path / "c.pt"
    with pytest.raises(TrainingDiverged) as raised:
        fit(distiller, _PoisonedLoader(loader, die_at=1), cfg, checkpoint, "teacher", False)
    message = str(raised.value)
    assert message.startswith("teacher: loss ce=nan at epoch 2/3, step 1: training diverged")
    assert f"the checkpoint of epoch 1 ({checkpoint}) is kept" in message
    assert "train.lr, now 0.05" in message and "grad_clip" in message
    assert raised.value.checkpoint == checkpoint
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
