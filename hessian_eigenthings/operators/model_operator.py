"""The machinery shared by operators built from a model, a loss and a dataloader.

A ModelOperator owns the data loop (full dataset or one mini-batch per product, micro-batching,
weighting by sample counts), the device choice, the model-state guarantees and the NaN/Inf checks.
A subclass says only what one micro-batch contributes: ``_chunk_products``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import (
    BatchSizeFn,
    as_batches,
    call_model,
    check_reiterable,
    leading_dim,
    move_to,
    num_samples,
    slice_samples,
    split_batch,
    tensors_in,
)
from ..model_utils import (
    ParamSpec,
    common_device,
    common_dtype,
    preserved_model_state,
    select_parameters,
    unflatten,
)
from ..utils import check_bool, check_positive_int, logger, preserved_global_rng, resolve_device, user_stacklevel
from .base import Operator
from .graph_cache import (
    KeptGraphs,
    SavedTensorHooksRefused,
    counting_saved_bytes,
    default_graph_budget,
    model_state_key,
)
from .kernels import math_attention, rnn_without_cudnn
from .precision import autocast_context, fp32_math, resolve_precision
from .reduction import ReductionProbe, WeightedSum, finish, resolve_reduction


class NonFiniteError(ValueError):
    """A loss or a Hessian-vector product came out NaN or Inf."""


# Batches are kept on the compute device between products while they take at most this much memory.
DEFAULT_CACHE_MAX_BYTES = 2**30

# What a dataloader's iterator returns here once it is exhausted.
_END = object()

# One micro-batch as the data loop yields it: (label for messages, inputs, targets, samples,
# key: (position of its batch in the dataloader, its number within that batch)).
Chunk = tuple[str, Any, Any, int, tuple[int, int]]


class ModelOperator(Operator):
    """Base of curvature operators of ``criterion(model(inputs), targets)`` over a dataloader.

    The operator is the sample-weighted mean over micro-batches of what ``_chunk_products``
    returns for each (their sum for a summing criterion; see operators/reduction.py); see
    :class:`HVPOperator` for the meaning of every argument.

    Under torch.distributed (an initialised process group), each rank passes the dataloader of
    its own shard of the data and every product is ONE all-reduce of the sample-weighted sums and
    sample counts: every rank gets the same product with the curvature of the mean (or summed)
    loss over the union of the shards, exact for uneven shards (``num_samples`` is then the global count). Every
    rank must make the same products in the same order, with the same vectors (checked). An error
    inside a product on one rank (a NaN/Inf, a bad batch) is raised on every rank instead of
    leaving the others waiting. A ``DistributedDataParallel``-wrapped model is unwrapped: products
    use ``model.module`` (the same parameter tensors; parameter names are those of
    ``model.module``), so DDP's hooks and collectives never run. Set ``reduce_across_ranks =
    False`` on an operator for a rank-local one, or ``process_group`` to reduce over a subgroup.
    """

    #: All-reduce every product over the ranks of ``process_group`` when torch.distributed is
    #: initialised; False makes this operator rank-local (its own shard only).
    reduce_across_ranks: bool = True
    #: The process group of the all-reduce; None is the default (world) group.
    process_group: Any = None

    def __init__(
        self,
        model: nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        use_gpu: bool = True,
        fp16: bool = False,
        full_dataset: bool = True,
        max_possible_gpu_samples: int = 256,
        *,
        params: ParamSpec = None,
        eval_mode: bool = True,
        device: Any = None,
        check_finite: bool = True,
        cache_batches: bool = True,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        cache_graphs: bool = True,
        graph_cache_max_bytes: Optional[int] = None,
        precision: Optional[str] = None,
        reduction: Optional[str] = None,
        batch_size_fn: Optional[BatchSizeFn] = None,
    ) -> None:
        model = distributed.unwrap_model(model)
        names, chosen = select_parameters(model, params)
        if any(p.is_inference() for p in chosen):
            raise ValueError(
                "The model's parameters were created under torch.inference_mode(), and such tensors can never "
                "be differentiated. Create or load the model outside inference_mode() (torch.no_grad() is "
                "fine), or replace its parameters with clones made outside it."
            )
        if not callable(criterion):
            raise TypeError(f"criterion must be a callable loss(outputs, targets), got {type(criterion).__name__}.")
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"batch_size_fn must be a callable (inputs, targets) -> number of samples, got "
                f"{type(batch_size_fn).__name__}."
            )
        for flag, name in ((use_gpu, "use_gpu"), (fp16, "fp16"), (full_dataset, "full_dataset"),
                           (eval_mode, "eval_mode"), (check_finite, "check_finite"),
                           (cache_batches, "cache_batches"), (cache_graphs, "cache_graphs")):
            check_bool(flag, name)
        dataloader = as_batches(dataloader)
        check_reiterable(dataloader, full_dataset)
        self.max_possible_gpu_samples = check_positive_int(max_possible_gpu_samples, "max_possible_gpu_samples")
        self.cache_max_bytes = check_positive_int(cache_max_bytes, "cache_max_bytes")
        if graph_cache_max_bytes is not None:
            check_positive_int(graph_cache_max_bytes, "graph_cache_max_bytes")
        self.cache_graphs = cache_graphs
        self.graph_cache_max_bytes = graph_cache_max_bytes
        model_device = common_device(chosen)
        if device is not None:
            target = resolve_device(device)
        elif model_device.type != "cpu" or not use_gpu or not torch.cuda.is_available():
            target = model_device
        else:
            target = torch.device("cuda")

        self.precision = resolve_precision(precision, bool(fp16), target)

        super().__init__(sum(p.numel() for p in chosen), common_dtype(chosen), target)
        self.model = model
        # The user's parameter tensors and where they were: a product refuses a model converted or
        # given new parameter tensors since (see _check_model_unchanged).
        self._model_params = chosen
        self._model_device = model_device
        self.dataloader = dataloader
        self.criterion = criterion
        self.batch_size_fn = batch_size_fn
        # "mean" or "sum" (see operators/reduction.py); None until the data shows which.
        self.reduction = resolve_reduction(reduction, criterion)
        # True when products run under autocast (the meaning fp16 always had).
        self.fp16 = self.precision in ("fp16", "bf16")
        self.cache_batches = cache_batches
        self.full_dataset = bool(full_dataset)
        self.is_stochastic = not self.full_dataset
        self.eval_mode = bool(eval_mode)
        self.check_finite = bool(check_finite)
        self._deferred: Optional[list] = None  # pending NaN/Inf checks inside deferred_checks()
        self._frozen_depth = 0  # nesting depth of frozen() blocks
        self._chunk_position = (0, 0)  # key of the micro-batch in progress (see Chunk)
        # Work of each micro-batch kept between products inside frozen() (see _kept_or_built).
        self._kept = KeptGraphs()
        self._graph_budget: Optional[int] = None  # bytes, fixed when a frozen block keeps its first work
        self._reusing = False  # the product in progress keeps/reuses per-micro-batch work
        self.param_names = names
        self.dropout_seed = 0
        self._batch_iter: Optional[Iterator] = None
        self._data_rng_state: Optional[Tensor] = None  # the dataloader's own random stream (_on_data_stream)
        self._batch_pos = 0
        self.num_samples: Optional[int] = None
        # Device copies of the micro-batches, by position of their batch in the dataloader.
        self._cache: dict[int, list[Chunk]] = {}
        self._cache_bytes = 0
        self._cache_complete = False  # every batch of the full dataset is in _cache
        self._cache_overflowed = False

        if target == model_device or (target.type == model_device.type == "cuda" and target.index is None):
            self._work_model = model
            self._params = chosen
        else:
            logger.info("HVPOperator: computing on %s with a copy of the model (the model is on %s).",
                        target, model_device)
            self._work_model = copy.deepcopy(model).to(target)
            work_named = dict(self._work_model.named_parameters())
            self._params = [work_named[n] for n in names]

    # -- layout helpers ------------------------------------------------------------------------
    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat (n,) vector into {parameter name: tensor shaped like that parameter}."""
        return dict(zip(self.param_names, unflatten(vec, self._params)))

    def parameters_vector(self) -> Tensor:
        """The current values of the chosen parameters as one flat (n,) vector on the operator's device."""
        return torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.device)

    # -- products ------------------------------------------------------------------------------
    def _matvec(self, vec: Tensor) -> Tensor:
        return self._matmat(vec.unsqueeze(1)).squeeze(1)

    def _check_callable_now(self) -> None:
        """Raise, before touching the model or the data, where no product can be computed now."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} was called inside torch.inference_mode(): tensors made there can never "
                f"be differentiated, so no curvature product can be computed. Call it outside the "
                f"inference_mode() block (inside torch.no_grad() is fine: products turn gradients on themselves)."
            )
        self._check_model_unchanged()

    def _check_model_unchanged(self) -> None:
        """Raise if the model was converted (dtype, device) or given new parameter tensors after this
        operator was built: its products would then mix devices or dtypes, or differentiate the loss
        with respect to tensors the model no longer uses."""
        current = dict(self.model.named_parameters())
        for name, param in zip(self.param_names, self._model_params):
            if current.get(name) is not param:
                raise RuntimeError(
                    f"The model's parameter {name!r} is no longer the tensor {type(self).__name__} was built "
                    f"with (it was replaced, e.g. by assigning a new nn.Parameter or load_state_dict(assign=True)). "
                    f"Build a new operator for the model as it is now."
                )
            if param.dtype != self.dtype or param.device != self._model_device:
                raise RuntimeError(
                    f"{type(self).__name__} was built for a model with {self.dtype} parameters on "
                    f"{self._model_device}, but {name!r} is now {param.dtype} on {param.device}: the model was "
                    f"converted after the operator was built (model.double(), model.to(...), model.cuda() "
                    f"convert the model in place). Build a new operator for the converted model, or convert "
                    f"a copy (copy.deepcopy(model)) and leave this operator's model as it was."
                )

    def _matmat(self, mat: Tensor) -> Tensor:
        self._check_callable_now()
        self._reusing = self._may_keep_work()
        try:
            # The dataloader, dropout and random layers or losses draw from the global generators.
            with preserved_global_rng():
                out = self._product(mat)
        except BaseException:
            self._kept.clear()  # a product that failed half-way may have kept part of a pass
            raise
        if self._reusing and not self._batches_fixed():
            # The next product may read other samples at the same positions (the batches did
            # not stay on the device), so work kept by position cannot be matched to them.
            self._kept.clear()
        return out

    def _batches_fixed(self) -> bool:
        """Whether a batch position always holds the same samples from now on: the whole dataset
        is cached on the device, or the dataloader is a list/tuple of batches read one per product."""
        if self.full_dataset:
            return self._cache_complete
        return isinstance(self.dataloader, (list, tuple)) and self.cache_batches and not self._cache_overflowed

    def _product(self, mat: Tensor) -> Tensor:
        """The block product over the data: the micro-batches' products combined as the criterion's
        reduction says (see operators/reduction.py)."""
        columns = [unflatten(mat[:, j], self._params) for j in range(mat.shape[1])]
        total = WeightedSum(mat, self.reduction)
        probe = ReductionProbe(self.criterion, self.batch_size_fn) if self.reduction is None else None
        checks: list[tuple[str, Tensor, Tensor]] = []
        # Under a process group, an error on this rank is held until every rank has joined the
        # product's all-reduce, then raised on all of them (single process: a no-op).
        guard = distributed.ProductGuard(self.process_group, self.reduce_across_ranks, (NonFiniteError,))
        with guard, self._product_context():
            for label, inputs, targets, count, key in self._chunks():
                self._chunk_position = key
                if total.reduction is None:
                    self._find_reduction(probe, total, inputs, targets)
                loss, hv = self._chunk_products(inputs, targets, columns, label)
                total.add(hv, count)
                if self.check_finite:
                    checks.append((label, loss.detach(), torch.isfinite(hv).all()))
            if checks and self._deferred is not None and not distributed.is_distributed(self.process_group):
                self._deferred.extend(checks)
            elif checks:
                self._raise_if_not_finite(checks)
            if probe is not None:
                self._settle_reduction(probe, total)
        summed, seen, reduction = guard.reduce(total.total(), total.samples, mat, total.reduction)
        if seen == 0:
            raise ValueError("Every batch of the dataloader was empty (0 samples); there is no loss to differentiate.")
        if reduction is not None:
            self.reduction = reduction
        if self.full_dataset:
            self.num_samples = seen
        return finish(summed, seen, reduction)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss over the dataloader and its gradient, flat (n,), at the current parameters.

        The loss is the one whose curvature the operator is: the mean over every sample (or the
        sum, for a summing criterion), through the same data loop, device, micro-batching and
        model-state guarantees as the products (eval mode unless built with ``eval_mode=False``;
        the model's ``.grad`` is not touched). With ``full_dataset=False`` it is that of the next
        mini-batch. Under torch.distributed it is over every rank's shard, in one all-reduce, and
        an error on one rank is raised on every rank instead of leaving the others waiting.

        Returns:
            (loss as a float, gradient as an (n,) tensor in the operator's dtype and on its device).
        """
        with preserved_global_rng():
            return self._loss_and_gradient()

    def _loss_and_gradient(self) -> tuple[float, Tensor]:
        self._check_callable_now()
        self._reusing = self._may_keep_work()
        total = WeightedSum(torch.zeros(self.size + 1, dtype=torch.float64, device=self.device), self.reduction)
        probe = ReductionProbe(self.criterion, self.batch_size_fn) if self.reduction is None else None
        offsets = self._offsets
        guard = distributed.ProductGuard(self.process_group, self.reduce_across_ranks, (NonFiniteError,))
        with guard, self._product_context():
            for label, inputs, targets, count, _ in self._chunks():
                if total.reduction is None:
                    self._find_reduction(probe, total, inputs, targets)
                loss = self._loss(inputs, targets, label)
                pieces = torch.autograd.grad(loss, self._params, allow_unused=True)
                row = torch.zeros(self.size + 1, dtype=torch.float64, device=self.device)
                for i, piece in enumerate(pieces):
                    if piece is not None:
                        row[offsets[i] : offsets[i + 1]] = piece.reshape(-1)
                row[-1] = loss.detach()
                total.add(row, count)
            if probe is not None:
                self._settle_reduction(probe, total)
        summed, seen, reduction = guard.reduce(total.total(), total.samples, None, total.reduction)
        if seen == 0:
            raise ValueError("Every batch of the dataloader was empty (0 samples); there is no loss to evaluate.")
        if reduction is not None:
            self.reduction = reduction
        result = finish(summed, seen, reduction)
        return float(result[-1]), result[:-1].to(self.dtype)

    def _find_reduction(self, probe: ReductionProbe, total: WeightedSum, inputs: Any, targets: Any) -> None:
        """Look at one micro-batch for whether the criterion averages or sums its samples (until
        known). Its outputs come from extra forward passes without gradients, in eval mode (so
        that neither dropout nor batch statistics enter), with the random state put back."""
        with torch.no_grad(), preserved_global_rng(), \
                preserved_model_state(self._work_model, eval_mode=True, restore_buffers=False):
            found = probe.observe(inputs, targets, lambda batch: call_model(self._work_model, batch))
        if found is not None:
            total.decide(found)
            self.reduction = found

    def _settle_reduction(self, probe: ReductionProbe, total: WeightedSum) -> None:
        """At the end of a product whose data never showed the reduction: take it as a mean (the
        documented convention) where a mean and a sum would differ, and say so. Not while a loss
        was NaN/Inf (the product's own check reports that); the next product looks again."""
        if not total.ambiguous or probe.non_finite:
            return
        warnings.warn(
            f"Cannot tell whether the criterion averages or sums over the samples of a batch: the batches "
            f"{type(self).__name__} read do not show it (one row in all, or losses that are all zero). It is "
            f"taken as a mean (the Hessian of the mean loss over the {total.samples} samples); pass "
            f"reduction='sum' to the operator for the Hessian of the summed loss, or reduction='mean' to "
            f"silence this warning.",
            stacklevel=user_stacklevel(),
        )
        total.decide("mean")
        self.reduction = "mean"

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """A block in which the caller promises not to change the model (parameters, buffers, modes)
        nor its data, so that work shared by all products may be kept between them (see
        ``cache_graphs`` of :class:`HVPOperator`). Nested blocks are one block; what was kept is
        freed when the outermost block ends, also on error."""
        self._frozen_depth += 1
        try:
            yield
        finally:
            self._frozen_depth -= 1
            if self._frozen_depth == 0:
                self._release_kept_work()

    # -- work kept between products inside frozen() ----------------------------------------------
    def _keeps_work(self) -> bool:
        """Whether this operator's products can reuse kept per-micro-batch work at all."""
        return True

    def _may_keep_work(self) -> bool:
        """Whether this product keeps/reuses per-micro-batch work (see ``cache_graphs``); drops
        work kept for another state of the model."""
        if not (
            self._frozen_depth > 0 and self.cache_graphs and self.cache_batches and not self._cache_overflowed
            and (self.full_dataset or isinstance(self.dataloader, (list, tuple))) and self._keeps_work()
        ):
            return False
        if not self.eval_mode and next(self._work_model.buffers(), None) is not None:
            # Restoring the buffers after each product writes into tensors the graphs saved.
            return False
        key = (model_state_key(self.model), self.dropout_seed)
        if self._kept.key != key:
            if len(self._kept):
                logger.info("%s: the model changed inside frozen(); rebuilding the kept graphs.", type(self).__name__)
            self._kept.clear()
            self._kept.key = key
        return True

    def _kept_or_built(
        self, build: Callable[[], Any], outputs_bytes: Callable[[Any], int], inputs: Any, targets: Any,
        count_saved: bool = True,
    ) -> tuple[Any, bool]:
        """The kept work of the micro-batch in progress, or ``build()`` it and keep it if it fits
        ``graph_cache_max_bytes``. Returns (work, whether it is kept).

        Its size is what autograd saved while building it (``count_saved``; parameters and inputs
        excepted) plus ``outputs_bytes(work)``. Call only while ``self._reusing``.
        """
        position = self._chunk_position
        work = self._kept.get(position)
        if work is not None:
            return work, True
        if self._kept.full:
            return build(), False
        if self._graph_budget is None:
            self._graph_budget = self.graph_cache_max_bytes or default_graph_budget(self.device)
        rewind = rng_rewinder(self.device)
        try:
            if count_saved:
                with counting_saved_bytes(list(self._params) + tensors_in((inputs, targets))) as saved:
                    work = build()
                size = saved.total
            else:
                work, size = build(), 0
        except SavedTensorHooksRefused as exc:
            logger.info("%s: the model runs torch.func transforms, which refuse the hooks that measure the "
                        "memory of kept graphs (%s); nothing is kept for it.", type(self).__name__, exc)
            self.cache_graphs = False
            self._kept.give_up()
            rewind()  # the failed attempt may have drawn dropout masks
            return build(), False
        except torch.cuda.OutOfMemoryError:
            if not len(self._kept):
                raise  # nothing kept to free: this micro-batch alone does not fit
            self._drop_kept_work()
            rewind()
            return build(), False
        kept = self._kept.add(position, work, size + outputs_bytes(work), self._graph_budget)
        if not kept and not self.eval_mode:
            # Kept micro-batches draw no more dropout masks, so the ones computed afresh would draw
            # other masks than in this product: with random layers it is all or nothing.
            self._kept.give_up()
            logger.info("%s: the kept work does not fit graph_cache_max_bytes=%d bytes, and with "
                        "eval_mode=False it is kept for all micro-batches or none; keeping none.",
                        type(self).__name__, self._graph_budget)
        elif not kept:
            logger.info(
                "%s: the kept work of %d micro-batch(es) fills graph_cache_max_bytes=%d bytes; the others are "
                "computed afresh in every product (raise graph_cache_max_bytes to keep more).",
                type(self).__name__, len(self._kept), self._graph_budget,
            )
        return work, kept

    def _drop_kept_work(self) -> None:
        """Out of device memory with work kept: free it and compute afresh for the rest of the block."""
        logger.warning(
            "%s: out of device memory with %d micro-batch(es) of kept work (%d bytes); freeing them and "
            "computing every product afresh for the rest of this frozen() block. Lower "
            "graph_cache_max_bytes to keep less.", type(self).__name__, len(self._kept), self._kept.bytes,
        )
        self._kept.give_up()

    def _release_kept_work(self) -> None:
        """Free what products kept inside :meth:`frozen`."""
        self._kept.clear()
        self._graph_budget = None

    def _copy_is_stale(self) -> bool:
        """Whether the device copy of the model must be synced from the model before a product.

        Kept work is valid only for an unchanged model, so the copy is then up to date; syncing it
        would also write into tensors the kept graphs saved.
        """
        return not (self._reusing and len(self._kept))

    @contextlib.contextmanager
    def deferred_checks(self) -> Iterator[None]:
        """Postpone the NaN/Inf checks of the products in this block to :meth:`flush_checks` or the
        block's end, saving the host sync of every product. Under a process group the checks stay
        immediate (the product's all-reduce synchronises anyway, and every rank must raise alike)."""
        if self._deferred is not None:  # nested: the outer block flushes
            yield
            return
        self._deferred = []
        try:
            yield
        except BaseException:
            self._deferred = None
            raise
        pending, self._deferred = self._deferred, None
        if pending:
            self._raise_if_not_finite(pending)

    def flush_checks(self) -> None:
        """Run the checks postponed by :meth:`deferred_checks` now (one host sync for all of them)."""
        if self._deferred:
            pending, self._deferred = self._deferred, []
            self._raise_if_not_finite(pending)

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """(mean loss of one micro-batch, its curvature matrix times every column, shape (n, b)).

        ``columns[j]`` is column j of the block, split like the parameters (see ``unflatten``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _chunk_products")

    def _loss(
        self, inputs: Any, targets: Any, label: str, parameters: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        """The checked batch-mean loss of one micro-batch (under autocast in the fp16/bf16 modes).

        ``parameters`` ({name: tensor}) stand in for those parameters of the model during the call
        (``torch.func.functional_call``; the module's own tensors are back in place afterwards,
        also on error), which is how ``torch.func`` transforms differentiate the loss.
        """
        with autocast_context(self.precision, self.device):
            if parameters is None:
                outputs = call_model(self._work_model, inputs)
            else:
                outputs = _functional_call(self._work_model, parameters, inputs)
            loss = self.criterion(outputs, targets)
        self._check_loss(loss, label)
        return loss

    @property
    def _offsets(self) -> list[int]:
        offsets = [0]
        for p in self._params:
            offsets.append(offsets[-1] + p.numel())
        return offsets

    def _check_loss(self, loss: Any, label: str) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"criterion returned a {type(loss).__name__} for {label}; it must return the batch-mean "
                f"loss as a scalar torch.Tensor (do not call .item())."
            )
        if loss.dim() != 0:
            raise ValueError(
                f"criterion returned a tensor of shape {tuple(loss.shape)} for {label}; it must return the "
                f"batch-mean loss as a scalar. Use reduction='mean' (the default of torch losses)."
            )
        if not loss.requires_grad:
            raise ValueError(
                f"The loss of {label} does not depend on the chosen parameters (it has no grad_fn). Make "
                f"sure criterion computes it from the model outputs without .detach()/.item(), that it is "
                f"not called under torch.no_grad(), and that params selects parameters the loss uses."
            )

    def _raise_if_not_finite(self, checks: list[tuple[str, Tensor, Tensor]]) -> None:
        losses = torch.stack([loss.float() for _, loss, _ in checks])
        product_ok = torch.stack([ok for _, _, ok in checks])
        flags = torch.isfinite(losses) & product_ok
        if bool(flags.all()):  # the one sync of a product
            return
        bad = int((~flags).nonzero()[0, 0])
        label, loss, _ = checks[bad]
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(
                f"The loss of {label} is {loss.item()}. Check the inputs and targets of that batch for "
                f"NaN/Inf and the model for overflow (try float64, or fp16=False)."
            )
        raise NonFiniteError(
            f"The Hessian-vector product of {label} has NaN/Inf entries although its loss is finite "
            f"({loss.item():.6g}). The vector or that batch's inputs may contain NaN/Inf (an Inf input can "
            f"leave the loss finite through a saturating activation), or the second derivatives overflow: "
            f"try float64 (model.double()) or fp16=False."
        )

    # -- data ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _product_context(self) -> Iterator[None]:
        if self._work_model is not self.model and self._copy_is_stale():
            self._sync_copy()
        keep_modes = not self.eval_mode
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_model_state(self._work_model, self.eval_mode, restore_buffers=keep_modes))
            if keep_modes:
                devices = [self.device] if self.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(self.dropout_seed)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(math_attention())
            stack.enter_context(rnn_without_cudnn(self._work_model, self.device))
            stack.enter_context(fp32_math(allow_tf32=self.precision == "tf32"))
            yield

    def _sync_copy(self) -> None:
        with torch.no_grad():
            for dst, src in zip(self._work_model.parameters(), self.model.parameters()):
                dst.copy_(src, non_blocking=True)
            for dst, src in zip(self._work_model.buffers(), self.model.buffers()):
                dst.copy_(src, non_blocking=True)
        for dst, src in zip(self._work_model.modules(), self.model.modules()):
            dst.training = src.training

    def clear_batch_cache(self) -> None:
        """Forget the device copies of the batches; the next product reads the dataloader again.

        Call it after changing the data behind the dataloader (with ``cache_batches=True`` the
        batches are read once and reused by every later product).
        """
        self._cache = {}
        self._cache_bytes = 0
        self._cache_complete = False
        self._cache_overflowed = False
        self._kept.clear()  # built from the old data

    def _raw_batches(self) -> Iterator[tuple[int, Any]]:
        """Yield (position in the dataloader, batch): every batch, or the next one when stochastic."""
        if self.full_dataset:
            batches = self._on_data_stream(lambda: iter(self.dataloader))
            index = 0
            while True:
                batch = self._on_data_stream(lambda: next(batches, _END))
                if batch is _END:
                    break
                yield index, batch
                index += 1
            if index == 0:
                raise ValueError(
                    "The dataloader yielded no batches. If it is a one-shot iterator it is exhausted: pass "
                    "a torch DataLoader or a list, which can be read for every product."
                )
            return
        for attempt in range(2):
            if self._batch_iter is None:
                self._batch_iter = self._on_data_stream(lambda: iter(self.dataloader))
                self._batch_pos = 0
            batch = self._on_data_stream(lambda: next(self._batch_iter, _END))
            if batch is _END:
                self._batch_iter = None
                continue
            self._batch_pos += 1
            yield self._batch_pos - 1, batch
            return
        raise ValueError(
            "The dataloader yielded no batches (an exhausted iterator cannot be restarted): pass a torch "
            "DataLoader or a list of batches."
        )

    def _on_data_stream(self, read: Callable[[], Any]) -> Any:
        """``read()`` (start or advance the dataloader) drawing from this operator's own stream of
        the global CPU random state, which starts where the global state was at the first read.

        A DataLoader draws from the global generator (a shuffling sampler's permutation, the
        workers' base seed). Products put the global state back when they end, so without a stream
        of its own a reshuffling dataloader would draw the same order in every epoch.
        """
        user_state = torch.get_rng_state()
        if self._data_rng_state is not None:
            torch.set_rng_state(self._data_rng_state)
        try:
            return read()
        finally:
            self._data_rng_state = torch.get_rng_state()
            torch.set_rng_state(user_state)

    def _caching(self) -> bool:
        """Whether batches read now may be kept for later products.

        The full dataset is the same set of samples in every product (the mean over all samples
        does not depend on their order), so its device copies can be reused. One mini-batch per
        product must follow the dataloader, whose next epoch may be reshuffled or re-augmented;
        only a list or tuple of batches is known to give the same batches again.
        """
        if not self.cache_batches or self._cache_overflowed:
            return False
        return self.full_dataset or isinstance(self.dataloader, (list, tuple))

    def _chunks(self) -> Iterator[Chunk]:
        """Yield (label, inputs, targets, samples) micro-batches on the compute device.

        With ``cache_batches`` the micro-batches are kept on the device after they are first read
        (while they fit in ``cache_max_bytes``) and reused, so that later products neither read
        the dataloader nor copy host to device again.
        """
        if self.full_dataset and self._cache_complete:
            for index in sorted(self._cache):
                yield from self._cache[index]
            return
        # A full pass is kept only once it has completed: a shuffling dataloader puts other samples
        # at the same positions in its next epoch, so a partial cache could not be completed later.
        pending: Optional[dict[int, list[Chunk]]] = {} if self._caching() else None
        pending_bytes = 0
        for index, batch in self._raw_batches():
            if index in self._cache:  # only a list/tuple dataloader read one batch at a time gets here
                yield from self._cache[index]
                continue
            chunks, added = self._device_chunks(index, batch)
            if pending is not None:
                if self._cache_bytes + pending_bytes + added <= self.cache_max_bytes:
                    pending[index] = chunks
                    pending_bytes += added
                else:
                    pending = None
                    self._cache_overflowed = True
                    logger.info(
                        "%s: the batches take more than cache_max_bytes=%d bytes on %s, so they are read "
                        "from the dataloader for every product; raise cache_max_bytes to keep them.",
                        type(self).__name__, self.cache_max_bytes, self.device,
                    )
            yield from chunks
        if pending is not None:
            self._cache.update(pending)
            self._cache_bytes += pending_bytes
            self._cache_complete = self.full_dataset

    def _device_chunks(self, index: int, batch: Any) -> tuple[list[Chunk], int]:
        """The micro-batches of one dataloader batch on the compute device, and the bytes that
        keeping them would add (device copies, and batches the dataloader made afresh).

        A batch is split along the first dimension that all its tensors share (its rows), into
        micro-batches of at most ``max_possible_gpu_samples`` rows, each weighted by its own
        number of samples. A batch whose tensors share no first dimension (such as inputs (B, T)
        with targets flattened to (B*T,), counted by ``batch_size_fn``) cannot be split exactly,
        so it is used whole, and refused when it holds more than ``max_possible_gpu_samples``.
        """
        inputs, targets = split_batch(batch, index)
        count = num_samples(inputs, targets, index, self.batch_size_fn)
        if count == 0:
            return [], 0
        rows = leading_dim((inputs, targets))
        step = self.max_possible_gpu_samples
        if rows is None and count > step:
            shapes = sorted({tuple(t.shape) for t in tensors_in((inputs, targets))})
            raise ValueError(
                f"Batch {index} holds {count} samples, more than max_possible_gpu_samples={step}, but its tensors "
                f"(shapes {shapes}) share no first dimension to split it along exactly. Raise "
                f"max_possible_gpu_samples to at least {count}, or give every tensor the sample dimension first "
                f"(e.g. targets of shape (B, T), flattened inside the loss) so that it can be split."
            )
        moved_inputs, moved_targets = move_to(inputs, self.device), move_to(targets, self.device)
        # A list/tuple dataloader keeps its own tensors alive: holding them costs nothing more.
        owned = isinstance(self.dataloader, (list, tuple))
        added = _added_bytes((inputs, targets), (moved_inputs, moved_targets), owned)
        if rows is None or rows <= step:
            return [(f"batch {index}", moved_inputs, moved_targets, count, (index, 0))], added
        chunks = []
        unit = "samples" if self.batch_size_fn is None else "rows"
        for number, start in enumerate(range(0, rows, step)):
            stop = min(start + step, rows)
            part_inputs = slice_samples(moved_inputs, start, stop)
            part_targets = slice_samples(moved_targets, start, stop)
            part_count = stop - start if self.batch_size_fn is None else num_samples(
                part_inputs, part_targets, index, self.batch_size_fn)
            chunks.append((f"batch {index} ({unit} {start}:{stop})", part_inputs, part_targets, part_count,
                           (index, number)))
        parts = sum(chunk[3] for chunk in chunks)
        if parts != count:
            raise ValueError(
                f"Batch {index}: batch_size_fn counts {count} samples in the batch but {parts} in its micro-batches of "
                f"at most max_possible_gpu_samples={step} rows; it must count the samples of any set of rows "
                f"(e.g. inputs.shape[0], or the targets that are not ignored), so that micro-batches weigh exactly "
                f"what the batch does."
            )
        return chunks, added


def _added_bytes(source: Any, moved: Any, owned: bool) -> int:
    """Bytes held by the tensors of ``moved`` that are not already held elsewhere."""
    total = 0
    for original, copy_ in zip(tensors_in(source), tensors_in(moved)):
        if not (owned and copy_ is original):
            total += copy_.numel() * copy_.element_size()
    return total


def _functional_call(model: nn.Module, parameters: Mapping[str, Tensor], inputs: Any) -> Any:
    """``call_model`` with ``parameters`` swapped in for the model's own, through torch.func."""
    from torch.func import functional_call

    if isinstance(inputs, (tuple, list)):
        return functional_call(model, dict(parameters), tuple(inputs))
    if isinstance(inputs, Mapping):
        return functional_call(model, dict(parameters), (), dict(inputs))
    return functional_call(model, dict(parameters), (inputs,))


def rng_rewinder(device: torch.device) -> Callable[[], None]:
    """A function that puts the random state (CPU, and the device's if CUDA) back to what it is now."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return rewind
