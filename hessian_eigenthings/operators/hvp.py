"""Hessian-vector products of a model's loss over a dataloader."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..utils import logger
from .graph_cache import tensor_bytes
from .hvp_backends import BACKENDS, FirstOrderGraph, first_order_graph, forward_over_reverse, second_backward
from .model_operator import ModelOperator, NonFiniteError, Tangents, rng_rewinder  # noqa: F401  (re-exported)
from .options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES

# A way to compute a block product: (backend name, all b vectors in one pass?).
Plan = tuple[str, bool]
_SAFE: Plan = ("double_backward", False)
# Timed products per candidate plan before "auto" settles on one for a block width.
_TRIALS_PER_PLAN = 2


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
            ``torch.func.grad``), or ``"auto"`` (default), which uses double backward for single
            vectors and, for blocks, times the candidates (see ``batched``) and keeps the fastest.
            Where ``torch.func`` cannot run the model (in-place updates of buffers such as
            BatchNorm statistics in train mode, Python control flow on tensor values, kernels
            without a forward-mode derivative), it says so once in the log and uses double
            backward, one vector at a time.
        batched: for blocks of b > 1 vectors: True computes all b in one pass (vmap),
            False one vector after another on a shared first-order graph, None (default) lets
            timing decide, per block width b: the first few products of width b (real products,
            nothing is computed twice) each use another candidate, then the fastest is kept.
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
            double-backward product, and not with ``eval_mode=False`` on a model with buffers
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
        backend_used: {block width b: (backend, batched)} as chosen so far for products that
            compute every micro-batch afresh.
        kept_graph_plan: {block width b: (backend, batched)} as chosen so far for products that
            reuse kept graphs (always double backward; batched or not).
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
                f"backend={backend!r} is not known; use 'auto', 'double_backward' or 'forward_over_reverse'."
            )
        if batched is not None and not isinstance(batched, bool):
            raise TypeError(
                f"batched must be True, False or None (decide by timing), got {batched!r} of type "
                f"{type(batched).__name__}."
            )
        super().__init__(
            model, dataloader, criterion, use_gpu, fp16, full_dataset, max_possible_gpu_samples, **kwargs
        )
        self.backend = backend
        self.batched = batched
        self.backend_used: dict[int, Plan] = {}
        self.kept_graph_plan: dict[int, Plan] = {}
        self._unsupported: set[Plan] = set()  # plans that cannot run this model
        self._too_big: set[tuple[Plan, int]] = set()  # (plan, width) that ran out of device memory
        # (width, reusing kept graphs?) -> (plan, seconds) per timed product
        self._trials: dict[tuple[int, bool], list[tuple[Plan, float]]] = {}
        self._plan: Plan = _SAFE  # the plan of the product in progress

    # -- one micro-batch -----------------------------------------------------------------------
    def build(self, inputs: Any, targets: Any, label: str) -> Any:
        """The forward pass and the gradient with its graph; for forward-over-reverse, which does
        both together with the product, only what the product needs."""
        if self._plan[0] == "double_backward":
            return first_order_graph(lambda: self._loss(inputs, targets, label), self._params)
        return _Pending(inputs, targets, label, rng_rewinder(self.device))

    def work_bytes(self, work: Any) -> int:
        # The gradients are outputs, not saved tensors: n numbers per micro-batch.
        return tensor_bytes(work.grads)

    def product(self, work: Any, tangents: Tangents, keep: bool) -> Tensor:
        """``H_b V`` of one micro-batch, (n, b)."""
        if isinstance(work, _Pending):
            return self._forward_over_reverse(work, tangents)
        return self._second_backward(work, tangents, keep)

    def _second_backward(self, graph: FirstOrderGraph, tangents: Tangents, keep: bool) -> Tensor:
        if self._plan[1]:
            try:  # the graph is retained, so that a failed vmapped pass can be redone one vector at a time
                return second_backward(graph, self._params, tangents.per_parameter, True, keep=True).T
            except (RuntimeError, NotImplementedError) as exc:
                self._fall_back(exc, tangents.width)
        return second_backward(graph, self._params, tangents.per_parameter, False, keep=keep).T

    def _forward_over_reverse(self, pending: "_Pending", tangents: Tangents) -> Tensor:
        def loss_of(theta: dict[str, Tensor]) -> Tensor:
            return self._loss(pending.inputs, pending.targets, pending.label, parameters=theta)

        try:
            pending.loss, rows = forward_over_reverse(
                loss_of, self.param_names, self._params, tangents.per_parameter, self._plan[1], pending.rewind)
            return rows.T
        except (RuntimeError, NotImplementedError) as exc:
            self._fall_back(exc, tangents.width)
        # Outside the except block, so that the failed attempt's tensors (held by the traceback)
        # are freed before the retry.
        pending.rewind()  # the same dropout masks as the failed attempt
        graph = first_order_graph(lambda: self._loss(pending.inputs, pending.targets, pending.label), self._params)
        pending.loss = graph.loss
        return second_backward(graph, self._params, tangents.per_parameter, False, keep=False).T

    def _fall_back(self, exc: BaseException, b: int) -> None:
        """After the plan in progress failed with ``exc``: remember why, and compute the rest of this
        product with the safe plan (double backward, one vector at a time); re-raise if that was it."""
        if self._plan == _SAFE:
            raise exc
        self._mark_unsupported(self._plan, exc, b)
        self._plan = _SAFE

    def _keeps_work(self) -> bool:
        # Only double backward has a first-order graph to keep.
        return self.backend != "forward_over_reverse"

    # -- choosing a backend ----------------------------------------------------------------------
    def _candidates(self, b: int) -> list[Plan]:
        """The plans worth trying for blocks of width b, the safe one first where it is allowed."""
        if self.keeping_work:
            # Only double backward can reuse a first-order graph; what is left to choose is
            # whether the second backward pass takes the b vectors one by one or vmapped.
            widths = [False] if b == 1 else ([False, True] if self.batched is None else [self.batched])
            plans = [("double_backward", w) for w in widths]
        elif self.backend == "auto":
            if b == 1:
                # One vector: double backward was faster than forward-over-reverse on every model
                # measured (see benchmarks/hvp_backends.py).
                plans = [_SAFE]
            elif self.batched is None:
                plans = [_SAFE, ("double_backward", True), ("forward_over_reverse", True)]
            elif self.batched:
                plans = [("double_backward", True), ("forward_over_reverse", True)]
            else:
                plans = [_SAFE]
        else:
            widths = [False] if b == 1 else ([False, True] if self.batched is None else [self.batched])
            plans = [(self.backend, w) for w in widths]
        usable = [plan for plan in plans if plan not in self._unsupported and (plan, b) not in self._too_big]
        return usable or [_SAFE]

    def _next_plan(self, b: int) -> tuple[Plan, bool]:
        """The plan for the next product of width b, and whether that product is a timed trial.

        Where several plans qualify, the first products of width b try them in turn, twice
        round (each trial is a real product, so no work is repeated); each plan's time is the
        smaller of its two, which discounts one-time warm-up and a disturbed measurement on a
        busy machine. Then the fastest is kept for every later product of that width.
        """
        choices = self.kept_graph_plan if self.keeping_work else self.backend_used
        chosen = choices.get(b)
        if chosen is not None and chosen in self._candidates(b):
            return chosen, False
        candidates = self._candidates(b)
        if len(candidates) == 1:
            choices[b] = candidates[0]
            return candidates[0], False
        best: dict[Plan, float] = {}
        counts: dict[Plan, int] = {}
        for plan, seconds in self._trials.get((b, self.keeping_work), []):
            if plan in candidates:
                best[plan] = min(seconds, best.get(plan, seconds))
                counts[plan] = counts.get(plan, 0) + 1
        for round_index in range(_TRIALS_PER_PLAN):
            for plan in candidates:
                if counts.get(plan, 0) <= round_index:
                    return plan, True
        winner = min(best, key=best.__getitem__)
        choices[b] = winner
        logger.info("HVPOperator: blocks of %d vectors%s: %s per product; using %s.", b,
                    " (reusing kept graphs)" if self.keeping_work else "",
                    ", ".join(f"{_describe(p)} {t * 1e3:.1f} ms" for p, t in best.items()), _describe(winner))
        return winner, False

    def _product(self, mat: Tensor) -> Tensor:
        b = mat.shape[1]
        self._plan, timed = self._next_plan(b)
        planned, keeping = self._plan, self.keeping_work
        if not timed:
            return super()._product(mat)
        self._sync()
        start = time.perf_counter()
        out = super()._product(mat)
        self._sync()
        if self._plan == planned:  # a trial that fell back measured something else
            self._trials.setdefault((b, keeping), []).append((planned, time.perf_counter() - start))
        return out

    def _mark_unsupported(self, plan: Plan, exc: BaseException, b: int) -> None:
        """Remember that a plan fails on this model (or, out of memory, for this width) and say so once."""
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            # A vmapped block holds b copies of the activations' tangents; a narrower one may fit.
            self._too_big.add((plan, b))
            logger.info("HVPOperator: %s ran out of device memory for blocks of %d vectors; using double "
                        "backward, one vector at a time, for them.", _describe(plan), b)
            return
        if plan in self._unsupported:
            return
        self._unsupported.add(plan)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # A warning where the user asked for this backend by name, a note where "auto" tried it.
        (logger.warning if self.backend == plan[0] else logger.info)(
            "HVPOperator: %s does not work for this model (%s: %s); using double backward, one vector "
            "at a time, instead.", _describe(plan), type(exc).__name__, first_line[:300],
        )

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class _Pending:
    """The work of a micro-batch for forward-over-reverse, which computes the forward pass together
    with the product: its data, and the random state to redo it from; its loss once computed."""

    def __init__(self, inputs: Any, targets: Any, label: str, rewind: Callable[[], None]) -> None:
        self.inputs, self.targets, self.label, self.rewind = inputs, targets, label, rewind
        self.loss: Optional[Tensor] = None


def _describe(plan: Plan) -> str:
    backend, batched = plan
    return f"{backend.replace('_', '-')}{' batched' if batched else ''}"
