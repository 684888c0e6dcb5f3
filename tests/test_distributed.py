"""Data-parallel training under torchrun (``train.distributed``), with real processes on the CPU
(gloo): the same code path as several GPUs, minus NCCL."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_jobs import SHARED_METHODS, toy_job

from qkd_deploy.distill import build_distiller
from qkd_deploy.train.loop import fit

JOBS = Path(__file__).with_name("distributed_jobs.py")


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc-per-node={processes}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, done.stderr[-3000:]


def test_two_processes_train_as_one(tmp_path):
    """Each process trains on half of every batch; the averaged gradient is the whole batch's,
    so a model without BatchNorm ends where one process would have taken it."""
    _check(torchrun(str(JOBS), "toy", str(tmp_path)))
    shared = torch.load(tmp_path / "result.pt", weights_only=True)
    model, loader, cfg = toy_job()
    alone = fit(build_distiller("none", model, []), loader, cfg, tmp_path / "alone.pt")
    for name, value in model.state_dict().items():
        torch.testing.assert_close(shared["state"][name], value, atol=2e-5, rtol=1e-4)
    for mine, theirs in zip(shared["history"], alone, strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert mine["train_accuracy"] == pytest.approx(theirs["train_accuracy"])
    assert (tmp_path / "checkpoint.pt").is_file()


def test_a_parameter_that_one_process_did_not_use_is_averaged_too(tmp_path):
    """Process 1's steps skip a layer (no gradient there): the processes still average the
    same parameters, with process 1's share of that layer's gradient zero, and end identical."""
    _check(torchrun(str(JOBS), "gate", str(tmp_path)))
    first = torch.load(tmp_path / "result.pt", weights_only=True)["state"]
    second = torch.load(tmp_path / "train.rank1.pt", weights_only=True)
    before = torch.load(tmp_path / "gate.before.pt", weights_only=True)
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["extra.weight"], before["extra.weight"])


def test_every_method_that_can_be_shared_trains_on_two_processes(tmp_path):
    """Every non-data-free method's distiller travels to the other process (pickled) and trains
    there in step: a collective that one process skipped would hang, one of another size fail,
    and the two students end identical (same averaged gradients, same BatchNorm statistics)."""
    _check(torchrun(str(JOBS), "methods", str(tmp_path)))
    for method in SHARED_METHODS:
        result = torch.load(tmp_path / f"{method}.result.pt", weights_only=True)
        assert result["changed"], method
        assert all(torch.isfinite(torch.tensor(e["loss"])) for e in result["history"]), method
        first, second = (torch.load(tmp_path / f"{method}.rank{r}.pt") for r in (0, 1))
        assert first.keys() == second.keys()
        for name in first:
            assert torch.equal(first[name], second[name]), f"{method}: {name}"


def test_main_command_under_torchrun(tmp_path):
    """Process 0 runs the pipeline and alone writes the run directory; the report says how many
    processes trained. A data-free method is refused before anything is written."""
    out = tmp_path / "run"
    main = ["-m", "qkd_deploy.train_and_export", "--no-progress", "--bits", "4", "--epochs", "2"]
    _check(torchrun(*main, "--out", str(out)))
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["training_processes"] == 2
    assert "cpu x 2 processes" in (out / "report.md").read_text()
    (student,) = report["students"]
    assert student["onnx_agreement"] >= 0.99 and student["accuracy_onnx"] > 0.5

    refused = torchrun(*main, "--method", "dafl", "--out", str(tmp_path / "dafl"))
    assert refused.returncode != 0
    assert "dafl is data-free" in refused.stderr and "run it without torchrun" in refused.stderr
    assert not (tmp_path / "dafl").exists()
