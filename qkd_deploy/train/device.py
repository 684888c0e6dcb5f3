"""Where models train: the config's ``device`` ("auto", "cpu", "cuda", "cuda:N").

Only training runs there (``train.loop.fit`` moves the distiller and each batch, then moves the
models back). Evaluation, calibration, export and the ONNX Runtime checks run on the CPU, so the
exported numbers do not depend on the training device.
"""

from __future__ import annotations

import torch

from qkd_deploy.errors import UserError

CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA GPU torch sees, else the CPU. A GPU asked for by name must exist."""
    if name == "auto":
        return torch.device("cuda:0") if torch.cuda.is_available() else CPU
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = 0 if device.index is None else device.index
        if index >= count:
            raise UserError(
                f"device {name!r}: torch {torch.__version__} sees {count} CUDA GPU(s) here; "
                "use device=auto or cpu, or install a CUDA build of torch"
            )
        return torch.device("cuda", index)
    return device


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (GPU name)`` for the report."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
