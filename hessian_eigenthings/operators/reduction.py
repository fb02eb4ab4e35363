"""How a criterion's batch losses add up to the loss whose curvature a model operator is.

A criterion either averages its samples' losses (``reduction="mean"``, torch's default) or sums
them (``reduction="sum"``). Over a dataset of N samples in batches b of B_b samples:

* mean: the loss is ``L = (1/N) sum_b B_b L_b``, so a batch's (or micro-batch's) curvature is
  weighted by its number of samples and the total divided by N;
* sum: the loss is ``L = sum_b L_b``, so curvatures are added as they are.

Both are exact for unequal batches and for micro-batches. A loss module says which it is through
its ``reduction`` attribute (as does ``functools.partial(F.cross_entropy, reduction="sum")``); for
a plain function the operator finds out from the data (:class:`ReductionProbe`), or is told
(``reduction=`` of the operator).
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..data import map_tensors, tensors_in
from ..utils import user_stacklevel

REDUCTIONS = ("mean", "sum")

# Reductions of torch's loss modules that average over samples: "batchmean" (KLDivLoss) divides by
# the batch size, and "mean" over all elements is a per-sample mean for samples of equal size.
_MEAN_NAMES = ("mean", "batchmean")


def declared_reduction(criterion: Callable[..., Any]) -> Optional[str]:
    """The reduction a criterion states: a loss module's ``reduction`` attribute, or the
    ``reduction=`` keyword of a ``functools.partial``; None when it states none."""
    if isinstance(criterion, nn.Module):
        value = getattr(criterion, "reduction", None)
    elif isinstance(criterion, functools.partial):
        value = criterion.keywords.get("reduction")
    else:
        return None
    if value is None:
        return None
    if value in _MEAN_NAMES:
        return "mean"
    if value == "sum":
        return "sum"
    raise ValueError(
        f"criterion has reduction={value!r}; a model operator needs a scalar loss per batch: use "
        f"reduction='mean' (the Hessian of the mean loss over the dataset) or reduction='sum' (of the sum)."
    )


def resolve_reduction(reduction: Optional[str], criterion: Callable[..., Any]) -> Optional[str]:
    """The operator's reduction from its ``reduction`` argument and the criterion's own statement;
    None: to be found from the data."""
    if reduction is not None and reduction not in REDUCTIONS:
        raise ValueError(
            f"reduction={reduction!r} is not known; use 'mean' (the criterion averages over the samples of a "
            f"batch), 'sum' (it sums over them) or None (read it from a loss module, or find it from the data)."
        )
    stated = declared_reduction(criterion)
    if reduction is not None and stated is not None and reduction != stated:
        raise ValueError(
            f"reduction={reduction!r} contradicts the criterion, whose own reduction is {stated!r}; leave "
            f"reduction=None to use the criterion's."
        )
    return reduction or stated


class ReductionProbe:
    """Finds whether a criterion averages or sums over samples, from the micro-batches of a product.

    :meth:`observe` looks at one micro-batch and returns "mean", "sum", or None while the data seen
    cannot tell (one sample so far, every loss zero, a loss not finite). It compares the loss
    ``L`` of a set of samples with the losses ``L1``, ``L2`` of two parts of it weighing ``w1`` and
    ``w2`` samples: a mean satisfies ``L = (w1 L1 + w2 L2) / (w1 + w2)`` and a sum ``L = L1 + L2``.
    The micro-batch's outputs are those of a product's own forward pass where the caller has them,
    else from one more forward pass (the caller's ``forward``); the parts are, by preference:

    * the two halves of the rows that the model outputs and the targets share (samples, or the
      tokens of flattened language-model outputs), weighing their numbers of rows;
    * the two halves of the batch (the rows its inputs and targets share), each run through the
      model (two more forward passes), weighing what ``batch_size_fn`` counts in them (or their
      numbers of samples);
    * two micro-batches of one sample each, put together.

    A loss that satisfies neither (a weighted mean, a mean over a varying number of non-ignored
    targets) gets a warning and is taken as a mean, which is what the operator then computes (the
    mean of the batch losses weighted by their samples).

    Args:
        criterion: the loss ``criterion(outputs, targets)``.
        batch_size_fn: the user's count of a batch's samples, or None (its rows).
    """

    def __init__(self, criterion: Callable[[Any, Any], Tensor], batch_size_fn: Optional[Callable] = None) -> None:
        self.criterion = criterion
        self.batch_size_fn = batch_size_fn
        self.non_finite = False  # a loss was NaN/Inf: the product's own check reports it
        self.failure: Optional[str] = None  # why the model or criterion failed on a part of a batch
        self.found: Optional[str] = None  # the reduction, once the data showed it
        self._single: Optional[tuple[Any, Any, float]] = None  # (outputs, targets, weight) of one sample

    def observe(self, inputs: Any, targets: Any, forward: Callable[[Any], Any], outputs: Any = None) -> Optional[str]:
        """The reduction as far as this micro-batch shows it. ``forward(inputs)`` returns the model
        outputs (without gradients, in eval mode: the caller's business); ``outputs``, where
        given, are the micro-batch's outputs already (a product's own forward pass, detached).

        A model or criterion that fails on a part of a batch (e.g. one written for a fixed batch
        size) shows nothing: the failure is noted in :attr:`failure` and None returned.
        """
        try:
            self.found = self._observe(inputs, targets, forward, outputs)
        except Exception as exc:  # noqa: BLE001 - the product itself reports errors of the whole batch
            self.failure = f"{type(exc).__name__}: {exc}"
        return self.found

    def _observe(self, inputs: Any, targets: Any, forward: Callable[[Any], Any], outputs: Any) -> Optional[str]:
        outputs = map_tensors(_at_least_float32, forward(inputs) if outputs is None else outputs)
        rows = _shared_rows((outputs, targets))
        if self.batch_size_fn is None and rows is not None and rows >= 2:
            half = rows // 2
            parts = [(_rows(outputs, a, b), _rows(targets, a, b), b - a) for a, b in ((0, half), (half, rows))]
            return self._compare(outputs, targets, parts, warn=True)
        samples = _shared_rows((inputs, targets))
        if samples is not None and samples >= 2:
            half = samples // 2
            parts = []
            for a, b in ((0, half), (half, samples)):
                part_inputs, part_targets = _rows(inputs, a, b), _rows(targets, a, b)
                parts.append((map_tensors(_at_least_float32, forward(part_inputs)), part_targets,
                              self._weight(part_inputs, part_targets, b - a)))
            return self._compare(outputs, targets, parts, warn=True)
        if rows is not None and rows >= 2:
            # Only the output rows can be split, and batch_size_fn weighs batches, not rows: compare
            # by rows, and trust the user's weights where the loss is not a mean over rows.
            half = rows // 2
            parts = [(_rows(outputs, a, b), _rows(targets, a, b), b - a) for a, b in ((0, half), (half, rows))]
            return self._compare(outputs, targets, parts, warn=False)
        if samples == 1:
            return self._pair_singles(outputs, targets, self._weight(inputs, targets, 1))
        if _largest_rows((outputs, targets)) >= 2:
            warnings.warn(
                "Cannot tell whether the criterion averages or sums over the samples of a batch: neither the "
                "batch nor the model outputs with the targets share a first dimension to split them along. The "
                "operator takes it as a mean (the Hessian of the sample-weighted mean of the batch losses); pass "
                "reduction='mean' or reduction='sum' to the operator to say which it is.",
                stacklevel=user_stacklevel(),
            )
            return "mean"
        return None

    def _weight(self, inputs: Any, targets: Any, rows: int) -> float:
        return float(rows if self.batch_size_fn is None else self.batch_size_fn(inputs, targets))

    def _pair_singles(self, outputs: Any, targets: Any, weight: float) -> Optional[str]:
        """Keep a one-sample micro-batch until a second one comes, then compare their union."""
        if self._single is None:
            self._single = (outputs, targets, weight)
            return None
        (first_outputs, first_targets, first_weight), self._single = self._single, None
        joined_outputs, joined_targets = _join_rows(first_outputs, outputs), _join_rows(first_targets, targets)
        if joined_outputs is None or joined_targets is None:
            return None
        parts = [(first_outputs, first_targets, first_weight), (outputs, targets, weight)]
        return self._compare(joined_outputs, joined_targets, parts, warn=True)

    def _compare(self, outputs: Any, targets: Any, parts: list[tuple[Any, Any, float]], warn: bool) -> Optional[str]:
        whole = _value(self.criterion(outputs, targets))
        losses = [_value(self.criterion(part_outputs, part_targets)) for part_outputs, part_targets, _ in parts]
        weights = [weight for _, _, weight in parts]
        if not all(math.isfinite(x) for x in [whole, *losses]):
            self.non_finite = True
            return None
        if sum(weights) <= 0:
            return None
        floats = [t for t in tensors_in(outputs) if t.dtype.is_floating_point]
        eps = max((torch.finfo(t.dtype).eps for t in floats), default=2.0**-23)
        rows = max(_largest_rows((outputs, targets)), 2)
        tolerance = 64 * eps * math.sqrt(rows) * (abs(whole) + sum(abs(x) for x in losses)) + 1e-300
        is_mean = abs(whole - sum(w * x for w, x in zip(weights, losses)) / sum(weights)) <= tolerance
        is_sum = abs(whole - sum(losses)) <= tolerance
        if is_mean and is_sum:
            return None  # every loss is zero here
        if is_sum:
            return "sum"
        if not is_mean and warn:
            counted = "samples" if self.batch_size_fn is None else "samples counted by batch_size_fn"
            warnings.warn(
                f"The criterion is neither a per-sample mean nor a per-sample sum: its loss of a batch is "
                f"{whole:.6g}, and of two parts of it with {weights[0]:g} and {weights[1]:g} {counted} "
                f"{losses[0]:.6g} and {losses[1]:.6g} (e.g. a weighted mean, or a mean over the targets that are "
                f"not ignored). The operator computes the Hessian of the mean of the batch losses weighted by "
                f"their {counted}, which then depends on how the data is batched. Pass batch_size_fn to weight "
                f"the batches by what the loss averages over (e.g. the targets that are not ignored), or "
                f"reduction='mean' to silence this warning.",
                stacklevel=user_stacklevel(),
            )
        return "mean"


def _join_rows(first: Any, second: Any) -> Any:
    """Two structures of one sample each as one of two samples (tensors joined along their first
    dimension); None if their structures differ."""
    a, b = tensors_in(first), tensors_in(second)
    if len(a) != len(b) or any(x.dim() != y.dim() or x.shape[1:] != y.shape[1:] for x, y in zip(a, b)):
        return None
    pieces = iter(b)

    def join(t: Tensor) -> Tensor:
        other = next(pieces)
        return torch.cat([t, other]) if t.dim() > 0 else t

    return map_tensors(join, first)


def _value(loss: Any) -> float:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        return math.nan  # the product's own check of the loss says what is wrong with it
    return float(loss.detach().double())


def _at_least_float32(t: Tensor) -> Tensor:
    # Half-precision outputs would round the three losses too coarsely to tell a mean from a sum.
    return t.float() if t.dtype.is_floating_point and torch.finfo(t.dtype).bits < 32 else t


def _shared_rows(obj: Any) -> Optional[int]:
    sizes = {t.shape[0] for t in tensors_in(obj) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def _largest_rows(obj: Any) -> int:
    return max((t.shape[0] for t in tensors_in(obj) if t.dim() > 0), default=0)


def _rows(obj: Any, start: int, stop: int) -> Any:
    return map_tensors(lambda t: t[start:stop] if t.dim() > 0 else t, obj)


class WeightedSum:
    """The sum of per-micro-batch results, weighted as a reduction needs: by samples for a mean,
    as they are for a sum. While the reduction is not known yet both sums are kept.

    Args:
        like: a tensor shaped like one result (e.g. the (n, b) product block).
        reduction: "mean", "sum" or None (not known yet).
        per_sample_mean: the results are per-sample means whatever the reduction (such as the
            empirical Fisher's, built from per-sample gradients), so they are weighted by their
            samples for a sum too; only :func:`finish` then differs.
    """

    def __init__(self, like: Tensor, reduction: Optional[str], per_sample_mean: bool = False) -> None:
        self.reduction = reduction
        self.per_sample_mean = per_sample_mean
        self._weighted = torch.zeros_like(like) if reduction != "sum" or per_sample_mean else None
        self._plain = torch.zeros_like(like) if reduction != "mean" and not per_sample_mean else None
        self.samples = 0
        self.all_single = True  # every micro-batch so far had at most one sample

    def decide(self, reduction: str) -> None:
        """Fix the reduction, dropping the sum the other one needed."""
        self.reduction = reduction
        if self.per_sample_mean:
            return
        if reduction == "mean":
            self._plain = None
        else:
            self._weighted = None

    def add(self, value: Tensor, samples: int) -> None:
        """Add one micro-batch's result, computed on its ``samples`` samples."""
        if self._weighted is not None:
            self._weighted.add_(value, alpha=samples)
        if self._plain is not None:
            self._plain.add_(value)
        self.samples += samples
        self.all_single = self.all_single and samples <= 1

    @property
    def ambiguous(self) -> bool:
        """Whether a mean and a sum would differ and the reduction is still unknown."""
        return self.reduction is None and not (self.all_single and self.samples <= 1)

    def total(self) -> Tensor:
        """The sum to reduce across ranks and then finish (see :func:`finish`); with the reduction
        still unknown the two sums are equal (see :attr:`ambiguous`), so either will do."""
        return self._weighted if self._weighted is not None else self._plain


def finish(total: Tensor, samples: int, reduction: Optional[str]) -> Tensor:
    """The operator's result from the (all-reduced) sum: divided by the samples for a mean."""
    return total if reduction == "sum" else total.div_(samples)
