"""How many CPU threads training uses, and how they wait (torch-free: set before torch loads).

OpenMP threads spin while they wait for work. Beside another job that does the same, two spinning
pools fight for the cores: on 2 cores, a resnet8 training step beside another PyTorch training
process took 2.1-2.5 s at torch's default 2 threads, against 138 ms at 1 thread. So:

- ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep) unless the user set a policy; it must be
  in the environment before torch loads its OpenMP runtime, so the command entries call
  ``prefer_passive_waiting`` first thing.
- torch's intra-op threads for training are chosen on purpose (``threads`` in the config, 0 =
  this choice): one thread for small images, where an operator's work is too small for a second
  thread to pay for waking it; otherwise the cores this process's share of the machine has
  that the load average says are idle, at least one. ``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import os

# at most this many pixels per image (32x32), one thread trains fastest
SMALL_IMAGE_PIXELS = 32 * 32


def prefer_passive_waiting() -> None:
    """Let waiting OpenMP threads sleep instead of spin, unless the user chose otherwise."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def idle_cores(cores: int) -> int:
    """Cores the last minute's load average leaves idle (the load counts runnable threads)."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # not on this platform
        return cores
    return max(1, cores - round(load))


def training_threads(requested: int, image_pixels: int, processes: int = 1) -> int:
    """torch's intra-op thread count for training (see the module docstring)."""
    if requested:
        return requested
    share = max(1, available_cores() // max(1, processes))
    if image_pixels <= SMALL_IMAGE_PIXELS:
        return 1
    return min(share, idle_cores(available_cores()))


def set_training_threads(requested: int, image_pixels: int, processes: int = 1) -> int:
    """Apply ``training_threads`` to torch (left alone when the user set ``OMP_NUM_THREADS``);
    returns the count in use."""
    import torch

    if not requested and "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    threads = training_threads(requested, image_pixels, processes)
    torch.set_num_threads(threads)
    return threads
