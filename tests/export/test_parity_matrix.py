"""Parity of every zoo model's export with its fake-quant model in ONNX Runtime, per bit-width.

The models are freshly initialised and calibrated on random images: parity is a property of the
export, not of training. Sub-8-bit activations match to ~1e-6. With 8-bit activations the grid
is fine enough that float summation order (torch vs ONNX Runtime kernels) occasionally moves a
value across a rounding boundary; in deep untrained nets, whose logits are large and close, that
shows as a small logit error and a rare argmax flip, hence the tolerances.

Every model of the zoo at W8A8, W4A8, W4A4 and W2A2: about 4 minutes of one core; the
torchvision-style blocks (``torchvision_style.py``) at W2A2 for both targets: half a minute.
"""

import numpy as np
import pytest
import torch

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.models import available_models, build_model
from qkd_deploy.quant.convert import BitWidths, QuantizeOptions, quantize_model
from qkd_deploy.quant.fold import fold_batchnorm
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.runtime.onnxruntime import OnnxRuntimeRunner
from tests.support.torchvision_style import BLOCK_NETS

BITS = ["w8a8", "w4a8", "w4a4", "w2a2"]
CASES = [(arch, bits) for arch in available_models() for bits in BITS]


@pytest.mark.parametrize(("arch", "bits"), CASES)
def test_zoo_model_parity(arch, bits, tmp_path):
    torch.manual_seed(0)
    model = build_model(arch, 1, 10).eval()
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    q = quantize_model(model, QuantizeOptions(BitWidths.parse(bits)))
    calibrate(q, [x])
    q.eval()
    path = export_onnx(to_deploy(q), x, tmp_path / "m.onnx")
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    logits = OnnxRuntimeRunner(path, optimize=False).run(x.numpy())  # the graph as written
    agreement = (logits.argmax(1) == reference.argmax(1)).mean()
    error = np.abs(logits - reference).max()
    assert agreement >= 0.95, (agreement, error)
    assert error <= 0.05 * np.abs(reference).max(), (agreement, error)
    if bits.endswith(("a4", "a2")):
        assert error < 1e-3 * max(1.0, np.abs(reference).max())


USER_CASES = [(name, target) for name in BLOCK_NETS for target in ("tensorrt", "onnxruntime")]


@pytest.mark.parametrize(("name", "target"), USER_CASES)
def test_torchvision_style_block_parity_at_w2a2(name, target, tmp_path):
    """Functional adds, SE gates, concatenations and channel shuffles on the coarsest grid."""
    torch.manual_seed(0)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    q = quantize_model(BLOCK_NETS[name](), QuantizeOptions(BitWidths.parse("w2a2"), target))
    calibrate(q, [x])
    q.eval()
    path = export_onnx(to_deploy(q), x, tmp_path / "m.onnx")
    with torch.no_grad():
        reference = fold_batchnorm(q)(x).numpy()
    logits = OnnxRuntimeRunner(path, optimize=False).run(x.numpy())
    assert (logits.argmax(1) == reference.argmax(1)).all()
    assert np.abs(logits - reference).max() < 1e-3 * max(1.0, np.abs(reference).max())
