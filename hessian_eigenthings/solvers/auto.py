"""``mode="auto"``: thick-restart Lanczos, or block Lanczos at the width predicted to be faster, by measurement.

A solve's time is the products it needs times the seconds of one product. The products per solver
come from a model calibrated on measured solves (below); the seconds per product come from the
operator's own products, timed as they happen (:class:`~hessian_eigenthings.operators.plans.PlanBook`
of an :class:`~hessian_eigenthings.operators.hvp.HVPOperator`). Nothing is computed twice:

1. Thick-restart Lanczos starts. Its first products build the kept graphs and time the kept single
   product against the forward and first backward pass it saves (the operator times them anyway).
2. After :data:`SCREEN_AFTER` products: where the kept product costs less than
   :data:`~hessian_eigenthings.operators.plans.SLOW_SECOND_PASS` times that pass, no block can make
   up for the extra products block Lanczos needs (see ``operators/plans.py``): thick-restart Lanczos
   simply goes on (every CPU workload measured; no product is spent on the choice).
3. Otherwise, once the operator has also timed a single product by forward-over-reverse, one block
   product of :data:`PROBE_WIDTH` vectors is timed: the start block block Lanczos would use. The
   predicted time of thick-restart Lanczos is compared with that of block Lanczos at each width of
   :data:`BLOCK_WIDTHS` that fits in memory (costs of widths not timed are interpolated, see
   :meth:`PlanBook.predict`). Block Lanczos wins: it starts over and its first block product is the
   one already computed (answered from it, :class:`_Replay`); thick-restart wins: it goes on, and
   only the probe's products were spent on the choice.

Where the operator reports no costs (a dense matrix, a user's operator, a wrapper), thick-restart
Lanczos runs, as it is the fastest whenever blocks cost as much per vector as single vectors.

The product model: block Lanczos at width b needs about ``b ** 0.55`` times the products of
thick-restart Lanczos for the same pairs and tolerance. Fitted to the benchmark workloads
(``benchmarks/block_products.py``: MLP, CNN and transformer, top 1, 5 and 10, tol 1e-4, widths 2-16;
the ratio was 1.2-1.7 at b=2, 1.6-2.9 at 4, 2.7-4.4 at 8 and 4.1-8.9 at 16, with no trend in k) and
to the H200 solves (ResNet-18 top-1 at b=2: 1.09; GPT top-1 at b=2: 1.67; GPT top-10 at b=8:
2.23), whose mean exponent over all of them is 0.55. Thick-restart Lanczos itself needs about
``15 + 4k`` products (8-61 measured), which only matters against one-time costs.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .. import distributed
from ..operators.base import Operator, WrappingOperator, as_operator, runs_frozen
from ..operators.plans import MIN_TRIAL_SECONDS, SLOW_SECOND_PASS, PlanBook
from ..utils import check_num_eigenthings, check_positive_int, check_which, logger
from .block_lanczos import block_lanczos
from .contract import check_tol, pick, resolve_seed
from .krylov_schur import default_basis_size, largest_basis, start_block
from .memory import native_plan
from .result import EigenResult, check_init_vectors, random_vectors
from .thick_restart import thick_restart_lanczos

#: Products of block Lanczos at width b are about ``b ** BLOCK_PRODUCT_EXPONENT`` times those of
#: thick-restart Lanczos (see the module docstring).
BLOCK_PRODUCT_EXPONENT = 0.55
#: The block widths ``auto`` considers.
BLOCK_WIDTHS = (2, 4, 8, 16)
#: The width of the block product timed to predict every width.
PROBE_WIDTH = 8
#: Products of thick-restart Lanczos after which the costs are read: the one that builds the kept
#: graphs, then three kept ones (the operator times each).
SCREEN_AFTER = 4
#: A block product is answered from the probe where its columns lie in the probe's span up to this
#: many units of rounding (the engine itself adds noise of one unit to every product).
REPLAY_TOLERANCE = 16


def single_products(num_eigenthings: int) -> float:
    """Products thick-restart Lanczos needs for the top k pairs, about (measured 8-61 for k = 1-10)."""
    return 15.0 + 4.0 * num_eigenthings


def block_products(num_eigenthings: int, width: int) -> float:
    """Products block Lanczos at ``width`` needs for the top k pairs, about (see the module docstring)."""
    return single_products(num_eigenthings) * width ** BLOCK_PRODUCT_EXPONENT


@dataclass
class AutoReport:
    """What ``mode="auto"`` measured and chose (``result.info["auto"]``)."""

    solver: str = "thick_restart"
    block_size: int = 1
    reason: str = ""
    decided_after_products: int = 0
    probe_products: int = 0
    replayed_products: int = 0
    second_pass_ratio: Optional[float] = None
    predicted_seconds: dict = field(default_factory=dict)
    plan_costs: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "solver": self.solver, "block_size": self.block_size, "reason": self.reason,
            "decided_after_products": self.decided_after_products, "probe_products": self.probe_products,
            "replayed_products": self.replayed_products, "second_pass_ratio": self.second_pass_ratio,
            "predicted_seconds": self.predicted_seconds, "plan_costs": self.plan_costs,
            "product_model": f"block Lanczos at width b: b**{BLOCK_PRODUCT_EXPONENT} x the products of thick-restart",
        }


class _Switch(Exception):
    """Raised from inside a product of thick-restart Lanczos when block Lanczos is predicted faster."""

    def __init__(self, width: int) -> None:
        super().__init__(f"switch to block Lanczos with blocks of {width}")
        self.width = width


@runs_frozen
def auto_eigensolve(operator: Any, num_eigenthings: int = 10, **keywords: Any) -> EigenResult:
    """Top eigenpairs by the solver predicted fastest from the operator's measured product costs.

    Takes every keyword of :func:`thick_restart_lanczos` (and ``block_size``, which chooses block
    Lanczos at that width; see :func:`~hessian_eigenthings.solvers.registry.choose_auto` for the
    options that choose a solver by themselves). See the module docstring for how it chooses.

    Returns:
        The :class:`EigenResult` of the solver that ran, with ``num_products`` counting every
        product computed for the call (the probe's included, a product answered from it not twice)
        and ``info["auto"]`` saying what was measured, predicted and chosen.
    """
    from .registry import choose_auto, run_chosen

    chosen = choose_auto(keywords)
    if chosen != "thick_restart":
        return run_chosen("auto", chosen, operator, num_eigenthings, keywords)
    keywords = {name: value for name, value in keywords.items() if name != "block_size"}
    op = as_operator(operator)
    book = getattr(op, "plans", None)
    if not isinstance(book, PlanBook) or op.is_stochastic:
        result = thick_restart_lanczos(op, num_eigenthings, **keywords)
        result.info["auto"] = AutoReport(reason="the operator reports no product costs: thick-restart Lanczos, "
                                                "the fastest where blocks cost as much per vector").as_dict()
        return result
    session = _Session(op, book, num_eigenthings, keywords)
    return session.run()


class _Session:
    """One ``auto`` solve: the costs read, the probe, the choice and the solve."""

    def __init__(self, op: Operator, book: PlanBook, num_eigenthings: Any, keywords: dict) -> None:
        self.op, self.book = op, book
        self.k = check_num_eigenthings(num_eigenthings, op.size)
        init, init_name = pick("auto", "init_vecs", keywords.pop("init_vecs", None), "init_vec",
                               keywords.pop("init_vec", None))
        self.init, self.init_name = init, init_name
        keywords["seed"] = resolve_seed(keywords.get("seed", 0))  # the same for the probe and the solver
        # checked here too, as the probe may be the call's first products
        check_which(keywords.get("which", "LM"))
        check_tol(keywords.get("tol", 1e-6))
        self.keywords = keywords
        self.report = AutoReport()
        self.products = 0  # products of thick-restart Lanczos so far
        self.settled = False
        self.probe: Optional[tuple[Tensor, Tensor]] = None
        self.probe_block: Optional[Tensor] = None  # the probe's columns before orthonormalising

    # -- the solve --------------------------------------------------------------------------------
    def run(self) -> EigenResult:
        start = self.op.num_products
        init = {self.init_name: self.init} if self.init is not None else {}
        ratio, _, _ = self._screen()
        if not math.isnan(ratio):  # the single products' costs are known from earlier products: decide now
            self.decide()
        try:
            if self.report.solver == "block_lanczos":
                raise _Switch(self.report.block_size)
            watched = self.op if self.settled else _Watch(self.op, self.after_product)
            result = thick_restart_lanczos(watched, self.k, **init, **self.keywords)
        except _Switch as switch:
            result = self.run_blocks(switch.width)
        if not self.settled:
            self.report.reason = "the solve ended before the costs were known"
        result.num_products = self.op.num_products - start
        self.report.plan_costs = self.book.summary()
        result.info["auto"] = self.report.as_dict()
        return result

    def run_blocks(self, width: int) -> EigenResult:
        """Block Lanczos at ``width``, its first block answered from the probe where it lies in its span."""
        keywords = dict(self.keywords)
        op: Operator = self.op
        if self.probe is not None:
            inputs, outputs = self.probe
            self.probe = None
            op = _Replay(self.op, inputs, outputs)
            starts = self._starts()
            if width < inputs.shape[1] and starts is not None:
                # the block the caller's vectors start alone (width divides the probe's, so its
                # columns are sums of the probe's), or, with fewer vectors than columns, the probe's
                # first columns: each a caller's vector or one of the probe's random ones
                if starts.shape[1] >= width:
                    keywords[self.init_name] = self.init
                else:
                    keywords["init_vecs"] = self.probe_block[:, :width].T
            elif width != inputs.shape[1]:
                # the probe's columns start the block: all of it lies in their span for a narrower
                # block, its first columns for a wider one (see start_block)
                keywords["init_vecs"] = inputs.T
            elif self.init is not None:  # the very block of the probe is built again
                keywords[self.init_name] = self.init
        elif self.init is not None:
            keywords[self.init_name] = self.init
        result = block_lanczos(op, self.k, block_size=width, **keywords)
        if isinstance(op, _Replay):
            self.report.replayed_products = op.replayed
        return result

    # -- reading the costs ------------------------------------------------------------------------
    def after_product(self) -> None:
        """Called after each product of thick-restart Lanczos, until the choice is made."""
        self.products += 1
        if self.settled or self.products < SCREEN_AFTER:
            return
        ratio, slow, known = self._screen()
        if self.products == SCREEN_AFTER and not slow and not known:
            self.settle_single(ratio)
            return
        if self.products == SCREEN_AFTER and slow:
            return  # the next product times forward-over-reverse for single vectors: wait for it
        self.decide()
        if self.report.solver == "block_lanczos":
            self.op.flush_checks()  # the products so far are checked before they are left behind
            raise _Switch(self.report.block_size)

    def settle_single(self, ratio: float) -> None:
        self.settled = True
        self.report.decided_after_products = self.products
        self.report.second_pass_ratio = None if math.isnan(ratio) else ratio
        shown = "unknown" if math.isnan(ratio) else f"{ratio:.2f}x"
        self.report.reason = (f"the kept single product costs {shown} the forward and first backward pass it "
                              f"saves (below {SLOW_SECOND_PASS}x): no block pays for the extra products")
        logger.info("auto: thick_restart (%s).", self.report.reason)

    def decide(self) -> None:
        """Time the probe if needed, predict every option and choose (the same on every rank)."""
        self.settled = True
        self.report.decided_after_products = self.products
        ratio, slow, known = self._screen()
        self.report.second_pass_ratio = None if math.isnan(ratio) else ratio
        if not slow and not known:
            self.settle_single(ratio)
            return
        widths = self._widths()
        if not widths:
            self.report.reason = (
                "max_steps was given: it caps the fills of the basis, and block Lanczos needs more of them"
                if self.keywords.get("max_steps") is not None else
                "no block width fits this problem (k + 3b <= n, its default basis within n) or its memory")
            return
        if not known:
            self._time_probe(min(PROBE_WIDTH, max(widths)))
        options = self._options(widths)
        labels = sorted(options)
        seconds = _agreed([options[label][1] for label in labels], self.op)
        predicted = dict(zip(labels, seconds))
        self.report.predicted_seconds = {label: value for label, value in predicted.items() if math.isfinite(value)}
        best = min(predicted, key=predicted.__getitem__)
        if not math.isfinite(predicted[best]):
            self.report.reason = "no product cost was measured"
            return
        self.report.solver, self.report.block_size = ("thick_restart", 1) if best == "thick_restart" else \
            ("block_lanczos", options[best][0])
        self.report.reason = "the smallest predicted time: " + ", ".join(
            f"{label} {value:.3g} s" for label, value in sorted(self.report.predicted_seconds.items(),
                                                                 key=lambda item: item[1]))
        logger.info("auto: %s%s (%s).", self.report.solver,
                    f" with blocks of {self.report.block_size}" if self.report.block_size > 1 else "",
                    self.report.reason)

    def _screen(self) -> tuple[float, bool, bool]:
        """(the kept single product over the pass it saves, whether that is slow (see
        :meth:`PlanBook.second_pass_is_slow`), whether block costs were measured), agreed by every rank."""
        kept = self.book.best_single([plan for plan, _ in self.book.measured() if plan.kept])
        known = any(width > 1 for _, width in self.book.measured())
        ratio, seconds, known_share = _agreed(
            [self.book.second_pass_ratio(), None if kept is None else kept[1], float(known)], self.op)
        slow = ratio >= SLOW_SECOND_PASS and seconds >= MIN_TRIAL_SECONDS
        return ratio, slow, known_share == 1.0

    def _widths(self) -> list[int]:
        """The widths of :data:`BLOCK_WIDTHS` that the problem admits and whose basis fits the memory."""
        n, k = self.op.size, self.k
        given = self.keywords.get("num_lanczos_vectors")
        cap = self.keywords.get("max_basis_bytes")
        free = _free_device_bytes(self.op.device)
        if self.keywords.get("max_steps") is not None:
            # a cap on the fills of the basis, which block Lanczos needs more of for the same pairs
            return []
        widths = []
        for width in BLOCK_WIDTHS:
            if k + 3 * width > n:
                continue
            if given is None and default_basis_size(k, width, n) < default_basis_size(k, width, sys.maxsize):
                continue  # n caps its basis: it would restart more often than the product model says
            if given is not None and not k + 2 * width <= check_positive_int(given, "num_lanczos_vectors") <= \
                    largest_basis(width, n):
                continue
            # the basis the product model was measured with (a smaller one would restart more often)
            need = native_plan(block=True)(n, k, self.op.dtype, self.op.device,
                                           {"block_size": width, "num_lanczos_vectors": given})
            if cap is not None and need.peak_bytes > check_positive_int(cap, "max_basis_bytes"):
                continue
            if free is not None and need.device_bytes > 0.9 * free:
                continue
            widths.append(width)
        return widths

    def _time_probe(self, width: int) -> None:
        """One block product of ``width`` vectors, the start block block Lanczos would use (timed by
        the operator); kept for the solver that may follow."""
        block = start_block(self._starts(), random_vectors(self.op, width, self.keywords["seed"]))
        self.probe_block = block
        inputs = torch.linalg.qr(block)[0]
        outputs = self.op.apply_block(inputs)
        self.probe = (inputs, outputs)
        self.report.probe_products = width

    def _starts(self) -> Optional[Tensor]:
        if self.init is None:
            return None
        return check_init_vectors(self.init, self.op, self.op.size, self.init_name)

    def _options(self, widths: list[int]) -> dict[str, tuple[int, float]]:
        """{label: (width, predicted seconds)} for thick-restart Lanczos and block Lanczos at each width."""
        k = self.k
        single = self.book.best_single()
        options: dict[str, tuple[int, float]] = {}
        options["thick_restart"] = (1, single_products(k) * single[1] if single is not None else math.inf)
        block_plans = {plan for plan, width in self.book.measured() if width > 1}
        free = _free_device_bytes(self.op.device)
        for width in widths:
            per_product = []
            for plan in block_plans:
                if self.book.widest(plan, width, free) < width:
                    continue  # it did not fit, or is predicted not to
                seconds = self.book.predict(plan, width)
                if seconds is not None:
                    per_product.append(seconds)
            if per_product:
                options[f"block_lanczos b={width}"] = (width, block_products(k, width) * min(per_product) / width)
        return options


class _Watch(WrappingOperator):
    """``operator`` as seen by thick-restart Lanczos in ``auto``: every product passes through, and
    ``after_product`` is called after each one (it may time a probe and raise :class:`_Switch`)."""

    def __init__(self, operator: Operator, after_product: Callable[[], None]) -> None:
        super().__init__([operator], operator.size)
        self.base = operator
        self.after_product = after_product

    @property
    def shown_operator(self) -> Operator:
        """The operator that messages name (this wrapper is the solver's business, not the caller's)."""
        return self.base

    def _matvec(self, vec: Tensor) -> Tensor:
        out = self.base.apply(vec)
        self.after_product()
        return out

    def _matmat(self, mat: Tensor) -> Tensor:
        out = self.base.apply_block(mat)
        self.after_product()
        return out


class _Replay(WrappingOperator):
    """``operator`` whose first block product is answered from products already computed.

    ``inputs`` (n, p) orthonormal columns and ``outputs`` = operator @ inputs. A column of the first
    block asked for that lies in the span of ``inputs`` (its distance to it at most
    :data:`REPLAY_TOLERANCE` units of rounding) is answered as the same combination of ``outputs``;
    the other columns, and every later product, are computed.
    """

    def __init__(self, operator: Operator, inputs: Tensor, outputs: Tensor) -> None:
        super().__init__([operator], operator.size)
        self.base = operator
        self._memo: Optional[tuple[Tensor, Tensor]] = (inputs, outputs)
        self.replayed = 0

    @property
    def shown_operator(self) -> Operator:
        """The operator that messages name (this wrapper is the solver's business, not the caller's)."""
        return self.base

    def _matvec(self, vec: Tensor) -> Tensor:
        if self._memo is None:
            return self.base.apply(vec)
        return self._matmat(vec.unsqueeze(1)).squeeze(1)

    def _matmat(self, mat: Tensor) -> Tensor:
        if self._memo is None:
            return self.base.apply_block(mat)
        inputs, outputs = self._memo
        self._memo = None
        coefficients, inside = span_coefficients(inputs, mat, REPLAY_TOLERANCE * torch.finfo(mat.dtype).eps)
        out = torch.empty_like(mat)
        if inside.any():
            out[:, inside] = outputs @ coefficients[:, inside].to(outputs.dtype)
        rest = ~inside
        if rest.any():
            missing = mat[:, rest]
            out[:, rest] = self.base.apply_block(missing) if missing.shape[1] > 1 else \
                self.base.apply(missing[:, 0]).unsqueeze(1)
        self.replayed = int(inside.sum())
        return out


def span_coefficients(basis: Tensor, mat: Tensor, tol: float, rows: int = 2**20) -> tuple[Tensor, Tensor]:
    """Least-squares ``C`` with ``mat ≈ basis @ C`` and, per column, whether its residual is at most
    ``tol`` times its norm; computed in float64, ``rows`` rows at a time (no float64 copy of the
    whole basis). ``basis`` (n, p) must have independent columns; ``mat`` is (n, w).

    Returns:
        (C (p, w) float64 on the device, inside (w,) bool on the device).
    """
    p, w = basis.shape[1], mat.shape[1]
    gram = torch.zeros(p, p, dtype=torch.float64, device=basis.device)
    cross = torch.zeros(p, w, dtype=torch.float64, device=basis.device)
    for start in range(0, basis.shape[0], rows):
        part = basis[start : start + rows].double()
        gram += part.T @ part
        cross += part.T @ mat[start : start + rows].double()
    coefficients = torch.linalg.solve(gram, cross)
    residual = torch.zeros(w, dtype=torch.float64, device=basis.device)
    norm = torch.zeros(w, dtype=torch.float64, device=basis.device)
    for start in range(0, basis.shape[0], rows):
        target = mat[start : start + rows].double()
        residual += ((target - basis[start : start + rows].double() @ coefficients) ** 2).sum(dim=0)
        norm += (target**2).sum(dim=0)
    conditioned = torch.linalg.cond(gram) < 1e4
    inside = (residual.sqrt() <= tol * norm.sqrt()) & (norm > 0) & conditioned
    return coefficients, inside


def _free_device_bytes(device: torch.device) -> Optional[int]:
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free)


def _agreed(values: list[Optional[float]], op: Operator) -> list[float]:
    """``values`` (None as NaN) averaged over the ranks of a distributed operator, so that every rank
    makes the same choice (one all-reduce); as they are otherwise. A NaN or inf on any rank stays."""
    numbers = [math.nan if value is None else float(value) for value in values]
    group = getattr(op, "process_group", None)
    if not (getattr(op, "reduce_across_ranks", False) and distributed.is_distributed(group)):
        return numbers
    tensor = torch.tensor(numbers, dtype=torch.float64, device=op.device)
    summed = distributed.all_reduce_sum(tensor, group)
    return (summed / distributed.get_world_size(group)).tolist()
