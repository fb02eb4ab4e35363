"""The ways a model operator can compute a product, and what each has cost on the operator's own products.

A :class:`Plan` is one way to multiply a micro-batch's Hessian by a block of b vectors:

* ``backend``: ``"double_backward"`` (backpropagate through the gradient's graph),
  ``"forward_over_reverse"`` (``torch.func.jvp`` of ``torch.func.grad``) or ``"linearize"``
  (``torch.func.linearize`` of the gradient, kept per micro-batch: later products are one jvp);
* ``batched``: the b vectors in one vmapped pass, or one after another;
* ``kept``: reusing work kept per micro-batch inside :meth:`~.Operator.frozen` (the first-order
  graph, or the linearized gradient), or computing the micro-batch afresh.

:class:`PlanBook` records, for each plan and block width, the seconds of the products it timed
(real products of the operator, never extra ones), the peak device memory of those products on
CUDA, the cost of building kept work, and the widest block that fitted in device memory. From
these it predicts the cost of widths it has not timed, and it tells whether the double backward
runs slowly enough for other plans to be worth a trial (:meth:`PlanBook.second_pass_is_slow`).
:func:`next_trial` decides which plan the next product of a width times.

The cost model of a width b not timed yet, for one family of plans (a backend, fresh or kept):

* fresh plans share one forward and one first backward pass between the b vectors, so a product
  costs ``T(b) = F + J b``: F and J are fitted to the widths timed (one width: F is the shared
  pass measured when kept work was built, :meth:`PlanBook.shared_seconds`);
* kept plans share nothing more per product, so their cost per vector is that of the nearest
  width timed.
"""

from __future__ import annotations

import math
from typing import Iterable, NamedTuple, Optional

#: A plan whose kept single product costs at least this many times the forward and first backward
#: pass that kept work saves is slow in its second pass. Per vector a block of b costs about
#: ``shared / b`` plus a tangent pass of ``2 kappa`` shared passes (kappa = 0.4-0.95 measured: its
#: arithmetic is that of two gradients, at the gradient's speed or below), and block Lanczos needs
#: about ``b ** 0.55`` times the products (``solvers/auto.py``): blocks can only pay where a kept
#: product costs more than ``b ** 0.55 (2 kappa + 1 / b)`` shared passes, 3.1 for b = 2 at kappa =
#: 0.8. Measured: 1.4 (MLP, CNN) and 2.4 (transformer) on a CPU, 2.0 (GPT) and 5.1 (ResNet-18) on an
#: H200, where only ResNet-18's blocks were several times cheaper per vector.
SLOW_SECOND_PASS = 3.0
#: Inside :meth:`~.Operator.frozen`, a block plan that recomputes the forward pass instead of
#: reusing the kept graph is tried where the kept single product costs at least this many times the
#: shared forward and first backward pass: per vector such a block costs about ``shared / b`` plus a
#: tangent pass of about two gradient passes, which can only undercut a kept second pass this slow.
FRESH_BLOCK_TRIAL = 1.8
#: Products faster than this are never second-guessed: timings of milliseconds on a shared machine
#: are noise, and a whole solve of such products is over before another plan could pay for its trial.
MIN_TRIAL_SECONDS = 0.02
#: A candidate timed within this factor of the best one is timed a second time (its smaller time
#: counts), which discounts one-time warm-up; slower ones are dropped after one trial.
RETRY_MARGIN = 1.25
#: A candidate predicted (from other widths) to cost this many times the best candidate is not tried.
SKIP_FACTOR = 1.5


class Plan(NamedTuple):
    """One way to compute a micro-batch's product (see the module docstring)."""

    backend: str
    batched: bool
    kept: bool = False

    def __str__(self) -> str:
        name = self.backend.replace("_", "-")
        if self.batched:
            name += " batched"
        return f"kept {name}" if self.kept else name

    @property
    def pair(self) -> tuple[str, bool]:
        """``(backend, batched)``, the form of ``HVPOperator.backend_used``."""
        return self.backend, self.batched


SAFE = Plan("double_backward", False)


class PlanBook:
    """What each plan cost on an operator's products (see the module docstring).

    Times are seconds per product of the whole dataset at a block width; peaks are bytes of device
    memory above the product's start (CUDA only). :meth:`force` fixes a cost (tests, and benchmarks
    that replay another machine's measurements); forced costs win over measured ones.
    """

    def __init__(self) -> None:
        self._times: dict[tuple[Plan, int], list[float]] = {}
        self._forced: dict[tuple[Plan, int], float] = {}
        self._peaks: dict[tuple[Plan, int], int] = {}
        self._builds: dict[tuple[Plan, int], float] = {}  # a product that also built the kept work
        self._forced_shared: Optional[float] = None
        self._shared: list[float] = []  # the forward and first backward pass, timed while building
        self._ratios: list[float] = []  # a kept product over that pass, paired by micro-batch
        self.limits: dict[Plan, int] = {}  # the widest block each plan fitted in device memory
        self.setup: dict[Plan, float] = {}  # seconds to build a kept plan's work, per product

    # -- recording ------------------------------------------------------------------------------
    def record(self, plan: Plan, width: int, seconds: float, peak_bytes: Optional[int] = None) -> None:
        """A timed product of ``width`` vectors by ``plan`` (its kept work, if any, existed already)."""
        self._times.setdefault((plan, width), []).append(float(seconds))
        if peak_bytes is not None:
            self._peaks[(plan, width)] = max(int(peak_bytes), self._peaks.get((plan, width), 0))

    def record_build(self, plan: Plan, width: int, seconds: float, peak_bytes: Optional[int] = None,
                     shared: Optional[float] = None, ratio: Optional[float] = None) -> None:
        """A timed product of a kept plan that built its kept work on the way. Where timed micro-batch
        by micro-batch: ``shared``, the forward and first backward pass it built (see
        :meth:`shared_seconds`), and ``ratio``, its product of one vector over that pass, paired
        micro-batch by micro-batch (see :meth:`second_pass_ratio`)."""
        self._builds[(plan, width)] = min(float(seconds), self._builds.get((plan, width), math.inf))
        if shared is not None and shared > 0:
            self._shared.append(float(shared))
        if ratio is not None and ratio > 0:
            self._ratios.append(float(ratio))
        if peak_bytes is not None:
            self._peaks[(plan, width)] = max(int(peak_bytes), self._peaks.get((plan, width), 0))

    def force(self, plan: Plan, width: int, seconds: float, peak_bytes: Optional[int] = None) -> None:
        """Fix the cost of ``plan`` at ``width`` (seconds per product); later measurements do not change it."""
        if not (seconds > 0 and math.isfinite(seconds)):
            raise ValueError(f"seconds must be a positive finite number, got {seconds!r}.")
        self._forced[(plan, width)] = float(seconds)
        if peak_bytes is not None:
            self._peaks[(plan, width)] = int(peak_bytes)

    def force_shared(self, seconds: float) -> None:
        """Fix the cost of the forward and first backward pass that kept work saves (see :meth:`shared_seconds`)."""
        self._forced_shared = float(seconds)

    def note_out_of_memory(self, plan: Plan, width: int) -> int:
        """``plan`` ran out of device memory at ``width``: remember half of it as its widest; returns that."""
        limit = max(1, width // 2)
        self.limits[plan] = min(limit, self.limits.get(plan, limit))
        return self.limits[plan]

    # -- reading --------------------------------------------------------------------------------
    def trials(self, plan: Plan, width: int) -> int:
        """How many products of this plan and width were timed (3 for a forced or derived cost)."""
        if (plan, width) in self._forced or self._derived(plan, width) is not None:
            return 3
        return len(self._times.get((plan, width), ()))

    def seconds(self, plan: Plan, width: int) -> Optional[float]:
        """Seconds per product of ``plan`` at ``width``: forced, or the smallest timed, or exactly
        derived from another width (a kept double backward one vector at a time costs ``width``
        kept single products); None when unknown."""
        if (plan, width) in self._forced:
            return self._forced[(plan, width)]
        times = self._times.get((plan, width))
        if times:
            return min(times)
        return self._derived(plan, width)

    def _derived(self, plan: Plan, width: int) -> Optional[float]:
        if plan.kept and not plan.batched and width > 1 and plan.backend == "double_backward":
            single = self._known(plan, 1)
            return None if single is None else width * single
        return None

    def _known(self, plan: Plan, width: int) -> Optional[float]:
        if (plan, width) in self._forced:
            return self._forced[(plan, width)]
        times = self._times.get((plan, width))
        return min(times) if times else None

    def peak_bytes(self, plan: Plan, width: int) -> Optional[int]:
        """The peak device memory of a product of ``plan`` at ``width`` (CUDA), if measured."""
        return self._peaks.get((plan, width))

    def shared_seconds(self) -> Optional[float]:
        """Seconds of the forward and first backward pass that kept work saves in every product:
        timed micro-batch by micro-batch while kept work was built (the smallest such time), or else a
        building product less a kept product of the same plan and width; None until timed."""
        if self._forced_shared is not None:
            return self._forced_shared
        if self._shared:
            return min(self._shared)
        shared = [build - kept for (plan, width), build in self._builds.items()
                  if (kept := self._known(plan, width)) is not None and build > kept]
        return min(shared) if shared else None

    def best_single(self, plans: Optional[Iterable[Plan]] = None) -> Optional[tuple[Plan, float]]:
        """The cheapest timed single-vector plan (among ``plans``, default all) and its seconds."""
        known = [(plan, seconds) for plan in (plans if plans is not None else self._plans())
                 if (seconds := self.seconds(plan, 1)) is not None]
        return min(known, key=lambda item: item[1]) if known else None

    def second_pass_ratio(self) -> Optional[float]:
        """How many times the forward and first backward pass it saves a kept product costs, per
        vector: timed micro-batch by micro-batch while kept work was built (the median over them;
        forced costs win), or else the cheapest kept single product over :meth:`shared_seconds`; None
        until timed."""
        if self._ratios and self._forced_shared is None:
            ordered = sorted(self._ratios)
            return ordered[len(ordered) // 2]
        shared = self.shared_seconds()
        kept = self.best_single([plan for plan in self._plans() if plan.kept])
        if shared is None or kept is None or shared <= 0:
            return None
        return kept[1] / shared

    def second_pass_is_slow(self, threshold: float = SLOW_SECOND_PASS) -> bool:
        """Whether the kept single product costs at least ``threshold`` times the shared forward and
        first backward pass, and at least :data:`MIN_TRIAL_SECONDS` (then plans without the double
        backward, and blocks, are worth a trial)."""
        ratio = self.second_pass_ratio()
        kept = self.best_single([plan for plan in self._plans() if plan.kept])
        return ratio is not None and ratio >= threshold and kept is not None and kept[1] >= MIN_TRIAL_SECONDS

    def _plans(self) -> set[Plan]:
        return {plan for plan, _ in (*self._times, *self._forced, *self._builds)}

    def measured(self) -> set[tuple[Plan, int]]:
        """Every (plan, width) with a timed or forced cost."""
        return {*self._times, *self._forced}

    # -- predicting -----------------------------------------------------------------------------
    def predict(self, plan: Plan, width: int) -> Optional[float]:
        """Seconds per product of ``plan`` at ``width``: known, or from the widths timed for its
        family (see the module docstring); None when nothing of the family was timed."""
        known = self.seconds(plan, width)
        if known is not None:
            return known
        points = self._family_points(plan)
        if not points:
            return None
        if plan.kept:
            nearest = min(points, key=lambda point: abs(math.log(point[0] / width)))
            return nearest[1] / nearest[0] * width
        if len({w for w, _ in points}) >= 2:
            fixed, per_vector = _affine_fit(points)
        else:
            w0, t0 = min(points, key=lambda point: point[1] / point[0])
            shared = self.shared_seconds()
            fixed = min(shared, t0) if shared is not None else 0.0
            per_vector = (t0 - fixed) / w0
        return fixed + per_vector * width

    def _family_points(self, plan: Plan) -> list[tuple[int, float]]:
        """(width, seconds) timed for plans of ``plan``'s family: the same backend and keeping, and
        the same batching (a single vector belongs to both)."""
        points = []
        for other in self._plans():
            if other.backend != plan.backend or other.kept != plan.kept:
                continue
            for (p, width) in {*self._times, *self._forced}:
                if p != other or (other.batched != plan.batched and width != 1):
                    continue
                seconds = self.seconds(other, width)
                if seconds is not None:
                    points.append((width, seconds))
        return points

    def widest(self, plan: Plan, width: int, free_bytes: Optional[int]) -> int:
        """The widest block up to ``width`` that ``plan`` may take: below the width that ran out of
        memory, and, with ``free_bytes`` given, with a predicted peak (measured peaks grown in
        proportion to the width) that fits in 90% of it."""
        width = min(width, self.limits.get(plan, width))
        if free_bytes is None:
            return width
        measured = [(w, peak) for (p, w), peak in self._peaks.items() if p == plan and peak > 0]
        if not measured:
            return width
        per_vector = max(peak / w for w, peak in measured)
        fitting = int(0.9 * free_bytes // per_vector) if per_vector > 0 else width
        return max(1, min(width, fitting))

    def summary(self) -> dict:
        """Every timed plan as ``{"<plan> x<width>": {"seconds": ..., "per_vector": ..., "trials": ...,
        "peak_bytes": ...}}``, plus the shared pass and the memory limits, for logs and results."""
        out: dict = {}
        for plan, width in sorted({*self._times, *self._forced}, key=lambda item: (str(item[0]), item[1])):
            seconds = self.seconds(plan, width)
            entry = {"seconds": seconds, "per_vector": seconds / width, "trials": self.trials(plan, width)}
            if (plan, width) in self._forced:
                entry["forced"] = True
            if (plan, width) in self._peaks:
                entry["peak_bytes"] = self._peaks[(plan, width)]
            out[f"{plan} x{width}"] = entry
        shared = self.shared_seconds()
        if shared is not None:
            out["shared forward and first backward"] = {"seconds": shared}
        for plan, seconds in self.setup.items():
            out.setdefault(f"{plan} x1", {})["setup_seconds"] = seconds
        if self.limits:
            out["widest that fitted"] = {str(plan): width for plan, width in self.limits.items()}
        return out


def _affine_fit(points: list[tuple[int, float]]) -> tuple[float, float]:
    """Least-squares ``T(b) = F + J b`` with F >= 0 and J > 0."""
    widths = [float(w) for w, _ in points]
    times = [t for _, t in points]
    mean_w, mean_t = sum(widths) / len(widths), sum(times) / len(times)
    spread = sum((w - mean_w) ** 2 for w in widths)
    slope = sum((w - mean_w) * (t - mean_t) for w, t in zip(widths, times)) / spread
    fixed = mean_t - slope * mean_w
    if fixed < 0 or slope <= 0:  # timing noise: fall back to a cost proportional to the width
        ratio = min(t / w for w, t in zip(widths, times))
        return 0.0, ratio
    return fixed, slope


def next_trial(book: PlanBook, candidates: list[Plan], width: int) -> Optional[Plan]:
    """The candidate the next product of ``width`` vectors should time, or None when every candidate
    worth a trial has had its trials (then :func:`cheapest` is the choice).

    Candidates are tried in the order given; each once, except one predicted from other widths to
    cost :data:`SKIP_FACTOR` times the best; then a second time each one that came within
    :data:`RETRY_MARGIN` of the best."""
    best = min((s for p in candidates if (s := book.seconds(p, width)) is not None), default=None)
    guesses = [s for p in candidates if (s := book.predict(p, width)) is not None]
    floor = min(guesses + ([best] if best is not None else []), default=None)
    for plan in candidates:
        if book.trials(plan, width) == 0:
            guess = book.predict(plan, width)
            if guess is not None and floor is not None and guess >= SKIP_FACTOR * floor:
                continue
            return plan
    if best is None:
        return None
    for plan in candidates:
        seconds = book.seconds(plan, width)
        if book.trials(plan, width) == 1 and seconds is not None and seconds <= RETRY_MARGIN * best:
            return plan
    return None


def cheapest(book: PlanBook, candidates: list[Plan], width: int) -> Optional[Plan]:
    """The timed candidate with the smallest seconds per product at ``width`` (None if none was timed)."""
    timed = [(s, i) for i, p in enumerate(candidates) if (s := book.seconds(p, width)) is not None]
    return candidates[min(timed)[1]] if timed else None
