"""Reading files written by ``torch.save``: weights only, and one clear error for a file that is
missing, damaged, or holds pickled objects (which are refused, never run)."""

from __future__ import annotations

import os
from typing import Any

import torch

from qkd_deploy.errors import UserError


def load_weights_only(path: str | os.PathLike, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; any failure is a ``UserError`` naming
    the file, why, and ``fix`` (what the user should do)."""
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; {fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways inside torch
        raise UserError(f"{path} cannot be read ({why(error)}); {fix}") from None


def why(error: Exception) -> str:
    """The reason a ``torch.load`` failed, in one short line."""
    text = str(error).strip()
    if "Weights only load failed" in text:
        return "it holds pickled Python objects, not only tensors; they were not run"
    first = (text.splitlines() or [type(error).__name__])[0]
    return first if len(first) <= 160 else first[:157] + "..."
