"""Hessian-vector products of a model's loss over a dataloader."""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from ..utils import logger
from .hvp_backends import BACKENDS, double_backward, forward_over_reverse
from .model_operator import ModelOperator, NonFiniteError  # noqa: F401  (NonFiniteError re-exported)

# A way to compute a block product: (backend name, all b vectors in one pass?).
Plan = tuple[str, bool]
_SAFE: Plan = ("double_backward", False)


class HVPOperator(ModelOperator):
    """The Hessian of ``criterion(model(inputs), targets)`` w.r.t. the model's parameters, as an operator.

    ``apply(v)`` returns ``H v`` for a flat vector ``v`` of shape (n,), laid out as the chosen
    parameters in ``model.parameters()`` order (see ``param_names`` / ``unflatten``);
    ``apply_block(V)`` returns ``H V`` for a block of shape (n, b), computing all b columns from
    one forward and first backward pass per micro-batch.

    Args:
        model: the network. It is never changed: parameters, buffers, ``.grad``,
            ``requires_grad`` and train/eval mode are as before every call, also on error.
        dataloader: iterable of ``(inputs, targets)`` batches (a torch DataLoader, a list, ...).
        criterion: ``criterion(outputs, targets)`` returning the *mean* loss over the batch (a
            scalar tensor), e.g. ``torch.nn.functional.cross_entropy``.
        use_gpu: compute on CUDA when the model is on the CPU and a GPU is available (on a copy of
            the model, synced from the original before every product). A model already on a GPU is
            used where it is.
        fp16: the old spelling of ``precision="fp16"``.
        full_dataset: True: ``H`` is the Hessian of the mean loss over every sample of the
            dataloader, batches weighted by their number of samples (exact for a short last
            batch). False: each product uses the next mini-batch (a stochastic operator).
        max_possible_gpu_samples: batches larger than this are split into micro-batches whose
            products are combined exactly; bounds memory.
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
            vectors and, for blocks, times the candidates once (see ``batched``) and keeps the
            fastest. Where ``torch.func`` cannot run the model (in-place updates of buffers such as
            BatchNorm statistics in train mode, data-dependent Python control flow, some RNN
            kernels), it says so once in the log and uses double backward.
        batched: for blocks of b > 1 vectors: True computes all b in one pass (vmap),
            False one vector after another on a shared first-order graph, None (default) lets a
            one-time timing on the first micro-batch decide, per block width b.
        cache_batches: True (default) keeps the batches on the compute device after the first
            product and reuses them, instead of reading the dataloader and copying it to the
            device for every product; only while they take at most ``cache_max_bytes``. With
            ``full_dataset=True`` the operator is then fixed by the first reading (a shuffling or
            augmenting dataloader is read once). With ``full_dataset=False`` only a list or tuple of
            batches is cached (the dataloader's next batches are otherwise new ones). Call
            ``clear_batch_cache()`` after changing the data.
        cache_max_bytes: memory bound of that cache (default 1 GiB). It counts device copies and
            batches the dataloader makes afresh, not the tensors of a list already on the device.
        precision: ``"exact"`` (default: the parameters' dtype, TF32 off during products, the
            user's global setting restored after), ``"tf32"`` (CUDA only), ``"bf16"`` or ``"fp16"``
            (autocast). Results and their sum over batches stay in the parameters' dtype; see
            :mod:`hessian_eigenthings.operators.precision` for the measured accuracy of each.

    Attributes:
        backend_used: {block width b: (backend, batched)} as chosen so far.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        use_gpu: bool = True,
        fp16: bool = False,
        full_dataset: bool = True,
        max_possible_gpu_samples: int = 256,
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
            raise TypeError(f"batched must be True, False or None (decide by timing), got {batched!r}.")
        super().__init__(
            model, dataloader, criterion, use_gpu, fp16, full_dataset, max_possible_gpu_samples, **kwargs
        )
        self.backend = backend
        self.batched = batched
        self.backend_used: dict[int, Plan] = {}
        self._unsupported: set[Plan] = set()
        self._tangents: Optional[tuple[list, list[Tensor]]] = None

    # -- choosing a backend ----------------------------------------------------------------------
    def _candidates(self, b: int) -> list[Plan]:
        """The plans worth trying for blocks of width b, the safe one first where it is allowed."""
        if self.backend == "auto":
            if b == 1:
                # One vector: double backward was faster than forward-over-reverse on every model we
                # measured (CPU and GPU, see benchmarks/hvp_backends.py), so no probe is spent on it.
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
        usable = [plan for plan in plans if plan not in self._unsupported]
        return usable or [_SAFE]

    def _matmat(self, mat: Tensor) -> Tensor:
        try:
            return super()._matmat(mat)
        finally:
            self._tangents = None

    def _stacked(self, columns: list[list[Tensor]]) -> list[Tensor]:
        """The block's columns as one (b, *p.shape) tensor per parameter (built once per product)."""
        if self._tangents is None or self._tangents[0] is not columns:
            stacked = [torch.stack([col[i] for col in columns]) for i in range(len(self._params))]
            self._tangents = (columns, stacked)
        return self._tangents[1]

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch and its Hessian times every column, shape (n, b)."""
        b = len(columns)
        tangents = self._stacked(columns)
        rewind = _rng_rewinder(self.device)
        plan = self.backend_used.get(b)
        if plan is None or plan in self._unsupported:
            plan, loss, rows = self._probe(inputs, targets, tangents, label, rewind)
            self.backend_used[b] = plan
        else:
            loss, rows = self._run_or_fall_back(plan, inputs, targets, tangents, label, rewind)
        return loss, rows.T

    def _run(self, plan: Plan, inputs: Any, targets: Any, tangents: list[Tensor], label: str,
             rewind: Callable[[], None]) -> tuple[Tensor, Tensor]:
        backend, batched = plan
        if backend == "double_backward":
            return double_backward(lambda: self._loss(inputs, targets, label), self._params, tangents, batched)
        return forward_over_reverse(
            lambda theta: self._loss(inputs, targets, label, parameters=theta),
            self.param_names, self._params, tangents, batched, rewind,
        )

    def _run_or_fall_back(self, plan: Plan, inputs: Any, targets: Any, tangents: list[Tensor], label: str,
                          rewind: Callable[[], None]) -> tuple[Tensor, Tensor]:
        try:
            return self._run(plan, inputs, targets, tangents, label, rewind)
        except (RuntimeError, NotImplementedError) as exc:
            if plan == _SAFE:
                raise
            self._mark_unsupported(plan, exc)
        rewind()
        self.backend_used = {b: p for b, p in self.backend_used.items() if p not in self._unsupported}
        return self._run(_SAFE, inputs, targets, tangents, label, rewind)

    def _probe(self, inputs: Any, targets: Any, tangents: list[Tensor], label: str,
               rewind: Callable[[], None]) -> tuple[Plan, Tensor, Tensor]:
        """Run each candidate plan on this micro-batch, timed; keep the fastest and its result.

        Two interleaved rounds (the second only for candidates within 2x of the first round's
        best), each candidate's time the smaller of its two, so that one disturbed measurement on
        a busy machine does not decide. Every run starts from the same random state, and the state
        after the probe is the one a single run leaves: dropout masks are as without a probe.
        """
        candidates = self._candidates(len(tangents[0]))
        times: dict[Plan, float] = {}
        result: Optional[tuple[Plan, Tensor, Tensor]] = None
        runs = 0
        for round_index in range(2 if len(candidates) > 1 else 1):
            if round_index:
                fastest = min(times.values(), default=0.0)
                candidates = [plan for plan in times if times[plan] <= 2 * fastest]
                if len(candidates) < 2:
                    break
            for plan in candidates:
                if runs:
                    rewind()
                runs += 1
                try:
                    self._sync()
                    start = time.perf_counter()
                    loss, rows = self._run(plan, inputs, targets, tangents, label, rewind)
                    self._sync()
                    elapsed = time.perf_counter() - start
                except (RuntimeError, NotImplementedError) as exc:
                    if plan == _SAFE:
                        raise
                    self._mark_unsupported(plan, exc)
                    continue
                times[plan] = min(elapsed, times.get(plan, elapsed))
                result = (plan, loss, rows)
        if not times:  # every candidate failed and the safe one was not among them
            if runs:
                rewind()
            loss, rows = self._run(_SAFE, inputs, targets, tangents, label, rewind)
            return _SAFE, loss, rows
        best = min(times, key=times.__getitem__)
        if len(times) > 1:
            logger.info("HVPOperator: blocks of %d vectors: %s; using %s.", len(tangents[0]),
                        ", ".join(f"{_describe(p)} {t * 1e3:.1f} ms" for p, t in times.items()), _describe(best))
        # Any candidate's result is exact; the last one computed is returned with the choice.
        assert result is not None
        return best, result[1], result[2]

    def _mark_unsupported(self, plan: Plan, exc: BaseException) -> None:
        """Remember that a plan fails on this model and say so once."""
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


def _describe(plan: Plan) -> str:
    backend, batched = plan
    return f"{backend.replace('_', '-')}{' batched' if batched else ''}"


def _rng_rewinder(device: torch.device) -> Callable[[], None]:
    """A function that puts the random state (CPU, and the device's if CUDA) back to what it is now."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return rewind
