"""Plain-Python arithmetic the loss tests compare torch against (no torch, no numpy)."""

import math


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    e = [math.exp(v / tau) for v in row]
    return [v / sum(e) for v in e]
