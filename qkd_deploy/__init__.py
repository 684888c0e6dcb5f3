"""qkd-deploy: knowledge distillation inside quantization-aware training, exported as Q/DQ ONNX.

The library (``qkd_deploy.api``): ``quantize``, ``distiller``, ``export_onnx``, ``lint``. They load
on first use, so ``import qkd_deploy`` stays light and torch-free for the deploy side
(``qkd_deploy.runtime``, the linter, bundles), which a device without torch imports too.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["quantize", "distiller", "export_onnx", "lint", "UserError"]


def __getattr__(name: str) -> Any:
    if name == "UserError":
        from qkd_deploy.errors import UserError

        return UserError
    if name in __all__:
        return getattr(importlib.import_module("qkd_deploy.api"), name)
    raise AttributeError(f"module 'qkd_deploy' has no attribute {name!r}")
