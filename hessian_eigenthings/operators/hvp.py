"""Hessian-vector products of a model's loss over a dataloader."""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

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


class HVPOperator(Operator):
    """The Hessian of ``criterion(model(inputs), targets)`` w.r.t. the model's parameters, as an operator.

    ``apply(v)`` returns ``H v`` for a flat vector ``v`` of shape (n,), laid out as the chosen
    parameters in ``model.parameters()`` order (see ``param_names`` / ``unflatten``).

    Args:
        model: the network. It is never changed: parameters, buffers, ``.grad``,
            ``requires_grad`` and train/eval mode are as before every call, also on error.
        dataloader: iterable of ``(inputs, targets)`` batches (a torch DataLoader, a list, ...).
        criterion: ``criterion(outputs, targets)`` returning the *mean* loss over the batch (a
            scalar tensor), e.g. ``torch.nn.functional.cross_entropy``.
        use_gpu: compute on CUDA when the model is on the CPU and a GPU is available (on a copy of
            the model, synced from the original before every product). A model already on a GPU is
            used where it is.
        fp16: run forward and backward passes under autocast (float16 on CUDA, bfloat16 on CPU);
            vectors and accumulation stay in the parameters' dtype. Faster, less accurate.
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
            dropout masks are drawn from a fixed seed (the same masks in every product) without
            touching the global random state.
        device: compute device; overrides ``use_gpu``. Default: the model's device.
        check_finite: raise :class:`NonFiniteError`, naming the batch, when a loss or a product is
            NaN/Inf (costs one device sync per product).
    """

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
        with self._product_context():
            for label, inputs, targets, count in self._chunks():
                loss, hv = self._chunk_products(inputs, targets, columns, label)
                total.add_(hv, alpha=count)
                seen += count
                if self.check_finite:
                    checks.append((label, loss.detach(), torch.isfinite(hv).all()))
        if seen == 0:
            raise ValueError("Every batch of the dataloader was empty (0 samples); there is no loss to differentiate.")
        if self.full_dataset:
            self.num_samples = seen
        if checks:
            self._raise_if_not_finite(checks)
        return total.div_(seen)

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch and its Hessian times every column, shape (n, b)."""
        autocast = (
            torch.autocast(self.device.type, dtype=torch.float16 if self.device.type == "cuda" else torch.bfloat16)
            if self.fp16
            else contextlib.nullcontext()
        )
        with autocast:
            loss = self.criterion(call_model(self._work_model, inputs), targets)
        self._check_loss(loss, label)
        grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        # Gradients that are constant in the parameters (or absent) contribute zero curvature.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = torch.zeros(self.size, len(columns), dtype=self.dtype, device=self.device)
        if not live:
            return loss, out
        live_grads = [grads[i] for i in live]
        offsets = [0]
        for p in self._params:
            offsets.append(offsets[-1] + p.numel())
        for j, pieces in enumerate(columns):
            hv = torch.autograd.grad(
                live_grads,
                self._params,
                grad_outputs=[pieces[i] for i in live],
                retain_graph=j < len(columns) - 1,
                allow_unused=True,
            )
            for i, h in enumerate(hv):
                if h is not None:
                    out[offsets[i] : offsets[i + 1], j] = h.reshape(-1)
        return loss, out

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
