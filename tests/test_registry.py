"""The solver registry: what compute_hessian_eigenthings, the tracker and solver_memory look up."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import (
    SharpnessTracker,
    compute_hessian_eigenthings,
    deflated_power_iteration,
    thick_restart_lanczos,
)
from hessian_eigenthings.eigenthings import SOLVER_MODES
from hessian_eigenthings.solvers import registry
from hessian_eigenthings.solvers.contract import CORE_KEYWORDS
from hessian_eigenthings.solvers.registry import get_solver, register_solver, solver_names
from helpers import exact_top

F = nn.functional


def test_every_registered_solver_takes_the_core_keywords():
    assert set(solver_names()) >= {"auto", "thick_restart", "block_lanczos", "lanczos", "power_iter"}
    for name in solver_names():
        assert CORE_KEYWORDS <= get_solver(name).keywords, name
    assert get_solver("power_iter").krylov is False and get_solver("thick_restart").krylov is True


def test_solver_modes_is_kept_as_a_view_of_the_registry():
    assert list(SOLVER_MODES) == list(solver_names())
    runner, function = SOLVER_MODES["power_iter"]
    assert function is deflated_power_iteration and callable(runner)
    with pytest.raises(KeyError):
        SOLVER_MODES["nope"]


@pytest.mark.parametrize("keywords,chosen", [
    ({}, "thick_restart"),
    ({"block_size": None}, "thick_restart"),
    ({"block_size": 3}, "block_lanczos"),
    ({"momentum": 0.5}, "power_iter"),
    ({"power_iter_steps": 50}, "power_iter"),
    ({"power_iter_err_threshold": 1e-3, "tol": None}, "power_iter"),
])
def test_auto_chooses_by_the_options_given(keywords, chosen):
    assert get_solver("auto").resolve(keywords).name == chosen


@pytest.fixture
def custom_solver():
    """A solver registered under a new name for one test (thick-restart Lanczos with an option of its
    own), recording the keywords it is called with."""
    calls = []

    def recording_solver(operator, num_eigenthings, my_option=None, **keywords):
        calls.append({"my_option": my_option, **keywords})
        return thick_restart_lanczos(operator, num_eigenthings, **keywords)

    register_solver("recording_test", recording_solver, {"which", "tol", "max_steps", "init_vecs", "seed",
                                                         "verbose", "to_numpy", "my_option"}, krylov=True,
                    summary="test")
    yield calls
    registry._REGISTRY.pop("recording_test")


def test_one_call_and_tracker_run_a_newly_registered_solver(mlp_problem, custom_solver):
    model, loader, _, _, hessian = mlp_problem
    vals, _ = exact_top(hessian, 3, "LA")
    got, vecs = compute_hessian_eigenthings(model, loader, F.cross_entropy, 3, mode="recording_test", which="LA",
                                            my_option=7, use_gpu=False, verbose=False)
    assert np.allclose(got, vals, rtol=1e-6)
    assert custom_solver[-1]["my_option"] == 7 and custom_solver[-1]["to_numpy"] is True
    with pytest.raises(TypeError, match=r"other_option.*mode='recording_test'"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 3, mode="recording_test", other_option=1)

    tracker = SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, solver="recording_test", tol=1e-5,
                               solver_kwargs={"my_option": 1})
    first = tracker.step(0)
    second = tracker.step(1)
    assert np.allclose(first.eigenvalues, vals[:2], rtol=1e-4)
    assert custom_solver[-2].get("init_vecs") is None and custom_solver[-1]["init_vecs"].shape == (2, hessian.shape[0])
    assert custom_solver[-1]["my_option"] == 1
    assert custom_solver[-1]["tol"] == 1e-5 and custom_solver[-1]["which"] == "LA"
    assert second.warm
    with pytest.raises(TypeError, match="does not accept bogus"):
        SharpnessTracker(model, loader, F.cross_entropy, solver="recording_test", solver_kwargs={"bogus": 1})


def test_unknown_mode_and_options_name_what_is_accepted(mlp_problem):
    model, loader, _, _, _ = mlp_problem
    with pytest.raises(ValueError, match="mode='nope' is not known; choose one of 'thick_restart'"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, mode="nope")
    with pytest.raises(TypeError, match=r"block_size.*mode='thick_restart'"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, mode="thick_restart", block_size=2)
    with pytest.raises(TypeError, match="sets to_numpy"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, to_numpy=False)
    with pytest.raises(TypeError, match="chose 'power_iter', which does not take num_lanczos_vectors"):
        compute_hessian_eigenthings(model, loader, F.cross_entropy, 2, momentum=0.0, num_lanczos_vectors=20,
                                    use_gpu=False, verbose=False)
