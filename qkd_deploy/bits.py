"""Bit-widths as a typed value: ``BitWidths(w, a)``, written ``wXaY``.

Torch-free and at the bottom of the package: the config checks a student's bits where it is
built, and quantization, export and the reports all pass the same value.
"""

from __future__ import annotations

from dataclasses import dataclass

from qkd_deploy.errors import UserError


def check_bits(bits: int, what: str) -> None:
    """Quantizers round to 2 to 8 bits; anything else is the user's mistake about ``what``."""
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise UserError(f"{what}: bit-width {bits!r} is not supported; use an integer from 2 to 8")


@dataclass(frozen=True)
class BitWidths:
    """Weight and activation bit-widths, written ``wXaY`` (e.g. ``w4a8``)."""

    w: int
    a: int

    def __post_init__(self) -> None:
        check_bits(self.w, f"w{self.w}a{self.a} weights")
        check_bits(self.a, f"w{self.w}a{self.a} activations")

    @property
    def name(self) -> str:
        return f"w{self.w}a{self.a}"

    @classmethod
    def parse(cls, text: str) -> BitWidths:
        """``"4"`` -> w4a4, ``"w4a8"`` -> w4a8."""
        t = text.strip().lower()
        try:
            if t.isdigit():
                return cls(int(t), int(t))
            if t.startswith("w") and "a" in t:
                w, a = t[1:].split("a", 1)
                return cls(int(w), int(a))
        except ValueError:
            pass
        raise UserError(
            f"bit-width {text!r} not understood; write a number (4 = w4a4) or wXaY (w4a8)"
        )
