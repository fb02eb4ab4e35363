"""Kernels that second-order products can differentiate.

Some fast kernels implement only a first derivative, so a double backward through them fails
("derivative for ..._backward is not implemented") and so does forward-mode AD:

* PyTorch's fused ``scaled_dot_product_attention`` kernels (flash and memory-efficient on CUDA,
  cuDNN, the flash kernel on CPU). Its math backend is plain matmuls and a softmax, which autograd
  differentiates any number of times, so every product of a model operator runs under it.
* cuDNN's RNN/LSTM/GRU kernels. PyTorch's own CUDA implementation is twice differentiable, so
  products of a model with recurrent layers on a GPU run with cuDNN switched off.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


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
        context = torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    else:
        context = sdpa_kernel(SDPBackend.MATH)
    with context:
        yield


@contextlib.contextmanager
def rnn_without_cudnn(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run a block with cuDNN off if ``model`` has recurrent layers and computes on CUDA.

    Only then: cuDNN's convolutions are twice differentiable and much faster than the fallback.
    The user's ``torch.backends.cudnn.enabled`` is restored on exit, also on error.
    """
    if device.type != "cuda" or not any(isinstance(m, nn.RNNBase) for m in model.modules()):
        yield
        return
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled
