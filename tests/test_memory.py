"""What a solve costs in memory: the prediction, the cap max_basis_bytes, and the error when
nothing fits; the prediction against the measured peak of each solver."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
ROOT = Path(__file__).resolve().parents[1]


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
    assert on_gpu == tr  # the same vectors on the device (the result, which the caller keeps, is not counted)
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


MEASURE = r"""
import gc, json, sys
import torch
import hessian_eigenthings as he

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024

torch.set_num_threads(1)
small = he.LambdaOperator(lambda v: torch.linspace(1.0, 2.0, 300, dtype=torch.float64) * v, 300, dtype=torch.float64)
for warm_up in (he.thick_restart_lanczos, he.block_lanczos, he.lanczos, he.deflated_power_iteration):
    warm_up(small, 2, verbose=False)  # one-time setup (libraries, workspaces) is not the solve's
n = 250_000
out = {}
for mode, k in (("thick_restart", 10), ("block_lanczos", 4), ("lanczos", 10), ("power_iter", 6)):
    diag = torch.full((n,), 1e-3, dtype=torch.float64)
    diag[: k + 5] = 10 * 0.7 ** torch.arange(k + 5, dtype=torch.float64)
    op = he.LambdaOperator(lambda v: diag * v, n, dtype=torch.float64,
                           apply_block_fn=lambda m: diag.unsqueeze(1) * m)
    solve = {"thick_restart": he.thick_restart_lanczos, "block_lanczos": he.block_lanczos,
             "lanczos": he.lanczos, "power_iter": he.deflated_power_iteration}[mode]
    predicted = he.solver_memory(op, k, mode).peak_bytes
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak (VmHWM) to the current resident size
    start = status("VmRSS")
    result = solve(op, k, verbose=False)
    out[mode] = {"peak": status("VmHWM") - start, "predicted": predicted, "converged": bool(result.converged.all())}
    del result, op, diag
print(json.dumps(out))
"""


def _peak_tracking_available() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.slow  # a fresh process and four solves of n = 250,000: about 10-20 s
@pytest.mark.skipif(not _peak_tracking_available(), reason="needs Linux /proc/self/clear_refs")
def test_measured_peaks_are_within_the_predictions(tmp_path):
    """Peak resident memory of each solver on a cheap diagonal operator (so a product allocates only
    its output), in a fresh process whose big allocations go straight to mmap (so freed memory leaves
    at once and nothing left by earlier work is reused unseen)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + sys.path))
    proc = subprocess.run([sys.executable, "-c", MEASURE], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    vector = 8 * 250_000
    for mode, got in json.loads(proc.stdout.strip().splitlines()[-1]).items():
        print(f"{mode}: measured {got['peak'] / vector:.1f} vectors, predicted {got['predicted'] / vector:.1f}")
        assert got["converged"], mode
        assert got["peak"] <= got["predicted"] + 2 * vector, mode
        assert got["peak"] >= 0.8 * got["predicted"] - 2 * vector, mode  # not a loose bound
