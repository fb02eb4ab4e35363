"""Arithmetic precision of the products of a model operator.

``"exact"`` (the default) computes in the parameters' own dtype with TF32 switched off for the
duration of every product, whatever the user's global setting is (PyTorch enables TF32 for cuDNN
convolutions by default, which alone costs about three digits). The lower precisions are opt-in:

=========  ===================================================  ==================================
precision  what runs in reduced precision                       relative error of a product
=========  ===================================================  ==================================
exact      nothing                                              rounding of the dtype
tf32       CUDA matmuls and convolutions (10-bit mantissa)      about 1e-3 (CUDA only)
bf16       forward and backward under ``autocast(bfloat16)``     0.4% to 5% (measured, CPU: MLP,
                                                                small CNN, tiny GPT)
fp16       ``autocast(float16)`` on CUDA, bfloat16 on the CPU    about 1e-3 on CUDA
=========  ===================================================  ==================================

In every mode the returned vectors, and their sum over batches, stay in the parameters' dtype
(float32/float64): only the arithmetic inside one micro-batch's product is reduced. An
eigen-residual tolerance tighter than a mode's product error cannot be reached in that mode.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

from ..utils import logger

PRECISIONS = ("exact", "tf32", "bf16", "fp16")


def resolve_precision(precision: Optional[str], fp16: bool, device: torch.device) -> str:
    """Validate the ``precision`` argument against the legacy ``fp16`` flag and the device."""
    if precision is None:
        return "fp16" if fp16 else "exact"
    if not isinstance(precision, str) or precision.lower() not in PRECISIONS:
        raise ValueError(f"precision={precision!r} is not known; use one of {', '.join(map(repr, PRECISIONS))}.")
    precision = precision.lower()
    if fp16 and precision != "fp16":
        raise ValueError(
            f"fp16=True and precision={precision!r} contradict each other; fp16=True is the old spelling of "
            f"precision='fp16'. Pass only one of them."
        )
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(
            f"precision='tf32' needs a CUDA device (TensorFloat-32 is an Ampere+ GPU format), but the "
            f"operator computes on {device}. Use precision='bf16' for reduced precision on the CPU, or the default."
        )
    return precision


def autocast_dtype(precision: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of a precision mode on a device, or None for no autocast."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        # float16 autocast on the CPU is slow and patchy; bfloat16 keeps the old fp16=True behaviour there.
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    return None


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for the reduced-precision modes, a null context otherwise."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Attributes of the fp32 precision API of torch >= 2.9 ("ieee"/"tf32"/"bf16"/"none" per backend and op);
# older versions only have the global matmul precision and cuDNN's allow_tf32.
_NEW_API_PATHS = (
    ("cuda", "matmul"),
    ("cudnn", "conv"),
    ("cudnn", "rnn"),
    ("mkldnn", "matmul"),
    ("mkldnn", "conv"),
    ("mkldnn", "rnn"),
)


def _new_api_node(backend: str, op: str) -> Any:
    node = getattr(getattr(torch.backends, backend, None), op, None)
    return node if node is not None and _readable(lambda: node.fp32_precision) is not None else None


def _readable(getter: Callable[[], Any]) -> Any:
    """The getter's value, or None when torch refuses to answer (it raises on a mix of old and new APIs)."""
    try:
        return getter()
    except (RuntimeError, AttributeError):
        return None


_MIXED_API_WARNED = False


@contextlib.contextmanager
def fp32_math(allow_tf32: bool) -> Iterator[None]:
    """Run a block with TF32 matmuls/convolutions allowed or not, then restore every global flag.

    Sets the legacy switches (``torch.set_float32_matmul_precision`` and
    ``torch.backends.cudnn.allow_tf32``), whose setters keep torch's old and new precision
    APIs consistent; on exit it puts back the legacy values and then, where torch has them, the
    per-backend ``fp32_precision`` values exactly as they were.
    """
    matmul = _readable(torch.get_float32_matmul_precision)
    cudnn = _readable(lambda: torch.backends.cudnn.allow_tf32)
    leaves = {}
    for backend, op in _NEW_API_PATHS:
        node = _new_api_node(backend, op)
        if node is not None:
            leaves[(backend, op)] = (node, node.fp32_precision)
    if matmul is None or cudnn is None:
        global _MIXED_API_WARNED
        if not _MIXED_API_WARNED:
            _MIXED_API_WARNED = True
            logger.warning(
                "The float32 matmul precision was set through both torch's legacy allow_tf32/"
                "set_float32_matmul_precision and its new fp32_precision API, so torch cannot report it; "
                "products run with it as it is. Set it through one API only."
            )
        yield
        return
    try:
        torch.set_float32_matmul_precision("high" if allow_tf32 else "highest")
        torch.backends.cudnn.allow_tf32 = allow_tf32
        yield
    finally:
        torch.set_float32_matmul_precision(matmul)
        torch.backends.cudnn.allow_tf32 = cudnn
        for node, value in leaves.values():
            if node.fp32_precision != value:
                node.fp32_precision = value
