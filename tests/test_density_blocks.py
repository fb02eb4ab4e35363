"""SLQ with its probes advanced together (one block product per Lanczos step), against exact answers:
the sequential runs, the exact spectral measure of each probe of a planted matrix, and the exact
quadrature moments ``z^T H^k z`` of a model's dense Hessian."""

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard
from torch import nn

from hessian_eigenthings import HVPOperator, MatrixOperator, hessian_density, hutchinson_trace, spectral_density
from hessian_eigenthings.operators.base import Operator
from hessian_eigenthings.solvers.krylov import lanczos_tridiagonal, lanczos_tridiagonal_batch
from hessian_eigenthings.spectrum import density as density_module
from hessian_eigenthings.spectrum.density import default_probes_per_block
from hessian_eigenthings.spectrum.probes import draw_probes, probe_generator
from helpers import batches, classification_data, planted_matrix

F = nn.functional
# Relative agreement of two runs that differ only in rounding (block vs sequential arithmetic).
SAME = 1e-10


class Recording(Operator):
    """A dense matrix that records the width of every product: 1 for ``apply``, b for ``apply_block``."""

    def __init__(self, matrix: torch.Tensor) -> None:
        super().__init__(matrix.shape[0], matrix.dtype, matrix.device)
        self.matrix = matrix
        self.widths: list[int] = []

    def _matvec(self, vec):
        self.widths.append(1)
        return self.matrix @ vec

    def _matmat(self, mat):
        self.widths.append(mat.shape[1])
        return self.matrix @ mat


def expected_widths(steps_per_probe, group):
    """Block widths when every probe stops after its own number of steps and finished ones leave."""
    widths = []
    for begin in range(0, len(steps_per_probe), group):
        steps = steps_per_probe[begin : begin + group]
        widths += [sum(s > t for s in steps) for t in range(max(steps))]
    return widths


def same(a, b, rel=SAME):
    a, b = np.asarray(a), np.asarray(b)
    scale = np.abs(b).max() if b.size else 0.0
    return a.shape == b.shape and np.allclose(a, b, rtol=rel, atol=rel * scale)


def test_batched_recurrences_equal_the_sequential_ones_and_shrink_on_breakdown():
    a, lam, u = planted_matrix(list(np.linspace(-3.0, 5.0, 60)), seed=1)
    gen = torch.Generator().manual_seed(0)
    generic = torch.randn(60, 2, generator=gen, dtype=torch.float64)
    # an eigenvector (1 step), a mix of 3 eigenvectors (3 steps), two generic vectors, a mix of 2 (2 steps)
    starts = torch.stack([u[:, 7], u[:, [2, 30, 51]] @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
                          generic[:, 0], generic[:, 1], u[:, 10] + 3 * u[:, 45]], dim=1)
    op = Recording(a)
    decs = lanczos_tridiagonal_batch(op, starts, 20)
    assert [d.num_steps for d in decs] == [1, 3, 20, 20, 2]
    assert op.widths == expected_widths([1, 3, 20, 20, 2], 5) == [5, 4, 3] + [2] * 17
    assert op.num_products == sum(d.num_products for d in decs) == 46
    for j, dec in enumerate(decs):
        alone = lanczos_tridiagonal(MatrixOperator(a), starts[:, j], 20)
        assert same(dec.alphas, alone.alphas) and same(dec.betas, alone.betas)
        # each basis survived the reshuffling of finished recurrences: orthonormal, Lanczos relation holds
        q, m = dec.basis, dec.num_steps
        assert torch.allclose(q.T @ q, torch.eye(m, dtype=torch.float64), atol=1e-13)
        assert torch.allclose(q[:, 0], starts[:, j] / starts[:, j].norm(), atol=1e-15)
        e_m = torch.zeros(m, dtype=torch.float64)
        e_m[-1] = 1
        assert torch.allclose(a @ q, q @ dec.tridiagonal() + torch.outer(dec.residual, e_m), atol=1e-12)
    # a finished start in an invariant subspace has exactly the eigenvalues of that subspace
    assert torch.allclose(torch.linalg.eigvalsh(decs[1].tridiagonal()), lam[[2, 30, 51]], atol=1e-12)

    # without re-orthogonalisation and without bases, the same three-term recurrences
    plain = lanczos_tridiagonal_batch(MatrixOperator(a), generic, 12, reorthogonalize=False, keep_basis=False)
    for j, dec in enumerate(plain):
        alone = lanczos_tridiagonal(MatrixOperator(a), generic[:, j], 12, reorthogonalize=False, keep_basis=False)
        assert dec.basis is None and same(dec.alphas, alone.alphas, 1e-9) and same(dec.betas, alone.betas, 1e-9)


def test_batched_lanczos_bad_arguments():
    a = MatrixOperator(torch.eye(10, dtype=torch.float64))
    with pytest.raises(ValueError, match="nonzero"):
        lanczos_tridiagonal_batch(a, torch.cat([torch.ones(10, 1), torch.zeros(10, 1)], 1).double(), 3)
    with pytest.raises(ValueError, match=r"shape \(10, g\)"):
        lanczos_tridiagonal_batch(a, torch.ones(10, dtype=torch.float64), 3)
    with pytest.raises(ValueError, match="keep_basis"):
        lanczos_tridiagonal_batch(a, torch.ones(10, 2, dtype=torch.float64), 3, keep_basis=False)


@pytest.fixture(scope="module")
def hessian_like():
    spectrum = np.concatenate([np.linspace(-0.2, 1.0, 396), [5.0, 8.0, 12.0, 20.0]])
    a, lam, _ = planted_matrix(list(spectrum), seed=6)
    return a, lam


def test_every_block_size_gives_the_same_density_and_hutchinson_trace(hessian_like):
    a, _ = hessian_like
    runs = {g: spectral_density(a, num_probes=7, num_steps=30, seed=4, probes_per_block=g, verbose=False)
            for g in (1, 3, 7, None)}
    reference = runs[1]
    same_probes = hutchinson_trace(a, max_products=7, seed=4, verbose=False)
    for g, d in runs.items():
        assert d.info["probes_per_block"] == (7 if g is None else g)
        assert d.num_products == 7 * 30 and list(d.info["num_steps"]) == [30] * 7
        assert same(d.ritz_values, reference.ritz_values) and same(d.weights, reference.weights)
        assert same(d.density, reference.density)
        assert np.allclose(d.trace().samples, same_probes.samples, rtol=1e-10)
    gaussian = [spectral_density(a, num_probes=5, num_steps=12, seed=2, distribution="gaussian",
                                 probes_per_block=g, verbose=False) for g in (1, 3)]
    assert same(gaussian[0].ritz_values, gaussian[1].ritz_values) and same(gaussian[0].weights, gaussian[1].weights)


@pytest.mark.parametrize("group", [1, 4])
def test_full_runs_give_each_probes_exact_spectral_measure(group):
    """With m = n steps the Gauss quadrature of a probe is its spectral measure: every eigenvalue,
    with weight (u_i^T z)^2 / ||z||^2."""
    a, lam, u = planted_matrix(list(np.linspace(-2.0, 5.0, 40)), seed=3)
    d = spectral_density(a, num_probes=4, num_steps=40, seed=7, probes_per_block=group, verbose=False)
    z = draw_probes(MatrixOperator(a), 4, "rademacher", probe_generator(7))
    exact_weights = ((u.T @ z) ** 2 / (z**2).sum(0)).T.numpy()  # (P, n), eigenvalues ascending
    assert d.num_products == 160
    for p in range(4):
        assert np.allclose(d.ritz_values[p], lam.numpy(), atol=1e-9 * 5.0)
        assert np.allclose(d.weights[p], exact_weights[p], atol=1e-10)


@pytest.mark.parametrize("group", [1, 4, 10])
def test_probes_that_break_down_stop_early_and_leave_their_block(group):
    """A = H diag(lam) H^T / 8 with H the 8 x 8 Hadamard matrix and lam taking the values 1, 2, 7: a +-1
    probe z has 1, 4 or 8 nonzero components h_k^T z, which meet 1, 2 or 3 of those values, so its
    Krylov space is invariant after that many steps. The exact measure puts weight
    sum (h_k^T z)^2 / 64 over the k with lam_k = v on each value v met."""
    h = torch.tensor(hadamard(8), dtype=torch.float64)
    lam = torch.tensor([1.0, 1.0, 2.0, 2.0, 7.0, 7.0, 7.0, 7.0], dtype=torch.float64)
    a = (h * lam) @ h.T / 8
    op = Recording(a)
    d = spectral_density(op, num_probes=10, num_steps=8, seed=2, probes_per_block=group, verbose=False)
    z = draw_probes(op, 10, "rademacher", probe_generator(2))
    share = (h.T @ z) ** 2 / 64  # (8, P): each probe's squared components in the eigenbasis
    measures = []
    for p in range(10):
        values = sorted({float(v) for v in lam[share[:, p] > 1e-12]})
        measures.append((values, [float(share[lam == v, p].sum()) for v in values]))
    steps = [len(values) for values, _ in measures]
    assert sorted(set(steps)) == [1, 2, 3]  # the seed gives all three cases
    assert list(d.info["num_steps"]) == steps
    assert d.num_products == op.num_products == sum(steps)
    assert op.widths == expected_widths(steps, group)
    for p, (values, weights) in enumerate(measures):
        m = steps[p]
        assert np.allclose(d.ritz_values[p, :m], values, atol=1e-12)
        assert np.allclose(d.weights[p, :m], weights, atol=1e-12)
        assert np.all(d.weights[p, m:] == 0) and np.all(d.ritz_values[p, m:] == d.ritz_values[p, m - 1])
    assert d.integral() == pytest.approx(1.0, abs=1e-9)


def test_hvp_blocks_agree_with_sequential_and_give_exact_quadrature_moments(mlp_problem):
    """On the MLP's Hessian: block and sequential runs agree to 1e-8, and each probe's m-point Gauss
    quadrature reproduces z^T H^k z / ||z||^2 exactly for k <= 2m - 1 (checked for k = 1..4, m = 10,
    against the dense Hessian)."""
    model, loader, _, _, hessian = mlp_problem
    op = HVPOperator(model, loader, F.cross_entropy, use_gpu=False)
    runs = []
    for group in (1, 3):
        before = op.num_products
        runs.append(spectral_density(op, num_probes=3, num_steps=10, seed=5, probes_per_block=group, verbose=False))
        assert runs[-1].num_products == op.num_products - before == 30
    assert same(runs[0].ritz_values, runs[1].ritz_values, 1e-8) and same(runs[0].weights, runs[1].weights, 1e-8)
    z = draw_probes(op, 3, "rademacher", probe_generator(5))
    norm = float(torch.linalg.matrix_norm(hessian, 2))
    power = z.clone()
    for k in range(1, 5):
        power = hessian @ power
        exact = ((z * power).sum(0) / (z**2).sum(0)).numpy()
        quadrature = np.sum(runs[1].weights * runs[1].ritz_values**k, axis=1)
        assert np.allclose(quadrature, exact, rtol=0, atol=1e-8 * norm**k)


def test_progress_bar_moves_every_step_and_ends_at_its_total(monkeypatch):
    updates = []

    class Bar:
        def __init__(self, total, **kwargs):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, count):
            updates.append(count)

    monkeypatch.setattr(density_module, "progress", lambda total=None, **kw: Bar(total))
    a, _, _ = planted_matrix([1.0] * 20 + [2.0] * 20 + [7.0] * 20, seed=3)
    d = spectral_density(a, num_probes=5, num_steps=6, probes_per_block=2, verbose=False)
    # groups of 2, 2, 1 probes; every recurrence breaks down after 3 steps (3 distinct eigenvalues)
    assert list(d.info["num_steps"]) == [3] * 5 and d.num_products == 15
    assert updates == [2, 2, 2, 6, 2, 2, 2, 6, 1, 1, 1, 3]
    assert sum(updates) == 5 * 6


def test_default_block_size_follows_the_memory_rule(hessian_like):
    gib = 1024**3
    assert default_probes_per_block(1000, 100, 50, torch.float64) == 50
    assert default_probes_per_block(1000, 100, 50, torch.float64, budget_bytes=8_000_000) == 10
    assert default_probes_per_block(10**8, 80, 10, torch.float32) == 1  # one basis is 32 GB: still one probe
    per_probe = 10**6 * 80 * 4
    assert default_probes_per_block(10**6, 80, 100, torch.float32) == gib // per_probe == 3
    assert default_probes_per_block(10**6, 80, 100, torch.float32, reorthogonalize=False) == 89
    a, _ = hessian_like
    assert spectral_density(a, num_probes=4, num_steps=5, probes_per_block=9, verbose=False).info["probes_per_block"] == 4


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (2.0, TypeError), (True, TypeError),
                                        ("3", TypeError)])
def test_probes_per_block_is_validated(hessian_like, bad, error):
    a, _ = hessian_like
    with pytest.raises(error, match="probes_per_block"):
        spectral_density(a, num_probes=3, num_steps=5, probes_per_block=bad, verbose=False)


def test_hessian_density_forwards_probes_per_block():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = classification_data(num=40, din=4, classes=3, seed=3)
    loader = batches(x, y, [25, 15])
    runs = [hessian_density(model, loader, F.cross_entropy, num_probes=3, num_steps=8, probes_per_block=g,
                            use_gpu=False, verbose=False) for g in (1, 2)]
    assert [r.info["probes_per_block"] for r in runs] == [1, 2]
    assert same(runs[0].ritz_values, runs[1].ritz_values) and same(runs[0].weights, runs[1].weights)


@pytest.mark.gpu
def test_blocks_on_cuda_match_cpu(hessian_like):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    a, _ = hessian_like
    cpu = spectral_density(a, 5, 30, seed=5, probes_per_block=1, verbose=False)
    gpu = spectral_density(a.cuda(), 5, 30, seed=5, probes_per_block=3, verbose=False)
    assert np.allclose(cpu.ritz_values, gpu.ritz_values, atol=1e-8)
    assert np.allclose(cpu.weights, gpu.weights, atol=1e-10)
