"""Other libraries' ways to the same eigenpairs, each returning (eigenvalues (k,), eigenvectors (k, n),
products). They are optional: a missing or failing library raises :class:`Skipped` with a note.

* curvlinops: ``HessianLinearOperator`` (forward-over-reverse products, vmap for blocks) handed to
  scipy's ``eigsh`` (ARPACK, float64 on the host) through its ``to_scipy()``.
* PyHessian: ``hessian(model, criterion, dataloader=...).eigenvalues(top_n=k)`` (deflated power
  iteration that stops when the eigenvalue changes by less than ``tol`` relative).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from workloads import Workload


class Skipped(Exception):
    """A baseline could not run here; the message says why."""


def curvlinops_eigsh(work: Workload, k: int, tol: float, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        from curvlinops import HessianLinearOperator
    except Exception as exc:  # not installed, or broken against this torch
        raise Skipped(f"curvlinops not importable ({type(exc).__name__}: {exc}); pip install curvlinops-for-pytorch")
    from scipy.sparse.linalg import LinearOperator, eigsh

    model = copy.deepcopy(work.flat_model()).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    # check_deterministic=False: its default spends extra products checking the data loop.
    hessian = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, work.flat_batches(),
                                    check_deterministic=False)
    base = hessian.to_scipy(dtype=np.float64)
    count = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        count[0] += 1
        return base.matvec(x)

    op = LinearOperator(base.shape, matvec=matvec, rmatvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(base.shape[0])
    vals, vecs = eigsh(op, k=k, which="LM", tol=tol, v0=v0)
    return vals, vecs.T, count[0]


def curvlinops_product_error(work: Workload, reference: Any, seed: int) -> float:
    """Relative difference of curvlinops' ``H v`` from the float64 reference product, one random v
    (outside the timing): shows when its operator, not its solver, limits the accuracy."""
    from curvlinops import HessianLinearOperator

    model = copy.deepcopy(work.flat_model()).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    hessian = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, work.flat_batches(),
                                    check_deterministic=False)
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(reference.size, generator=gen, dtype=torch.float64)
    ours = reference.apply(v.to(reference.device)).cpu()
    theirs = (hessian @ v.to(device=params[0].device, dtype=params[0].dtype)).double().cpu()
    return float(torch.linalg.vector_norm(theirs - ours) / torch.linalg.vector_norm(ours))


def pyhessian_eigenvalues(work: Workload, k: int, tol: float, max_iter: int, seed: int) -> tuple[np.ndarray, np.ndarray, int]:
    try:
        from pyhessian import hessian
    except Exception as exc:
        raise Skipped(f"PyHessian not importable ({type(exc).__name__}: {exc}); pip install pyhessian")
    model = copy.deepcopy(work.model)
    cuda = next(model.parameters()).device.type == "cuda"
    computer = hessian(model, work.criterion, dataloader=work.batches, cuda=cuda)
    count = [0]
    product = computer.dataloader_hv_product

    def counted(v: Any) -> Any:
        count[0] += 1
        return product(v)

    computer.dataloader_hv_product = counted
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # PyHessian draws its start vectors from the global generator
    try:
        vals, vecs = computer.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        torch.random.set_rng_state(state)
    flat = np.stack([torch.cat([t.reshape(-1) for t in vec]).detach().cpu().double().numpy() for vec in vecs])
    return np.asarray(vals, dtype=np.float64), flat, count[0]
