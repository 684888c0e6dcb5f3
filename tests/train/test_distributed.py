"""Data-parallel training under torchrun (``train.distributed``), with real processes on the CPU
(gloo): the same code path as several GPUs, minus NCCL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qkd_deploy import train_and_export
from qkd_deploy.distill import build_distiller
from qkd_deploy.train import distributed
from qkd_deploy.train.loop import fit
from tests.support.distributed_jobs import SHARED_METHODS, toy_job

JOBS = Path(__file__).parents[1] / "support" / "distributed_jobs.py"


def torchrun(*args: str, processes: int = 2, cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", *args]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=300, cwd=cwd
    )  # a process left waiting in a collective hangs


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


# A rare abort at interpreter exit, after all work was done (3 of about 70 launches on
# 2026-11-30, before ``distributed._shut_down`` released the gloo groups; 0 of 62 after). The
# launch is repeated once for it, and only for it, until more runs confirm the fix.
NATIVE_ABORT = "terminate called without an active exception"


@pytest.fixture(scope="module")
def jobs(tmp_path_factory) -> Path:
    """One torchrun launch of every job in ``distributed_jobs.py``; their results."""
    for _attempt in range(2):
        out = tmp_path_factory.mktemp("jobs")  # a fresh folder: the jobs write checkpoints
        _first_epoch_alone(out / "resume.checkpoint.pt")
        done = torchrun(str(JOBS), str(out))
        if done.returncode == 0 or NATIVE_ABORT not in done.stderr:
            break
    _check(done)
    return out


def _first_epoch_alone(checkpoint: Path) -> None:
    """The toy job's checkpoint after its first epoch, trained by one process and killed."""
    model, loader, cfg = toy_job()
    set_epoch = loader.set_epoch

    def killed_after_the_first(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt
        set_epoch(epoch)

    loader.set_epoch = killed_after_the_first
    with pytest.raises(KeyboardInterrupt):
        fit(build_distiller("none", model, []), loader, cfg, checkpoint)


def _same_on_both_processes(out: Path, name: str) -> dict:
    first, second = (torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in (0, 1))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), f"{name}: {key}"
    return first


def test_two_processes_train_as_one(jobs, tmp_path):
    """Each process trains on half of every batch; the averaged gradient is the whole batch's,
    so a model without BatchNorm ends where one process would have taken it."""
    shared = torch.load(jobs / "toy.pt", weights_only=True)
    _same_on_both_processes(jobs, "toy")
    model, loader, cfg = toy_job()
    alone = fit(build_distiller("none", model, []), loader, cfg, tmp_path / "alone.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(shared["state"][name], value, atol=2e-5, rtol=1e-4)
    for mine, theirs in zip(shared["history"], alone, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])
    assert torch.load(jobs / "toy.checkpoint.pt", weights_only=True)["epoch"] == cfg.epochs


def test_a_run_resumes_on_two_processes_from_a_checkpoint(jobs):
    """A checkpoint written by one process resumes on two (process 0 sends its contents), and
    the run ends where the uninterrupted one did."""
    resumed = _same_on_both_processes(jobs, "resume")
    straight = torch.load(jobs / "toy.pt", weights_only=True)
    for name, value in straight["state"].items():
        torch.testing.assert_close(resumed[name], value, atol=2e-5, rtol=1e-4)
    history = torch.load(jobs / "resume.pt", weights_only=True)["history"]
    assert [e["epoch"] for e in history] == [1, 2]


def test_a_parameter_that_one_process_did_not_use_is_averaged_too(jobs):
    """Process 1's steps skip a layer (no gradient there): the processes still average the
    same parameters, with process 1's share of that layer's gradient zero, and end identical."""
    trained = _same_on_both_processes(jobs, "gate")
    before = torch.load(jobs / "gate.before.pt", weights_only=True)
    assert not torch.equal(trained["extra.weight"], before["extra.weight"])


def test_every_method_that_can_be_shared_trains_on_two_processes(jobs):
    """Every non-data-free method's distiller travels to the other process (pickled) and trains
    there in step: a collective that one process skipped would hang, one of another size fail,
    and the two distillers end identical (same averaged gradients, same BatchNorm statistics,
    and the online methods' running CE, which picks the exported peer, averaged too)."""
    for method in SHARED_METHODS:
        result = torch.load(jobs / f"{method}.result.pt", weights_only=True)
        assert result["changed"], method
        assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result["history"]), method
        state = _same_on_both_processes(jobs, method)
        if method in ("dml", "pcl", "dkel"):
            assert torch.isfinite(state["running_ce"]).all(), method


def test_main_command_under_torchrun(tmp_path):
    """Process 0 runs the pipeline and alone writes the run directory; the report says how many
    processes trained."""
    out = tmp_path / "run"
    bench = ["--set", "bench.batch_sizes=[1]", "--set", "bench.iterations=5"]
    main = ["-m", "qkd_deploy.train_and_export", "--no-progress", "--bits", "4", "--epochs", "1"]
    _check(torchrun(*main, *bench, "--out", str(out)))
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["training_processes"] == 2
    assert "cpu x 2 processes" in (out / "report.md").read_text()
    (student,) = report["students"]
    assert student["onnx_agreement"] >= 0.99 and student["accuracy_onnx"] > 0.5


USER_NET = """
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):  # written the ordinary way: an in-place residual add, functional ops
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(x))
        out += x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(F.relu(out), 1), 1))


def build():
    return Net()
"""


def test_your_own_student_under_torchrun(tmp_path):
    """A user student (imported from the working directory by every process) trains on two
    processes, and its graph-placed quantizers export exactly."""
    (tmp_path / "mynet.py").write_text(USER_NET)
    out = tmp_path / "run"
    main = ["-m", "qkd_deploy.train_and_export", "--no-progress", "--bits", "8", "--epochs", "1"]
    main += ["--student", "mynet:build", "--teacher-arch", "resnet8", "--allow-low-accuracy"]
    bench = ["--set", "bench.batch_sizes=[1]", "--set", "bench.iterations=5"]
    _check(torchrun(*main, *bench, "--out", str(out), cwd=tmp_path))
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["training_processes"] == 2
    (student,) = report["students"]
    assert student["name"] == "build_w8a8" and student["onnx_agreement"] >= 0.99


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--method", "dafl"], "dafl is data-free: it generates its batches"),
        (["--set", "student.train.batch_size=3"], "batch_size is 3, fewer images than the 4"),
    ],
)
def test_what_the_processes_cannot_share_fails_before_training(
    flags, message, tmp_path, monkeypatch, capsys
):
    """As process 0 of four (the check needs no other process): nothing is trained or kept."""
    monkeypatch.setattr(distributed, "_current", distributed.Group(0, 4, 0, control=None))
    out = tmp_path / "run"
    assert train_and_export.main([*flags, "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
