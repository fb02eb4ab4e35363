"""The diagonal of the generalized Gauss-Newton matrix, exact or by Monte-Carlo, by backpropagation.

With ``G = sum_b J_b^T H_b J_b`` (``J_b`` the Jacobian of sample b's outputs w.r.t. the parameters,
``H_b`` the Hessian of the loss w.r.t. those outputs) and any factorisation
``H_b = sum_r s_br f_br f_br^T``, the diagonal is ``sum_{b, r} s_br (J_b^T f_br)^2``: one backward
pass per factor column r carries ``f_br`` for every sample at once, and at each parametrised layer
the per-sample gradients it produces are squared and summed (Dangel, Harmeling & Hennig (2020),
"BackPACK: Packing more into backprop", and Dangel, Harmeling & Hennig (2020), "Modular
block-diagonal curvature approximations for feedforward architectures").

* Exact: the factor's columns are those of ``H_b`` (K backward passes for K outputs per sample):
  ``c_b (diag(sqrt p) - p sqrt(p)^T)`` for cross-entropy, ``sqrt(c) I`` for MSE, and an
  eigendecomposition of ``H_b`` for other losses.
* Monte-Carlo (one backward pass per draw): ``f_b`` is random with ``E[f_b f_b^T] = H_b``; for
  cross-entropy it is the loss gradient at a label drawn from the model's predictive distribution
  (``sqrt(c_b) (p_b - e_y)``, ``y ~ p_b``), for MSE a Gaussian draw; unbiased for the diagonal.

Works for any model whose parametrised layers (the modules that own the chosen parameters) are
Linear, Conv/ConvTranspose, BatchNorm in eval mode, LayerNorm, GroupNorm, Embedding or PReLU,
wired in any way (residual connections, shared activations), as long as every sample is processed
on its own: the first dimension of each such layer's input, and of the model's output, is the
sample. Other parametrised layers, and parameters shared by several layers, are refused by name.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..data import call_model
from ..model_utils import ParamSpec
from ..utils import check_positive_int, private_generator
from .diagonal import DiagonalEstimate
from .diagonal_backprop import Chunk, ChunkDiagonal, as_estimate, backprop_diagonal
from .loss_curvature import loss_curvature

BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PER_SAMPLE_LAYERS = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, *BATCHNORMS,
    nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.PReLU,
)
SUPPORTED = (nn.Linear, *PER_SAMPLE_LAYERS)

# Per-sample gradients of one layer are materialised in chunks of at most this many numbers.
PER_SAMPLE_BUDGET = 2**25


class _Layer:
    """A parametrised layer being watched: its chosen parameters and what one backward pass gives."""

    def __init__(self, name: str, module: nn.Module, params: dict[str, Tensor]) -> None:
        self.name = name
        self.module = module
        self.params = params  # {name within the module: parameter}
        self.inputs: list[Tensor] = []  # the input of each call in this forward pass
        self.squares: dict[str, Tensor] = {key: torch.zeros_like(p) for key, p in params.items()}
        self.pending: list[Tensor] = []  # output gradients of this pass, one per call
        self.sign: Optional[Tensor] = None


class _Watch:
    """Forward hooks that record the inputs of the parametrised layers and tap their outputs, so
    that a backward pass from the model output hands each layer the gradient w.r.t. its output (the
    per-sample cotangents) and computes no parameter gradient at all."""

    def __init__(self, model: nn.Module, names: list[str], params: list[Tensor], samples: int) -> None:
        self.samples = samples
        chosen = {id(p): name for name, p in zip(names, params)}
        self.layers: list[_Layer] = []
        seen: dict[int, str] = {}
        for module_name, module in model.named_modules():
            own = {key: p for key, p in module.named_parameters(recurse=False) if id(p) in chosen}
            if not own:
                continue
            label = module_name or type(module).__name__
            for p in own.values():
                if id(p) in seen:
                    raise ValueError(
                        f"GGN diagonal: parameter {chosen[id(p)]!r} is shared by layers {seen[id(p)]!r} and "
                        f"{label!r} (tied weights); per-layer squares cannot separate them. Use method='exact' or "
                        f"'hutchinson'."
                    )
                seen[id(p)] = label
            if not isinstance(module, SUPPORTED):
                raise ValueError(
                    f"GGN diagonal: layer {label!r} ({type(module).__name__}) owns parameters but is not supported. "
                    f"Supported parametrised layers: Linear, Conv/ConvTranspose 1d-3d, BatchNorm (eval mode), "
                    f"LayerNorm, GroupNorm, Embedding, PReLU. Use method='exact' or 'hutchinson' for this model."
                )
            if isinstance(module, BATCHNORMS) and (module.training or module.running_var is None):
                raise ValueError(
                    f"GGN diagonal: BatchNorm layer {label!r} would normalise with batch statistics (training "
                    f"mode or track_running_stats=False), which couples the samples. Use eval_mode=True."
                )
            self.layers.append(_Layer(label, module, own))
        missing = [name for name, p in zip(names, params) if id(p) not in seen]
        if missing:
            raise ValueError(f"GGN diagonal: parameter(s) {', '.join(missing)} belong to no layer of the model.")
        self.anchor: Optional[Tensor] = None

    @contextlib.contextmanager
    def recording(self, device: torch.device, dtype: torch.dtype) -> Iterator[None]:
        """Hooks in place for one forward pass (removed afterwards, also on error)."""
        self.anchor = torch.zeros((), device=device, dtype=dtype, requires_grad=True)
        handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _forward_hook(self, layer: _Layer) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            if not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                raise ValueError(f"GGN diagonal: layer {layer.name!r} must take and return a single tensor.")
            x = args[0]
            if x.dim() == 0 or x.shape[0] != self.samples or output.shape[0] != self.samples:
                raise ValueError(
                    f"GGN diagonal: layer {layer.name!r} sees an input of shape {tuple(x.shape)} whose first "
                    f"dimension is not the {self.samples} samples of the batch. The per-sample squares need "
                    f"batch-first layers (e.g. batch_first=True)."
                )
            layer.inputs.append(x.detach())
            # Adding a zero that requires grad puts a node here that every backward pass from the
            # output reaches, and the hook on the sum receives dL/d(output) for this call even if a
            # later layer overwrites the output in place.
            tapped = output + self.anchor
            call = len(layer.inputs) - 1

            def keep(out_grad: Tensor) -> None:
                layer.pending.append((call, out_grad))

            tapped.register_hook(keep)
            return tapped

        return hook

    def backward(self, outputs: Tensor, cotangent: Tensor, sign: Optional[Tensor]) -> None:
        """One backward pass of ``cotangent`` (shaped like the outputs) and the squares it adds;
        ``sign`` (B,) multiplies each sample's squares (an indefinite factor's signs)."""
        torch.autograd.grad(outputs, [self.anchor], grad_outputs=cotangent, retain_graph=True, allow_unused=True)
        for layer in self.layers:
            pending, layer.pending = sorted(layer.pending, key=lambda item: item[0]), []
            if not pending:
                continue
            if isinstance(layer.module, nn.Linear) and len(layer.inputs) == 1 and layer.inputs[0].dim() == 2:
                _linear_squares(layer, pending[0][1], sign)
            else:
                _per_sample_squares(layer, pending, sign)

    def diagonals(self, names: list[str], params: list[Tensor]) -> list[Tensor]:
        found = {id(p): layer.squares[key] for layer in self.layers for key, p in layer.params.items()}
        return [found[id(p)] for p in params]

    def reset(self) -> None:
        for layer in self.layers:
            layer.squares = {key: torch.zeros_like(p) for key, p in layer.params.items()}


def _linear_squares(layer: _Layer, out_grad: Tensor, sign: Optional[Tensor]) -> None:
    """A Linear layer on (B, I) inputs: sample b's weight gradient is the outer product g_b x_b^T,
    whose square is g_b^2 (x_b^2)^T, so the sum over samples is one matrix product."""
    g2 = out_grad.detach() ** 2
    if sign is not None:
        g2 = g2 * sign[:, None]
    for key, p in layer.params.items():
        if key == "weight":
            layer.squares[key] += g2.T @ layer.inputs[0] ** 2
        else:
            layer.squares[key] += g2.sum(dim=0)


def _per_sample_squares(layer: _Layer, pending: list, sign: Optional[Tensor]) -> None:
    """Any supported layer: per-sample parameter gradients (summed over the layer's calls) by
    vectorising the layer on one sample with torch.func, squared and summed, in chunks of samples."""
    module, params = layer.module, {key: p.detach() for key, p in layer.params.items()}
    numel = sum(p.numel() for p in params.values())
    samples = layer.inputs[0].shape[0]
    step = max(1, PER_SAMPLE_BUDGET // max(1, numel))

    def contribution(weights: dict, x: Tensor, g: Tensor) -> Tensor:
        out = functional_call(module, weights, (x.unsqueeze(0),))
        return (out * g.unsqueeze(0)).sum()

    per_sample = vmap(grad(contribution), in_dims=(None, 0, 0))
    for start in range(0, samples, step):
        stop = min(samples, start + step)
        total: dict[str, Tensor] = {}
        for call, out_grad in pending:
            grads = per_sample(params, layer.inputs[call][start:stop], out_grad.detach()[start:stop])
            for key, value in grads.items():
                total[key] = total[key] + value if key in total else value
        for key, value in total.items():
            squares = value**2
            if sign is not None:
                squares = squares * sign[start:stop].reshape(-1, *([1] * (squares.dim() - 1)))
            layer.squares[key] += squares.sum(dim=0)


def ggn_chunk(criterion: Callable, mc_samples: Optional[int], generator: Optional[torch.Generator]) -> ChunkDiagonal:
    """The per-micro-batch GGN diagonal for :func:`.diagonal_backprop.backprop_diagonal`: exact
    (``mc_samples=None``) or a list of ``mc_samples`` independent one-draw estimates."""

    def run(model: nn.Module, names: list[str], params: list[Tensor], chunk: Chunk) -> Any:
        watch = _Watch(model, names, params, chunk.count)
        try:
            with watch.recording(params[0].device, params[0].dtype):
                outputs = call_model(model, chunk.inputs)
            if not isinstance(outputs, Tensor) or outputs.dim() == 0 or outputs.shape[0] != chunk.count:
                shape = tuple(outputs.shape) if isinstance(outputs, Tensor) else type(outputs).__name__
                raise ValueError(
                    f"GGN diagonal: the model output ({shape}) must be one tensor with one row per sample "
                    f"({chunk.count}); the loss's Hessian is factorised sample by sample."
                )
            curvature = loss_curvature(criterion, lambda z: criterion(z, chunk.targets), outputs, chunk.targets)
            if mc_samples is None:
                columns, signs = curvature.factor()
                negative = bool((signs < 0).any())
                for r in range(columns.shape[2]):
                    watch.backward(outputs, columns[:, :, r].reshape(outputs.shape), signs[:, r] if negative else None)
                chunk.passes += columns.shape[2]
                return watch.diagonals(names, params)
            draws = []
            for _ in range(mc_samples):
                watch.backward(outputs, curvature.sample(generator).reshape(outputs.shape), None)
                draws.append(watch.diagonals(names, params))
                watch.reset()
            chunk.passes += mc_samples
            return draws
        finally:
            for layer in watch.layers:
                layer.inputs.clear()
                layer.pending.clear()

    return run


def ggn_diagonal(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    *,
    mc_samples: Optional[int] = None,
    seed: Optional[int] = 0,
    params: ParamSpec = None,
    eval_mode: bool = True,
    device: Any = None,
    use_gpu: bool = True,
    max_possible_gpu_samples: Optional[int] = None,
    verbose: bool = True,
) -> DiagonalEstimate:
    """The diagonal of the generalized Gauss-Newton matrix of ``loss(model(inputs), targets)`` over
    the data (the same matrix as :class:`GGNOperator`), exact or by Monte-Carlo.

    Args:
        model: any model whose parametrised layers are supported (see the module docstring) and that
            processes every sample on its own.
        dataloader, loss: batches of (inputs, targets) and ``loss(model(inputs), targets)``, a mean or
            a sum over the batch; the result is for the mean (or sum) over every sample.
        mc_samples: None (default): exact, one backward pass per model output of a sample (e.g. the
            number of classes). An integer m: the Monte-Carlo estimate, m backward passes per batch
            (one draw each), unbiased, with standard errors from the spread of the draws (m >= 2).
        seed: seed of the private generator of the Monte-Carlo draws (None: fresh randomness).
        params, eval_mode, device, use_gpu, max_possible_gpu_samples: as for :class:`HVPOperator`.
        verbose: show a progress bar over the batches.

    Returns:
        A :class:`DiagonalEstimate` with ``method`` "ggn_exact" (zero standard errors) or "ggn_mc",
        ``info["by_parameter"]``, ``info["num_samples"]``, ``info["reduction"]``,
        ``info["backward_passes"]``.
    """
    generator = None
    if mc_samples is not None:
        mc_samples = check_positive_int(mc_samples, "mc_samples")
        generator = private_generator(seed)
    method = "ggn_exact" if mc_samples is None else "ggn_mc"
    result = backprop_diagonal(
        method, model, dataloader, loss, ggn_chunk(loss, mc_samples, generator), draws=mc_samples or 1,
        params=params, eval_mode=eval_mode,
        device=device, use_gpu=use_gpu, max_possible_gpu_samples=max_possible_gpu_samples, verbose=verbose,
        check_model=lambda work, names, chosen: _Watch(work, names, chosen, 0),
    )
    return as_estimate(result, method, std_error="zero" if mc_samples is None else "sampled")
