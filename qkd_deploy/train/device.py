"""Where models train: the config's ``device`` ("auto", "cpu", "cuda", "cuda:N").

Only training runs there (``train.loop.fit`` moves the distiller and each batch, then moves the
models back). Evaluation, calibration, export and the ONNX Runtime checks run on the CPU, so the
exported numbers do not depend on the training device.
"""

from __future__ import annotations

import torch

from qkd_deploy.errors import UserError
from qkd_deploy.train import distributed

CPU = torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: a CUDA GPU if torch sees one, else the CPU. A GPU asked for by name must exist.
    Under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cpu":
        return device
    group = distributed.current()
    device = group.cuda_device(name) if group else torch.device("cuda", device.index or 0)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device.index >= count:
        raise UserError(
            f"device {name!r}: torch {torch.__version__} sees {count} CUDA GPU(s) here; "
            "use device=auto or cpu, or install a CUDA build of torch"
        )
    return device


def describe(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (GPU name)`` for the report."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
