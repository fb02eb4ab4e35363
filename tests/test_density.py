"""Stochastic Lanczos quadrature against planted spectra and exact model Hessians."""

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hessian_eigenthings import HVPOperator, MatrixOperator, hessian_density, hutchinson_trace, spectral_density
from hessian_eigenthings.spectrum.density import gaussian_mixture
from helpers import assert_model_unchanged, batches, classification_data, dense_loss_hessian, model_snapshot, planted_matrix

F = nn.functional


@pytest.fixture(scope="module")
def hessian_like():
    """n=400: a bulk of 396 eigenvalues in [-0.2, 1] and four outliers 5, 8, 12, 20 (trace 203.4)."""
    spectrum = np.concatenate([np.linspace(-0.2, 1.0, 396), [5.0, 8.0, 12.0, 20.0]])
    a, lam, _ = planted_matrix(list(spectrum), seed=6)
    return a, lam


def trapezoid(y, x):
    return float(np.trapezoid(y, x)) if hasattr(np, "trapezoid") else float(np.trapz(y, x))


def test_integral_weights_and_extremes(hessian_like):
    a, lam = hessian_like
    d = spectral_density(a, num_probes=6, num_steps=50, verbose=False)
    assert d.ritz_values.shape == (6, 50) and d.weights.shape == (6, 50) and d.num_products == 300
    assert np.allclose(d.weights.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(np.diff(d.ritz_values, axis=1) >= 0)
    assert d.integral() == pytest.approx(1.0, abs=1e-9)
    assert d.density.min() >= 0 and d.grid.shape == d.density.shape == (4096,)
    lo, hi = d.extremes
    assert hi == pytest.approx(20.0, rel=1e-10)  # an isolated outlier converges fast
    assert lo == pytest.approx(-0.2, abs=1e-4)  # the bulk edge converges more slowly
    # every probe resolves all four outliers
    for row in d.ritz_values:
        for outlier in (5.0, 8.0, 12.0, 20.0):
            assert np.min(np.abs(row - outlier)) < 1e-6


def test_implied_trace_is_hutchinsons_estimate_with_the_same_probes(hessian_like):
    a, lam = hessian_like
    n, true = a.shape[0], float(lam.sum())
    d = spectral_density(a, num_probes=20, num_steps=30, seed=4, verbose=False)
    implied = d.trace()
    same = hutchinson_trace(a, max_products=20, seed=4, verbose=False)
    assert np.allclose(implied.samples, same.samples, rtol=1e-10)
    assert implied.estimate == pytest.approx(same.estimate, rel=1e-10)
    assert implied.std_error == pytest.approx(same.std_error, rel=1e-8)
    assert abs(implied.estimate - true) < 4 * implied.std_error
    # the smoothed density has the same mean: n * integral of t rho(t) dt is the implied trace
    assert n * trapezoid(d.grid * d.density, d.grid) == pytest.approx(implied.estimate, rel=1e-9)
    # second moment: smoothing adds sigma^2; the quadrature estimates ||A||_F^2 / n
    second = trapezoid(d.grid**2 * d.density, d.grid) - d.sigma**2
    assert second == pytest.approx(d.moment(2), rel=1e-8)
    assert abs(n * d.moment(2) - float((lam**2).sum())) < 0.15 * float((lam**2).sum())


def test_density_approaches_the_smoothed_true_spectrum_as_probes_grow(hessian_like):
    a, lam = hessian_like
    exact_weights = np.full((1, lam.numel()), 1.0 / lam.numel())
    distance = {}
    for probes in (4, 64):
        d = spectral_density(a, num_probes=probes, num_steps=50, sigma=0.05, seed=1, verbose=False)
        truth = gaussian_mixture(d.grid, lam.numpy()[None, :], exact_weights, 0.05)
        distance[probes] = trapezoid(np.abs(d.density - truth), d.grid)
    assert distance[64] < 0.04
    # the L1 error falls like 1/sqrt(probes): 16 times the probes, about 4 times less
    assert distance[4] / distance[64] > 2.5


def test_full_lanczos_gives_the_exact_eigenvalues():
    spectrum = np.linspace(-1.0, 3.0, 40) ** 3
    a, lam, _ = planted_matrix(list(spectrum), seed=2)
    d = spectral_density(a, num_probes=3, num_steps=100, verbose=False)  # capped at n = 40
    assert d.ritz_values.shape == (3, 40)
    for row in d.ritz_values:
        assert np.allclose(row, np.sort(lam.numpy()), atol=1e-9)
    assert d.extremes == pytest.approx((float(lam.min()), float(lam.max())), abs=1e-10)


def test_breakdown_pads_with_zero_weights():
    a, _, _ = planted_matrix([1.0] * 20 + [2.0] * 20 + [7.0] * 20, seed=3)
    d = spectral_density(a, num_probes=4, num_steps=10, verbose=False)
    assert list(d.info["num_steps"]) == [3, 3, 3, 3]
    assert np.all(d.weights[:, 3:] == 0) and np.allclose(d.weights.sum(axis=1), 1.0)
    assert np.allclose(d.ritz_values[:, :3], [1.0, 2.0, 7.0], atol=1e-10)
    assert d.extremes == pytest.approx((1.0, 7.0), abs=1e-10)
    assert d.integral() == pytest.approx(1.0, abs=1e-9)
    # mass 1/3 near each eigenvalue (up to the probes' sampling)
    near_two = (d.grid > 1.5) & (d.grid < 4.5)
    assert trapezoid(d.density[near_two], d.grid[near_two]) == pytest.approx(1 / 3, abs=0.1)


def test_multiple_of_identity_and_custom_grid():
    d = spectral_density(MatrixOperator(3.0 * torch.eye(30, dtype=torch.float64)), 2, 5, verbose=False)
    assert d.extremes == pytest.approx((3.0, 3.0))
    assert d.grid[np.argmax(d.density)] == pytest.approx(3.0, abs=d.sigma)
    assert d.integral() == pytest.approx(1.0, abs=1e-9)
    grid = np.linspace(2.0, 4.0, 501)
    d2 = spectral_density(3.0 * torch.eye(30, dtype=torch.float64), 2, 5, grid=grid, sigma=0.1, verbose=False)
    assert np.array_equal(d2.grid, grid) and d2.sigma == 0.1
    assert np.allclose(d2.evaluate(grid), d2.density)
    assert np.allclose(d2.density, np.exp(-0.5 * ((grid - 3) / 0.1) ** 2) / (0.1 * np.sqrt(2 * np.pi)), atol=1e-10)


def test_bad_arguments(hessian_like):
    a, _ = hessian_like
    with pytest.raises(ValueError, match="sigma"):
        spectral_density(a, sigma=-1.0)
    with pytest.raises(ValueError, match="grid"):
        spectral_density(a, grid=np.array([1.0, 0.0, 2.0]))
    with pytest.raises(ValueError, match="num_probes"):
        spectral_density(a, num_probes=0)
    with pytest.raises(ValueError, match="distribution"):
        spectral_density(a, distribution="sobol")


@pytest.fixture(scope="module")
def tiny_problem():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 9), nn.Tanh(), nn.Linear(9, 3)).double()
    x, y = classification_data(num=60, din=4, classes=3, seed=3)
    return model, batches(x, y, [25, 25, 10]), dense_loss_hessian(model, F.cross_entropy, x, y)


def test_model_density_extremes_match_the_dense_hessian(tiny_problem):
    model, loader, hessian = tiny_problem
    exact = torch.linalg.eigvalsh(hessian)
    model.train()
    before = model_snapshot(model)
    d = hessian_density(model, loader, F.cross_entropy, num_probes=3, num_steps=30, use_gpu=False, verbose=False)
    assert_model_unchanged(model, before)
    lo, hi = d.extremes
    scale = float(exact.abs().max())
    assert hi == pytest.approx(float(exact.max()), abs=1e-8 * scale)
    assert lo == pytest.approx(float(exact.min()), abs=1e-3 * scale)
    assert abs(d.trace().estimate - float(exact.sum())) < 4 * d.trace().std_error
    # the GGN of the same model is PSD: its density has no negative support
    g = hessian_density(model, loader, F.cross_entropy, curvature="ggn", num_probes=2, num_steps=20,
                        use_gpu=False, verbose=False)
    assert g.extremes[0] > -1e-10 * g.extremes[1]
    with pytest.raises(ValueError, match=r"full_dataset=True.*HVPOperator\(model, \[\(x, y\)\], loss\)"):
        spectral_density(HVPOperator(model, loader, F.cross_entropy, use_gpu=False, full_dataset=False), 1, 3,
                         verbose=False)
    with pytest.raises(TypeError, match="always uses the whole dataset"):
        hessian_density(model, loader, F.cross_entropy, full_dataset=False, use_gpu=False)


def test_plot_writes_a_log_scale_png(hessian_like, tmp_path):
    pytest.importorskip("matplotlib")
    a, _ = hessian_like
    d = spectral_density(a, num_probes=2, num_steps=20, verbose=False)
    path = tmp_path / "density.png"
    fig = d.plot(path=path, label="planted")
    assert path.exists() and path.stat().st_size > 5000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    low, high = ax.get_ylim()
    assert low == pytest.approx(1e-7 * d.density.max()) and high > d.density.max()
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_plots_leave_pyplot_alone(hessian_like, tmp_path):
    """Figures are plain matplotlib Figures: no pyplot window list grows, however many are drawn."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from hessian_eigenthings import SharpnessRecord, plot_log

    a, _ = hessian_like
    d = spectral_density(a, num_probes=1, num_steps=10, verbose=False)
    records = [SharpnessRecord(step=s, eigenvalues=[1.0], residuals=[0.0], converged=[True], products=1,
                               seconds=0.0, warm=False, which="LA") for s in range(3)]
    before = plt.get_fignums()
    for i in range(3):
        fig = d.plot(tmp_path / f"d{i}.png")
        assert fig.axes[0].get_yscale() == "log"
        plot_log(records, tmp_path / f"t{i}.png")
    assert plt.get_fignums() == before
    assert all((tmp_path / f"{kind}{i}.png").stat().st_size > 1000 for kind in "dt" for i in range(3))


def test_plot_without_matplotlib_says_how_to_install(hessian_like, monkeypatch):
    a, _ = hessian_like
    d = spectral_density(a, num_probes=1, num_steps=5, verbose=False)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"hessian_eigenthings\[plot\]"):
        d.plot()


@pytest.mark.gpu
def test_density_on_cuda_matches_cpu(hessian_like):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, _ = hessian_like
    cpu = spectral_density(a, 3, 30, seed=5, verbose=False)
    gpu = spectral_density(a.cuda(), 3, 30, seed=5, verbose=False)
    assert np.allclose(cpu.ritz_values, gpu.ritz_values, atol=1e-8)
    assert np.allclose(cpu.density, gpu.density, atol=1e-8 * cpu.density.max())


def test_example_spectrum_script_prints_consistent_numbers_and_saves_the_plot(tmp_path):
    """example/spectrum.py end to end (small settings): the top eigenvalue, the Hutch++ trace and the SLQ
    density agree with each other, and the PNG is written."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    script = Path(__file__).resolve().parents[1] / "example" / "spectrum.py"
    out = tmp_path / "density.png"
    proc = subprocess.run(
        [sys.executable, str(script), "--epochs", "2", "--k", "3", "--probes", "4", "--steps", "30",
         "--trace-products", "60", "--width", "16", "--ggn", "--quiet", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    number = r"(-?\d+\.\d+)"
    top = float(re.search(r"Top 3 Hessian eigenvalues .*\n\s+0\s+" + number, text).group(1))
    trace, trace_se = map(float, re.search(r"Hessian trace \(Hutch\+\+.*: " + number + r" \+- " + number, text).groups())
    implied, implied_se = map(float, re.search(r"implied trace " + number + r" \+- " + number, text).groups())
    ritz_max = float(re.search(r"largest Ritz value " + number, text).group(1))
    assert float(re.search(r"integral " + number, text).group(1)) == pytest.approx(1.0, abs=1e-6)
    assert ritz_max == pytest.approx(top, rel=1e-4)
    assert abs(trace - implied) < 4 * math.hypot(trace_se, implied_se)
    assert "GGN density" in text
    assert out.stat().st_size > 5000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
