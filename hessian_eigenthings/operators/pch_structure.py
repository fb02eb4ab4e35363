"""Which models the positive-curvature Hessian supports, and the activations whose curvature it modifies.

The PCH (:mod:`.pch`) splits a parameter block's Hessian into the Gauss-Newton term and one
diagonal residual per elementwise activation, and makes each residual positive. That is the whole
Hessian block only if no other operation on the way from the block's parameters to the model's
outputs has a second derivative within the block. This module checks that on the autograd graph
of every micro-batch, so that a model it does not fit is refused with the operation's name rather
than given a matrix that silently misses a curvature term:

* operations linear (or piecewise linear) in each input, e.g. views, sums, pooling, padding,
  ReLU, dropout: no second derivative;
* products of two inputs (Linear, Conv, BatchNorm in eval mode, ``x * y``): second derivatives
  only between the two factors, so allowed where no parameter block reaches both factors (it
  does for tied weights, or ``x * x``);
* elementwise activation modules (:data:`CURVED_ACTIVATIONS`): their curvature is the residual
  the PCH makes positive; they are recorded by forward hooks during the forward pass;
* anything else (``torch.exp``, softmax, LayerNorm, BatchNorm with batch statistics, attention,
  a curved function called outside an activation module) is refused where it depends on a chosen
  parameter. Where it does not (e.g. it acts on the inputs before the first chosen parameter), it
  is a constant and fine.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, NamedTuple, Optional, Sequence

from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

#: Elementwise activation modules with a second derivative: the residuals the PCH modifies. The
#: exact classes (a subclass may compute something else in its forward).
CURVED_ACTIVATIONS: tuple[type, ...] = (
    nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
    nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Hardswish,
)

# Autograd operations (their node's name without "Backward<k>") linear or piecewise linear in each
# input: no second derivative at all (almost everywhere, as autograd differentiates them).
_LINEAR_OPS = frozenset({
    "View", "Reshape", "ReshapeAlias", "UnsafeView", "Permute", "T", "Transpose", "Expand", "Squeeze",
    "Unsqueeze", "Slice", "Select", "Index", "IndexSelect", "Gather", "Take", "Cat", "Stack", "Split",
    "SplitWithSizes", "Unbind", "Clone", "ToCopy", "Alias", "AsStrided", "Flip", "Roll", "Rot90", "Repeat",
    "Diag", "DiagEmbed", "Diagonal", "Tril", "Triu", "Trace", "Cumsum", "Sum", "Mean", "Neg", "Add", "Sub",
    "Rsub", "MaskedFill", "MaskedScatter", "MaskedSelect", "Where", "IndexPut", "IndexAdd", "Scatter",
    "ScatterAdd", "SliceScatter", "SelectScatter", "Unfold", "Im2Col", "Col2Im", "Embedding",
    "Relu", "LeakyRelu", "RreluWithNoise", "Hardtanh", "Threshold", "Hardsigmoid", "Hardshrink", "Softshrink",
    "Abs", "Clamp", "ClampMin", "ClampMax", "Maximum", "Minimum", "Fmax", "Fmin", "Max", "Min", "Amax", "Amin",
    "Sort", "Topk", "Kthvalue", "Sign", "Sgn", "Floor", "Ceil", "Round", "Trunc", "Frac",
    "MaxPool1DWithIndices", "MaxPool2DWithIndices", "MaxPool3DWithIndices", "AdaptiveMaxPool1D",
    "AdaptiveMaxPool2D", "AdaptiveMaxPool3D", "MaxUnpool2D", "MaxUnpool3D", "AvgPool2D", "AvgPool3D",
    "AdaptiveAvgPool2D", "AdaptiveAvgPool3D", "ConstantPadNd", "ReflectionPad1D", "ReflectionPad2D",
    "ReflectionPad3D", "ReplicationPad1D", "ReplicationPad2D", "ReplicationPad3D", "UpsampleNearest1D",
    "UpsampleNearest2D", "UpsampleNearest3D", "UpsampleNearestExact1D", "UpsampleNearestExact2D",
    "UpsampleNearestExact3D", "UpsampleLinear1D", "UpsampleBilinear2D", "UpsampleBicubic2D",
    "UpsampleTrilinear3D", "UpsampleBilinear2DAa", "UpsampleBicubic2DAa", "PixelShuffle", "PixelUnshuffle",
    "ChannelShuffle", "NativeDropout", "FusedDropout",
})

# Operations multilinear in their inputs: for each, the input positions that are multiplied with
# each other (the only second derivatives they have). Addmm is bias + mat1 @ mat2, Convolution is
# (input, weight, bias), PReLU is (input, weight).
_PRODUCT_OPS: dict[str, tuple[tuple[int, int], ...]] = {
    "Mul": ((0, 1),), "Mm": ((0, 1),), "Bmm": ((0, 1),), "Mv": ((0, 1),), "Dot": ((0, 1),), "Vdot": ((0, 1),),
    "Addmm": ((1, 2),), "Addmv": ((1, 2),), "Addbmm": ((1, 2),), "Baddbmm": ((1, 2),), "Addr": ((1, 2),),
    "Linear": ((0, 1),), "Convolution": ((0, 1),), "MkldnnConvolution": ((0, 1),),
    "ConvolutionOverrideable": ((0, 1),), "PreluKernel": ((0, 1),), "Prelu": ((0, 1),),
    "NativeBatchNormLegitNoTraining": ((0, 1),),
    "Trilinear": ((0, 1), (0, 2), (1, 2)),
}

# Batch normalization: an affine map of its input, times its weight, in eval mode (running
# statistics); with batch statistics (training mode) a curved function of the whole batch.
_BATCH_NORM_OPS = frozenset({"NativeBatchNorm", "CudnnBatchNorm", "MiopenBatchNorm"})

_SUPPORTED = (
    "Linear and Conv layers, BatchNorm in eval mode, pooling, padding, dropout, reshaping, sums, "
    "piecewise-linear activations (ReLU, LeakyReLU, PReLU, ReLU6, Hardtanh, ...) and the elementwise "
    "activation modules " + ", ".join(cls.__name__ for cls in CURVED_ACTIVATIONS)
)


def op_name(node: Any) -> str:
    """The operation of an autograd node, e.g. "Addmm" for ``AddmmBackward0``."""
    return re.sub(r"Backward\d*$", "", type(node).__name__)


class ActivationCall(NamedTuple):
    """One call of an elementwise activation module in a forward pass.

    ``pre``/``post``: its input and output tensors; ``pre_node``/``post_node``: their autograd
    nodes (``pre_node`` None where the input does not require gradients); ``versions``: the two
    tensors' version counters when the call returned (an in-place change afterwards is refused).
    """

    name: str
    pre: Tensor
    post: Tensor
    pre_node: Any
    post_node: Any
    versions: tuple[int, int]


class ForwardRecord:
    """What the hooks of :func:`recording_forward` saw: the activation calls, and which module
    produced a tensor whose autograd node is a given one (for naming modules in errors)."""

    def __init__(self) -> None:
        self.activations: list[ActivationCall] = []
        self.module_of_node: dict[Any, str] = {}


def check_activation_modules(model: nn.Module, owner: str) -> None:
    """Refuse activation modules whose curvature the PCH cannot take: in-place ones (their input,
    the tensor the residual lives on, is overwritten)."""
    for name, module in model.named_modules():
        if type(module) in CURVED_ACTIVATIONS and getattr(module, "inplace", False):
            raise ValueError(
                f"{owner}: the activation module {name!r} ({type(module).__name__}) runs in place, which "
                f"overwrites the pre-activation whose second derivative the positive-curvature Hessian needs. "
                f"Build it with inplace=False (the same function, one more tensor in memory)."
            )


@contextlib.contextmanager
def recording_forward(model: nn.Module) -> Iterator[ForwardRecord]:
    """Forward hooks on every module of ``model`` for the duration of the block (removed on exit,
    also on error): record the calls of :data:`CURVED_ACTIVATIONS` and the modules' output nodes."""
    record = ForwardRecord()
    handles = []

    def hook_for(name: str, curved: bool):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            for leaf in _tensors(output):
                if leaf.grad_fn is not None:
                    # Inner modules' hooks run first: keep the innermost name.
                    record.module_of_node.setdefault(leaf.grad_fn, name or type(module).__name__)
            if not curved or not args or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
                return
            pre = args[0]
            if not output.requires_grad:
                return  # applied to data that no parameter reaches
            pre_node = get_gradient_edge(pre).node if pre.requires_grad else None
            record.activations.append(ActivationCall(name, pre, output, pre_node, output.grad_fn,
                                                     (pre._version, output._version)))

        return hook

    try:
        for name, module in model.named_modules():
            handles.append(module.register_forward_hook(hook_for(name, type(module) in CURVED_ACTIVATIONS)))
        yield record
    finally:
        for handle in handles:
            handle.remove()


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    if isinstance(value, dict):
        return [t for item in value.values() for t in _tensors(item)]
    return []


def check_unchanged_in_place(record: ForwardRecord, owner: str) -> None:
    """Refuse a forward pass that changed an activation's input or output in place after it ran
    (the recorded tensors would then no longer be the activation's)."""
    for call in record.activations:
        if (call.pre._version, call.post._version) != call.versions:
            raise ValueError(
                f"{owner}: the input or output of the activation module {call.name!r} was changed in place "
                f"later in the forward pass (e.g. `h += ...` or an in-place op on it), so its residual curvature "
                f"cannot be read. Use out-of-place operations on the tensors around the activation."
            )


def check_curvature_structure(
    roots: Sequence[Any],
    loss_node: Any,
    record: ForwardRecord,
    block_of: dict[int, int],
    block_names: Sequence[str],
    owner: str,
) -> dict[Any, frozenset]:
    """Check a micro-batch's autograd graph (see the module docstring); return, for each node on
    the way from the chosen parameters to the model outputs, the chosen blocks it depends on.

    Args:
        roots: the autograd nodes of the model's floating outputs.
        loss_node: the loss's autograd node (the criterion must reach the parameters only through
            the outputs).
        record: the forward pass's activation calls and module names.
        block_of: ``id(parameter) -> block index`` for the chosen parameters.
        block_names: a short name of each block, for messages.
        owner: the operator's name, for messages.

    Raises:
        ValueError: naming the operation (and the module, where it is one's output) that gives a
            block curvature the PCH does not cover.
    """
    # An activation's interior is its residual: the walk steps from its output to its input.
    through = {call.post_node: call.pre_node for call in record.activations}
    deps = _dependencies(roots, through, block_of)

    def describe(node: Any) -> str:
        module = record.module_of_node.get(node)
        where = f" in module {module!r}" if module else " (a function called in the model's forward)"
        return f"{op_name(node)}{where}"

    def blocks(found: frozenset) -> str:
        return ", ".join(block_names[i] for i in sorted(found)[:4]) + (", ..." if len(found) > 4 else "")

    for node, found in deps.items():
        if not found or node in through or type(node).__name__ == "AccumulateGrad":
            continue
        name = op_name(node)
        inputs = [deps.get(child, frozenset()) if child is not None else frozenset()
                  for child, _ in node.next_functions]
        if name in _LINEAR_OPS:
            continue
        if name in _BATCH_NORM_OPS and not getattr(node, "_saved_training", True):
            pairs: tuple[tuple[int, int], ...] = ((0, 1),)
        elif name in _PRODUCT_OPS:
            pairs = _PRODUCT_OPS[name]
        elif name == "Div" and (len(inputs) < 2 or not inputs[1]):
            continue  # divided by a constant
        else:
            involved = frozenset().union(*inputs) if inputs else found
            hint = (" BatchNorm uses batch statistics here: build the operator with eval_mode=True (running "
                    "statistics)." if name in _BATCH_NORM_OPS else
                    " If it is an elementwise activation, use it as one of the modules listed; a model that "
                    "returns probabilities should return logits and leave softmax to the criterion.")
            raise ValueError(
                f"{owner} does not support the operation {describe(node)}: it is curved in parameters of "
                f"{blocks(involved)}, and its curvature is not an elementwise activation's residual, which is "
                f"all the positive-curvature Hessian can make positive. Supported: {_SUPPORTED}; any operation "
                f"on data that no chosen parameter reaches (choose fewer parameters with params=).{hint}"
            )
        for i, j in pairs:
            shared = (inputs[i] & inputs[j]) if max(i, j) < len(inputs) else frozenset()
            if shared:
                raise ValueError(
                    f"{owner} does not support the operation {describe(node)}: both of its factors depend on "
                    f"{blocks(shared)} (a parameter used twice, e.g. tied weights, or a product such as x * x), "
                    f"so that block's Hessian has a term the positive-curvature Hessian does not define. "
                    f"Supported: {_SUPPORTED}, each parameter used once."
                )
    _check_loss_uses_outputs_only(loss_node, set(roots), block_of, owner)
    return deps


def _dependencies(roots: Sequence[Any], through: dict[Any, Any], block_of: dict[int, int]) -> dict[Any, frozenset]:
    """For every node reachable from ``roots`` (stepping over activations by ``through``), the set
    of chosen blocks whose parameters it depends on."""
    deps: dict[Any, frozenset] = {}

    def children(node: Any) -> list[Any]:
        if node in through:
            return [through[node]]
        return [child for child, _ in node.next_functions]

    stack: list[tuple[Any, bool]] = [(root, False) for root in roots if root is not None]
    while stack:
        node, expanded = stack.pop()
        if node in deps:
            continue
        kids = [child for child in children(node) if child is not None]
        if not expanded:
            stack.append((node, True))
            stack.extend((child, False) for child in kids if child not in deps)
            continue
        found: set[int] = set()
        if type(node).__name__ == "AccumulateGrad":
            block = block_of.get(id(node.variable))
            if block is not None:
                found.add(block)
        for child in kids:
            found |= deps[child]
        deps[node] = frozenset(found)
    return deps


def _check_loss_uses_outputs_only(loss_node: Any, outputs: set, block_of: dict[int, int], owner: str) -> None:
    """Refuse a criterion that reaches a chosen parameter other than through the model outputs
    (e.g. a weight penalty inside the loss): its curvature would be missing from the products."""
    seen: set = set()
    stack = [loss_node]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in outputs:
            continue
        seen.add(node)
        if type(node).__name__ == "AccumulateGrad" and id(node.variable) in block_of:
            raise ValueError(
                f"{owner}: the criterion uses a chosen parameter directly, not only through the model's outputs "
                f"(e.g. a weight penalty inside the loss). The positive-curvature Hessian is built from the "
                f"outputs' loss Hessian; add a penalty's (known) curvature separately, e.g. `op + c` for "
                f"c * ||theta||^2 / 2."
            )
        stack.extend(child for child, _ in node.next_functions)


def reached(call: ActivationCall, deps: dict[Any, frozenset]) -> Optional[frozenset]:
    """The chosen blocks an activation call's input depends on, or None where the outputs do not
    use the call (or nothing chosen reaches it)."""
    if call.post_node not in deps or call.pre_node is None:
        return None
    found = deps.get(call.pre_node, frozenset())
    return found or None
