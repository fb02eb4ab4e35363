"""The empirical Fisher operator: the mean outer product of per-sample gradients."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ..data import as_plain_containers, call_model, like, map_tensors, num_samples, slice_samples
from ..utils import logger
from .graph_cache import tensor_bytes
from .model_operator import ModelOperator, Tangents
from .precision import autocast_context

PER_SAMPLE_MODES = ("auto", "vmap", "loop")


class _PerSample(NamedTuple):
    """A micro-batch's per-sample gradients ``grads`` (B, n) and losses (B,), and its loss."""

    grads: Tensor
    losses: Tensor
    loss: Tensor


class EmpiricalFisherOperator(ModelOperator):
    """The empirical Fisher ``F = (1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of sample i's loss.

    Sample i's loss is ``criterion`` evaluated on that sample alone (a batch of one), which for a
    mean-reduced loss makes the batch loss the mean of the sample losses, and for a summing one
    their sum: the operator is then ``sum_i g_i g_i^T``, the Fisher of the summed loss. ``F`` is
    positive semi-definite, of rank at most the number of samples. The samples of a batch are the
    rows of its tensors (so ``batch_size_fn`` is refused). A micro-batch's work is its B
    per-sample gradients ``G`` (B, n); its product is ``G^T (G V) / B``, two matrix products.

    Args:
        per_sample: how per-sample gradients are computed: "vmap" (``torch.func``, one
            vectorised pass), "loop" (one backward pass per sample; works for every model), or
            "auto" (default: vmap, falling back to the loop, with a log message, for models that
            ``torch.func`` cannot vectorise).
        Other arguments: as for :class:`HVPOperator`. With ``cache_graphs`` (default), inside
            :meth:`frozen` each micro-batch's per-sample gradients are kept (B * n numbers,
            within ``graph_cache_max_bytes``), so later products are two matrix products.
    """

    # The per-sample gradients are outputs; torch.func transforms refuse the hooks that measure
    # saved tensors anyway.
    measures_saved_tensors = False
    per_sample_mean_products = True

    def __init__(self, *args: Any, per_sample: str = "auto", **kwargs: Any) -> None:
        if per_sample not in PER_SAMPLE_MODES:
            raise ValueError(f"per_sample={per_sample!r} is not known; use one of {', '.join(map(repr, PER_SAMPLE_MODES))}.")
        if kwargs.get("batch_size_fn") is not None:
            raise TypeError(
                "EmpiricalFisherOperator takes the samples of a batch to be the rows of its tensors (it slices "
                "them to compute each sample's gradient), so it takes no batch_size_fn. Give every tensor the "
                "sample dimension first."
            )
        super().__init__(*args, **kwargs)
        self.per_sample = per_sample
        self._check_no_batch_statistics()

    def build(self, inputs: Any, targets: Any, label: str) -> _PerSample:
        """The micro-batch's per-sample gradients and losses."""
        count = num_samples(inputs, targets, 0)
        grads, losses = None, None
        if self.per_sample in ("auto", "vmap"):
            try:
                grads, losses = self._per_sample_vmap(inputs, targets)
            except Exception as exc:  # noqa: BLE001 - any torch.func limitation means: use the loop
                if self.per_sample == "vmap":
                    raise
                logger.info("EmpiricalFisherOperator: torch.func cannot vectorise this model (%s); "
                            "using one backward pass per sample.", exc)
                self.per_sample = "loop"
        if grads is None:
            grads, losses = self._per_sample_loop(inputs, targets, count, label)
        return _PerSample(grads, losses, losses.mean())

    def work_bytes(self, work: _PerSample) -> int:
        return tensor_bytes([work.grads, work.losses])

    def product(self, work: _PerSample, tangents: Tangents, keep: bool) -> Tensor:
        """``G^T (G V) / B`` for the micro-batch's (B, n) per-sample gradients ``G``, (n, b): the mean
        over its samples, whatever the criterion's reduction (see ``per_sample_mean_products``)."""
        grads = work.grads
        return (grads.T @ (grads @ tangents.block.to(grads.dtype)) / grads.shape[0]).to(self.dtype)

    def _check_callable_now(self) -> None:
        super()._check_callable_now()
        self._check_no_batch_statistics()  # the model's modes may have changed since

    def _check_no_batch_statistics(self) -> None:
        """Refuse BatchNorm layers in training mode (with ``eval_mode=False``): they normalise with the
        statistics of the batch, which a per-sample batch of one does not have (and with which the
        sample losses would not add up to the batch loss anyway)."""
        if self.eval_mode:
            return
        training = [name or type(module).__name__ for name, module in self.model.named_modules()
                    if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training]
        if training:
            raise ValueError(
                f"EmpiricalFisherOperator computes each sample's gradient on a batch of one sample, but with "
                f"eval_mode=False the BatchNorm layer{'s' if len(training) > 1 else ''} "
                f"{', '.join(map(repr, training))} run{'' if len(training) > 1 else 's'} in training mode, "
                f"where the batch statistics of one sample do not exist. Use eval_mode=True (the default: "
                f"running statistics), or put the BatchNorm layers in eval mode (module.eval())."
            )

    def _per_sample_loop(self, inputs: Any, targets: Any, count: int, label: str) -> tuple[Tensor, Tensor]:
        grads = torch.zeros(count, self.size, dtype=self.dtype, device=self.device)
        losses = []
        offsets = self._offsets
        for i in range(count):
            loss = self._loss(slice_samples(inputs, i, i + 1), slice_samples(targets, i, i + 1), f"{label} sample {i}")
            pieces = torch.autograd.grad(loss, self._params, allow_unused=True)
            for k, g in enumerate(pieces):
                if g is not None:
                    grads[i, offsets[k] : offsets[k + 1]] = g.reshape(-1)
            losses.append(loss.detach())
        return grads, torch.stack(losses)

    def _per_sample_vmap(self, inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
        model, criterion = self._work_model, self.criterion
        chosen = {name: p.detach() for name, p in zip(self.param_names, self._params)}

        def one_loss(weights: dict, x: Any, y: Any) -> tuple[Tensor, Tensor]:
            # vmap sees plain containers; the model and the loss get the user's own types back.
            x1 = map_tensors(lambda t: t.unsqueeze(0), like(inputs, x))
            y1 = map_tensors(lambda t: t.unsqueeze(0), like(targets, y))
            loss = criterion(call_model(model, x1, weights), y1)
            return loss, loss.detach()

        randomness = "error" if self.eval_mode else "different"
        with autocast_context(self.precision, self.device):
            per_grads, losses = vmap(grad(one_loss, has_aux=True), in_dims=(None, 0, 0), randomness=randomness)(
                chosen, as_plain_containers(inputs), as_plain_containers(targets)
            )
        flat = torch.cat([per_grads[name].reshape(losses.shape[0], -1) for name in self.param_names], dim=1)
        return flat.to(self.dtype), losses
