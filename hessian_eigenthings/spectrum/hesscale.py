"""HesScale: the diagonal of the loss Hessian backpropagated layer by layer, at about the cost of a
gradient.

Elsayed & Mahmood (2022), "HesScale: Scalable Computation of Hessian Diagonals", which refines
Becker & LeCun (1989), "Improving the convergence of back-propagation learning with second order
methods". For a layer ``y = f(x)`` the diagonal of the Hessian w.r.t. its input is approximated
from the one w.r.t. its output by dropping every off-diagonal term:

* linear maps (Linear, Conv, pooling, BatchNorm in eval mode, reshapes):
  ``d2L/dx_i^2 ~ sum_o (dy_o/dx_i)^2 d2L/dy_o^2``, and a weight's diagonal is
  ``sum_o (dy_o/dw)^2 d2L/dy_o^2`` (summed over samples and positions);
* elementwise activations: ``d2L/dx^2 = f'(x)^2 d2L/dy^2 + f''(x) dL/dy``, where the second term
  (the activation's curvature times the backpropagated gradient) is what a Gauss-Newton
  approximation drops (``curvature="ggn"``, HesScaleGN; Elsayed, Farrahi, Dangel & Mahmood
  (2024), "Revisiting Scalable Hessian Diagonal Approximations for Applications in Reinforcement
  Learning").

At the top, HesScale starts from the exact diagonal of the loss Hessian w.r.t. the model outputs
(closed forms for cross-entropy and MSE; automatic differentiation for other losses). Trailing
Softmax/LogSoftmax layers are treated as part of the loss, so for a model ending in LogSoftmax
with NLLLoss the start is the exact cross-entropy curvature. The last parametrised layer's
diagonal is therefore exact when only elementwise layers or reshapes follow it, and the whole
diagonal is exact for a model that is linear in its parameters with one Linear layer.

Supported models: an ``nn.Sequential`` (nested Sequentials are flattened) of Linear,
Conv1d/2d/3d (zero padding), elementwise activations, Flatten/Unflatten, max/average/adaptive
pooling, BatchNorm in eval mode, Identity and Dropout in eval mode, with Softmax/LogSoftmax only
at the end. Anything else is refused by name.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from ..model_utils import ParamSpec
from .diagonal import DiagonalEstimate
from .diagonal_backprop import Chunk, ChunkDiagonal, as_estimate, backprop_diagonal
from .loss_curvature import loss_curvature

ELEMENTWISE = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Softplus, nn.Softsign, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.LogSigmoid, nn.Tanhshrink,
)
PIECEWISE_LINEAR = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh)
PASS_THROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
RESHAPES = (nn.Flatten, nn.Unflatten)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
ADAPTIVE_AVG_POOLS = (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
OUTPUT_LAYERS = (nn.Softmax, nn.LogSoftmax)
SUPPORTED = (nn.Linear, *CONVS, *BATCHNORMS, *ELEMENTWISE, *PASS_THROUGH, *RESHAPES, *MAX_POOLS, *AVG_POOLS,
             *ADAPTIVE_AVG_POOLS)


def sequential_layers(model: nn.Module, method: str) -> list[tuple[str, nn.Module]]:
    """The leaf layers of an ``nn.Sequential`` in execution order, with their qualified names."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(
            f"{method} backpropagates layer by layer through an nn.Sequential (nested Sequentials are fine); the "
            f"model is a {type(model).__name__}. Write it as an nn.Sequential, or use method='ggn_exact' / 'ggn_mc' "
            f"(any model with supported parametrised layers) or 'hutchinson' (any model)."
        )
    layers: list[tuple[str, nn.Module]] = []

    def walk(module: nn.Sequential, prefix: str) -> None:
        for name, child in module.named_children():
            qualified = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(child, qualified + ".")
            else:
                layers.append((qualified, child))

    walk(model, "")
    return layers


def _check_layers(layers: list[tuple[str, nn.Module]], curvature: str) -> int:
    """Refuse unsupported layers by name; return where the loss's output layers begin."""
    tail = len(layers)
    while curvature == "hessian" and tail > 0 and isinstance(layers[tail - 1][1], OUTPUT_LAYERS):
        tail -= 1
    for position, (name, layer) in enumerate(layers):
        if position >= tail:
            continue
        if isinstance(layer, OUTPUT_LAYERS):
            where = "at the end of the model" if curvature == "hessian" else "in a model (the GGN is taken w.r.t. " \
                "the model's outputs, and softmax is not elementwise)"
            raise ValueError(
                f"method='hesscale': layer {name!r} ({type(layer).__name__}) is only supported {where}. Put "
                f"log-softmax into the loss instead (nn.CrossEntropyLoss on the logits)."
            )
        if not isinstance(layer, SUPPORTED):
            raise ValueError(
                f"method='hesscale' does not support layer {name!r} ({type(layer).__name__}). Supported: Linear, "
                f"Conv1d/2d/3d, elementwise activations, Flatten/Unflatten, max/average/adaptive pooling, BatchNorm in "
                f"eval mode, Identity, Dropout in eval mode, and Softmax/LogSoftmax at the end. Use method='ggn_exact' "
                f"or 'hutchinson' for this model."
            )
        if isinstance(layer, BATCHNORMS):
            if layer.training or layer.running_var is None:
                raise ValueError(
                    f"method='hesscale': BatchNorm layer {name!r} would normalise with batch statistics (it is in "
                    f"training mode, or has track_running_stats=False), which couples the samples of a batch. Use "
                    f"eval_mode=True (the default) with running statistics."
                )
        if isinstance(layer, PASS_THROUGH[1:]) and layer.training and layer.p > 0:
            raise ValueError(
                f"method='hesscale': dropout layer {name!r} is in training mode (eval_mode=False); use eval_mode=True."
            )
        if isinstance(layer, CONVS):
            if layer.padding_mode != "zeros":
                raise ValueError(
                    f"method='hesscale': convolution {name!r} uses padding_mode={layer.padding_mode!r}; only zero "
                    f"padding is supported."
                )
            _conv_padding(layer, name)
        if isinstance(layer, MAX_POOLS) and layer.return_indices:
            raise ValueError(
                f"method='hesscale': pooling layer {name!r} returns indices; only its output is supported."
            )
    return tail


def _conv_padding(layer: nn.Module, name: str) -> list[int]:
    if not isinstance(layer.padding, str):
        return list(layer.padding)
    if layer.padding == "valid":
        return [0] * len(layer.kernel_size)
    totals = [d * (k - 1) for d, k in zip(layer.dilation, layer.kernel_size)]
    if any(t % 2 for t in totals):
        raise ValueError(
            f"method='hesscale': convolution {name!r} uses padding='same' with an even kernel (uneven padding); give "
            f"the padding as numbers instead."
        )
    return [t // 2 for t in totals]


def hesscale_chunk(criterion: Callable, curvature: str) -> ChunkDiagonal:
    """The per-micro-batch HesScale computation for :func:`.diagonal_backprop.backprop_diagonal`."""

    def run(model: nn.Module, names: list[str], params: list[Tensor], chunk: Chunk) -> list[Tensor]:
        layers = sequential_layers(model, "method='hesscale'")
        tail = _check_layers(layers, curvature)
        owner = _owners(layers, names, params)
        first = min(owner[id(p)][0] for p in params)
        if first >= tail:
            raise ValueError("method='hesscale': the chosen parameters are in the output (softmax) layers.")
        # forward, keeping every layer's input
        if not isinstance(chunk.inputs, Tensor):
            raise ValueError("method='hesscale': an nn.Sequential takes one input tensor per batch.")
        inputs: list[Tensor] = []
        x = chunk.inputs
        for _, layer in layers[:tail]:
            inputs.append(x)
            # an in-place activation would overwrite its input, which the backward rules read
            x = layer(x.clone() if getattr(layer, "inplace", False) else x)
        outputs = x
        if not isinstance(outputs, Tensor):
            raise ValueError("method='hesscale': the model must return a single tensor.")
        output_layers = [layer for _, layer in layers[tail:]]

        def loss_fn(z: Tensor) -> Tensor:
            for layer in output_layers:
                z = layer(z)
            return criterion(z, chunk.targets)

        diag = loss_curvature(criterion, loss_fn, outputs, chunk.targets, closed_form=not output_layers).diagonal()
        grads = _activation_gradients(layers, inputs, tail, first, loss_fn, outputs) if curvature == "hessian" else {}
        chunk.passes += 1
        result: dict[int, Tensor] = {}
        for position in range(tail - 1, first - 1, -1):
            name, layer = layers[position]
            x = inputs[position]
            for param_name, param in layer.named_parameters(recurse=False):
                if id(param) in owner:
                    result[id(param)] = _parameter_diagonal(layer, param_name, x, diag)
            if position > first:
                diag = _input_diagonal(layer, x, diag, grads.get(position), name)
        return [result[id(p)] for p in params]

    return run


def _owners(layers: list[tuple[str, nn.Module]], names: list[str], params: list[Tensor]) -> dict[int, tuple[int, str]]:
    """{id(chosen parameter): (position of its layer, its name)}; every chosen one must have a layer."""
    owner: dict[int, tuple[int, str]] = {}
    chosen = {id(p) for p in params}
    for position, (_, layer) in enumerate(layers):
        for param_name, param in layer.named_parameters(recurse=False):
            if id(param) in chosen:
                if id(param) in owner:
                    raise ValueError(
                        f"method='hesscale': parameter {param_name!r} is shared by several layers (tied weights), "
                        f"which layer-by-layer backpropagation does not support."
                    )
                owner[id(param)] = (position, param_name)
    missing = [name for name, p in zip(names, params) if id(p) not in owner]
    if missing:
        raise ValueError(f"method='hesscale': parameter(s) {', '.join(missing)} belong to no layer of the Sequential.")
    return owner


def _activation_gradients(
    layers: list[tuple[str, nn.Module]], inputs: list[Tensor], tail: int, first: int,
    loss_fn: Callable[[Tensor], Tensor], outputs: Tensor,
) -> dict[int, Tensor]:
    """dL/dy at the output of every elementwise activation above the first chosen layer (the
    second-derivative term needs it), from one backward pass that computes nothing else."""
    wanted = [p for p in range(first + 1, tail) if isinstance(layers[p][1], ELEMENTWISE)
              and not isinstance(layers[p][1], PIECEWISE_LINEAR)]
    # the output of layer p is the input of layer p + 1 (or the model output)
    tensors = [inputs[p + 1] if p + 1 < tail else outputs for p in wanted]
    keep = [(p, t) for p, t in zip(wanted, tensors) if t.requires_grad]
    if not keep:
        return {}
    grads = torch.autograd.grad(loss_fn(outputs), [t for _, t in keep], allow_unused=True)
    return {p: (torch.zeros_like(t) if g is None else g) for (p, t), g in zip(keep, grads)}


def _parameter_diagonal(layer: nn.Module, param_name: str, x: Tensor, diag: Tensor) -> Tensor:
    """The diagonal for one parameter of a layer from its input and the diagonal at its output."""
    if isinstance(layer, nn.Linear):
        d = diag.reshape(-1, diag.shape[-1])
        if param_name == "bias":
            return d.sum(dim=0)
        return d.T @ (x.detach() ** 2).reshape(-1, x.shape[-1])
    if isinstance(layer, CONVS):
        if param_name == "bias":
            return diag.sum(dim=[d for d in range(diag.dim()) if d != 1])
        return _conv_backward(layer, diag, x.detach() ** 2, layer.weight.detach(), weight_grad=True)
    if isinstance(layer, BATCHNORMS):
        reduce = [d for d in range(diag.dim()) if d != 1]
        if param_name == "bias":
            return diag.sum(dim=reduce)
        normalised = (x.detach() - _channel(layer.running_mean, x)) * _channel(_inv_std(layer), x)
        return (diag * normalised**2).sum(dim=reduce)
    raise ValueError(f"method='hesscale': no rule for parameter {param_name!r} of {type(layer).__name__}.")


def _input_diagonal(layer: nn.Module, x: Tensor, diag: Tensor, grad: Optional[Tensor], name: str) -> Tensor:
    """The diagonal at a layer's input from the one at its output (and dL/dy for activations)."""
    if isinstance(layer, nn.Linear):
        return diag @ layer.weight.detach() ** 2
    if isinstance(layer, CONVS):
        return _conv_backward(layer, diag, x.detach(), layer.weight.detach() ** 2, weight_grad=False)
    if isinstance(layer, BATCHNORMS):
        scale = _inv_std(layer)
        if layer.weight is not None:
            scale = scale * layer.weight.detach()
        return diag * _channel(scale, x) ** 2
    if isinstance(layer, PASS_THROUGH):
        return diag
    if isinstance(layer, RESHAPES):
        return diag.reshape(x.shape)
    if isinstance(layer, ELEMENTWISE):
        first, second = _elementwise_derivatives(layer, x)
        out = first**2 * diag
        if grad is not None and second is not None:
            out = out + second * grad
        return out
    if isinstance(layer, MAX_POOLS):
        # each output copies one input: the Jacobian's entries are 0 or 1, so J^2 = J
        return _vjp(layer, x, diag)
    if isinstance(layer, AVG_POOLS):
        return _vjp(layer, x, diag * _avg_pool_weights(layer, x))
    if isinstance(layer, ADAPTIVE_AVG_POOLS):
        return _vjp(layer, x, diag * _adaptive_weights(layer, x, diag))
    raise ValueError(f"method='hesscale': no rule for layer {name!r} ({type(layer).__name__}).")


def _elementwise_derivatives(layer: nn.Module, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """f'(x) and f''(x) of an elementwise activation (None for piecewise-linear ones)."""
    if type(layer) is nn.ReLU:
        return (x > 0).to(x.dtype), None
    if type(layer) is nn.LeakyReLU:
        return torch.where(x > 0, torch.ones_like(x), torch.full_like(x, layer.negative_slope)), None
    with torch.enable_grad():
        xs = x.detach().requires_grad_(True)
        y = layer(xs.clone() if getattr(layer, "inplace", False) else xs)
        (first,) = torch.autograd.grad(y.sum(), xs, create_graph=not isinstance(layer, PIECEWISE_LINEAR))
        if isinstance(layer, PIECEWISE_LINEAR) or not first.requires_grad:
            return first.detach(), None
        (second,) = torch.autograd.grad(first.sum(), xs, allow_unused=True)
    return first.detach(), (None if second is None else second.detach())


def _vjp(layer: nn.Module, x: Tensor, cotangent: Tensor) -> Tensor:
    with torch.enable_grad():
        xs = x.detach().requires_grad_(True)
        (out,) = torch.autograd.grad(layer(xs), xs, grad_outputs=cotangent)
    return out


def _avg_pool_weights(layer: nn.Module, x: Tensor) -> Tensor:
    """1 / divisor of each output of an average pool: its Jacobian row is that weight on every
    input in the window (padding excluded), so squaring the Jacobian multiplies by it once more."""
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    average = layer(ones)
    counts = _window_counts(layer, ones)
    return (average / counts).reshape(average.shape[2:])


def _window_counts(layer: nn.Module, ones: Tensor) -> Tensor:
    """How many real (unpadded) inputs each output of an average pool covers."""
    functional = nn.functional
    if isinstance(layer, nn.AvgPool1d):
        return functional.avg_pool2d(
            ones.unsqueeze(2), (1, layer.kernel_size[0]), (1, layer.stride[0]), (0, layer.padding[0]),
            layer.ceil_mode, True, divisor_override=1,
        ).squeeze(2)
    pool = functional.avg_pool2d if isinstance(layer, nn.AvgPool2d) else functional.avg_pool3d
    return pool(ones, layer.kernel_size, layer.stride, layer.padding, layer.ceil_mode, True, divisor_override=1)


def _adaptive_weights(layer: nn.Module, x: Tensor, diag: Tensor) -> Tensor:
    """1 / window size of each output of an adaptive average pool (windows from PyTorch's rule:
    output o of n covers inputs floor(o L / n) to ceil((o + 1) L / n))."""
    dims = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}[type(layer)]
    weights = torch.ones((), dtype=x.dtype, device=x.device)
    for axis in range(dims):
        length, size = x.shape[x.dim() - dims + axis], diag.shape[diag.dim() - dims + axis]
        o = torch.arange(size, device=x.device)
        ends = torch.div((o + 1) * length + size - 1, size, rounding_mode="floor")
        counts = ends - torch.div(o * length, size, rounding_mode="floor")
        shape = [1] * dims
        shape[axis] = size
        weights = weights * (1.0 / counts.to(x.dtype)).reshape(shape)
    return weights


def _conv_backward(layer: nn.Module, diag: Tensor, x: Tensor, weight: Tensor, weight_grad: bool) -> Tensor:
    """The transposed convolution of ``diag``: w.r.t. the weight (``sum diag * patch(x)``) or the input."""
    dims = len(layer.kernel_size)
    grad_input, grad_weight, _ = torch.ops.aten.convolution_backward(
        diag, x, weight, None, list(layer.stride), _conv_padding(layer, ""), list(layer.dilation), False,
        [0] * dims, layer.groups, [not weight_grad, weight_grad, False],
    )
    return grad_weight if weight_grad else grad_input


def _inv_std(layer: nn.Module) -> Tensor:
    return torch.rsqrt(layer.running_var.detach() + layer.eps)


def _channel(values: Tensor, x: Tensor) -> Tensor:
    """A per-channel (C,) tensor shaped to broadcast over (B, C, ...)."""
    return values.detach().reshape(1, -1, *([1] * (x.dim() - 2)))


def hesscale_diagonal(
    model: nn.Module,
    dataloader: Any,
    loss: Callable[[Any, Any], Tensor],
    *,
    curvature: str = "hessian",
    params: ParamSpec = None,
    eval_mode: bool = True,
    device: Any = None,
    use_gpu: bool = True,
    max_possible_gpu_samples: Optional[int] = None,
    verbose: bool = True,
) -> DiagonalEstimate:
    """HesScale's approximation of the diagonal of the loss Hessian (or, with ``curvature="ggn"``,
    of the GGN: HesScaleGN), at about the cost of one gradient over the data.

    Args:
        model: an ``nn.Sequential`` of supported layers (see the module docstring); others are
            refused with the name of the first unsupported layer.
        dataloader, loss: batches of (inputs, targets) and ``loss(model(inputs), targets)``, a mean
            or a sum over the batch; the result is for the mean (or sum) over every sample.
        curvature: "hessian" (default) or "ggn" (drops the activations' second-derivative terms).
        params, eval_mode, device, use_gpu, max_possible_gpu_samples: as for :class:`HVPOperator`.
        verbose: show a progress bar over the batches.

    Returns:
        A :class:`DiagonalEstimate` (``method="hesscale"``): ``diagonal`` (n,) in the chosen
        parameters' order, ``std_error`` NaN (the approximation's error is not statistical),
        ``info["by_parameter"]``, ``info["num_samples"]``, ``info["reduction"]``.
    """
    if curvature not in ("hessian", "ggn"):
        raise ValueError(f"hesscale: curvature={curvature!r} is not supported; use 'hessian' or 'ggn'.")
    result = backprop_diagonal(
        "hesscale", model, dataloader, loss, hesscale_chunk(loss, curvature), params=params, eval_mode=eval_mode,
        device=device, use_gpu=use_gpu, max_possible_gpu_samples=max_possible_gpu_samples, verbose=verbose,
        check_model=lambda work, names, chosen: _check_layers(sequential_layers(work, "method='hesscale'"), curvature),
    )
    estimate = as_estimate(result, "hesscale", std_error="unknown")
    estimate.info["curvature"] = curvature
    return estimate
