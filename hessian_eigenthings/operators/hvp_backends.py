"""The ways to compute one micro-batch's Hessian times a block of b vectors.

Every backend takes the b vectors as ``tangents``: one tensor of shape (b, *p.shape) per
parameter p, and returns rows of shape (b, n): row j is ``H v_j`` laid out like the flat
parameter vector. All of them are exact (they differ only in rounding):

* double backward: ``g = dL/dθ`` with a graph (:func:`first_order_graph`), then ``H v = d(g·v)/dθ``
  by a second backward pass (:func:`second_backward`). One vector at a time (the first-order
  graph is reused), or all b at once through ``torch.autograd.grad(..., is_grads_batched=True)``,
  which vmaps the second backward.
* forward over reverse: ``H v = jvp(grad(L), θ, v)`` with ``torch.func``, the loss evaluated
  through ``functional_call`` (:func:`forward_over_reverse`, which returns the loss too). All b
  at once is ``vmap`` over the tangents, which shares the forward and first backward pass
  between the b vectors.
* linearize: ``torch.func.linearize`` of the gradient (:func:`linearized_gradient`) traces the
  forward-over-reverse computation once and keeps its primal values, so that a later product is
  only the tangent half, one jvp (:func:`linearized_product`; vmapped for b vectors). Tracing
  costs far more than a product (on a CPU about 100 gradients per micro-batch), so it only pays
  over many products of a fixed model and data; the traced graph holds every intermediate value.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

BACKENDS = ("double_backward", "forward_over_reverse", "linearize")


def _rows_from_blocks(blocks: Sequence[Optional[Tensor]], params: Sequence[Tensor], b: int) -> Tensor:
    """Per-parameter (b, *shape) blocks (None: no curvature) as one (b, n) tensor."""
    ref = params[0]
    pieces = [
        torch.zeros(b, p.numel(), dtype=p.dtype, device=p.device) if h is None else h.reshape(b, -1).to(p.dtype)
        for h, p in zip(blocks, params)
    ]
    if not pieces:
        return torch.zeros(b, 0, dtype=ref.dtype, device=ref.device)
    return torch.cat(pieces, dim=1)


@contextlib.contextmanager
def _quiet_vmap_fallbacks() -> Iterator[None]:
    # vmap runs ops without a batching rule as a slow loop and warns every time; HVPOperator's
    # timing of the candidates measures that cost, and the warning would repeat on every product.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        yield


class FirstOrderGraph(NamedTuple):
    """A micro-batch's loss and its gradient with the autograd graph that produced it.

    ``live`` are the indices of the parameters whose gradient depends on the parameters (the
    others have zero curvature); ``grads`` their gradients, in that order.
    """

    loss: Tensor
    live: list[int]
    grads: list[Tensor]


def first_order_graph(loss_fn: Callable[[], Tensor], params: Sequence[Tensor]) -> FirstOrderGraph:
    """The forward pass and the gradient of ``loss_fn()`` w.r.t. ``params``, keeping the graph."""
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # Gradients that are constant in the parameters (or absent) contribute zero curvature.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    return FirstOrderGraph(loss, live, [grads[i] for i in live])


def second_backward(
    graph: FirstOrderGraph, params: Sequence[Tensor], tangents: Sequence[Tensor], batched: bool, keep: bool
) -> Tensor:
    """``H v`` for each of b vectors from a first-order graph, as (b, n) rows.

    ``keep`` leaves the graph usable for later products (False frees it after the last vector).
    """
    b = tangents[0].shape[0]
    if not graph.live:
        return _rows_from_blocks([None] * len(params), params, b)
    if batched:
        with _quiet_vmap_fallbacks():
            blocks = torch.autograd.grad(
                graph.grads, params, grad_outputs=[tangents[i] for i in graph.live],
                retain_graph=keep, is_grads_batched=True, allow_unused=True,
            )
        return _rows_from_blocks(blocks, params, b)
    rows = torch.zeros(b, sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    for j in range(b):
        hv = torch.autograd.grad(
            graph.grads,
            params,
            grad_outputs=[tangents[i][j] for i in graph.live],
            retain_graph=keep or j < b - 1,
            allow_unused=True,
        )
        for i, h in enumerate(hv):
            if h is not None:
                rows[j, offsets[i] : offsets[i + 1]] = h.reshape(-1)
    return rows


def forward_over_reverse(
    loss_of: Callable[[Mapping[str, Tensor]], Tensor],
    names: Sequence[str],
    params: Sequence[Tensor],
    tangents: Sequence[Tensor],
    batched: bool,
    rewind_rng: Callable[[], None],
) -> tuple[Tensor, Tensor]:
    """Hessian times b vectors as the forward-mode derivative of the gradient (``torch.func``).

    Args:
        loss_of: ``loss_of({name: tensor})`` computes the (checked, scalar) loss with those tensors
            in place of the named parameters (``functional_call``).
        names, params: the parameters' names and current values.
        tangents: per parameter, the b vectors' pieces, shape (b, *p.shape).
        batched: vmap over the b vectors (True) or one jvp per vector (False).
        rewind_rng: puts the random state back to where it was when the call began; called before
            every pass after the first, so that dropout draws the same masks for every vector.

    Returns:
        (loss, rows): the loss and the (b, n) products.
    """
    from torch.func import grad, jvp, vmap

    b = tangents[0].shape[0]
    primals = {name: p.detach() for name, p in zip(names, params)}

    def loss_and_value(theta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss = loss_of(theta)
        return loss, loss.detach()

    gradient = grad(loss_and_value, has_aux=True)

    def product(direction: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
        _, hv, loss = jvp(gradient, (primals,), (direction,), has_aux=True)
        return hv, loss

    # The transforms track their own derivatives; outside them nothing needs a graph (parameters
    # left out of the chosen set still have requires_grad=True).
    with torch.no_grad():
        if batched:
            with _quiet_vmap_fallbacks():
                hv, losses = vmap(product, randomness="same")(dict(zip(names, tangents)))
            return losses[0], _rows_from_blocks([hv[name] for name in names], params, b)
        rows = []
        loss = None
        for j in range(b):
            if j:
                rewind_rng()
            hv, loss = product({name: t[j] for name, t in zip(names, tangents)})
            rows.append(_rows_from_blocks([hv[name].unsqueeze(0) for name in names], params, 1))
        return loss, torch.cat(rows, dim=0)


class LinearizedGradient(NamedTuple):
    """A micro-batch's loss and the jvp of its gradient, traced by ``torch.func.linearize``.

    ``jvp({name: tangent}) -> ({name: H tangent}, _)``; ``constant_bytes`` is the memory of the
    primal values the trace keeps.
    """

    loss: Tensor
    jvp: Callable
    constant_bytes: int


def linearized_gradient(
    loss_of: Callable[[Mapping[str, Tensor]], Tensor], names: Sequence[str], params: Sequence[Tensor]
) -> LinearizedGradient:
    """Trace the gradient of ``loss_of`` at the current parameters with ``torch.func.linearize``.

    The trace replays no random numbers faithfully (a dropout mask inside it is drawn anew at every
    jvp), so only deterministic models may be linearized.
    """
    from torch.func import grad, linearize

    primals = {name: p.detach() for name, p in zip(names, params)}

    def loss_and_value(theta: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        loss = loss_of(theta)
        return loss, loss.detach()

    with torch.no_grad(), warnings.catch_warnings():
        # const_fold warns about the attributes it creates for the kept primal values
        warnings.filterwarnings("ignore", message=".*get_attr Node.*")
        (_, loss), jvp_fn = linearize(grad(loss_and_value, has_aux=True), primals)
    graph = getattr(jvp_fn, "__closure__", None) or ()
    kept = 0
    for cell in graph:
        module = cell.cell_contents
        if isinstance(module, torch.nn.Module):
            kept += sum(t.numel() * t.element_size() for t in _module_tensors(module))
    return LinearizedGradient(loss, jvp_fn, kept)


def _module_tensors(module: torch.nn.Module) -> list[Tensor]:
    found = [t for t in vars(module).values() if isinstance(t, Tensor)]
    for child in module.children():
        found += _module_tensors(child)
    return found + list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))


def linearized_product(
    work: LinearizedGradient, names: Sequence[str], params: Sequence[Tensor], tangents: Sequence[Tensor], batched: bool
) -> Tensor:
    """``H v`` for each of b vectors from a :class:`LinearizedGradient`, as (b, n) rows."""
    from torch.func import vmap

    b = tangents[0].shape[0]
    with torch.no_grad():
        if batched:
            with _quiet_vmap_fallbacks():
                hv, _ = vmap(work.jvp)(dict(zip(names, tangents)))
            return _rows_from_blocks([hv[name] for name in names], params, b)
        rows = []
        for j in range(b):
            hv, _ = work.jvp({name: t[j] for name, t in zip(names, tangents)})
            rows.append(_rows_from_blocks([hv[name].unsqueeze(0) for name in names], params, 1))
        return torch.cat(rows, dim=0)
