"""Draw the documentation's figures from real runs: nothing in docs/images is drawn by hand.

    python docs/make_figures.py                 # all of them, a few minutes on one CPU thread
    python docs/make_figures.py --quick --out /tmp/figures   # smaller runs, a smoke test

* ``spectral_density.png``: the SLQ densities of the benchmark MLP's loss Hessian and Gauss-Newton
  matrix on digits, at initialization and after training.
* ``sharpness.png``: the sharpness of full-batch gradient descent, tracked every 10 steps, rising to
  2/lr and hovering there (``example/track_sharpness.py`` with its defaults).
* ``convergence.png``: for each solver, the largest relative residual ``||H v - lambda v|| / |lambda|``
  it reaches against the Hessian-vector products it spends, on the benchmark MLP
  (``benchmarks/workloads.py``), measured by running it at a sweep of tolerances.
* ``per_layer.png``, ``landscape_1d.png``, ``landscape_2d.png``: the per-layer table and the loss
  landscapes of ``example/analysis.py`` with its defaults (the digits MLP of the examples).

Needs the ``docs`` or ``examples`` extra (scikit-learn, matplotlib). Run from the repository root.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "example"))  # the example scripts import their helpers as ``common``

from benchmarks.workloads import make_workload  # noqa: E402
from hessian_eigenthings import (  # noqa: E402
    ConvergenceWarning,
    GGNOperator,
    HVPOperator,
    block_lanczos,
    deflated_power_iteration,
    lanczos,
    plot_spectral_density,
    spectral_density,
    thick_restart_lanczos,
)
from hessian_eigenthings.solvers.arpack import NoConvergenceError  # noqa: E402


def _densities(work, probes: int, steps: int) -> tuple:
    """SLQ densities of the workload's loss Hessian and of its Gauss-Newton matrix."""
    hessian = HVPOperator(work.model, work.batches, work.criterion, use_gpu=False)
    ggn = GGNOperator(work.model, work.batches, work.criterion, use_gpu=False)
    return (spectral_density(hessian, num_probes=probes, num_steps=steps, verbose=False),
            spectral_density(ggn, num_probes=probes, num_steps=steps, verbose=False))


def density_figure(out: Path, quick: bool) -> None:
    """The Hessian and GGN densities of the benchmark MLP, at initialization and after training."""
    trained = make_workload("mlp", torch.device("cpu"), quick=quick, gpu_sized=False)
    initial = make_workload("mlp", torch.device("cpu"), quick=quick, gpu_sized=False)
    torch.manual_seed(0)
    for module in initial.model.modules():
        if isinstance(module, torch.nn.Linear):
            module.reset_parameters()
    probes, steps = (3, 30) if quick else (6, 80)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, work, when in zip(axes, (initial, trained), ("at initialization", "after training")):
        start = time.perf_counter()
        hessian, ggn = _densities(work, probes, steps)
        print(f"density {when}: {time.perf_counter() - start:.1f} s; Lanczos steps per probe "
              f"{hessian.info['num_steps'].tolist()}; Ritz range Hessian [{hessian.extremes[0]:.4g}, "
              f"{hessian.extremes[1]:.4g}], GGN [{ggn.extremes[0]:.4g}, {ggn.extremes[1]:.4g}]; "
              f"Hessian weight below zero {float((hessian.weights * (hessian.ritz_values < 0)).sum(1).mean()):.2f}")
        plot_spectral_density(hessian, ax=ax, label="Hessian")
        plot_spectral_density(ggn, ax=ax, label="Gauss-Newton", show_extremes=False)
        ax.lines[-1].set_linestyle("--")
        ax.set_title(f"{when}")
        ax.legend()
    fig.suptitle(f"Spectral density of a {trained.num_params:,}-parameter MLP's loss on digits "
                 f"(SLQ, {probes} probes x up to {steps} Lanczos steps)")
    fig.tight_layout()
    fig.savefig(out / "spectral_density.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def sharpness_figure(out: Path, quick: bool) -> None:
    """``example/track_sharpness.py`` with its defaults (fewer steps with ``quick``); keeps its plot."""
    spec = importlib.util.spec_from_file_location("track_sharpness", ROOT / "example" / "track_sharpness.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with tempfile.TemporaryDirectory() as folder:
        module.main(["--out", folder, "--quiet"] + (["--steps", "100"] if quick else []))
        shutil.copy(Path(folder) / "sharpness.png", out / "sharpness.png")


# A solver run at one tolerance: returns the eigenvalues, eigenvectors and the products it used.
Run = Callable[[HVPOperator, int, float], tuple]


def _runs() -> dict[str, Run]:
    def power(op, k, tol):
        return deflated_power_iteration(op, num_eigenthings=k, power_iter_steps=2000, power_iter_err_threshold=tol,
                                        verbose=False)

    def arpack(op, k, tol):
        try:
            return lanczos(op, num_eigenthings=k, tol=tol, verbose=False)
        except NoConvergenceError as error:  # not expected at these tolerances; plotted if it happens
            raise RuntimeError(f"ARPACK did not converge at tol={tol}") from error

    return {
        "thick_restart": lambda op, k, tol: thick_restart_lanczos(op, num_eigenthings=k, tol=tol, verbose=False),
        "block_lanczos": lambda op, k, tol: block_lanczos(op, num_eigenthings=k, tol=tol, verbose=False),
        "lanczos (ARPACK)": arpack,
        "power_iter": power,
    }


def _max_relative_residual(op: HVPOperator, values: np.ndarray, vectors: np.ndarray) -> float:
    """Measured with one fresh block product, whatever the solver reported."""
    vecs = torch.as_tensor(vectors, dtype=op.dtype).T
    vals = torch.as_tensor(values, dtype=op.dtype)
    residual = torch.linalg.vector_norm(op.apply_block(vecs) - vecs * vals, dim=0)
    return float((residual / vals.abs()).max())


def convergence_figure(out: Path, quick: bool) -> None:
    """Residual reached against products spent, for each solver, top 1 and top 10 of the benchmark MLP."""
    work = make_workload("mlp", torch.device("cpu"), quick=quick, gpu_sized=False)
    op = HVPOperator(work.model, work.batches, work.criterion, use_gpu=False)
    checker = HVPOperator(work.model, work.batches, work.criterion, use_gpu=False)
    tolerances = [1e-1, 1e-3, 1e-5] if quick else [1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6]
    panels = [(1, list(_runs())), (10, ["thick_restart", "block_lanczos", "lanczos (ARPACK)"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = {"thick_restart": "o", "block_lanczos": "s", "lanczos (ARPACK)": "^", "power_iter": "v"}
    for ax, (k, names) in zip(axes, panels):
        for name in names:
            products, residuals = [], []
            for tol in tolerances:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    result = _runs()[name](op, k, tol)
                products.append(result.num_products)
                residuals.append(_max_relative_residual(checker, result.eigenvalues, result.eigenvectors))
            order = np.argsort(products, kind="stable")
            ax.plot(np.array(products)[order], np.array(residuals)[order], marker=markers[name], label=name)
            print(f"convergence k={k} {name}: " + ", ".join(f"{p} products -> {r:.1e}" for p, r in
                                                             zip(products, residuals)))
        ax.set_yscale("log")
        ax.set_xlim(left=0)
        ax.set_xlabel("Hessian-vector products")
        ax.set_ylabel("largest relative residual ||Hv - λv|| / |λ|")
        ax.set_title(f"top {k} (largest |λ|)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
    fig.suptitle(f"Solvers on the benchmark MLP ({work.num_params:,} parameters, digits), float32, "
                 f"one run per tolerance from {tolerances[0]:g} to {tolerances[-1]:g}")
    fig.tight_layout()
    fig.savefig(out / "convergence.png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def analysis_figures(out: Path, quick: bool) -> None:
    """``example/analysis.py`` with its defaults (a coarser, cheaper run with ``quick``); keeps its
    per-layer and landscape plots."""
    spec = importlib.util.spec_from_file_location("analysis", ROOT / "example" / "analysis.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cheaper = ["--grid", "7", "--probes", "2", "--steps", "20", "--layer-products", "30"] if quick else []
    with tempfile.TemporaryDirectory() as folder:
        module.main(["--out-dir", folder, "--quiet"] + cheaper)
        for made, kept in (("layers.png", "per_layer.png"), ("landscape_1d.png", "landscape_1d.png"),
                           ("landscape.png", "landscape_2d.png")):
            shutil.copy(Path(folder) / made, out / kept)


FIGURES = {"density": density_figure, "sharpness": sharpness_figure, "convergence": convergence_figure,
           "analysis": analysis_figures}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"), help="folder for the PNG files")
    parser.add_argument("--quick", action="store_true", help="smaller runs (a smoke test, not for the docs)")
    parser.add_argument("--only", choices=sorted(FIGURES), action="append", help="draw only these figures")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: small models, see the FAQ)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only or list(FIGURES):
        start = time.perf_counter()
        FIGURES[name](out, args.quick)
        print(f"{name}: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
