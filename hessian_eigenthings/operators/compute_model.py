"""The model a model operator differentiates, and the promise that the user's model comes back as it was.

:class:`ComputeModel` holds the user's model and the module the products run: the model itself,
or a copy of it on the compute device, synced from the model before a pass. It puts the model in
the operator's mode for a pass and restores everything afterwards (modes, ``.grad``,
``requires_grad``, and buffers where they may change), and it refuses a pass when the model was
converted or given new parameter tensors since the operator was built.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
from torch import Tensor, nn

from ..model_utils import preserved_model_state
from ..utils import logger
from .kernels import math_attention, rnn_without_cudnn
from .precision import fp32_math


class ComputeModel:
    """The user's ``model`` and the module products run on ``device`` (see the module docstring).

    Args:
        model: the user's model.
        names, chosen: the chosen parameters' names and the model's own tensors.
        device: the compute device.
        owner: the operator's name, for messages.

    Attributes:
        model: the user's model.
        module: the module products run (``model``, or its copy on ``device``).
        params: the chosen parameters of ``module``: the tensors products differentiate.
    """

    def __init__(self, model: nn.Module, names: list[str], chosen: list[Tensor], device: torch.device,
                 owner: str) -> None:
        self.model = model
        self.names = names
        self.owner = owner
        self.dtype = chosen[0].dtype
        # The user's parameter tensors and where they were, to notice a converted model.
        self._user_params = chosen
        self._user_device = chosen[0].device
        same = device == self._user_device or (device.type == self._user_device.type == "cuda" and device.index is None)
        if same:
            self.module = model
            self.params = chosen
        else:
            logger.info("%s: computing on %s with a copy of the model (the model is on %s).",
                        owner, device, self._user_device)
            self.module = copy.deepcopy(model).to(device)
            copied = dict(self.module.named_parameters())
            self.params = [copied[n] for n in names]

    @property
    def is_copy(self) -> bool:
        """Whether products run on a device copy of the user's model."""
        return self.module is not self.model

    def check_unchanged(self) -> None:
        """Raise if the model was converted (dtype, device) or given new parameter tensors since:
        products would then mix devices or dtypes, or differentiate the loss with respect to
        tensors the model no longer uses."""
        current = dict(self.model.named_parameters())
        for name, param in zip(self.names, self._user_params):
            if current.get(name) is not param:
                raise RuntimeError(
                    f"The model's parameter {name!r} is no longer the tensor {self.owner} was built with (it was "
                    f"replaced, e.g. by assigning a new nn.Parameter or load_state_dict(assign=True)). Build a new "
                    f"operator for the model as it is now."
                )
            if param.dtype != self.dtype or param.device != self._user_device:
                raise RuntimeError(
                    f"{self.owner} was built for a model with {self.dtype} parameters on {self._user_device}, but "
                    f"{name!r} is now {param.dtype} on {param.device}: the model was converted after the operator "
                    f"was built (model.double(), model.to(...), model.cuda() convert the model in place). Build a "
                    f"new operator for the converted model, or convert a copy (copy.deepcopy(model)) and leave "
                    f"this operator's model as it was."
                )

    @contextlib.contextmanager
    def running(self, eval_mode: bool, dropout_seed: int, allow_tf32: bool, sync: bool) -> Iterator[None]:
        """A pass: the module in eval mode (or in the model's own modes, ``eval_mode=False``, with
        dropout drawn from ``dropout_seed`` and the buffers restored afterwards), gradients on,
        kernels that can be differentiated twice, and TF32 as ``allow_tf32`` says. ``sync``: copy
        the model's values into the device copy first (not while kept graphs hold them)."""
        if sync and self.is_copy:
            self._sync_copy()
        device = self.params[0].device
        with contextlib.ExitStack() as stack:
            stack.enter_context(preserved_model_state(self.module, eval_mode, restore_buffers=not eval_mode))
            if not eval_mode:
                stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
                torch.manual_seed(dropout_seed)
            stack.enter_context(torch.enable_grad())
            stack.enter_context(math_attention())
            stack.enter_context(rnn_without_cudnn(self.module, device))
            stack.enter_context(fp32_math(allow_tf32=allow_tf32))
            yield

    def _sync_copy(self) -> None:
        with torch.no_grad():
            for dst, src in zip(self.module.parameters(), self.model.parameters()):
                dst.copy_(src, non_blocking=True)
            for dst, src in zip(self.module.buffers(), self.model.buffers()):
                dst.copy_(src, non_blocking=True)
        for dst, src in zip(self.module.modules(), self.model.modules()):
            dst.training = src.training
