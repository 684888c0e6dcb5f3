"""Training on a GPU (config ``device``): the device names, and what can be checked without one."""

import json

import pytest
import torch

from qkd_deploy.config import load_config
from qkd_deploy.data import load_dataset, normalization_stats
from qkd_deploy.distill.base import METHODS
from qkd_deploy.errors import UserError
from qkd_deploy.pipeline import checks as P
from qkd_deploy.rundir import RunDir
from qkd_deploy.train.device import resolve_device
from qkd_deploy.train_and_export import main

NO_GPU = not torch.cuda.is_available()


def test_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu" if NO_GPU else "cuda:0")
    for bad in ("tpu", "gpu0", "cuda:x"):
        with pytest.raises(UserError, match="use auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    count = torch.cuda.device_count() if not NO_GPU else 0
    with pytest.raises(UserError, match=f"sees {count} CUDA GPU"):
        resolve_device(f"cuda:{count}")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
def test_a_gpu_that_is_not_there_fails_before_training(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--set", "device=cuda", "--out", str(out), "--no-progress"]) == 2
    assert "sees 0 CUDA GPU(s)" in capsys.readouterr().err
    assert not out.exists()


def _step(distiller, images, labels):
    _, terms = distiller.forward_train(images, labels, 0.5)
    sum(terms.values()).backward()
    distiller.after_step()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_training_step_makes_its_tensors_on_the_models_device(method, tmp_path):
    """On a GPU, a tensor that a method makes without ``device=`` lands on the CPU and the step
    fails. Simulated without a GPU: under ``torch.device("meta")`` every such tensor lands on
    the meta device instead, and any op that mixes it with the CPU models raises. (A first step
    outside creates the optimizer state of methods that step a generator inside theirs.)"""
    data = load_dataset("digits")
    config = load_config(overrides=[f"student.method={method}", "student.bits=[w4a4]"])
    ctx = P.Context(config, data, normalization_stats(data.train.images.numpy()), RunDir(tmp_path))
    distiller, images, labels = P.untrained_method(ctx)
    distiller.train()
    _step(distiller, images, labels)
    with torch.device("meta"):
        _step(distiller, images, labels)


@pytest.mark.skipif(NO_GPU, reason="no CUDA GPU: torch.cuda.is_available() is False here")
def test_main_command_trains_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    args = ["--set", "device=cuda", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["environment"]["training_device"].startswith("cuda:0")
    assert all(s["onnx_agreement"] >= 0.99 for s in report["students"])
