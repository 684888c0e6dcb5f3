import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under ``pytest -n N`` the N workers share the machine's cores: one thread each (and in the
    # subprocesses they start) instead of N workers each spreading over every core.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

MAX_AUTO_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker per core, at most ``MAX_AUTO_WORKERS``. Test files stay on one
    worker (``--dist loadfile``) and the parity matrix alone takes about 3.5 core-minutes, so
    more workers would only sit idle, each holding its own torch (a few hundred MB)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cores or 1, MAX_AUTO_WORKERS))
