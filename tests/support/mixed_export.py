"""The toy residual net quantized with per-layer precision (``quant.layer_bits``, float layers)
and exported: a real mixed-precision ONNX file for the precision table and the linter."""

import torch

from qkd_deploy.calib.calibrate import calibrate
from qkd_deploy.export.onnx import export_onnx
from qkd_deploy.quant.convert import BitWidths
from qkd_deploy.quant.integer import to_deploy
from qkd_deploy.quant.precision import PrecisionOptions, quantize
from tests.support.toy import ToyResNet, randomize_batchnorm


def export_toy(path, bits: str, **options):
    """Export ToyResNet(width=16) at ``bits`` with ``PrecisionOptions`` ``options`` to ``path``."""
    torch.manual_seed(0)
    model = randomize_batchnorm(ToyResNet(width=16)).eval()
    quantized = quantize(model, PrecisionOptions(BitWidths.parse(bits), **options))
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    calibrate(quantized, [x])
    return export_onnx(to_deploy(quantized.eval()), x, path)
