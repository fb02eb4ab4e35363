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
from ..utils import check_bool, check_positive_int, logger, progress, resolve_device
from .loss_curvature import batch_reduction


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
    params: ParamSpec = None,
    eval_mode: bool = True,
    device: Any = None,
    use_gpu: bool = True,
    max_possible_gpu_samples: int = 256,
    verbose: bool = True,
    check_model: Optional[Callable[[nn.Module, list[str], list[Tensor]], Any]] = None,
) -> BackpropResult:
    """Run ``chunk_diagonal`` on every micro-batch of ``dataloader`` and combine the results.

    Args:
        method: the public name, for messages and the progress bar.
        model, dataloader, criterion: as for the model operators: ``criterion(model(inputs), targets)``.
        chunk_diagonal: the method's per-micro-batch computation (see :data:`ChunkDiagonal`).
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
    step = check_positive_int(max_possible_gpu_samples, "max_possible_gpu_samples")
    dtype = common_dtype(chosen)
    model_device = common_device(chosen)
    target = resolve_compute_device(model_device, device, use_gpu)
    shapes = [p.shape for p in chosen]

    with _untouched_random_state(target), preserved_model_state(model, eval_mode, restore_buffers=True):
        if target == model_device or (target.type == model_device.type == "cuda" and target.index is None):
            work = model
        else:
            logger.info("%s: computing on %s with a copy of the model (the model is on %s).", method, target,
                        model_device)
            work = copy.deepcopy(model).to(target)
            if eval_mode:
                work.eval()
        named = dict(work.named_parameters())
        work_params = [named[name] for name in names]
        if check_model is not None:
            check_model(work, names, work_params)
        totals: Optional[list[Tensor]] = None
        variance: Optional[Tensor] = None
        seen, passes, reduction = 0, 0, None
        total_batches = _length(dataloader)
        with progress(total=total_batches, desc=method, verbose=verbose) as bar:
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
                    draws = pieces if pieces and isinstance(pieces[0], list) else [pieces]
                    passes += chunk.passes
                    weight = float(stop - start) if reduction == "mean" else 1.0
                    flat = [torch.cat([d.reshape(-1) for d in draw]).to(dtype) * weight for draw in draws]
                    if totals is None:
                        totals = [torch.zeros_like(f) for f in flat]
                        variance = torch.zeros_like(flat[0]) if len(flat) > 1 else None
                    for total, f in zip(totals, flat):
                        total.add_(f)
                    if variance is not None:
                        # draws are independent across micro-batches: variances of their means add up
                        stacked = torch.stack(flat)
                        variance.add_(stacked.var(dim=0, unbiased=True) / len(flat))
                    seen += stop - start
                bar.update(1)
        if totals is None or seen == 0:
            raise ValueError(f"{method}: every batch of the dataloader was empty; there is no loss to differentiate.")
        if distributed.is_distributed():
            packed = torch.cat([*totals, *([variance] if variance is not None else []),
                                torch.tensor([float(seen)], dtype=totals[0].dtype, device=totals[0].device)])
            packed = distributed.all_reduce_sum(packed)
            n = totals[0].numel()
            totals = [packed[i * n : (i + 1) * n] for i in range(len(totals))]
            if variance is not None:
                variance = packed[len(totals) * n : (len(totals) + 1) * n]
            seen = int(round(float(packed[-1])))
        if reduction == "mean":
            totals = [t / seen for t in totals]
            if variance is not None:
                variance = variance / seen**2
    return BackpropResult(totals, variance, seen, reduction, names, shapes, passes)


def _length(dataloader: Any) -> Optional[int]:
    try:
        return len(dataloader)
    except TypeError:
        return None


def _detect_reduction(method: str, model: nn.Module, criterion: Callable, inputs: Any, targets: Any) -> str:
    """"mean" or "sum" for the criterion, judged once on the first micro-batch."""
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
