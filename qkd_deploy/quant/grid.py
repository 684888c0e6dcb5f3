"""Integer grids of symmetric quantization and the container they export to.

Torch-free: the exporter and the linter reason about the same grids.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkd_deploy.bits import check_bits
from qkd_deploy.targets import Target


@dataclass(frozen=True)
class Grid:
    """The integers ``qmin..qmax`` a quantizer rounds to (value = integer * scale).

    ``container`` is the ONNX integer type of the Q/DQ pair that carries it ("int8" or "uint8"),
    holding ``integer + zero_point``. The zero point is 0 except for a signed grid on UINT8 (the
    ``onnxruntime`` target), where 128 shifts -128..127 onto 0..255: the values are the same
    symmetric grid. A grid narrower than its container is exported as a clip plus Q/DQ.
    """

    qmin: int
    qmax: int
    container: str
    zero_point: int = 0

    @property
    def fills_container(self) -> bool:
        full = (-128, 127) if self.container == "int8" else (0, 255)
        return (self.qmin + self.zero_point, self.qmax + self.zero_point) == full


def weight_grid(bits: int) -> Grid:
    """Weights: signed narrow range (-(2^(b-1)-1) .. 2^(b-1)-1), so folding a negative BN scale
    into a channel can negate its integers exactly; 2 bits gives ternary weights."""
    check_bits(bits, "weight quantizer")
    half = 2 ** (bits - 1) - 1
    return Grid(-half, half, "int8")


def activation_grid(bits: int, non_negative: bool, target: Target | str) -> Grid:
    """Activations: per tensor, symmetric.

    A non-negative activation (after ReLU) uses the unsigned grid 0 .. 2^b-1, carried by UINT8 for
    ``onnxruntime`` and by INT8 for ``tensorrt`` (TensorRT has no UINT8 Q/DQ), which holds it
    exactly up to 7 bits; an 8-bit non-negative activation for TensorRT falls back to the signed
    grid. A signed activation uses -2^(b-1) .. 2^(b-1)-1: on INT8 for ``tensorrt``, on UINT8 with
    zero point 128 for ``onnxruntime``, whose CPU integer convolutions take UINT8 inputs (a signed
    network input on INT8 left the first conv of ResNet-18 unfused).
    """
    check_bits(bits, "activation quantizer")
    target = Target.parse(target)
    if non_negative and target is Target.ONNXRUNTIME:
        return Grid(0, 2**bits - 1, "uint8")
    if non_negative and bits <= 7:
        return Grid(0, 2**bits - 1, "int8")
    half = 2 ** (bits - 1)
    if target is Target.ONNXRUNTIME:
        return Grid(-half, half - 1, "uint8", zero_point=128)
    return Grid(-half, half - 1, "int8")
