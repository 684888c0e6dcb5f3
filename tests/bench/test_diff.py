"""`qkd-deploy diff`: a planted scale change in one Q/DQ pair is named at its node; the graph as
written and the fused kernels are compared tensor by tensor."""

import numpy as np
import torch

from qkd_deploy.bench import diff
from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.pipeline import diff as diff_command
from qkd_deploy.pipeline.diff_reference import levels_of
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.integer import to_deploy
from tests.support.planted import plant_scale_change
from tests.support.toy import ToyResNet, randomize_batchnorm


def _export(tmp_path, target="tensorrt"):
    torch.manual_seed(0)
    model = randomize_batchnorm(ToyResNet(width=16)).eval()
    q = quantize_model(model, QuantizeOptions(BitWidths.parse("w4a4"), target))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate(q, [x])
    deploy = to_deploy(q.eval())
    return deploy, x.numpy(), export_onnx(deploy, x, tmp_path / "m.onnx")


def test_a_planted_scale_change_is_named_at_its_node(tmp_path):
    deploy, images, path = _export(tmp_path)
    planted = plant_scale_change(path, tmp_path / "planted.onnx", 2)
    for model_path, expected in ((path, None), (tmp_path / "planted.onnx", planted)):
        model = diff.load(model_path)
        points = diff.checkpoints(model)
        written = diff.run_onnxruntime(model, images, [p.tensor for p in points], fused=False)
        torch_side = levels_of(deploy)(images, points)
        rows = diff.compare(diff.levels(torch_side, points), diff.levels(written, points), points)
        first = diff.first_divergence(rows)
        assert (first and first.node) == expected
        if expected:
            assert first.max_steps >= 2 and first.share_off > 0.1


def test_fused_kernels_are_compared_at_every_quantized_tensor(tmp_path, capsys):
    _, _, path = _export(tmp_path, target="onnxruntime")
    code = diff_command.main([str(path), "--json", "--count", "16"])
    out = capsys.readouterr().out
    import json

    rows = json.loads(out)["fused ORT kernels vs graph as written"]
    assert len(rows) == len(diff.checkpoints(diff.load(path)))
    assert code in (0, 1) and code == int(any(r["share_off"] > diff.SHARE for r in rows))
    assert all(np.isfinite(r["max_abs"]) for r in rows)
