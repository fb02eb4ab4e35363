"""What a solve costs in memory: the prediction, the cap max_basis_bytes, and the error when
nothing fits; the prediction against the measured peak of each solver."""

from __future__ import annotations

import ctypes
import sys

import numpy as np
import pytest
import torch

from hessian_eigenthings import (
    LambdaOperator,
    MatrixOperator,
    block_lanczos,
    deflated_power_iteration,
    lanczos,
    solver_memory,
    thick_restart_lanczos,
)
from helpers import exact_top, planted_matrix

SPECTRUM = [10.0, -8.0, 7.0, 5.5, -4.0] + list(np.linspace(-2.0, 2.0, 295))
N = len(SPECTRUM)
MIB = 2**20


def test_predictions_count_vectors_of_the_operator():
    n = 5_000_000
    tr = solver_memory(n, 10, "thick_restart")
    assert tr.solver == "thick_restart" and tr.basis_vectors == 40 and tr.host_bytes == 0
    assert 50 * 4 * n <= tr.device_bytes <= 60 * 4 * n  # basis 40 + result 10 + a few working vectors
    assert solver_memory(n, 10) == tr  # auto is thick_restart
    assert solver_memory(n, 10, block_size=4).solver == "block_lanczos"
    assert solver_memory(n, 10, momentum=0.5).solver == "power_iter"
    arpack = solver_memory(n, 10, "lanczos")
    assert arpack.basis_vectors == 40 and arpack.peak_bytes >= 8 * n * 40  # float64 on the host
    power = solver_memory(n, 10, "power_iter")
    assert 20 * 4 * n <= power.peak_bytes <= 30 * 4 * n
    on_gpu = solver_memory(n, 10, "thick_restart", device="cuda")
    assert on_gpu.device_bytes == tr.device_bytes and on_gpu.host_bytes == 10 * 4 * n  # the numpy result
    double = solver_memory(n, 10, "thick_restart", dtype=torch.float64)
    assert double.device_bytes == pytest.approx(2 * tr.device_bytes, rel=1e-3)
    op = LambdaOperator(lambda v: v, n)
    assert solver_memory(op, 10) == tr
    assert "40 vectors" in str(tr) and "GiB" in str(tr)


@pytest.mark.parametrize("solver,mode", [
    (lambda op, **kw: thick_restart_lanczos(op, 4, **kw), "thick_restart"),
    (lambda op, **kw: block_lanczos(op, 4, block_size=2, **kw), "block_lanczos"),
    (lambda op, **kw: lanczos(op, 4, **kw), "lanczos"),
])
def test_a_cap_makes_the_basis_smaller_and_the_solve_still_converges(solver, mode):
    a, _, _ = planted_matrix(SPECTRUM, seed=1)
    op = MatrixOperator(a)
    vals, _ = exact_top(a, 4)
    free = solver(op, tol=1e-10, verbose=False)
    options = {"block_size": 2} if mode == "block_lanczos" else {}
    full = solver_memory(op, 4, mode, **options)
    cap = solver_memory(op, 4, mode, **options).peak_bytes * 2 // 3
    planned = solver_memory(op, 4, mode, max_basis_bytes=cap, **options)
    assert planned.peak_bytes <= cap < full.peak_bytes and planned.basis_vectors < full.basis_vectors
    capped = solver(op, tol=1e-10, verbose=False, max_basis_bytes=cap)
    used = capped.info["ncv" if mode == "lanczos" else "basis_size"]
    assert used == planned.basis_vectors < free.info["ncv" if mode == "lanczos" else "basis_size"]
    assert capped.converged.all() and np.allclose(capped.eigenvalues, vals, rtol=1e-9)


@pytest.mark.parametrize("solver,mode", [
    (lambda op, **kw: thick_restart_lanczos(op, 4, **kw), "thick_restart"),
    (lambda op, **kw: block_lanczos(op, 4, **kw), "block_lanczos"),
    (lambda op, **kw: lanczos(op, 4, **kw), "lanczos"),
    (lambda op, **kw: deflated_power_iteration(op, 4, **kw), "power_iter"),
])
def test_a_cap_below_the_smallest_solve_is_refused_before_any_product_naming_the_memory(solver, mode):
    a, _, _ = planted_matrix(SPECTRUM, seed=2)
    op = MatrixOperator(a)
    cap = 8 * N * 5  # five float64 vectors: less than any solver needs for k = 4
    with pytest.raises(ValueError, match=r"needs [\d.]+ KiB .*more than max_basis_bytes=12000") as info:
        solver(op, verbose=False, max_basis_bytes=cap)
    assert op.num_products == 0
    with pytest.raises(ValueError, match="more than max_basis_bytes"):
        solver_memory(op, 4, mode, max_basis_bytes=cap)
    if mode != "power_iter":
        assert "smallest basis" in str(info.value)


@pytest.mark.parametrize("solve,mode", [(thick_restart_lanczos, "thick_restart"), (lanczos, "lanczos")])
def test_a_basis_asked_for_is_not_shrunk_to_fit(solve, mode):
    a, _, _ = planted_matrix(SPECTRUM, seed=3)
    cap = solver_memory(a, 4, mode).peak_bytes // 2  # room for a smaller basis, not for 40 vectors
    assert solver_memory(a, 4, mode, max_basis_bytes=cap).basis_vectors < 40
    with pytest.raises(ValueError, match="the basis you asked for"):
        solve(a, 4, num_lanczos_vectors=40, max_basis_bytes=cap, verbose=False)


def _peak_tracking_available() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ctypes.CDLL("libc.so.6").mallopt
        return True
    except (OSError, AttributeError):
        return False


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.skipif(not _peak_tracking_available(), reason="needs Linux /proc/self/clear_refs and glibc")
@pytest.mark.parametrize("mode,k", [("thick_restart", 10), ("block_lanczos", 4), ("lanczos", 10),
                                    ("power_iter", 6)])
def test_measured_peak_is_within_the_prediction(mode, k):
    """Peak resident memory of a solve on a cheap diagonal operator (so a product allocates only its
    output), with big allocations going straight to mmap so that freed memory leaves at once."""
    n = 250_000
    diag = torch.full((n,), 1e-3, dtype=torch.float64)
    diag[: k + 5] = 10 * 0.7 ** torch.arange(k + 5, dtype=torch.float64)
    op = LambdaOperator(lambda v: diag * v, n, dtype=torch.float64,
                        apply_block_fn=lambda m: diag.unsqueeze(1) * m)
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, so big blocks are unmapped when freed
    predicted = solver_memory(op, k, mode)
    solve = {"thick_restart": thick_restart_lanczos, "block_lanczos": block_lanczos, "lanczos": lanczos,
             "power_iter": deflated_power_iteration}[mode]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    start = _status("VmRSS")
    result = solve(op, k, verbose=False)
    peak = _status("VmHWM") - start
    vector = 8 * n
    print(f"{mode} k={k}: measured {peak / vector:.1f} vectors, predicted {predicted.peak_bytes / vector:.1f}")
    assert result.converged.all()
    assert peak <= predicted.peak_bytes + 2 * vector
    assert peak >= 0.8 * predicted.peak_bytes - 2 * vector  # the prediction is not a loose bound
