"""The export target as a typed value: ``Target.TENSORRT`` or ``Target.ONNXRUNTIME``.

Torch-free and at the bottom of the package, beside ``bits``. A ``Target`` is a ``str`` that
equals, hashes and prints as its YAML spelling (``"tensorrt"``), so the config keeps reading and
writing the same strings and a target compares equal to them wherever one still arrives.
"""

from __future__ import annotations

import enum

from qkd_deploy.errors import UserError


class Target(str, enum.Enum):
    """What the exported Q/DQ graph is laid out for: TensorRT (signed INT8 Q/DQ, Conv+Add
    fusion) or ONNX Runtime's CPU integer kernels (UINT8 activations, INT32 biases)."""

    TENSORRT = "tensorrt"
    ONNXRUNTIME = "onnxruntime"

    __str__ = str.__str__
    __format__ = str.__format__
    __hash__ = str.__hash__  # a dict keyed by the spelling finds the member, and back

    @classmethod
    def parse(cls, value: str) -> Target:
        """``"tensorrt"`` -> ``Target.TENSORRT``; an unknown name is the user's mistake."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(t.value for t in cls)
            raise UserError(f"unknown export target {value!r}; use one of {names}") from None
