"""Check a converged solve for eigenvalues it missed, and find them (repeated eigenvalues above all).

A single-vector Krylov method (ARPACK, thick-restart Lanczos) sees one copy of a repeated
eigenvalue per start vector: for a top eigenvalue of multiplicity 3 it returns, say, ``[5, 4, 3.5]``
for k = 3, every pair converged. The pairs are right, the set is not: two copies of 5 are missing.

The check runs Lanczos from a fresh random start on the operator deflated against the found
vectors, ``P A P`` with ``P = I - V V^T``. Every eigenvalue of ``A`` that the solve missed is an
eigenvalue of ``P A P``, and the start vector has (with probability 1) a component on it.

* Detection is certain. By Cauchy's interlacing theorem, each Ritz value of ``P A P`` lies within
  its spectrum; a Ritz value more extreme than the k-th found eigenvalue (by more than the
  tolerance) proves a missed eigenvalue. The Lanczos process then continues until that pair
  converges, it joins the found set, and the check starts again with a new random vector (each
  start vector reveals one copy of a repeated eigenvalue).
* Absence is established with a stated probability. For every polynomial ``p`` of degree below the
  number of steps m, ``||p(PAP) q|| = ||p(T_m) e_1||``, so the squared component ``c^2`` of the
  start vector ``q`` on an eigenvector with eigenvalue ``mu`` obeys
  ``c^2 <= ||p(T_m) e_1||^2 / p(mu)^2``. The best ``p`` gives the Christoffel function of the
  Lanczos (Gauss) quadrature, ``1 / sum_j l_j(b)^2 / w_j`` (nodes: the Ritz values, ``w_j`` their
  weights, ``l_j`` the Lagrange basis), which bounds ``c^2`` for every eigenvalue at the boundary
  ``b`` or beyond it at once (on Lanczos, Gauss quadrature and Christoffel functions: Golub &
  Meurant, 2010, "Matrices, Moments and Quadrature with Applications"). A Gaussian random start
  has a squared component below ``t`` on a given direction of a d-dimensional space with
  probability at most ``sqrt(2 d t / pi)`` (as in Kuczyński & Woźniakowski, 1992, "Estimating the
  largest eigenvalue by the power and Lanczos algorithms with a random start", SIAM J. Matrix
  Anal. Appl. 13(4)). The check stops when this probability of having overlooked a missed
  eigenvalue is below :data:`MISS_PROBABILITY`, or after :data:`CHECK_STEPS` products. A missed
  copy of a found eigenvalue further out than the boundary is ruled out far more surely, as the
  bound falls fast with the distance from ``b``.
* Ties are not misses: a further copy of the k-th value itself changes no eigenvalue. It would keep
  the bound from falling, so once it converges it is deflated too (not returned), and the check
  starts again.

A Lanczos breakdown (an invariant Krylov space, e.g. a zero operator or k close to n) makes the
Ritz values exact, and the check conclusive. Everything stays on the operator's device; the host
reads the small tridiagonal matrix at a few checkpoints, whose spacing is predicted from the rate at
which the bound falls, not once per product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ..operators.base import Operator
from ..utils import check_seed, check_which, logger, private_generator

# Stop when the chance that an eigenvalue beyond the k-th found one went unseen is below this.
MISS_PROBABILITY = 0.05
# Products a check may spend when it finds nothing (it stops earlier once MISS_PROBABILITY is met).
CHECK_STEPS = 12
# Krylov vectors kept while a missed pair converges; a longer search restarts from its Ritz vector.
MAX_BASIS = 40
# Products the whole completion may spend, in units of MAX_BASIS.
MAX_WORK = 12
# A Lanczos coefficient beta below this many units of rounding (times the operator's size seen)
# means an invariant Krylov space.
BREAKDOWN = 100.0
# Relative residual at which a further copy of the k-th eigenvalue (a tie) is deflated.
TIE_TOL = 1e-4
# Added to the caller's seed for the check's start vectors (any fixed offset: see there).
SEED_OFFSET = 0x5DEECE66D


@dataclass
class Completion:
    """The top-k pairs after the check.

    Attributes:
        values: (k,) eigenvalues, ordered most extreme first in the sense of ``which``.
        vectors: (n, k) orthonormal eigenvectors as columns (operator's device and dtype).
        residuals: (k,) ``||A v - lambda v||``: measured when pairs were added; otherwise the
            ``residuals`` given to :func:`complete_multiplicities`, NaN where none were given.
        num_products: operator products the check spent.
        missed: how many of the returned pairs the solve had missed (0: the input is returned as is).
        miss_probability: at the end, an upper bound on the probability that an eigenvalue beyond
            the k-th returned one was there and still not seen (0 when the check was conclusive).
    """

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_products: int
    missed: int
    miss_probability: float = 0.0


def complete_multiplicities(
    op: Operator,
    values: Tensor,
    vectors: Tensor,
    which: str,
    tol: float,
    seed: Optional[int],
    *,
    residuals: Optional[Tensor] = None,
) -> Completion:
    """Find eigenvalues that a converged solve missed (such as further copies of a repeated one).

    Args:
        op: the symmetric operator that was solved.
        values: (k,) the solve's eigenvalues, ordered most extreme first as ``which`` says ("LM": by
            |.| descending, "LA": descending, "SA": ascending).
        vectors: (n, k) their orthonormal eigenvectors as columns, on the operator's device and dtype.
        which: "LM", "LA" or "SA".
        tol: the solve's relative residual tolerance; pairs added here meet it too, and eigenvalues
            within ``tol * |lambda_k|`` of the k-th value count as ties, not as missed.
        seed: seed of the random start vectors (None: fresh randomness); the same on every rank.
        residuals: optional (k,) residuals of the given pairs, returned when nothing was missed.

    Returns:
        A :class:`Completion`: the true top k pairs (each converged to ``tol``), the products spent,
        how many pairs were added, and the probability bound the check reached.
    """
    which = check_which(which)
    k = int(values.shape[0])
    n = op.size
    dtype, device = op.dtype, op.device
    if vectors.shape != (n, k):
        raise ValueError(f"vectors must have shape (n, k) = ({n}, {k}), got {tuple(vectors.shape)}.")
    tol = float(tol)
    given = residuals if residuals is not None else torch.full((k,), float("nan"), dtype=torch.float64)
    if op.is_stochastic:
        # Lanczos needs one fixed matrix; with a new mini-batch per product there is nothing to check.
        logger.debug("multiplicity check skipped: the operator is stochastic.")
        return Completion(values, vectors, given, 0, 0, 1.0)
    host_values = values.detach().to("cpu", torch.float64).numpy().copy()
    found = _FoundSet(host_values, which, tol, dtype)
    deflation = vectors.detach().to(device=device, dtype=dtype)
    # The solve's own start vectors come from the same seed; reusing them would reproduce its blind
    # spot (a start vector with no component on the missed copies), so the check draws from another.
    generator = private_generator(None if seed is None else (check_seed(seed) + SEED_OFFSET) % 2**63)
    added: list[Tensor] = []
    products = 0
    probability = 1.0
    restart: Optional[Tensor] = None
    with op.deferred_checks():
        while products < MAX_WORK * MAX_BASIS:
            room = n - deflation.shape[1]
            if room <= 0:  # the found vectors span the whole space: nothing can be missing
                probability = 0.0
                break
            start = restart if restart is not None else torch.randn(n, generator=generator, dtype=dtype).to(device)
            search = _DeflatedLanczos(op, deflation, start, min(room, MAX_BASIS))
            outcome = _run_round(search, found, restart is None, tol)
            products += search.steps
            restart = outcome.restart
            if outcome.vectors is not None:
                deflation = torch.cat([deflation, outcome.vectors], dim=1)
                if outcome.missed:
                    added.append(outcome.vectors)
                    found.add(outcome.values)
                continue
            if outcome.finished:
                probability = outcome.probability
                break
    if not added:
        logger.debug("multiplicity check: nothing missed, %d products, miss probability <= %.2g.",
                     products, probability)
        return Completion(values, vectors, given, products, 0, probability)
    values, vectors, residuals, spent = _best_pairs(
        op, torch.cat([vectors.to(device=device, dtype=dtype)] + added, dim=1), k, which
    )
    missed = min(k, sum(block.shape[1] for block in added))
    logger.info("multiplicity check: %d missed eigenpair(s) added with %d products.", missed, products + spent)
    return Completion(values, vectors, residuals, products + spent, missed, probability)


class _FoundSet:
    """The eigenvalues found so far and the boundary of the wanted set: the k-th most extreme."""

    def __init__(self, values: np.ndarray, which: str, tol: float, dtype: torch.dtype) -> None:
        self.k = len(values)
        self.which = which
        self.tol = tol
        self.eps = torch.finfo(dtype).eps
        self.values = values

    def add(self, new: np.ndarray) -> None:
        self.values = np.concatenate([self.values, new])

    def extremeness(self, x: np.ndarray) -> np.ndarray:
        """A number that grows the more extreme a value is in the sense of ``which``."""
        return np.abs(x) if self.which == "LM" else (x if self.which == "LA" else -x)

    @property
    def scale(self) -> float:
        return float(np.max(np.abs(self.values))) if self.values.size else 0.0

    def kth(self) -> float:
        """Extremeness of the k-th most extreme value found so far."""
        return float(np.sort(self.extremeness(self.values))[::-1][self.k - 1])

    def boundary(self) -> float:
        """Extremeness a value must exceed to be missed: the k-th value's, plus the tolerance."""
        kth = self.kth()
        return kth + max(self.tol * abs(kth), 10 * self.eps * self.scale)

    def beyond(self, theta: np.ndarray) -> np.ndarray:
        """True where a value is more extreme than the k-th found one, beyond the tolerance."""
        return self.extremeness(theta) > self.boundary()

    def ties(self, theta: np.ndarray) -> np.ndarray:
        """True where a value equals the k-th found one within the tolerance (and is not beyond)."""
        b = self.boundary()
        margin = b - self.kth()
        e = self.extremeness(theta)
        return (e >= self.kth() - margin) & (e <= b)

    def certification_points(self) -> list[float]:
        """The eigenvalues at the boundary: one point, or two (+/-) for "LM"."""
        b = self.boundary()
        return [b, -b] if self.which == "LM" else ([b] if self.which == "LA" else [-b])


@dataclass
class _RoundOutcome:
    """How a round ended: pairs to deflate (missed ones, or ties at the boundary), a vector to
    restart from, or the end of the check with its probability bound."""

    values: Optional[np.ndarray] = None
    vectors: Optional[Tensor] = None
    missed: bool = False
    restart: Optional[Tensor] = None
    finished: bool = False
    probability: float = 1.0


class _DeflatedLanczos:
    """Lanczos with full reorthogonalisation on ``P A P``, ``P = I - W W^T``, kept on the device."""

    def __init__(self, op: Operator, deflation: Tensor, start: Tensor, capacity: int) -> None:
        self.op = op
        self.deflation = deflation
        n, dtype, device = op.size, op.dtype, op.device
        self.capacity = capacity
        # The basis grows by doubling (most checks stop after a few steps; a vector is n numbers).
        self.basis = torch.empty(n, min(capacity, 8) + 1, dtype=dtype, device=device)
        self.alphas = torch.zeros(capacity, dtype=dtype, device=device)
        self.betas = torch.zeros(capacity, dtype=dtype, device=device)
        q = self._deflate(self._deflate(start))
        norm = torch.linalg.vector_norm(q)
        self.basis[:, 0] = q / torch.where(norm > 0, norm, torch.ones_like(norm))
        self.steps = 0

    def _deflate(self, w: Tensor) -> Tensor:
        return w - self.deflation @ (self.deflation.T @ w)

    def advance(self, target: int) -> None:
        """Take steps until ``target`` Krylov vectors have been multiplied (no host read)."""
        while self.steps < min(target, self.capacity):
            j = self.steps
            if j + 2 > self.basis.shape[1]:
                grown = torch.empty(self.basis.shape[0], min(self.capacity, 2 * j) + 1, dtype=self.basis.dtype,
                                    device=self.basis.device)
                grown[:, : j + 1] = self.basis[:, : j + 1]
                self.basis = grown
            q = self.basis[:, j]
            w = self._deflate(self.op.apply(q))
            alpha = torch.dot(q, w)
            kept = self.basis[:, : j + 1]
            for _ in range(2):  # full reorthogonalisation, twice is enough
                w = self._deflate(w - kept @ (kept.T @ w))
            beta = torch.linalg.vector_norm(w)
            self.alphas[j], self.betas[j] = alpha, beta
            # After an exact breakdown (beta = 0) the next vector is zero; the host truncates there.
            self.basis[:, j + 1] = w / torch.where(beta > 0, beta, torch.ones_like(beta))
            self.steps += 1

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """Host copies (float64) of the alphas (m,) and betas (m,): one read."""
        m = self.steps
        self.op.flush_checks()
        host = torch.cat([self.alphas[:m], self.betas[:m]]).to("cpu", torch.float64).numpy()
        return host[:m], host[m:]

    def ritz_vectors(self, rotation: np.ndarray) -> Tensor:
        """``Q_m Y`` for a (m, d) host rotation: (n, d) on the device."""
        m = rotation.shape[0]
        y = torch.as_tensor(rotation, dtype=self.basis.dtype, device=self.basis.device)
        return self.basis[:, :m] @ y


def _run_round(search: _DeflatedLanczos, found: _FoundSet, random_start: bool, tol: float) -> _RoundOutcome:
    """Lanczos steps on the deflated operator until a missed pair (or a tie at the boundary)
    converges, or, from a random start, until the bound on having overlooked a missed eigenvalue is
    small enough or :data:`CHECK_STEPS` products are spent."""
    room = search.op.size - search.deflation.shape[1]
    limit = min(search.capacity, CHECK_STEPS) if random_start else search.capacity
    target = min(2, limit)
    history: list[tuple[str, int, float]] = []
    while True:
        search.advance(target)
        m = search.steps
        alphas, betas = search.snapshot()
        scale = max(found.scale, float(np.max(np.abs(alphas))), float(np.max(betas)))
        # A breakdown (beta at the rounding level): the Krylov space is invariant, its Ritz values exact.
        broke = np.nonzero(betas <= BREAKDOWN * found.eps * scale)[0]
        exact = broke.size > 0
        size = int(broke[0]) + 1 if exact else m
        theta, y = np.linalg.eigh(_tridiagonal(alphas[:size], betas[: size - 1]))
        residual = np.zeros(size) if exact else np.abs(betas[size - 1] * y[size - 1, :])
        floor = 10 * found.eps * max(scale, float(np.max(np.abs(theta))))
        converged = residual <= np.maximum(tol * np.abs(theta), floor)
        beyond = found.beyond(theta)
        if beyond.any():
            if not (beyond & ~converged).any():
                keep = np.nonzero(beyond)[0]
                return _RoundOutcome(theta[keep], search.ritz_vectors(y[:, keep]), missed=True)
            if exact or m >= search.capacity:
                done = np.nonzero(beyond & converged)[0]
                if done.size:  # keep what converged; the rest is searched for again
                    return _RoundOutcome(theta[done], search.ritz_vectors(y[:, done]), missed=True)
                furthest = int(np.argmax(np.where(beyond, found.extremeness(theta), -np.inf)))
                return _RoundOutcome(restart=search.ritz_vectors(y[:, [furthest]])[:, 0])
            pending = beyond & ~converged
            excess = float(np.log(np.max(residual[pending] / np.maximum(tol * np.abs(theta[pending]), floor))))
            target = m + _steps_to_reach(history, "residual", m, excess)
            continue
        if not random_start:  # a restart whose Ritz values fell back inside: look again afresh
            return _RoundOutcome()
        if exact:
            return _RoundOutcome(finished=True, probability=0.0)
        # A tie only needs deflating well enough to stop hiding what lies beyond it, not to tol.
        ties = found.ties(theta) & (residual <= np.maximum(max(tol, TIE_TOL) * np.abs(theta), floor))
        if ties.any():  # another copy of the k-th value: not missed, but in the way of the bound
            keep = np.nonzero(ties)[0]
            return _RoundOutcome(theta[keep], search.ritz_vectors(y[:, keep]))
        weights = y[0, :] ** 2
        bound = max(christoffel_bound(theta, weights, b) for b in found.certification_points())
        probability = miss_probability(bound, room)
        if probability <= MISS_PROBABILITY or m >= limit:
            return _RoundOutcome(finished=True, probability=probability)
        target = min(limit, m + _steps_to_certify(theta, found.certification_points(), probability))


def _steps_to_reach(history: list[tuple[str, int, float]], kind: str, m: int, excess: float) -> int:
    """Steps until the next host read: how many the recent rate of decrease of a log quantity
    (``excess`` above its goal) predicts are needed, between 1 and 4."""
    history.append((kind, m, excess))
    if len(history) < 2 or history[-2][0] != kind or excess <= 0:
        return 1
    (_, m0, e0), (_, m1, e1) = history[-2], history[-1]
    rate = (e0 - e1) / max(m1 - m0, 1)
    if rate <= 0:
        return 2
    return int(min(4, max(1, math.ceil(excess / rate))))


def _steps_to_certify(theta: np.ndarray, points: list[float], probability: float) -> int:
    """Steps until the next host read while the bound falls: each Lanczos step shrinks it by about
    the Chebyshev growth factor ``x + sqrt(x^2 - 1)`` of the boundary seen from the Ritz interval
    (the true interval is wider, so this rate is optimistic and the next read is not late)."""
    centre = 0.5 * (theta.max() + theta.min())
    half = max(0.5 * (theta.max() - theta.min()), 1e-300)
    x = min(abs(point - centre) for point in points) / half
    if x <= 1:
        return 1
    growth = math.log(x + math.sqrt(x * x - 1))
    return int(min(4, max(1, math.ceil(math.log(probability / MISS_PROBABILITY) / growth))))


def _tridiagonal(alphas: np.ndarray, betas: np.ndarray) -> np.ndarray:
    t = np.diag(alphas)
    if betas.size:
        t += np.diag(betas, 1) + np.diag(betas, -1)
    return t


def christoffel_bound(nodes: np.ndarray, weights: np.ndarray, point: float) -> float:
    """``min ||p(T) e_1||^2`` over polynomials of degree < m with ``p(point) = 1``, from the m Gauss
    nodes (Ritz values) and weights of ``T``: ``1 / sum_j l_j(point)^2 / w_j``. It bounds the squared
    component of the start vector on any eigenvector whose eigenvalue is ``point`` or further out.

    Computed in logarithms (Lagrange basis values overflow easily); nodes closer than rounding are
    merged, and weights are floored at 1e-15 (a larger weight only loosens the bound).
    """
    order = np.argsort(nodes)
    nodes, weights = nodes[order], np.maximum(weights[order], 1e-15)
    spread = max(float(np.max(np.abs(nodes))), abs(point), 1e-300)
    merged_nodes, merged_weights = [nodes[0]], [weights[0]]
    for x, w in zip(nodes[1:], weights[1:]):
        if x - merged_nodes[-1] <= 1e-12 * spread:
            merged_weights[-1] += w
        else:
            merged_nodes.append(x)
            merged_weights.append(w)
    x = np.asarray(merged_nodes)
    w = np.asarray(merged_weights)
    if np.any(np.abs(point - x) <= 1e-12 * spread):
        return 1.0
    diff = np.abs(x[:, None] - x[None, :])
    np.fill_diagonal(diff, 1.0)
    log_l = np.sum(np.log(np.abs(point - x)))[None] - np.log(np.abs(point - x)) - np.sum(np.log(diff), axis=1)
    log_terms = 2 * log_l - np.log(w)
    top = float(np.max(log_terms))
    return float(min(1.0, math.exp(-top) / float(np.sum(np.exp(log_terms - top)))))


def miss_probability(bound: float, dimension: int) -> float:
    """Probability that a Gaussian random start in a ``dimension``-dimensional space has squared
    component at most ``bound`` on a fixed direction: at most ``sqrt(2 d bound / pi)``."""
    return float(min(1.0, math.sqrt(2 * dimension * max(bound, 0.0) / math.pi)))


def _best_pairs(op: Operator, basis: Tensor, k: int, which: str) -> tuple[Tensor, Tensor, Tensor, int]:
    """Rayleigh-Ritz on span(basis) with one block product; the k most extreme pairs as
    (values (k,), vectors (n, k), residuals (k,), products)."""
    q, _ = torch.linalg.qr(basis)
    aq = op.apply_block(q)
    projected = q.T @ aq
    theta, rotation = torch.linalg.eigh((projected + projected.T) / 2)
    vectors, products = q @ rotation, aq @ rotation
    residuals = torch.linalg.vector_norm(products - vectors * theta.unsqueeze(0), dim=0)
    key = theta.abs() if which == "LM" else (theta if which == "LA" else -theta)
    order = torch.argsort(key, descending=True, stable=True)[:k]
    return theta[order], vectors[:, order], residuals[order], int(q.shape[1])
