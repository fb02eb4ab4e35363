"""Hessian-vector products of a model's loss over a dataloader."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .model_operator import ModelOperator, NonFiniteError  # noqa: F401  (NonFiniteError re-exported)


class HVPOperator(ModelOperator):
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

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch and its Hessian times every column, shape (n, b)."""
        loss = self._loss(inputs, targets, label)
        grads = torch.autograd.grad(loss, self._params, create_graph=True, allow_unused=True)
        # Gradients that are constant in the parameters (or absent) contribute zero curvature.
        live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
        out = torch.zeros(self.size, len(columns), dtype=self.dtype, device=self.device)
        if not live:
            return loss, out
        live_grads = [grads[i] for i in live]
        offsets = self._offsets
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
