"""The loop that CG and MINRES share: several right-hand sides advance together, one block product
per iteration, each column with its own recurrence coefficients and its own stopping.

A recurrence (:class:`Recurrence`) says how one iteration updates its state. The driver keeps the
block: it masks columns that have stopped (so that they stay as they were until the host next
looks), looks at the residual norms every ``check_every`` iterations (the only host sync of the
loop), checks each stopping column's true residual ``b - (A + damping I) x`` with one product,
restarts a column whose recurrence drifted from its true residual (residual replacement), and
drops finished columns from the block.
"""

from __future__ import annotations

import warnings
from typing import Optional, Protocol

import numpy as np
import torch
from torch import Tensor

from ..operators.model_operator import NonFiniteError
from ..solvers import ConvergenceWarning
from ..utils import logger, progress, user_stacklevel
from .problem import LinearProblem
from .result import SolveResult

State = dict[str, Tensor]

# Why a column left the block (codes kept on the device between host checks).
RUNNING, CONVERGED, STOPPED, MAX_ITERS, REJECTED = 0, 1, 2, 3, 4

# Residual replacements allowed per column when the recurrence's residual has drifted from the
# true one: each costs one product, and more than a few means rounding sets the floor.
MAX_RESTARTS = 3


class Recurrence(Protocol):
    """One Krylov method, written for a block of independent columns.

    Every state tensor has the columns as its last dimension ((n, k) vectors or (k,) scalars), so
    the driver can select, mask and concatenate columns without knowing what the tensors mean.
    """

    name: str

    def start(self, problem: LinearProblem, x: Tensor, r: Tensor) -> State:
        """The state of fresh iterations from ``x`` (n, k) whose residual is ``r`` (n, k)."""

    def step(self, problem: LinearProblem, state: State) -> tuple[State, Tensor, Tensor, Tensor, State]:
        """One iteration: (new state, (k,) residual norms of the new iterates, (k,) bool "reject this
        step" (a breakdown: the column keeps its old state and stops), (k,) bool "accept it, then
        stop", (k,) extras the rejection message may use)."""

    def rejection(self, state: State, extras: State, local: int, column: int, iteration: int) -> Optional[Exception]:
        """The exception to raise for a rejected column, or None to return it as not converged."""


def _merge(accept: Tensor, new: State, old: State) -> State:
    """Columns where ``accept`` take the new state; the others keep the old one."""
    return {key: torch.where(accept, new[key], old[key]) for key in old}


class _Block:
    """The running columns: their state, their original column numbers and their counters."""

    def __init__(self, state: State, columns: np.ndarray, iters: Tensor, device: torch.device) -> None:
        self.state = state
        self.columns = columns
        self.index = torch.as_tensor(columns, dtype=torch.long, device=device)
        self.iters = iters
        self.live = torch.ones(len(columns), dtype=torch.bool, device=device)
        self.reason = torch.zeros(len(columns), dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.columns)

    def keep(self, local: np.ndarray) -> None:
        index = torch.as_tensor(local, dtype=torch.long, device=self.iters.device)
        self.state = {key: value.index_select(-1, index) for key, value in self.state.items()}
        self.columns = self.columns[local]
        self.index = self.index[index]
        self.iters, self.live, self.reason = self.iters[index], self.live[index], self.reason[index]

    def extend(self, other: "_Block") -> None:
        if not len(self):
            self.__dict__.update(other.__dict__)
            return
        self.state = {key: torch.cat([self.state[key], other.state[key]], dim=-1) for key in self.state}
        self.columns = np.concatenate([self.columns, other.columns])
        self.index = torch.cat([self.index, other.index])
        self.iters = torch.cat([self.iters, other.iters])
        self.live = torch.cat([self.live, other.live])
        self.reason = torch.cat([self.reason, other.reason])


class BlockSolve:
    """One call of a solver: the bookkeeping around ``recurrence`` for every column of ``problem``."""

    def __init__(self, problem: LinearProblem, recurrence: Recurrence) -> None:
        self.problem = problem
        self.recurrence = recurrence
        rhs = problem.rhs
        self.device = rhs.device
        m = rhs.shape[1]
        self.rhs_norms = torch.linalg.vector_norm(rhs, dim=0)
        self.thresholds = problem.thresholds(self.rhs_norms)
        self.thresholds_h = self.thresholds.to("cpu", torch.float64).numpy()
        self.rhs_norms_h = self.rhs_norms.to("cpu", torch.float64).numpy()
        self.solution = torch.zeros_like(rhs)
        self.final = np.zeros(m)
        self.converged = np.zeros(m, dtype=bool)
        self.iterations = np.zeros(m, dtype=np.int64)
        self.restarts = np.zeros(m, dtype=np.int64)
        self.notes: dict[str, list] = {"not_positive_definite": [], "singular": []}
        self.history: list[Tensor] = []
        self.extras: State = {}
        self.checks = 0  # host looks at the residuals (each one sync)

    def run(self, verbose: bool) -> SolveResult:
        problem, op = self.problem, self.problem.operator
        first_products = op.num_products
        with op.deferred_checks():
            block = self._first_block()
            with progress(total=problem.max_iters, desc=self.recurrence.name, verbose=verbose) as bar:
                step = 0
                while len(block):
                    self._iterate(block)
                    step += 1
                    if bar.n < problem.max_iters:
                        bar.update(1)
                    if step % problem.check_every == 0:
                        self.checks += 1
                        op.flush_checks()
                        block = self._check(block, bar)
        return self._result(op.num_products - first_products)

    def _first_block(self) -> _Block:
        """Zero right-hand sides are solved by x = 0; the others start from x0 (or zero)."""
        problem, rhs = self.problem, self.problem.rhs
        nonzero = (self.rhs_norms > 0).cpu().numpy()
        self.converged[~nonzero] = True  # x = 0 solves b = 0 exactly, whatever the warm start
        columns = np.flatnonzero(nonzero)
        index = torch.as_tensor(columns, dtype=torch.long, device=self.device)
        x = torch.zeros(rhs.shape[0], len(columns), dtype=rhs.dtype, device=self.device)
        r = rhs[:, index]
        if problem.x0 is not None and len(columns):
            x = problem.x0[:, index].clone()
            r = r - problem.apply(x)
        norms = torch.linalg.vector_norm(r, dim=0)
        row = torch.zeros(rhs.shape[1], dtype=rhs.dtype, device=self.device)
        row[index] = norms
        self.history.append(row)
        # A warm start may already be good enough: its residual is a true one.
        good = (norms <= self.thresholds[index]).cpu().numpy()
        norms_h = norms.to("cpu", torch.float64).numpy()
        for local in np.flatnonzero(good):
            j = columns[local]
            self.solution[:, j] = x[:, local]
            self.final[j], self.converged[j] = norms_h[local], True
        rest = np.flatnonzero(~good)
        iters = torch.zeros(len(rest), dtype=torch.long, device=self.device)
        if not len(rest):
            return _Block({}, rest, iters, self.device)
        rest_index = torch.as_tensor(rest, dtype=torch.long, device=self.device)
        state = self.recurrence.start(problem, x[:, rest_index], r[:, rest_index])
        return _Block(state, columns[rest], iters, self.device)

    def _iterate(self, block: _Block) -> None:
        """One iteration of every running column, without a host sync."""
        new, rnorm, reject, stop, self.extras = self.recurrence.step(self.problem, block.state)
        accept = block.live & ~reject
        block.state = _merge(accept, new, block.state)
        block.iters += accept.long()
        done = accept & (rnorm <= self.thresholds[block.index])
        out_of_steps = accept & (block.iters >= self.problem.max_iters)
        now = torch.full_like(block.reason, RUNNING)
        now = torch.where(out_of_steps, MAX_ITERS, now)
        now = torch.where(accept & stop, STOPPED, now)
        now = torch.where(done, CONVERGED, now)
        now = torch.where(block.live & reject, REJECTED, now)
        block.reason = torch.where(block.live, now, block.reason)
        block.live = block.live & (now == RUNNING)
        row = torch.full((self.problem.rhs.shape[1],), float("nan"), dtype=rnorm.dtype, device=self.device)
        row[block.index] = torch.where(accept, rnorm, torch.full_like(rnorm, float("nan")))
        self.history.append(row)
        self._rnorm = rnorm

    def _check(self, block: _Block, bar) -> _Block:
        """The host's look: raise on NaN, finish the columns that stopped, restart drifted ones."""
        live = block.live.cpu().numpy()
        reason = block.reason.cpu().numpy()
        rnorm = self._rnorm.detach().to("cpu", torch.float64).numpy()
        if not np.all(np.isfinite(rnorm[live])):
            raise NonFiniteError(
                f"{self.recurrence.name}: the residual became NaN/Inf. The operator (or the preconditioner) returned "
                f"non-finite values; check its products with the right-hand side."
            )
        if live.any():
            relative = rnorm[live] / np.maximum(self.rhs_norms_h[block.columns[live]], 1e-300)
            bar.set_postfix(rel_residual=f"{float(np.max(relative)):.2e}", refresh=False)
        if live.all():
            return block
        finished = np.flatnonzero(~live)
        iters = block.iters.cpu().numpy()
        finished_index = torch.as_tensor(finished, dtype=torch.long, device=self.device)
        x = block.state["x"].index_select(1, finished_index)
        true_r = self.problem.rhs[:, block.index[finished_index]] - self.problem.apply(x)
        true_norms = torch.linalg.vector_norm(true_r, dim=0).to("cpu", torch.float64).numpy()
        again = []
        for pos, local in enumerate(finished):
            j, why = int(block.columns[local]), int(reason[local])
            self.iterations[j] = iters[local]
            ok = bool(true_norms[pos] <= self.thresholds_h[j])
            if why == REJECTED:
                error = self.recurrence.rejection(block.state, self.extras, int(local), j, int(iters[local]) + 1)
                if error is not None:
                    raise error
                if not ok:
                    self.notes["not_positive_definite"].append(j)
            if (not ok and why == CONVERGED and self.restarts[j] < MAX_RESTARTS
                    and iters[local] < self.problem.max_iters):
                # The recurrence's residual drifted from the true one: go on from the true residual.
                self.restarts[j] += 1
                again.append(pos)
                continue
            if why == STOPPED and not ok:
                self.notes["singular"].append(j)
            self.solution[:, j] = x[:, pos]
            self.final[j], self.converged[j] = true_norms[pos], ok
        previous_columns = block.columns
        block.keep(np.flatnonzero(live))
        if again:
            pick = torch.as_tensor(again, dtype=torch.long, device=self.device)
            state = self.recurrence.start(self.problem, x.index_select(1, pick), true_r.index_select(1, pick))
            counts = torch.as_tensor(iters[finished[again]], dtype=torch.long, device=self.device)
            block.extend(_Block(state, previous_columns[finished[again]], counts, self.device))
        return block

    def _result(self, num_products: int) -> SolveResult:
        problem = self.problem
        history = torch.stack(self.history).to("cpu", torch.float64).numpy()
        x = self.solution
        if problem.squeeze:
            x, history = x[:, 0], history[:, 0]
        converged = bool(self.converged.all())
        info = {
            "method": self.recurrence.name,
            "damping": problem.damping,
            "rtol": problem.rtol,
            "atol": problem.atol,
            "max_iters": problem.max_iters,
            "column_converged": self.converged.copy(),
            "column_iterations": self.iterations.copy(),
            "final_residual_norms": self.final.copy(),
            "rhs_norms": self.rhs_norms_h.copy(),
            "restarts": self.restarts.copy(),
            "checks": self.checks,
            **{key: sorted(value) for key, value in self.notes.items() if value},
        }
        result = SolveResult(x, converged, int(self.iterations.max(initial=0)), history, num_products, info)
        self._report(result)
        return result

    def _report(self, result: SolveResult) -> None:
        name, m = self.recurrence.name, len(self.converged)
        relative = result.relative_residuals
        logger.info("%s: %d/%d right-hand side(s) converged in at most %d iterations, %d products; largest "
                    "relative residual %.3g.", name, int(self.converged.sum()), m, result.iterations,
                    result.num_products, float(relative.max(initial=0.0)))
        if result.converged:
            return
        bad = np.flatnonzero(~self.converged)
        singular = result.info.get("singular", [])
        indefinite = result.info.get("not_positive_definite", [])
        others = [j for j in bad if j not in singular and j not in indefinite]
        advice = []
        if singular:
            advice.append(
                f"column(s) {_few(singular)} stopped at a least-squares solution where the residual no longer "
                f"falls: the operator is singular (or nearly so) and b has a part outside its range, so no x meets "
                f"the tolerance; damping regularises the system"
            )
        if indefinite:
            advice.append(
                f"column(s) {_few(indefinite)} met a direction of non-positive curvature (the operator is not "
                f"positive definite); use minres, or more damping"
            )
        if others:
            advice.append(
                f"column(s) {_few(others)} ran out of iterations or stalled: raise max_iters (now "
                f"{self.problem.max_iters}), add damping or a preconditioner, or loosen rtol (now "
                f"{self.problem.rtol:.1e}; in {self.problem.rhs.dtype} rounding limits how far the residual can fall)"
            )
        warnings.warn(
            f"{name}: {len(bad)} of {m} right-hand side(s) did not converge (largest relative residual "
            f"{float(relative[bad].max()):.3g}); " + "; ".join(advice) + ".",
            ConvergenceWarning,
            stacklevel=user_stacklevel(),
        )


def _few(columns: list) -> str:
    return ", ".join(map(str, columns[:5])) + (", ..." if len(columns) > 5 else "")
