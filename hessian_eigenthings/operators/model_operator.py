"""The machinery shared by operators built from a model, a loss and a dataloader.

A ModelOperator owns the data loop (full dataset or one mini-batch per product, micro-batching,
weighting by sample counts), the device choice, the model-state guarantees and the NaN/Inf checks.
A subclass says only what one micro-batch contributes: ``_chunk_products``.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import call_model, check_reiterable, move_to, num_samples, slice_samples, split_batch
from ..model_utils import (
    ParamSpec,
    common_device,
    common_dtype,
    preserved_model_state,
    select_parameters,
    unflatten,
)
from ..utils import check_positive_int, logger, resolve_device
from .base import Operator


class NonFiniteError(ValueError):
    """A loss or a Hessian-vector product came out NaN or Inf."""


class ModelOperator(Operator):
    """Base of curvature operators of ``criterion(model(inputs), targets)`` averaged over a dataloader.

    The operator is the sample-weighted mean over micro-batches of what ``_chunk_products``
    returns for each; see :class:`HVPOperator` for the meaning of every argument.

    Under torch.distributed (an initialised process group), each rank passes the dataloader of
    its own shard of the data and every product is ONE all-reduce of the sample-weighted sums and
    sample counts: every rank gets the same product with the curvature of the mean loss over the
    union of the shards, exact for uneven shards (``num_samples`` is then the global count). Every
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
    ) -> None:
        model = distributed.unwrap_model(model)
        names, chosen = select_parameters(model, params)
        if not callable(criterion):
            raise TypeError(f"criterion must be a callable loss(outputs, targets), got {type(criterion).__name__}.")
        check_reiterable(dataloader, full_dataset)
        self.max_possible_gpu_samples = check_positive_int(max_possible_gpu_samples, "max_possible_gpu_samples")
        model_device = common_device(chosen)
        if device is not None:
            target = resolve_device(device)
        elif model_device.type != "cpu" or not use_gpu or not torch.cuda.is_available():
            target = model_device
        else:
            target = torch.device("cuda")

        super().__init__(sum(p.numel() for p in chosen), common_dtype(chosen), target)
        self.model = model
        self.dataloader = dataloader
        self.criterion = criterion
        self.fp16 = bool(fp16)
        self.full_dataset = bool(full_dataset)
        self.is_stochastic = not self.full_dataset
        self.eval_mode = bool(eval_mode)
        self.check_finite = bool(check_finite)
        self.param_names = names
        self.dropout_seed = 0
        self._batch_iter: Optional[Iterator] = None
        self.num_samples: Optional[int] = None

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

    def _matmat(self, mat: Tensor) -> Tensor:
        columns = [unflatten(mat[:, j], self._params) for j in range(mat.shape[1])]
        total = torch.zeros_like(mat)
        seen = 0
        checks: list[tuple[str, Tensor, Tensor]] = []
        # Under a process group, an error on this rank is held until every rank has joined the
        # product's all-reduce, then raised on all of them (single process: a no-op).
        guard = distributed.ProductGuard(self.process_group, self.reduce_across_ranks, (NonFiniteError,))
        with guard, self._product_context():
            for label, inputs, targets, count in self._chunks():
                loss, hv = self._chunk_products(inputs, targets, columns, label)
                total.add_(hv, alpha=count)
                seen += count
                if self.check_finite:
                    checks.append((label, loss.detach(), torch.isfinite(hv).all()))
            if checks:
                self._raise_if_not_finite(checks)
        total, seen = guard.reduce(total, seen, mat)
        if seen == 0:
            raise ValueError("Every batch of the dataloader was empty (0 samples); there is no loss to differentiate.")
        if self.full_dataset:
            self.num_samples = seen
        return total.div_(seen)

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """(mean loss of one micro-batch, its curvature matrix times every column, shape (n, b)).

        ``columns[j]`` is column j of the block, split like the parameters (see ``unflatten``).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement _chunk_products")

    def _loss(self, inputs: Any, targets: Any, label: str) -> Tensor:
        """The checked batch-mean loss of one micro-batch (under autocast when fp16 is set)."""
        autocast = (
            torch.autocast(self.device.type, dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16)
            if self.fp16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.criterion(call_model(self._work_model, inputs), targets)
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
            f"({loss.item():.6g}). The vector may contain NaN/Inf, or the second derivatives overflow: "
            f"try float64 (model.double()) or fp16=False."
        )

    # -- data ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _product_context(self) -> Iterator[None]:
        if self._work_model is not self.model:
            self._sync_copy()
        keep_modes = not self.eval_mode
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_model_state(self._work_model, self.eval_mode, restore_buffers=keep_modes))
            if keep_modes:
                devices = [self.device] if self.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(self.dropout_seed)
            stack.enter_context(torch.enable_grad())
            yield

    def _sync_copy(self) -> None:
        with torch.no_grad():
            for dst, src in zip(self._work_model.parameters(), self.model.parameters()):
                dst.copy_(src, non_blocking=True)
            for dst, src in zip(self._work_model.buffers(), self.model.buffers()):
                dst.copy_(src, non_blocking=True)
        for dst, src in zip(self._work_model.modules(), self.model.modules()):
            dst.training = src.training

    def _raw_batches(self) -> Iterator[Any]:
        if self.full_dataset:
            empty = True
            for batch in self.dataloader:
                empty = False
                yield batch
            if empty:
                raise ValueError(
                    "The dataloader yielded no batches. If it is a one-shot iterator it is exhausted: pass "
                    "a torch DataLoader or a list, which can be read for every product."
                )
            return
        for attempt in range(2):
            if self._batch_iter is None:
                self._batch_iter = iter(self.dataloader)
            try:
                yield next(self._batch_iter)
                return
            except StopIteration:
                self._batch_iter = None
        raise ValueError(
            "The dataloader yielded no batches (an exhausted iterator cannot be restarted): pass a torch "
            "DataLoader or a list of batches."
        )

    def _chunks(self) -> Iterator[tuple[str, Any, Any, int]]:
        """Yield (label, inputs, targets, samples) micro-batches on the compute device."""
        for index, batch in enumerate(self._raw_batches()):
            inputs, targets = split_batch(batch, index)
            count = num_samples(inputs, targets, index)
            if count == 0:
                continue
            inputs, targets = move_to(inputs, self.device), move_to(targets, self.device)
            step = self.max_possible_gpu_samples
            for start in range(0, count, step):
                stop = min(start + step, count)
                label = f"batch {index}" if count <= step else f"batch {index} (samples {start}:{stop})"
                yield (
                    label,
                    slice_samples(inputs, start, stop) if count > step else inputs,
                    slice_samples(targets, start, stop) if count > step else targets,
                    stop - start,
                )
