"""Curvature operators beside the Hessian: the generalized Gauss-Newton and the empirical Fisher.

For a loss ``L(theta) = mean_i l(f(x_i; theta), y_i)`` with outputs ``f`` and Jacobian
``J = df/dtheta`` (or ``sum_i``, for a criterion that sums over samples: both operators are then
the curvature of the summed loss, N times that of the mean):

* Generalized Gauss-Newton (GGN): ``G = J^T H_out J`` with ``H_out`` the Hessian of the loss
  w.r.t. the outputs. It is the Hessian with the term ``sum_k (dl/df_k) d^2 f_k / dtheta^2``
  dropped, so ``G == H`` for a model linear in its parameters, and ``G`` is positive
  semi-definite whenever the loss is convex in the outputs (MSE, cross-entropy).
* Empirical Fisher: ``F = mean_i g_i g_i^T`` with ``g_i`` the gradient of sample i's loss
  (``sum_i g_i g_i^T`` for a summing criterion); PSD, rank at most the number of samples.

Both are :class:`ModelOperator` subclasses: the data loop, weighting, micro-batching, devices,
``params=`` blocks and the model-state guarantees are those of :class:`HVPOperator`, and every
solver and estimator of the package works on them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from ..data import as_plain_containers, call_model, like, map_tensors, num_samples, slice_samples
from ..utils import logger
from .graph_cache import tensor_bytes
from .model_operator import ModelOperator, _functional_call
from .precision import autocast_context


def _float_leaves(out: Any) -> list[Tensor]:
    """The floating tensors in a model output (a tensor or a tuple/list/dict of them)."""
    if isinstance(out, Tensor):
        return [out] if out.dtype.is_floating_point else []
    if isinstance(out, (tuple, list)):
        return [leaf for item in out for leaf in _float_leaves(item)]
    if isinstance(out, dict):
        return [leaf for item in out.values() for leaf in _float_leaves(item)]
    return []


class _GGNGraph(NamedTuple):
    """A micro-batch's forward pass and the graphs its GGN products differentiate.

    ``leaves`` are the model's floating outputs; ``loss_grads`` dl/df with a graph (``curved``:
    those that depend on the outputs); ``jt_u`` is J^T u for the zero ``dummies`` u, with a graph
    (``live``: the parameters it reaches). Empty ``live`` or ``curved`` means G = 0 here.
    """

    loss: Tensor
    leaves: list
    loss_grads: tuple
    curved: list
    dummies: list
    jt_u: tuple
    live: list


class GGNOperator(ModelOperator):
    """The generalized Gauss-Newton matrix ``J^T H_out J`` of ``criterion(model(inputs), targets)``.

    Exact: ``G v`` is computed as ``J^T (H_out (J v))`` with a Jacobian-vector product (the
    double-vjp trick, so any autograd model works), a Hessian-vector product of the loss w.r.t.
    the outputs, and a vector-Jacobian product. ``H_out`` is the Hessian of the criterion's loss of a
    batch, so ``G`` is averaged over samples exactly like the loss Hessian of :class:`HVPOperator`
    (and summed, for a criterion that sums over samples).

    Models may return a tensor or a tuple/list/dict of tensors; ``criterion`` receives that
    output as it is, and ``H_out`` couples all of its floating entries. Arguments are those of
    :class:`HVPOperator` (``params=`` restricts ``G`` to a parameter block, which is the
    corresponding block of the full ``G``). With ``cache_graphs`` (default), inside
    :meth:`frozen` the forward pass and the graphs of dl/df and J^T u are kept per micro-batch,
    so later products are three backward passes through them.
    """

    def _graphs(self, inputs: Any, targets: Any, label: str) -> _GGNGraph:
        """The forward pass of one micro-batch and the two first-order graphs of its products."""
        with autocast_context(self.precision, self.device):
            outputs = call_model(self._work_model, inputs)
            loss = self.criterion(outputs, targets)
        self._check_loss(loss, label)
        leaves = [t for t in _float_leaves(outputs) if t.requires_grad]
        if not leaves:
            return _GGNGraph(loss, [], (), [], [], (), [])
        # dl/df with its graph, so that a second differentiation gives H_out times a vector.
        loss_grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        curved = [i for i, g in enumerate(loss_grads) if g is not None and g.requires_grad]
        if not curved:  # the loss is linear in the outputs: H_out = 0
            return _GGNGraph(loss, leaves, loss_grads, [], [], (), [])
        # J^T u for a dummy u: differentiating it w.r.t. u along v gives J v (forward mode
        # through reverse mode), with nothing but ordinary autograd.
        dummies = [torch.zeros_like(t, requires_grad=True) for t in leaves]
        jt_u = torch.autograd.grad(leaves, self._params, grad_outputs=dummies, create_graph=True, allow_unused=True)
        live = [i for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        return _GGNGraph(loss, leaves, loss_grads, curved, dummies, jt_u, live)

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """Mean loss of one micro-batch and its GGN times every column, shape (n, b)."""
        if self._reusing:  # inside frozen(): the graphs are built once and kept (see cache_graphs)
            graph, _ = self._kept_or_built(
                lambda: self._graphs(inputs, targets, label),
                lambda g: tensor_bytes([*g.leaves, *g.loss_grads, *g.dummies, *g.jt_u]),
                inputs, targets,
            )
        else:
            graph = self._graphs(inputs, targets, label)
        loss, leaves, loss_grads, curved, dummies, jt_u, live = graph
        out = torch.zeros(self.size, len(columns), dtype=self.dtype, device=self.device)
        if not curved or not live:
            return loss, out
        if self._batched is not False:
            try:
                self._batched_products(leaves, loss_grads, curved, dummies, jt_u, live, columns, out)
                self._batched = True
                return loss, out
            except RuntimeError as exc:
                if self._batched:  # it worked before, so this is a real error
                    raise
                logger.info("GGNOperator: batched products are not supported by this model (%s); "
                            "using one product at a time.", exc)
                self._batched = False
        for j, pieces in enumerate(columns):
            self._column_product(leaves, loss_grads, curved, dummies, jt_u, live, pieces, out[:, j])
        return loss, out

    # None: not tried yet; True/False: whether vmapped backward passes work for this model.
    _batched = None

    def _column_product(self, leaves, loss_grads, curved, dummies, jt_u, live, pieces, target) -> None:
        """One column of G v = J^T (H_out (J v)), written into ``target`` (n,)."""
        jv = torch.autograd.grad(
            [jt_u[i] for i in live], dummies, grad_outputs=[pieces[i].to(jt_u[i].dtype) for i in live],
            retain_graph=True, allow_unused=True,
        )
        jv = [torch.zeros_like(t) if v is None else v for t, v in zip(leaves, jv)]
        h_jv = torch.autograd.grad(
            [loss_grads[i] for i in curved], leaves, grad_outputs=[jv[i] for i in curved],
            retain_graph=True, allow_unused=True,
        )
        h_jv = [torch.zeros_like(t) if h is None else h for t, h in zip(leaves, h_jv)]
        gv = torch.autograd.grad(leaves, self._params, grad_outputs=h_jv, retain_graph=True, allow_unused=True)
        offsets = self._offsets
        for i, g in enumerate(gv):
            if g is not None:
                target[offsets[i] : offsets[i + 1]] = g.reshape(-1).to(self.dtype)

    def _batched_products(self, leaves, loss_grads, curved, dummies, jt_u, live, columns, out) -> None:
        """All columns at once: the same three passes with a leading batch of b vectors (vmap)."""
        b = len(columns)
        stacked = [torch.stack([pieces[i] for pieces in columns]).to(jt_u[i].dtype) for i in live]
        jv = torch.autograd.grad(
            [jt_u[i] for i in live], dummies, grad_outputs=stacked, retain_graph=True, allow_unused=True,
            is_grads_batched=True,
        )
        jv = [t.new_zeros((b,) + t.shape) if v is None else v for t, v in zip(leaves, jv)]
        h_jv = torch.autograd.grad(
            [loss_grads[i] for i in curved], leaves, grad_outputs=[jv[i] for i in curved], retain_graph=True,
            allow_unused=True, is_grads_batched=True,
        )
        h_jv = [t.new_zeros((b,) + t.shape) if h is None else h for t, h in zip(leaves, h_jv)]
        gv = torch.autograd.grad(
            leaves, self._params, grad_outputs=h_jv, retain_graph=True, allow_unused=True, is_grads_batched=True
        )
        offsets = self._offsets
        for i, g in enumerate(gv):
            if g is not None:
                out[offsets[i] : offsets[i + 1], :] = g.reshape(b, -1).T.to(self.dtype)


PER_SAMPLE_MODES = ("auto", "vmap", "loop")


class EmpiricalFisherOperator(ModelOperator):
    """The empirical Fisher ``mean_i g_i g_i^T``, ``g_i`` the gradient of sample i's loss.

    Sample i's loss is ``criterion`` evaluated on that sample alone (a batch of one), which for a
    mean-reduced loss makes the batch loss the mean of the sample losses, and for a summing one
    their sum: the operator is then ``sum_i g_i g_i^T``, the Fisher of the summed loss. The
    samples of a batch are the rows of its tensors (so ``batch_size_fn`` is refused). A
    micro-batch of B samples costs its B per-sample gradients (memory B * n) and two matrix
    products per block.

    Args:
        per_sample: how per-sample gradients are computed: "vmap" (``torch.func``, one
            vectorised pass), "loop" (one backward pass per sample; works for every model), or
            "auto" (default: vmap, falling back to the loop, with a log message, for models that
            ``torch.func`` cannot vectorise).
        Other arguments: as for :class:`HVPOperator`. With ``cache_graphs`` (default), inside
            :meth:`frozen` each micro-batch's per-sample gradients are kept (B * n numbers,
            within ``graph_cache_max_bytes``), so later products are two matrix products.
    """

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

    def _chunk_products(
        self, inputs: Any, targets: Any, columns: list[list[Tensor]], label: str
    ) -> tuple[Tensor, Tensor]:
        """Loss of one micro-batch and ``G^T (G V)`` for its (B, n) per-sample gradients G, divided by B
        when the criterion averages over samples (the Fisher of the micro-batch's loss either way)."""
        count = num_samples(inputs, targets, 0)
        if self._reusing:  # inside frozen(): per-sample gradients computed once and kept
            (grads, losses), _ = self._kept_or_built(
                lambda: self._per_sample_gradients(inputs, targets, count, label),
                lambda work: tensor_bytes(work), inputs, targets,
                count_saved=False,  # nothing is saved for backward; torch.func refuses the hooks
            )
        else:
            grads, losses = self._per_sample_gradients(inputs, targets, count, label)
        loss = losses.sum() if self.reduction == "sum" else losses.mean()
        block = torch.stack([torch.cat([p.reshape(-1) for p in pieces]) for pieces in columns], dim=1)
        out = grads.T @ (grads @ block.to(grads.dtype))
        if self.reduction != "sum":  # not known yet only for single samples, where both are the same
            out = out / count
        return loss, out.to(self.dtype)

    def _per_sample_gradients(self, inputs: Any, targets: Any, count: int, label: str) -> tuple[Tensor, Tensor]:
        """The (B, n) per-sample gradients of one micro-batch and the B sample losses."""
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
        return grads, losses

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
            loss = criterion(_functional_call(model, weights, x1), y1)
            return loss, loss.detach()

        randomness = "error" if self.eval_mode else "different"
        with autocast_context(self.precision, self.device):
            per_grads, losses = vmap(grad(one_loss, has_aux=True), in_dims=(None, 0, 0), randomness=randomness)(
                chosen, as_plain_containers(inputs), as_plain_containers(targets)
            )
        flat = torch.cat([per_grads[name].reshape(losses.shape[0], -1) for name in self.param_names], dim=1)
        return flat.to(self.dtype), losses
