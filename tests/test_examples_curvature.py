"""example/newton_step.py and example/influence.py with small settings, checking what they claim."""

import importlib.util
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "example"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_newton_step_lowers_the_loss_more_than_a_gradient_step_of_the_same_length(capsys):
    pytest.importorskip("sklearn")
    state = torch.get_rng_state()
    result = _load("newton_step").main(
        ["--epochs", "5", "--width", "16", "--dampings", "1", "0.1", "0.03", "--max-iters", "150", "--quiet"])
    torch.set_rng_state(state)
    assert result["newton"] < result["gradient"] - 0.1
    assert result["newton"] < result["initial"] - 0.1  # a real decrease, not a rounding one
    out = capsys.readouterr().out
    assert "Gradient step of the same length" in out and "Best damping" in out


def test_influence_predicts_leave_one_out_retraining(capsys):
    pytest.importorskip("sklearn")
    threads = torch.get_num_threads()
    try:
        result = _load("influence").main(["--train", "80", "--test", "20", "--show", "3"])
    finally:
        torch.set_num_threads(threads)
    assert result["cg"].converged
    assert result["correlation"] > 0.99
    assert "Pearson correlation" in capsys.readouterr().out
