"""Optimisers and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch

from qkd_deploy.config import TrainConfig


def parameter_groups(groups: list[dict], cfg: TrainConfig) -> list[dict]:
    """Optimizer groups from a distiller's ``{"params", "lr_scale"}`` groups. Weight decay goes
    on weight matrices and kernels only: biases, BatchNorm affines and quantizer step sizes (all
    of dimension <= 1) are not decayed."""
    out = []
    for group in groups:
        lr = cfg.lr * group.get("lr_scale", 1.0)
        params = list(group["params"])
        decay = [p for p in params if p.dim() > 1]
        no_decay = [p for p in params if p.dim() <= 1]
        out += [
            {"params": decay, "weight_decay": cfg.weight_decay, "lr": lr},
            {"params": no_decay, "weight_decay": 0.0, "lr": lr},
        ]
    return [g for g in out if g["params"]]


def build_optimizer(groups: list[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(groups, cfg)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    return torch.optim.AdamW(groups, lr=cfg.lr)  # TrainConfig allows only "sgd" and "adamw"


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Multiplier of the base learning rate at each step: linear warm-up, then cosine to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total, warmup))
