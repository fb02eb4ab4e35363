"""Choosing the parameters a model operator acts on, and leaving the user's model as it was.

Every model operator (HVP, Gauss-Newton, ...) works on the same flat vector layout: the chosen
trainable parameters, in ``model.parameters()`` order, each flattened and concatenated.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

ParamSpec = Optional[Iterable[Union[str, Tensor]]]


def select_parameters(model: nn.Module, params: ParamSpec = None) -> tuple[list[str], list[Tensor]]:
    """Resolve a parameter choice to (names, tensors) in ``model.parameters()`` order.

    Args:
        model: the module whose parameters are chosen.
        params: None for every parameter with ``requires_grad=True``; otherwise an iterable of
            parameter names (as in ``model.named_parameters()``) and/or parameter tensors of
            ``model``, or a name prefix such as ``"fc2"`` that selects all parameters below it.

    Returns:
        The chosen names and parameters, ordered as the model orders them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
        if not chosen:
            raise ValueError(
                "The model has no trainable parameters (none has requires_grad=True), so its Hessian "
                "is empty. Unfreeze the parameters you want, e.g. p.requires_grad_(True)."
            )
        return [n for n, _ in chosen], [p for _, p in chosen]

    if isinstance(params, (str, Tensor)):
        params = [params]
    by_id = {id(p): n for n, p in named}
    names = [n for n, _ in named]
    wanted: set[str] = set()
    for item in params:
        if isinstance(item, str):
            hits = [n for n in names if n == item or n.startswith(item + ".")]
            if not hits:
                raise ValueError(
                    f"params: the model has no parameter named {item!r} (nor any below it). "
                    f"Its parameters are: {', '.join(names)}."
                )
            wanted.update(hits)
        elif isinstance(item, Tensor):
            if id(item) not in by_id:
                raise ValueError(
                    f"params: a tensor of shape {tuple(item.shape)} is not a parameter of this model; "
                    f"pass tensors from model.parameters() or parameter names."
                )
            wanted.add(by_id[id(item)])
        else:
            raise TypeError(f"params must hold parameter names or tensors, got {type(item).__name__}.")
    chosen = [(n, p) for n, p in named if n in wanted]
    if not chosen:
        raise ValueError("params selects no parameter; pass at least one parameter name or tensor.")
    frozen = [n for n, p in chosen if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"params: {', '.join(frozen)} ha{'s' if len(frozen) == 1 else 've'} requires_grad=False, so "
            f"{'it is' if len(frozen) == 1 else 'they are'} not trainable. Leave "
            f"{'it' if len(frozen) == 1 else 'them'} out, or set requires_grad=True first."
        )
    return [n for n, _ in chosen], [p for _, p in chosen]


def common_dtype(params: Sequence[Tensor]) -> torch.dtype:
    """The one floating dtype shared by ``params``; raises if they mix dtypes."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1:
        raise TypeError(
            f"The chosen parameters mix dtypes {sorted(str(d) for d in dtypes)}; a flat vector needs one. "
            f"Convert the model with model.float() or model.double(), or choose a subset with one dtype."
        )
    dtype = dtypes.pop()
    if not dtype.is_floating_point:
        raise TypeError(f"The chosen parameters have dtype {dtype}; they must be floating point.")
    return dtype


def common_device(params: Sequence[Tensor]) -> torch.device:
    """The one device holding ``params``; raises if they are spread over several."""
    devices = {p.device for p in params}
    if len(devices) != 1:
        raise ValueError(
            f"The chosen parameters live on several devices ({sorted(str(d) for d in devices)}); "
            f"model-parallel models are not supported: move the model to one device."
        )
    return devices.pop()


def unflatten(vec: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like``, in order (the inverse of concatenating
    their flattened values)."""
    out, start = [], 0
    for t in like:
        out.append(vec[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


@contextlib.contextmanager
def preserved_model_state(model: nn.Module, eval_mode: bool, restore_buffers: bool) -> Iterator[None]:
    """Run a block with ``model`` in eval mode (or, if ``eval_mode`` is False, in the modes its
    modules already have) and put everything back afterwards.

    Restores, also when the block raises: each submodule's ``training`` flag, every parameter's
    ``requires_grad`` and ``.grad`` (the same tensor object), and, when ``restore_buffers`` is True,
    the values of all buffers (BatchNorm running statistics change in train mode).
    """
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    saved_buffers = [(b, b.detach().clone()) for b in model.buffers()] if restore_buffers else []
    try:
        if eval_mode:
            model.eval()
        yield
    finally:
        for module, flag in training:
            module.training = flag
        with torch.no_grad():
            for p, req, g in zip(params, requires, grads):
                if p.requires_grad != req:
                    p.requires_grad_(req)
                if p.grad is not g:
                    p.grad = g
            for buf, saved in saved_buffers:
                buf.copy_(saved)
