"""What the backpropagated diagonals (HesScale, the exact and Monte-Carlo GGN diagonals) share:
one pass over the data, micro-batch by micro-batch, each contributing the diagonal of its own
loss's curvature, combined exactly as the model operators combine products.

With a loss that averages over its batch ("mean"), the result is the diagonal for the mean loss
over every sample of the dataloader (micro-batch b weighted by its sample count); with one that
sums ("sum"), for the summed loss. The model is left as it was: parameters, buffers, ``.grad``,
``requires_grad``, train/eval modes and the global random state, also when a call raises.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import call_model, check_reiterable, move_to, num_samples, slice_samples, split_batch
from ..model_utils import ParamSpec, common_device, common_dtype, preserved_model_state, select_parameters
from ..operators.options import resolve_max_possible_gpu_samples
from ..utils import check_bool, logger, progress, resolve_device
from .loss_curvature import batch_reduction, declared_reduction


@dataclass
class Chunk:
    """One micro-batch on the compute device, and what the method needs to know about the loss."""

    inputs: Any
    targets: Any
    count: int
    reduction: str  # "mean" or "sum": how the criterion combines this micro-batch's samples
    passes: int = 0  # backward passes the method made for it (the method counts them)


#: What a method computes for one micro-batch: the diagonal of that micro-batch's own loss (as the
#: criterion reduces it) for each chosen parameter, shaped like the parameter, or a list of such
#: lists (several independent draws, for the Monte-Carlo method).
ChunkDiagonal = Callable[[nn.Module, list[str], list[Tensor], Chunk], Any]


@dataclass
class BackpropResult:
    """The combined diagonal (flat, in the chosen parameters' order) and how it was obtained."""

    draws: list[Tensor]  # one (n,) diagonal per independent draw (one for deterministic methods)
    variance: Optional[Tensor]  # (n,) variance of the draws' mean, Monte-Carlo methods only
    num_samples: int
    reduction: str
    names: list[str]
    shapes: list[torch.Size]
    passes: int


def resolve_compute_device(model_device: torch.device, device: Any, use_gpu: bool) -> torch.device:
    """Where to compute, as the model operators choose: ``device`` if given; else CUDA for a CPU
    model when ``use_gpu`` and CUDA is available; else the model's device."""
    if device is not None:
        return resolve_device(device)
    if model_device.type != "cpu" or not use_gpu or not torch.cuda.is_available():
        return model_device
    return torch.device("cuda")


@contextlib.contextmanager
def _untouched_random_state(device: torch.device) -> Iterator[None]:
    """Put the global random state back afterwards (a DataLoader's iterator draws from it)."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        yield


def backprop_diagonal(
    method: str,
    model: nn.Module,
    dataloader: Any,
    criterion: Callable[[Any, Any], Tensor],
    chunk_diagonal: ChunkDiagonal,
    *,
    draws: int = 1,
    params: ParamSpec = None,
    eval_mode: bool = True,
    device: Any = None,
    use_gpu: bool = True,
    max_possible_gpu_samples: Optional[int] = None,
    verbose: bool = True,
    check_model: Optional[Callable[[nn.Module, list[str], list[Tensor]], Any]] = None,
) -> BackpropResult:
    """Run ``chunk_diagonal`` on every micro-batch of ``dataloader`` and combine the results.

    Under torch.distributed each rank passes its own shard of the data; the sums (and sample
    counts) are all-reduced once at the end, so every rank gets the diagonal over all shards, and
    an error on one rank is raised on every rank instead of leaving the others waiting.

    Args:
        method: the public name, for messages and the progress bar.
        model, dataloader, criterion: as for the model operators: ``criterion(model(inputs), targets)``.
        chunk_diagonal: the method's per-micro-batch computation (see :data:`ChunkDiagonal`).
        draws: how many independent diagonals ``chunk_diagonal`` returns (1 unless Monte-Carlo).
        params, eval_mode, device, use_gpu, max_possible_gpu_samples: as for :class:`HVPOperator`.
        verbose: show a progress bar over the batches.
        check_model: called with the model (in the modes it is used in), the chosen parameters'
            names and the parameters, before any data is read, to refuse an unsupported model early.
    """
    model = distributed.unwrap_model(model)
    names, chosen = select_parameters(model, params)
    if not callable(criterion):
        raise TypeError(f"{method}: loss must be a callable loss(outputs, targets), got {type(criterion).__name__}.")
    check_reiterable(dataloader, True)
    eval_mode = check_bool(eval_mode, "eval_mode")
    use_gpu = check_bool(use_gpu, "use_gpu")
    verbose = check_bool(verbose, "verbose")
    dtype = common_dtype(chosen)
    model_device = common_device(chosen)
    target = resolve_compute_device(model_device, device, use_gpu)
    step = resolve_max_possible_gpu_samples(max_possible_gpu_samples, target)
    size = sum(p.numel() for p in chosen)

    with _untouched_random_state(target), preserved_model_state(model, eval_mode, restore_buffers=True):
        work = _work_model(method, model, model_device, target, eval_mode)
        named = dict(work.named_parameters())
        work_params = [named[name] for name in names]
        if check_model is not None:
            check_model(work, names, work_params)
        sums = _Sums(draws, size, dtype, target)
        reduction: Optional[str] = None
        guard = distributed.ProductGuard()
        with guard, progress(total=_length(dataloader), desc=method, verbose=verbose) as bar:
            for index, batch in enumerate(dataloader):
                inputs, targets = split_batch(batch, index)
                count = num_samples(inputs, targets, index)
                inputs, targets = move_to(inputs, target), move_to(targets, target)
                for start in range(0, count, step):
                    stop = min(count, start + step)
                    chunk_in = slice_samples(inputs, start, stop) if count > step else inputs
                    chunk_out = slice_samples(targets, start, stop) if count > step else targets
                    if reduction is None:
                        reduction = _detect_reduction(method, work, criterion, chunk_in, chunk_out)
                    chunk = Chunk(chunk_in, chunk_out, stop - start, reduction)
                    with torch.enable_grad():
                        pieces = chunk_diagonal(work, names, work_params, chunk)
                    found = pieces if pieces and isinstance(pieces[0], list) else [pieces]
                    sums.add(found, float(stop - start) if reduction == "mean" else 1.0, stop - start, chunk.passes)
                bar.update(1)
        packed, seen, _ = guard.reduce(sums.packed(), sums.samples, torch.zeros(1, 1))
        if seen == 0:
            raise ValueError(f"{method}: every batch of the dataloader was empty; there is no loss to differentiate.")
        totals, variance = sums.unpack(packed)
        reduction = reduction or declared_reduction(criterion) or "mean"
        if reduction == "mean":
            totals = [t / seen for t in totals]
            if variance is not None:
                variance = variance / seen**2
    return BackpropResult(totals, variance, seen, reduction, names, [p.shape for p in chosen], sums.passes)


class _Sums:
    """Running sums of the weighted per-micro-batch diagonals (one per draw), and for several
    draws the variance of their mean (draws are independent across micro-batches, so the
    variances of the micro-batches' means add up)."""

    def __init__(self, draws: int, size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.totals = [torch.zeros(size, dtype=dtype, device=device) for _ in range(draws)]
        self.variance = torch.zeros(size, dtype=dtype, device=device) if draws > 1 else None
        self.samples = 0
        self.passes = 0

    def add(self, found: list[list[Tensor]], weight: float, samples: int, passes: int) -> None:
        if len(found) != len(self.totals):
            raise RuntimeError(f"expected {len(self.totals)} draw(s) from the method, got {len(found)}")
        flat = [torch.cat([d.reshape(-1) for d in draw]).to(self.totals[0].dtype) * weight for draw in found]
        for total, value in zip(self.totals, flat):
            total.add_(value)
        if self.variance is not None:
            self.variance.add_(torch.stack(flat).var(dim=0, unbiased=True) / len(flat))
        self.samples += samples
        self.passes += passes

    def packed(self) -> Tensor:
        """Everything to all-reduce, as one (k, 1) column."""
        parts = self.totals + ([self.variance] if self.variance is not None else [])
        return torch.cat(parts).unsqueeze(1)

    def unpack(self, packed: Tensor) -> tuple[list[Tensor], Optional[Tensor]]:
        n = self.totals[0].numel()
        pieces = list(packed[:, 0].split(n))
        if self.variance is not None:
            return pieces[:-1], pieces[-1]
        return pieces, None


def _work_model(method: str, model: nn.Module, model_device: torch.device, target: torch.device,
                eval_mode: bool) -> nn.Module:
    """The model itself, or a copy on the compute device (in the same modes)."""
    if target == model_device or (target.type == model_device.type == "cuda" and target.index is None):
        return model
    logger.info("%s: computing on %s with a copy of the model (the model is on %s).", method, target, model_device)
    work = copy.deepcopy(model).to(target)
    if eval_mode:
        work.eval()
    return work


def _length(dataloader: Any) -> Optional[int]:
    try:
        return len(dataloader)
    except TypeError:
        return None


def _detect_reduction(method: str, model: nn.Module, criterion: Callable, inputs: Any, targets: Any) -> str:
    """"mean" or "sum" for the criterion, judged once on the first micro-batch."""
    declared = declared_reduction(criterion)
    if declared is not None:
        return declared
    with torch.no_grad():
        outputs = call_model(model, inputs)
    reduction = batch_reduction(criterion, outputs, targets)
    if reduction is None:
        logger.warning("%s: the loss is 0 on the first micro-batch, so whether it averages or sums over samples "
                       "cannot be told; taking it as a mean. Pass a loss module with reduction='sum' if it sums.",
                       method)
        return "mean"
    return reduction


def as_estimate(result: BackpropResult, method: str, std_error: str) -> "DiagonalEstimate":
    """The combined diagonal as a :class:`DiagonalEstimate`, with ``info["by_parameter"]``.

    ``std_error``: "zero" (an exact method), "unknown" (a deterministic approximation: NaN), or
    "sampled" (Monte-Carlo: the standard error of the mean of the draws, inf for a single draw).
    """
    from .diagonal import DiagonalEstimate

    diagonal = torch.stack(result.draws).mean(dim=0) if len(result.draws) > 1 else result.draws[0]
    if std_error == "zero":
        error = torch.zeros_like(diagonal)
    elif std_error == "unknown":
        error = torch.full_like(diagonal, float("nan"))
    elif result.variance is None:
        error = torch.full_like(diagonal, float("inf"))
    else:
        error = result.variance.clamp_min(0).sqrt()
    pieces, start = {}, 0
    for name, shape in zip(result.names, result.shapes):
        size = shape.numel()
        pieces[name] = diagonal[start : start + size].view(shape)
        start += size
    info = {
        "by_parameter": pieces,
        "num_samples": result.num_samples,
        "reduction": result.reduction,
        "backward_passes": result.passes,  # over the whole dataset, besides the forward passes
    }
    return DiagonalEstimate(diagonal, error, 0, len(result.draws), method, True, info)
