"""How many CPU threads training uses, and how they wait (torch-free: set before torch loads).

OpenMP threads spin while they wait for work. Beside another job that does the same, two spinning
pools fight for the cores: on 2 cores, a resnet8 training step beside another PyTorch training
process took 2.1-2.5 s at torch's default 2 threads, against 138 ms at 1 thread. So:

- ``OMP_WAIT_POLICY=PASSIVE`` (waiting threads sleep) unless the user set a policy; it must be
  in the environment before torch loads its OpenMP runtime, so the command entries call
  ``prefer_passive_waiting`` first thing.
- torch's intra-op threads for training are chosen on purpose (``threads`` in the config, 0 =
  this choice): one thread for small images, where an operator's work is too small for a second
  thread to pay for waking it; otherwise the cores of this process's share of the machine that
  other work leaves idle right now, at least one. ``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import os
import time

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
    """Cores other work leaves idle, at least one: measured over a moment from ``/proc/stat``
    where Linux has it (the one-minute load average lags a job that started seconds ago), else
    from the load average (which counts runnable threads)."""
    busy = busy_cores_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except OSError:  # not on this platform
            return cores
    return max(1, cores - round(busy))


def busy_cores_now(window_s: float = 0.25) -> float | None:
    """How many of this process's cores were busy during the next ``window_s`` seconds (the
    caller waits meanwhile, so that is other work), from the kernel's per-CPU time counters;
    None where ``/proc/stat`` cannot be read."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(window_s)
    after = _cpu_times()
    if after is None:
        return None
    busy = 0.0
    for cpu, (total, idle) in after.items():
        if cpu in before:
            spent = total - before[cpu][0]
            if spent > 0:
                busy += 1 - (idle - before[cpu][1]) / spent
    return busy


def _cpu_times() -> dict[int, tuple[int, int]] | None:
    """{cpu: (all time, idle time)} in clock ticks, for the CPUs this process may run on."""
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            lines = stat.read().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    times = {}
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
            continue
        cpu = int(name[3:])
        if allowed is not None and cpu not in allowed:
            continue
        ticks = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        times[cpu] = (sum(ticks), ticks[3] + ticks[4])
    return times or None


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
