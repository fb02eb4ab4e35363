"""The generalized Gauss-Newton operator (and, re-exported, the empirical Fisher).

For a loss ``L(theta) = mean_i l(f(x_i; theta), y_i)`` with outputs ``f`` and Jacobian
``J = df/dtheta`` (or ``sum_i``, for a criterion that sums over samples: the operator is then the
curvature of the summed loss, N times that of the mean), the generalized Gauss-Newton matrix is
``G = J^T H_out J`` with ``H_out`` the Hessian of the loss w.r.t. the outputs. It is the Hessian
with the term ``sum_k (dl/df_k) d^2 f_k / dtheta^2`` dropped, so ``G == H`` for a model linear in
its parameters, and ``G`` is positive semi-definite whenever the loss is convex in the outputs
(MSE, cross-entropy). The empirical Fisher lives in :mod:`.fisher`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from ..utils import logger
from .fisher import EmpiricalFisherOperator  # noqa: F401  (re-exported: its historical home)
from .graph_cache import tensor_bytes
from .model_operator import ModelOperator, Tangents


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
    corresponding block of the full ``G``). A micro-batch's work is its forward pass and the
    graphs of dl/df and J^T u; with ``cache_graphs`` (default) it is kept inside :meth:`frozen`,
    so later products are three backward passes through them.
    """

    def build(self, inputs: Any, targets: Any, label: str) -> _GGNGraph:
        """The forward pass of one micro-batch and the two first-order graphs of its products."""
        outputs = self._forward(inputs)
        loss = self._batch_loss(outputs, targets, label, inputs)
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

    def work_bytes(self, graph: _GGNGraph) -> int:
        return tensor_bytes([*graph.leaves, *graph.loss_grads, *graph.dummies, *graph.jt_u])

    def product(self, graph: _GGNGraph, tangents: Tangents, keep: bool) -> Tensor:
        """``G_b V = J^T (H_out (J V))`` of one micro-batch, (n, b); the graphs are always retained
        (they serve three backward passes per vector)."""
        _, leaves, loss_grads, curved, dummies, jt_u, live = graph
        out = torch.zeros(self.size, tangents.width, dtype=self.dtype, device=self.device)
        if not curved or not live:
            return out
        if self._batched is not False:
            try:
                self._batched_products(leaves, loss_grads, curved, dummies, jt_u, live, tangents.columns, out)
                self._batched = True
                return out
            except RuntimeError as exc:
                if self._batched:  # it worked before, so this is a real error
                    raise
                logger.info("GGNOperator: batched products are not supported by this model (%s); "
                            "using one product at a time.", exc)
                self._batched = False
        for j, pieces in enumerate(tangents.columns):
            self._column_product(leaves, loss_grads, curved, dummies, jt_u, live, pieces, out[:, j])
        return out

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


