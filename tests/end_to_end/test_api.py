"""The Python API: the README's example runs as written, and each function does what it says."""

import re
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

import qkd_deploy as qd
from qkd_deploy.quant.modules import quantizers

README = Path(__file__).parents[2] / "README.md"


def test_the_readme_example_runs_as_written(tmp_path):
    (example,) = re.findall(r"## Python API\n.*?```python\n(.*?)```", README.read_text(), re.S)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    model = onnx.load(tmp_path / "student.onnx")
    ops = {node.op_type for node in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x).relu(), 1), 1))


def test_quantize_calibrates_a_copy_and_leaves_the_model_alone():
    torch.manual_seed(0)
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randn(8, 1, 6, 6), torch.zeros(8))]  # (inputs, labels) pairs work
    student = qd.quantize(model, bits=4, calibration=batches)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    found = quantizers(student)
    assert found and all(bool(q.calibrated) for _, q in found)
    assert {q.bits for _, q in found} == {8}  # its only conv and linear: first and last
    everywhere = qd.quantize(model, bits=4, calibration=batches, first_last_bits=None)
    assert {q.bits for _, q in quantizers(everywhere)} == {4}
    with pytest.raises(qd.UserError, match="calibration batches"):
        qd.quantize(model, bits=4)


def test_export_refuses_to_leave_a_file_that_changed_the_numbers(tmp_path, monkeypatch):
    torch.manual_seed(0)
    student = qd.quantize(Small(), bits=8, calibration=[torch.randn(16, 1, 6, 6)]).eval()
    sample = torch.randn(16, 1, 6, 6)
    path = qd.export_onnx(student, sample, tmp_path / "ok.onnx")
    assert path.is_file()

    import qkd_deploy.api as api

    real = api.export_deploy_model

    def wrong_by_a_constant_of_the_winner(deploy, *args):
        written = real(deploy, *args)
        model = onnx.load(written)
        bias = next(i for i in model.graph.initializer if i.name == "fc.bias")
        values = onnx.numpy_helper.to_array(bias).copy()
        values[0] += 100.0  # class 0 always wins in ONNX
        bias.CopyFrom(onnx.numpy_helper.from_array(values, "fc.bias"))
        onnx.save(model, written)
        return written

    monkeypatch.setattr(api, "export_deploy_model", wrong_by_a_constant_of_the_winner)
    with pytest.raises(qd.UserError, match="agrees with the torch model on only"):
        qd.export_onnx(student, sample, tmp_path / "bad.onnx")
    assert not (tmp_path / "bad.onnx").exists()


def test_the_package_imports_without_torch_until_the_api_is_used():
    code = "import sys, qkd_deploy, qkd_deploy.runtime; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
