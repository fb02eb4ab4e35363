"""Batches as model operators see them: ``(inputs, targets)`` pairs from any iterable dataloader.

``inputs`` may be a tensor (``model(inputs)``), a tuple/list of tensors (``model(*inputs)``) or a
dict (``model(**inputs)``); ``targets`` may be a tensor or any nesting of tuples/lists/dicts of
tensors. The number of samples of a batch is the length of the first dimension of its tensors.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch
from torch import Tensor, nn


def split_batch(batch: Any, index: int) -> tuple[Any, Any]:
    """Return (inputs, targets) of a dataloader batch, or raise a clear TypeError."""
    if isinstance(batch, dict) and "inputs" in batch and "targets" in batch:
        return batch["inputs"], batch["targets"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"Batch {index} of the dataloader is a {type(batch).__name__}"
        f"{' of length ' + str(len(batch)) if isinstance(batch, (tuple, list)) else ''}; "
        f"expected an (inputs, targets) pair so that the loss is criterion(model(inputs), targets)."
    )


def _tensors(obj: Any) -> Iterator[Tensor]:
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def tensors_in(obj: Any) -> list[Tensor]:
    """Every tensor inside nested tuples, lists and dicts (or ``obj`` itself if it is one)."""
    return list(_tensors(obj))


def num_samples(inputs: Any, targets: Any, index: int) -> int:
    """Samples in a batch: the first-dimension length shared by its tensors."""
    sizes = {t.shape[0] for t in _tensors((inputs, targets)) if t.dim() > 0}
    if len(sizes) != 1:
        found = "no batched tensor" if not sizes else f"first dimensions {sorted(sizes)}"
        raise ValueError(
            f"Batch {index}: cannot tell its number of samples ({found}); inputs and targets must be "
            f"tensors whose first dimension is the batch dimension."
        )
    return sizes.pop()


def slice_samples(obj: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every batched tensor in ``obj`` (other values are kept as they are)."""
    if isinstance(obj, Tensor):
        return obj[start:stop] if obj.dim() > 0 else obj
    if isinstance(obj, tuple):
        return tuple(slice_samples(item, start, stop) for item in obj)
    if isinstance(obj, list):
        return [slice_samples(item, start, stop) for item in obj]
    if isinstance(obj, dict):
        return {key: slice_samples(item, start, stop) for key, item in obj.items()}
    return obj


def move_to(obj: Any, device: torch.device) -> Any:
    """Every tensor in ``obj`` moved to ``device`` (no copy where it is already there)."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move_to(item, device) for item in obj)
    if isinstance(obj, list):
        return [move_to(item, device) for item in obj]
    if isinstance(obj, dict):
        return {key: move_to(item, device) for key, item in obj.items()}
    return obj


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, ``model(*inputs)`` for a tuple/list, ``model(**inputs)`` for a dict."""
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


def check_reiterable(dataloader: Any, full_dataset: bool) -> None:
    """Raise if ``dataloader`` is not iterable, is known to be empty, or (for the full dataset) is a
    one-shot iterator that a second product could not read again."""
    if not isinstance(dataloader, Iterable):
        raise TypeError(
            f"dataloader must be an iterable of (inputs, targets) batches, such as a torch DataLoader "
            f"or a list; got {type(dataloader).__name__}."
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
