import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under ``pytest -n N`` the N workers share the machine's cores: one thread each (and in the
    # subprocesses they start) instead of N workers each spreading over every core.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
