import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Method tests train small models: one intra-op thread avoids oversubscribing the small,
    shared CPU (about 10x faster than torch's default there), also under ``-n 0``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
