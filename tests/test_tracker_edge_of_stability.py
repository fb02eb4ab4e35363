"""The edge of stability (Cohen et al., 2021), seen through the tracker: under full-batch gradient descent
with learning rate lr, the sharpness rises during training and then hovers near 2/lr.

The band. On a quadratic, GD with learning rate lr diverges along any direction whose curvature exceeds
2/lr, so the sharpness cannot stay far above 2/lr while the loss keeps falling; Cohen et al. found that it
rises until it reaches 2/lr and then stays there, oscillating (self-stabilisation, Damian et al. 2023).
For this model we measured sharpness * lr / 2 between 0.95 and 1.06 over steps 300-400 for seeds 0, 1, 2
(0.26 to 0.33 at step 0). We accept [0.85, 1.15] for each of the last six records and [0.9, 1.1] for
their mean: about twice the spread we saw, yet it fails when there is no edge of stability. At lr = 0.1
the same model levels off at 0.59 * 2/lr within 1500 steps, because it converges first. Over longer
runs, as the loss approaches zero, the sharpness slowly sinks below 2/lr again (the slow test).
"""

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import SharpnessTracker

BAND, MEAN_BAND = (0.85, 1.15), (0.9, 1.1)


def half_squared_error(outputs, targets):
    return 0.5 * (outputs - targets).pow(2).sum(dim=1).mean()


def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    inputs = torch.tensor(data.data / 16.0, dtype=torch.float32)
    return inputs, nn.functional.one_hot(torch.tensor(data.target), 10).float()


def gd_sharpness(seed, lr, steps, every):
    """Full-batch GD on all 1797 digits with a ReLU MLP (64-32-32-10); returns sharpness * lr / 2 per record."""
    x, y = digits()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    tracker = SharpnessTracker(model, [(x, y)], half_squared_error, every=every, builtin_extras=("loss",))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps + 1):
        tracker.step(step)
        if step == steps:
            break
        optimizer.zero_grad()
        half_squared_error(model(x), y).backward()
        optimizer.step()
    losses = [r.extras["loss"] for r in tracker.records]
    return np.array([r.sharpness for r in tracker.records]) * lr / 2, losses


def check_edge_of_stability(ratio, losses):
    assert ratio[0] < 0.5, f"sharpness starts at {ratio[0]:.3f} * 2/lr, expected well below 2/lr"
    assert ratio.max() > 0.95
    final = ratio[-6:]
    assert np.all((final > BAND[0]) & (final < BAND[1])), f"final sharpness * lr/2 = {np.round(final, 3)}"
    assert MEAN_BAND[0] < final.mean() < MEAN_BAND[1]
    assert losses[-1] < 0.5 * losses[0]  # training progressed while at the edge


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sharpness_rises_then_hovers_at_two_over_lr(seed):
    ratio, losses = gd_sharpness(seed, lr=0.2, steps=400, every=20)
    check_edge_of_stability(ratio, losses)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lr", [0.2, 0.3, 0.4])
def test_edge_of_stability_follows_the_learning_rate_over_longer_runs(seed, lr):
    """Steps 250-500 sit at the edge for lr 0.2, 0.3 and 0.4 alike (before, the sharpness may overshoot
    2/lr by up to 25% as it first reaches it). Later, as the loss nears zero, the
    sharpness drifts below 2/lr (to 0.80-0.94 * 2/lr by step 1000 in our runs), but never back above."""
    ratio, losses = gd_sharpness(seed, lr=lr, steps=1000, every=25)
    steps = np.arange(len(ratio)) * 25
    assert ratio[0] < 0.7  # at lr 0.4 the sharpness starts at 0.66 * 2/lr
    edge = ratio[(steps >= 250) & (steps <= 500)]
    assert np.all((edge > BAND[0]) & (edge < BAND[1])), f"sharpness * lr/2 at steps 250-500 = {np.round(edge, 3)}"
    assert MEAN_BAND[0] < edge.mean() < MEAN_BAND[1]
    assert np.all(ratio[steps >= 250] < BAND[1])
    assert losses[-1] < losses[steps.tolist().index(500)]
