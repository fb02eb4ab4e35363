"""Hessian-vector products of a model's loss over a dataloader."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..utils import logger
from ..data import leading_dim
from .graph_cache import tensor_bytes
from .hvp_backends import (
    BACKENDS,
    FirstOrderGraph,
    LinearizedGradient,
    first_order_graph,
    forward_over_reverse,
    linearized_gradient,
    linearized_product,
    second_backward,
)
from .model_operator import ModelOperator, NonFiniteError, Tangents, rng_rewinder  # noqa: F401  (re-exported)
from .options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES
from .plans import FRESH_BLOCK_TRIAL, SAFE, Plan, PlanBook, cheapest, next_trial

_KEPT_SAFE = Plan("double_backward", False, kept=True)


class HVPOperator(ModelOperator):
    """The Hessian of ``criterion(model(inputs), targets)`` w.r.t. the model's parameters, as an operator.

    For the loss ``L(theta) = (1/N) sum_b B_b L_b(theta)`` over batches b of ``B_b`` samples (or
    ``sum_b L_b`` for a criterion that sums over samples), ``H = d^2 L / dtheta^2``. A
    micro-batch's product is computed exactly, by double backpropagation:
    ``H_b v = d/dtheta (grad L_b(theta) . v)``, the gradient taken once with its graph (the work
    kept between products inside :meth:`frozen`) and differentiated again along each ``v``; or
    as the forward-mode derivative of the gradient, ``jvp(grad L_b, theta, v)`` (see ``backend``).

    ``apply(v)`` returns ``H v`` for a flat vector ``v`` of shape (n,), laid out as the chosen
    parameters in ``model.parameters()`` order (see ``param_names`` / ``unflatten``);
    ``apply_block(V)`` returns ``H V`` for a block of shape (n, b), computing all b columns from
    one forward and first backward pass per micro-batch.

    Every product leaves torch's global random state as it was (the dataloader's shuffling
    continues from product to product on a stream of the operator's own), so a model or a loss
    that draws random numbers draws the same ones in every product.

    Args:
        model: the network. It is never changed: parameters, buffers, ``.grad``,
            ``requires_grad`` and train/eval mode are as before every call, also on error. Build a
            new operator after converting it (``model.double()``, ``model.cuda()``): a product of
            an operator whose model changed dtype or device, or got new parameter tensors, says so.
        dataloader: iterable of ``(inputs, targets)`` batches (a torch DataLoader, a list, ...), or
            one ``(inputs, targets)`` pair whose targets are a tensor (used as a single batch).
            Inputs and targets may be tensors or nested tuples/lists/mappings of tensors.
        criterion: ``criterion(outputs, targets)`` returning the loss of the batch as a scalar
            tensor: the mean over its samples (e.g. ``torch.nn.functional.cross_entropy``), or
            their sum (a loss module with ``reduction="sum"``, or a function found to sum; see
            ``reduction``).
        use_gpu: compute on CUDA when the model is on the CPU and a GPU is available (on a copy of
            the model, synced from the original before every product). A model already on a GPU is
            used where it is.
        fp16: the old spelling of ``precision="fp16"``.
        full_dataset: True: ``H`` is the Hessian of the mean loss over every sample of the
            dataloader, batches weighted by their number of samples (exact for a short last
            batch), or of the summed loss for a summing criterion. False: each product uses the
            next mini-batch (a stochastic operator).
        max_possible_gpu_samples: batches of more rows (the first dimension all their tensors
            share) are split into micro-batches of at most this many rows, whose products are
            combined exactly; bounds memory. A batch whose tensors share no first dimension (see
            ``batch_size_fn``) cannot be split exactly and is refused if it holds more samples.
        params: which parameters: None for all with ``requires_grad=True``, or names / name
            prefixes / tensors of the model (see :func:`select_parameters`).
        eval_mode: True (default) evaluates the model in eval mode, so BatchNorm uses its running
            statistics and dropout is off: the operator is deterministic and symmetric. False
            keeps the model's own modes; BatchNorm statistics are restored after each product, and
            dropout masks are drawn from a fixed seed (the same masks in every product and for
            every vector of a block) without touching the global random state.
        device: compute device; overrides ``use_gpu``. Default: the model's device.
        check_finite: raise :class:`NonFiniteError`, naming the batch, when a loss or a product is
            NaN/Inf (costs one device sync per product).
        backend: how products are computed, all exact: ``"double_backward"`` (backpropagate
            through the gradient), ``"forward_over_reverse"`` (``torch.func.jvp`` of
            ``torch.func.grad``), ``"linearize"`` (``torch.func.linearize`` of the gradient, kept
            per micro-batch inside :meth:`frozen` so that later products are one jvp; tracing
            costs about 100 gradients per micro-batch on a CPU, so it pays only over many
            products; deterministic models in eval mode only), or ``"auto"`` (default), which
            chooses per block width by timing the operator's own products (see ``batched`` and
            :mod:`hessian_eigenthings.operators.plans`): for single vectors the double backward
            (inside :meth:`frozen` through the kept graph; forward-over-reverse is tried too where
            the kept product is slow, at least 2.5x the forward and first backward pass it saves),
            for blocks also forward-over-reverse vmapped over the block, which recomputes the
            forward pass but shares it between the b vectors (inside :meth:`frozen` too: the kept
            graphs then stay for the single products). Where ``torch.func`` cannot run the model
            (in-place updates of buffers such as BatchNorm statistics in train mode, Python
            control flow on tensor values, kernels without a forward-mode derivative), it says so
            once in the log and uses double backward, one vector at a time.
        batched: for blocks of b > 1 vectors: True computes all b in one pass (vmap),
            False one vector after another on a shared first-order graph, None (default) lets
            timing decide, per block width b: the first products of width b (real products,
            nothing is computed twice) each use another candidate, once each, and a second time
            those within 25% of the fastest; then the fastest is kept. A vmapped block that runs
            out of device memory is computed in halves (recursively), and that plan's blocks are
            split so from then on.
        cache_batches: True (default) keeps the batches on the compute device after the first
            product and reuses them, instead of reading the dataloader and copying it to the
            device for every product; only while they take at most ``cache_max_bytes``. With
            ``full_dataset=True`` the operator is then fixed by the first reading (a shuffling or
            augmenting dataloader is read once). With ``full_dataset=False`` only a list or tuple of
            batches is cached (the dataloader's next batches are otherwise new ones). Call
            ``clear_batch_cache()`` after changing the data.
        cache_max_bytes: memory bound of that cache (default 1 GiB). It counts device copies and
            batches the dataloader makes afresh, not the tensors of a list already on the device.
        cache_graphs: True (default): inside :meth:`frozen` (every solver and estimator of this
            package enters it), keep each micro-batch's forward pass and gradient graph after the
            first product and reuse it, so that a later product is one backward pass through that
            graph instead of a forward and two backward passes (1.4-1.7x faster on a CPU; exact, the
            same numbers up to rounding). Only with the batches kept on the device
            (``cache_batches``) and either ``full_dataset=True`` or a list/tuple of batches (a
            stochastic operator then keeps one graph per batch it cycles through), a
            double-backward or linearize product, and not with ``eval_mode=False`` on a model with buffers
            (whose restoring would invalidate the graphs). The graphs are freed when the
            outermost ``frozen()`` block ends; they are rebuilt if a parameter or buffer is
            changed in place within it (not seen: writes through ``.data`` and fused optimizer
            kernels, which bump no version counter: do not change the model in the block). With
            ``eval_mode=False`` they are kept for all micro-batches or none (random layers).
        graph_cache_max_bytes: memory the kept graphs may take (counted as they are built: the
            tensors autograd saves, less parameters and inputs, plus the gradients).
            Micro-batches beyond it are computed afresh in every product. Default: 2 GiB on a
            CPU, 40% of the free memory of a GPU (read when the first graph is built in a
            ``frozen()`` block).
        reduction: how ``criterion`` combines the samples of a batch: ``"mean"`` (``H`` is the
            Hessian of the mean loss over all samples), ``"sum"`` (of the summed loss), or None
            (default): a loss module's own ``reduction`` (also that of a ``functools.partial``),
            and for a plain function found from the first product's data, by comparing the loss
            of a set of samples with the losses of its parts (read off the product's own outputs;
            a forward pass without gradients, in eval mode, once, where those come from
            ``torch.func`` transforms). A loss that is neither (a weighted mean, a mean over the
            non-ignored targets) gets a warning, and ``H`` is then the Hessian of the batch
            losses' mean weighted by their numbers of samples.
        batch_size_fn: ``batch_size_fn(inputs, targets) -> int``, the number of samples of a batch
            (or micro-batch), which weighs it in the mean. Default: the first dimension all its
            tensors share. Needed where they share none, e.g. a language model with inputs (B, T)
            and targets flattened to (B*T,) (``lambda x, y: x.shape[0]``); also a way to weigh
            batches by what the loss averages over (``lambda x, y: int((y != -100).sum())`` for a
            loss that ignores padding). It must count any set of rows, so that micro-batches
            weigh what their batch does (checked).
        precision: ``"exact"`` (default: the parameters' dtype, TF32 off during products, the
            user's global setting restored after), ``"tf32"`` (CUDA only), ``"bf16"`` or ``"fp16"``
            (autocast). Results and their sum over batches stay in the parameters' dtype; see
            :mod:`hessian_eigenthings.operators.precision` for the measured accuracy of each.

    Attributes:
        backend_used: {block width b: (backend, batched)} as chosen so far for products outside
            :meth:`frozen` (every micro-batch computed afresh).
        kept_graph_plan: {block width b: (backend, batched)} as chosen so far for products inside
            :meth:`frozen` (reusing kept work, or afresh where that measured faster).
        plans: the :class:`~hessian_eigenthings.operators.plans.PlanBook` of what each plan cost on
            this operator's products (seconds, and peak device memory on CUDA), which
            ``mode="auto"`` reads to choose a solver; ``plans.force(...)`` fixes a cost.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        use_gpu: bool = True,
        fp16: bool = False,
        full_dataset: bool = True,
        max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
        *,
        backend: str = "auto",
        batched: Optional[bool] = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(backend, str) or backend not in ("auto",) + BACKENDS:
            raise ValueError(
                f"backend={backend!r} is not known; use 'auto', 'double_backward', 'forward_over_reverse' or "
                f"'linearize'."
            )
        if batched is not None and not isinstance(batched, bool):
            raise TypeError(
                f"batched must be True, False or None (decide by timing), got {batched!r} of type "
                f"{type(batched).__name__}."
            )
        super().__init__(
            model, dataloader, criterion, use_gpu, fp16, full_dataset, max_possible_gpu_samples, **kwargs
        )
        if backend == "linearize" and not self.eval_mode:
            raise ValueError(
                "backend='linearize' needs eval_mode=True: the traced gradient would draw new dropout masks in "
                "every product. Use backend='double_backward' or 'forward_over_reverse' with eval_mode=False."
            )
        self.backend = backend
        self.batched = batched
        self.plans = PlanBook()
        self.backend_used: dict[int, tuple[str, bool]] = {}
        self.kept_graph_plan: dict[int, tuple[str, bool]] = {}
        self._unsupported: set[tuple[str, bool]] = set()  # (backend, batched) that cannot run this model
        self._plan: Plan = SAFE  # the plan of the product in progress
        self._holding_kept = False  # a fresh product inside frozen(), while kept work stays for others
        self._said_out_of_memory: set[Plan] = set()
        # While a timed product builds kept graphs: [rows, seconds of its forward and first backward
        # pass, seconds of its product] of each micro-batch built.
        self._pass_times: Optional[list[list]] = None

    # -- one micro-batch -----------------------------------------------------------------------
    def build(self, inputs: Any, targets: Any, label: str) -> Any:
        """The work of a micro-batch that does not depend on the vectors: the forward pass and the
        gradient with its graph (double backward), the traced gradient (linearize), or, for
        forward-over-reverse, which does both together with the product, only what the product needs."""
        if self._plan.backend == "double_backward":
            if self._pass_times is None:
                return first_order_graph(lambda: self._loss(inputs, targets, label), self._params)
            with _measured(self.device, memory=False) as measure:
                graph = first_order_graph(lambda: self._loss(inputs, targets, label), self._params)
            self._pass_times.append([leading_dim(inputs) or 1, measure.seconds, None])
            return graph
        if self._plan.backend == "linearize":
            return linearized_gradient(
                lambda theta: self._loss(inputs, targets, label, parameters=theta), self.param_names, self._params)
        return _Pending(inputs, targets, label, rng_rewinder(self.device))

    @property
    def measures_saved_tensors(self) -> bool:  # type: ignore[override]
        # A linearized gradient is made by torch.func transforms, which refuse the hooks that
        # measure saved tensors; its size is what the trace keeps (work_bytes).
        return self._plan.backend != "linearize"

    def work_bytes(self, work: Any) -> int:
        if isinstance(work, LinearizedGradient):
            return work.constant_bytes
        # The gradients are outputs, not saved tensors: n numbers per micro-batch.
        return tensor_bytes(work.grads)

    def product(self, work: Any, tangents: Tangents, keep: bool) -> Tensor:
        """``H_b V`` of one micro-batch, (n, b). A batched plan that runs out of device memory is
        redone in halves, and blocks wider than the widest that fitted are split from then on."""
        if self._pass_times and self._pass_times[-1][2] is None:  # the micro-batch just built: time it
            entry = self._pass_times[-1]
            entry[2] = 0.0
            with _measured(self.device, memory=False) as measure:
                out = self.product(work, tangents, keep)
            entry[2] = measure.seconds
            return out
        width = tangents.width
        plan = self._plan
        limit = self.plans.limits.get(plan)
        if plan.batched and width > 1 and limit is not None and width > limit:
            return self._in_chunks(work, tangents, keep, limit)
        try:
            return self._one_pass(work, tangents, keep)
        except torch.cuda.OutOfMemoryError:
            if not plan.batched or width == 1 or self._plan != plan:
                raise
            limit = self.plans.note_out_of_memory(plan, width)
        # Outside the except block, so that the failed attempt's tensors are freed before the retry.
        if plan not in self._said_out_of_memory:
            self._said_out_of_memory.add(plan)
            logger.info("HVPOperator: %s ran out of device memory for blocks of %d vectors; computing them in "
                        "blocks of at most %d from now on.", plan, width, limit)
        if isinstance(work, _Pending):
            work.rewind()  # the same dropout masks as the failed attempt
        return self._in_chunks(work, tangents, keep, limit)

    def _in_chunks(self, work: Any, tangents: Tangents, keep: bool, limit: int) -> Tensor:
        """The product in column blocks of at most ``limit`` vectors, each by the plan in progress."""
        starts = list(range(0, tangents.width, limit))
        pieces = []
        for i, start in enumerate(starts):
            if i and isinstance(work, _Pending):
                work.rewind()
            chunk = Tangents(tangents.block[:, start : start + limit], self._params)
            pieces.append(self.product(work, chunk, keep or i < len(starts) - 1))
        return torch.cat(pieces, dim=1)

    def _one_pass(self, work: Any, tangents: Tangents, keep: bool) -> Tensor:
        if isinstance(work, _Pending):
            return self._forward_over_reverse(work, tangents)
        if isinstance(work, LinearizedGradient):
            return self._linearized(work, tangents)
        return self._second_backward(work, tangents, keep)

    def _second_backward(self, graph: FirstOrderGraph, tangents: Tangents, keep: bool) -> Tensor:
        if self._plan.batched:
            try:  # the graph is retained, so that a failed vmapped pass can be redone one vector at a time
                return second_backward(graph, self._params, tangents.per_parameter, True, keep=True).T
            except (RuntimeError, NotImplementedError) as exc:
                if isinstance(exc, torch.cuda.OutOfMemoryError):
                    raise
                self._fall_back(exc)
        return second_backward(graph, self._params, tangents.per_parameter, False, keep=keep).T

    def _linearized(self, work: LinearizedGradient, tangents: Tangents) -> Tensor:
        batched = self._plan.batched and tangents.width > 1
        try:
            return linearized_product(work, self.param_names, self._params, tangents.per_parameter, batched).T
        except (RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError) or not batched:
                raise
            self._fall_back(exc)
        return linearized_product(work, self.param_names, self._params, tangents.per_parameter, False).T

    def _forward_over_reverse(self, pending: "_Pending", tangents: Tangents) -> Tensor:
        def loss_of(theta: dict[str, Tensor]) -> Tensor:
            return self._loss(pending.inputs, pending.targets, pending.label, parameters=theta)

        try:
            pending.loss, rows = forward_over_reverse(
                loss_of, self.param_names, self._params, tangents.per_parameter, self._plan.batched, pending.rewind)
            return rows.T
        except (RuntimeError, NotImplementedError) as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self._fall_back(exc)
        # Outside the except block, so that the failed attempt's tensors (held by the traceback)
        # are freed before the retry.
        pending.rewind()  # the same dropout masks as the failed attempt
        graph = first_order_graph(lambda: self._loss(pending.inputs, pending.targets, pending.label), self._params)
        pending.loss = graph.loss
        return second_backward(graph, self._params, tangents.per_parameter, False, keep=False).T

    def _fall_back(self, exc: BaseException) -> None:
        """After the plan in progress failed with ``exc``: remember why, and compute the rest of this
        product with the safe plan (double backward, one vector at a time); re-raise if that was it."""
        if self._plan.pair == SAFE.pair:
            raise exc
        self._mark_unsupported(self._plan, exc)
        self._plan = _KEPT_SAFE if self._plan.kept else SAFE

    def _keeps_work(self) -> bool:
        # Only double backward and linearize have work to keep.
        return self.backend != "forward_over_reverse"

    # -- choosing a plan ---------------------------------------------------------------------------
    def _candidates(self, b: int, keeping: bool) -> list[Plan]:
        """The plans worth trying for blocks of width b, in the order they are tried."""
        widths = [False] if b == 1 else ([False, True] if self.batched is None else [self.batched])
        if self.backend == "linearize":
            plans = [Plan("linearize", w, kept=True) for w in widths] if keeping else \
                [Plan("forward_over_reverse", w) for w in widths]
        elif self.backend != "auto":
            plans = [Plan(self.backend, w, kept=keeping) for w in widths]
        elif keeping:
            # The kept graph, and where its second pass is slow, recomputing the micro-batch by
            # forward-over-reverse (tried first then): vmapped, it shares the forward pass between the
            # vectors of a block, and the kept graphs stay for the single products.
            plans = [Plan("double_backward", w, kept=True) for w in widths]
            if b > 1 and self.batched is not False and self.plans.second_pass_is_slow(FRESH_BLOCK_TRIAL):
                plans.insert(0, Plan("forward_over_reverse", True))
            elif b == 1 and self.plans.second_pass_is_slow():
                plans.append(Plan("forward_over_reverse", False))
        elif b == 1:
            plans = [SAFE]
            if self.plans.second_pass_is_slow():
                plans.append(Plan("forward_over_reverse", False))
        else:
            plans = [Plan("double_backward", w) for w in widths]
            if self.batched is not False:
                plans.append(Plan("forward_over_reverse", True))
        usable = [plan for plan in plans if plan.pair not in self._unsupported]
        return usable or [_KEPT_SAFE if keeping else SAFE]

    def _next_plan(self, b: int, keeping: bool) -> tuple[Plan, bool]:
        """The plan of the next product of width b, and whether that product is timed.

        Several candidates: the first products of width b time them in turn (see
        :func:`~hessian_eigenthings.operators.plans.next_trial`; each is a real product, so nothing
        is computed twice), then the fastest is kept. A kept plan is also timed while it builds
        its kept work and once after (what ``mode="auto"`` reads to choose a solver).
        """
        candidates = self._candidates(b, keeping)
        choices = self.kept_graph_plan if keeping else self.backend_used
        lone = candidates[0]
        if len(candidates) > 1:
            trial = next_trial(self.plans, candidates, b)
        else:  # the choice; timed three times after its build: the smallest stands for the kept product
            choices[b] = lone.pair
            trial = lone if lone.kept and self.plans.trials(lone, b) < 3 else None
        if trial is not None:
            return trial, True
        chosen = cheapest(self.plans, candidates, b) or lone
        if len(candidates) > 1 and choices.get(b) != chosen.pair:
            timed = [(plan, self.plans.seconds(plan, b)) for plan in candidates]
            logger.info("HVPOperator: blocks of %d vectors%s: %s per product; using %s.", b,
                        " (inside frozen())" if keeping else "",
                        ", ".join(f"{plan} {seconds * 1e3:.1f} ms" for plan, seconds in timed if seconds is not None),
                        chosen)
        choices[b] = chosen.pair
        return chosen, False

    def _product(self, mat: Tensor) -> Tensor:
        b = mat.shape[1]
        keeping = self.keeping_work
        self._plan, timed = self._next_plan(b, keeping)
        planned = self._plan
        if keeping and not planned.kept:
            # Afresh inside frozen(): this product neither uses nor adds kept work, which stays.
            self._keeping, self._holding_kept = False, True
        try:
            if not timed:
                return super()._product(mat)
            kept_before = len(self._keeper)
            self._pass_times = [] if planned.kept else None
            with _measured(self.device) as measure:
                out = super()._product(mat)
            if self._plan == planned:  # a trial that fell back measured something else
                built = planned.kept and len(self._keeper) > kept_before and self._batches.positions_fixed
                if built:
                    shared, ratio = _pass_estimates(self._pass_times, b)
                    self.plans.record_build(planned, b, measure.seconds, measure.peak_bytes, shared=shared,
                                            ratio=ratio)
                else:
                    self.plans.record(planned, b, measure.seconds, measure.peak_bytes)
            return out
        finally:
            self._keeping, self._holding_kept = keeping, False
            self._pass_times = None

    def _product_context(self) -> contextlib.AbstractContextManager:
        if not self._holding_kept:
            return super()._product_context()
        # Kept work saved the device copy's tensors: syncing the copy would write into them (the
        # model is unchanged inside frozen(), so the copy is up to date).
        return self._compute.running(self.eval_mode, self.dropout_seed, allow_tf32=self.precision == "tf32",
                                     sync=not len(self._keeper))

    def _mark_unsupported(self, plan: Plan, exc: BaseException) -> None:
        """Remember that a plan fails on this model and say so once."""
        if plan.pair in self._unsupported:
            return
        self._unsupported.add(plan.pair)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A warning where the user asked for this backend by name, a note where "auto" tried it.
        (logger.warning if self.backend == plan.backend else logger.info)(
            "HVPOperator: %s does not work for this model (%s: %s); using double backward, one vector "
            "at a time, instead.", Plan(plan.backend, plan.batched), type(exc).__name__, first_line[:300],
        )


class _Measure:
    seconds: float = 0.0
    peak_bytes: Optional[int] = None


@contextlib.contextmanager
def _measured(device: torch.device, memory: bool = True) -> Any:
    """Time the block (synchronising a CUDA device), and on CUDA with ``memory`` measure its peak
    memory above the start. The device's peak-memory statistic is the user's and is never reset:
    the block's peak is known only where it sets a new one (else ``peak_bytes`` stays None, and the
    plans rely on halving a block that runs out of memory)."""
    measure = _Measure()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        if memory:
            start_bytes = torch.cuda.memory_allocated(device)
            earlier_peak = torch.cuda.max_memory_allocated(device)
    start = time.perf_counter()
    yield measure
    if cuda:
        torch.cuda.synchronize(device)
        if memory:
            peak = torch.cuda.max_memory_allocated(device)
            measure.peak_bytes = peak - start_bytes if peak > earlier_peak else None
    measure.seconds = time.perf_counter() - start


def _pass_estimates(times: Optional[list[list]], width: int) -> tuple[Optional[float], Optional[float]]:
    """From each micro-batch built in a product, [rows, seconds of its forward and first backward
    pass, seconds of its product of ``width`` vectors]: (the forward and first backward pass of the
    whole dataset, at the fastest rate seen, and the median over micro-batches of the product of one
    vector over that pass). The micro-batches are timed back to back, so that a machine's drift
    cancels in the ratio, and one-time warm-up, which falls on the first micro-batch of a process,
    counts in neither."""
    timed = [(rows, build, product) for rows, build, product in (times or ()) if build > 0 and product]
    if not timed:
        return None, None
    shared = min(build / rows for rows, build, _ in timed) * sum(rows for rows, _, _ in timed)
    ratios = sorted(product / width / build for _, build, product in timed)
    middle = len(ratios) // 2
    ratio = ratios[middle] if len(ratios) % 2 else (ratios[middle - 1] + ratios[middle]) / 2
    return shared, ratio


class _Pending:
    """The work of a micro-batch for forward-over-reverse, which computes the forward pass together
    with the product: its data, and the random state to redo it from; its loss once computed."""

    def __init__(self, inputs: Any, targets: Any, label: str, rewind: Callable[[], None]) -> None:
        self.inputs, self.targets, self.label, self.rewind = inputs, targets, label, rewind
        self.loss: Optional[Tensor] = None
