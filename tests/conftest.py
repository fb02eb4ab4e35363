import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The tests use small models, for which one thread is as fast as several; more threads than free
# cores make OpenMP spin and slow such products down by orders of magnitude on a busy machine.
torch.set_num_threads(1)

from helpers import batches, classification_data, dense_loss_hessian, small_mlp  # noqa: E402


@pytest.fixture(scope="session")
def mlp_problem():
    """A float64 MLP (~960 parameters), 512 samples in uneven batches, and its exact loss Hessian."""
    model = small_mlp()
    x, y = classification_data()
    loader = batches(x, y, [500, 12])
    hessian = dense_loss_hessian(model, torch.nn.functional.cross_entropy, x, y)
    return model, loader, x, y, hessian


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: heavier checks, run with -m slow")
