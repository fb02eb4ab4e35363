"""Attention kernels that second-order products can differentiate.

PyTorch's fused ``scaled_dot_product_attention`` kernels (flash and memory-efficient on CUDA, the
flash kernel on CPU, cuDNN) implement only a first derivative: a double backward through them
fails with "derivative for ..._backward is not implemented", and forward-mode AD with "forward AD
... has not been implemented". The math backend is plain matmuls and a softmax, which autograd
differentiates any number of times, so every product of a model operator runs under it.
"""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run a block with ``scaled_dot_product_attention`` restricted to its math backend.

    The user's choice of backends is restored on exit, also when the block raises. Models that
    do not use ``scaled_dot_product_attention`` (directly or through ``nn.MultiheadAttention``)
    are unaffected.
    """
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:  # torch 2.1/2.2: the older, CUDA-named but global switch
        import torch

        context = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    else:
        context = sdpa_kernel(SDPBackend.MATH)
    with context:
        yield
