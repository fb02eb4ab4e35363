"""Batches as model operators see them: ``(inputs, targets)`` pairs from any iterable dataloader.

``inputs`` may be a tensor (``model(inputs)``), a tuple/list of tensors (``model(*inputs)``) or a
mapping such as a dict or a ``UserDict`` (``model(**inputs)``); ``targets`` may be a tensor or any
nesting of tuples, lists and mappings of tensors. Every function here walks such nestings the same
way, keeping the container types (a ``UserDict`` stays a ``UserDict``, a named tuple stays one).

The number of samples of a batch is the length of the first dimension that all its tensors share,
or what the user's ``batch_size_fn(inputs, targets)`` says for batches whose tensors share none
(e.g. a language model's inputs of shape (B, T) with flattened targets of shape (B*T,)).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .utils import logger

BatchSizeFn = Callable[[Any, Any], int]


def _is_namedtuple(obj: Any) -> bool:
    return isinstance(obj, tuple) and hasattr(type(obj), "_fields")


def _rebuild_mapping(original: Mapping, items: dict) -> Mapping:
    """``items`` in a mapping of ``original``'s type where that type can be built from a dict."""
    if type(original) is dict:
        return items
    try:
        return type(original)(items)
    except Exception:  # noqa: BLE001 - a mapping type without a dict constructor: a plain dict will do
        return items


def map_tensors(fn: Callable[[Tensor], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to every tensor inside its nested tuples, lists and mappings;
    containers keep their types and other values are kept as they are."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if _is_namedtuple(obj):
        return type(obj)(*(map_tensors(fn, item) for item in obj))
    if isinstance(obj, tuple):
        return tuple(map_tensors(fn, item) for item in obj)
    if isinstance(obj, list):
        return [map_tensors(fn, item) for item in obj]
    if isinstance(obj, Mapping):
        return _rebuild_mapping(obj, {key: map_tensors(fn, item) for key, item in obj.items()})
    return obj


def as_plain_containers(obj: Any) -> Any:
    """``obj`` with every mapping turned into a dict (so that ``torch.func`` transforms, which know
    dicts but not e.g. ``UserDict``, can map over it); undo with :func:`like`."""
    if _is_namedtuple(obj):
        return type(obj)(*(as_plain_containers(item) for item in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(as_plain_containers(item) for item in obj)
    if isinstance(obj, Mapping):
        return {key: as_plain_containers(item) for key, item in obj.items()}
    return obj


def like(template: Any, plain: Any) -> Any:
    """``plain`` (as made by :func:`as_plain_containers` from ``template``, possibly transformed)
    with the container types of ``template`` put back."""
    if _is_namedtuple(template):
        return type(template)(*(like(t, p) for t, p in zip(template, plain)))
    if isinstance(template, (tuple, list)):
        return type(template)(like(t, p) for t, p in zip(template, plain))
    if isinstance(template, Mapping):
        return _rebuild_mapping(template, {key: like(item, plain[key]) for key, item in template.items()})
    return plain


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, Mapping):
        for item in obj.values():
            yield from _tensors(item)


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor inside nested tuples, lists and mappings (or ``obj`` itself if it is one)."""
    return list(_tensors(obj))


def split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """Return (inputs, targets) of a dataloader batch, or raise a clear TypeError."""
    if isinstance(batch, Mapping) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Batch {index} of the dataloader is a {type(batch).__name__}"
        f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; "
        f"expected an (inputs, targets) pair so that the loss is criterion(model(inputs), targets)."
    )


def leading_dim(obj: Any) -> Optional[int]:
    """The first-dimension length shared by every tensor of ``obj`` that has dimensions, or None
    when there is no such tensor or they disagree."""
    sizes = {t.shape[0] for t in _tensors(obj) if t.dim() > 0}
    return sizes.pop() if len(sizes) == 1 else None


def num_samples(inputs: Any, targets: Any, index: int, batch_size_fn: Optional[BatchSizeFn] = None) -> int:
    """Samples in a batch: ``batch_size_fn(inputs, targets)`` when given, else the first-dimension
    length shared by its tensors."""
    if batch_size_fn is not None:
        count = batch_size_fn(inputs, targets)
        if isinstance(count, Tensor) and count.numel() == 1 and not count.dtype.is_floating_point:
            count = int(count)
        try:
            if isinstance(count, bool):
                raise TypeError
            count = operator.index(count)
        except TypeError:
            raise TypeError(
                f"Batch {index}: batch_size_fn returned {count!r} of type {type(count).__name__}; it must "
                f"return the number of samples of the batch as an int."
            ) from None
        if count < 0:
            raise ValueError(f"Batch {index}: batch_size_fn returned {count}; a number of samples is >= 0.")
        return count
    sizes = {t.shape[0] for t in _tensors((inputs, targets)) if t.dim() > 0}
    if len(sizes) != 1:
        found = "no batched tensor" if not sizes else f"first dimensions {sorted(sizes)}"
        raise ValueError(
            f"Batch {index}: cannot tell its number of samples ({found}). Give inputs and targets the "
            f"batch dimension first, or pass batch_size_fn=lambda inputs, targets: <samples> to the "
            f"operator (e.g. inputs.shape[0] for a language model whose targets are flattened to (B*T,))."
        )
    return sizes.pop()


def slice_samples(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor in ``obj`` (other values are kept as they are)."""
    return map_tensors(lambda t: t[start:stop] if t.dim() > 0 else t, obj)


def move_to(obj: Any, device: torch.device) -> Any:
    """Every tensor in ``obj`` moved to ``device`` (no copy where it is already there).

    Tensors made under ``torch.inference_mode()`` cannot take part in a backward pass, so they
    are copied into ordinary tensors.
    """

    def move(t: Tensor) -> Tensor:
        moved = t.to(device, non_blocking=True)
        return moved.clone() if moved.is_inference() else moved

    return map_tensors(move, obj)


def call_model(model: nn.Module, inputs: Any, parameters: Optional[Mapping[str, Tensor]] = None) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a mapping.

    ``parameters`` ({name: tensor}) stand in for those parameters of the model during the call
    (``torch.func.functional_call``: the module's own tensors are back in place afterwards, also
    on error), which is how ``torch.func`` transforms differentiate through the model.
    """
    if parameters is not None:
        from torch.func import functional_call

        if isinstance(inputs, (tuple, list)):
            return functional_call(model, dict(parameters), tuple(inputs))
        if isinstance(inputs, Mapping):
            return functional_call(model, dict(parameters), (), dict(inputs))
        return functional_call(model, dict(parameters), (inputs,))
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)


def as_batches(dataloader: Any) -> Any:
    """The dataloader to iterate: ``dataloader`` itself, or ``[(inputs, targets)]`` when it is one
    ``(inputs, targets)`` pair whose targets are a tensor (a tensor cannot be a batch, so such a
    pair cannot be a list of two batches), as in ``hessian(model, criterion, data=(x, y))``."""
    if isinstance(dataloader, (tuple, list)) and len(dataloader) == 2 and isinstance(dataloader[1], Tensor):
        first = dataloader[0]
        if isinstance(first, (Tensor, tuple, list, Mapping)):
            logger.info("The dataloader is one (inputs, targets) pair of tensors; using it as a single batch.")
            return [tuple(dataloader)]
    return dataloader


def check_reiterable(dataloader: Any, full_dataset: bool) -> None:
    """Raise if ``dataloader`` is not iterable, is known to be empty, or (for the full dataset) is a
    one-shot iterator that a second product could not read again."""
    if not isinstance(dataloader, Iterable):
        raise TypeError(
            f"dataloader must be an iterable of (inputs, targets) batches, such as a torch DataLoader, a "
            f"list of batches or one (inputs, targets) pair; got {type(dataloader).__name__}."
        )
    try:
        length = len(dataloader)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if length == 0:
        raise ValueError("dataloader is empty (len(dataloader) == 0): give it at least one batch.")
    if full_dataset and length is None and iter(dataloader) is dataloader:
        raise ValueError(
            "full_dataset=True reads the whole dataloader for every product, but this dataloader is a "
            "one-shot iterator (no len(), and iter(d) is d). Pass something that can be iterated again, "
            "such as a torch DataLoader or list(batches), or use full_dataset=False."
        )
