"""The positive-curvature Hessian (PCH) of Hessian backpropagation, as an operator.

Dangel, Harmeling and Hennig (2020), "Modular Block-diagonal Curvature Approximations for
Feedforward Architectures", AISTATS (arXiv:1902.01813), backpropagate a curvature matrix through
the network module by module. Through an elementwise activation ``a = phi(z)`` the Hessian of the
loss ``L`` w.r.t. its input is

    H_z = diag(phi'(z)) H_a diag(phi'(z)) + diag(phi''(z) * dL/da),

and the second, *residual* term is the only one that can be concave: Linear and Conv layers have
none (they are linear in their input), and ``J^T H_out J`` is positive semi-definite for a loss
convex in the outputs. The PCH of Chen, Chou and Chang (2018), "BDA-PCH: Block-Diagonal
Approximation of Positive-Curvature Hessian for Training Neural Networks" (arXiv:1802.06502), makes
every residual positive, elementwise: ``|phi''(z) * dL/da|`` ("abs", their choice and the default
here) or ``max(phi''(z) * dL/da, 0)`` ("clip", the alternative HBP compares it with). Keeping the
residual gives the Hessian, dropping it the GGN, so the four choices are the four curvatures of
HBP's exact curvature-matrix products. The modified matrix is positive semi-definite by
construction.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ..utils import logger
from .ggn import _float_leaves
from .graph_cache import tensor_bytes
from .model_operator import ModelOperator, Tangents
from .options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES
from .pch_structure import (
    ActivationCall,
    check_activation_modules,
    check_curvature_structure,
    check_unchanged_in_place,
    reached,
    recording_forward,
)

#: How the residual ``phi''(z) * dL/da`` of every elementwise activation enters: "abs" (the PCH of
#: Chen et al., the default), "clip" (its negative entries set to zero), "keep" (unchanged: the
#: Hessian's blocks) or "drop" (left out: the GGN's blocks).
RESIDUAL_MODES = ("abs", "clip", "keep", "drop")
#: The block structure: one block per parameter tensor (HBP's), or one per module (a layer's weight
#: and bias together).
BLOCK_MODES = ("parameter", "module")

_MODIFY: dict[str, Callable[[Tensor], Tensor]] = {
    "abs": torch.abs,
    "clip": lambda r: r.clamp(min=0),
    "keep": lambda r: r,
}


class _PCHWork(NamedTuple):
    """A micro-batch's forward pass and the graphs its products differentiate.

    ``leaves``: the model's floating outputs; ``loss_grads``: dL/d(output) with a graph
    (``curved``: the ones that depend on the outputs); ``pre``: the activation inputs whose
    residual enters, with their modified residuals ``weights`` (shaped like them); ``jt_u``:
    ``J^T u`` of the outputs and activation inputs for the zero ``dummies`` u, with a graph;
    ``live``: the parameters it reaches.
    """

    loss: Tensor
    leaves: list
    loss_grads: tuple
    curved: list
    pre: list
    weights: list
    dummies: list
    jt_u: tuple
    live: frozenset


class PCHOperator(ModelOperator):
    """The positive-curvature Hessian (PCH) of ``criterion(model(inputs), targets)``, block diagonal.

    **Blocks.** The matrix is block diagonal: one block per parameter tensor with
    ``blocks="parameter"`` (the default: HBP's exact curvature products are per parameter, a
    layer's weight and bias apart), or one per module with ``blocks="module"`` (a layer's weight and
    bias together); products between blocks are zero. The off-diagonal blocks of the Hessian
    couple layers through the products ``W a`` of one layer's weights with an earlier layer's
    activations, which are indefinite and have no positive version, so the PCH has none.
    ``params=`` chooses parameters as for every operator: the result is the principal submatrix
    of the PCH on them (the blocks of the chosen parameters).

    **Each block.** For a block of parameters ``theta`` (a micro-batch's loss ``L``, the model's
    outputs ``f`` with Jacobian ``J = df/dtheta`` and the loss Hessian ``H_out`` w.r.t. them; the
    elementwise activations ``a_k = phi_k(z_k)`` with ``J_k = dz_k/dtheta``)::

        PCH_theta = J^T H_out J + sum_k J_k^T diag(m(phi_k''(z_k) * dL/da_k)) J_k

    with ``m`` the ``residual`` modification, elementwise over samples and units. With
    ``m(r) = r`` this is exactly the Hessian's block of ``theta`` (checked on the model, see
    below), and HBP's backpropagation ``H_z = diag(phi') H_a diag(phi') + m(diag(phi'' dL/da))``,
    ``H_in = W^T H_out W`` through a linear layer, unrolled. It is positive semi-definite when the
    criterion is convex in the outputs (MSE, cross-entropy, BCE with logits, Huber). Like
    :class:`HVPOperator`, it is the mean of the micro-batches' matrices weighted by their numbers of
    samples (their sum for a summing criterion); the residual is modified per sample, so the
    split into batches does not change it.

    **Supported models.** Networks whose curvature comes from elementwise activation modules
    (Tanh, Sigmoid, Softplus, ELU, CELU, SELU, GELU, SiLU, Mish, LogSigmoid, Softsign,
    Tanhshrink, Hardswish; not in place) between layers linear in their input: Linear, Conv,
    BatchNorm in eval mode, pooling, padding, dropout, reshaping, residual sums, and
    piecewise-linear activations (ReLU and its kin, whose residual is zero). Every micro-batch's
    autograd graph is checked: an operation whose curvature is not an activation's residual
    (softmax or LayerNorm inside the model, ``torch.exp``, a product ``x * x``, tied weights,
    attention, BatchNorm with batch statistics) raises a ValueError naming it, if a chosen
    parameter reaches it (on the inputs before the first chosen parameter, anything goes). The
    loss must reach the parameters only through the model's outputs.

    **Cost.** Building a micro-batch's work (kept inside :meth:`frozen`, like the other operators):
    one forward pass, the loss gradient w.r.t. the activations' outputs, the output gradient with
    its graph and the graph of ``J^T u`` (about three backward passes). Each product then runs,
    per block, three backward passes through the part of the network after that block, all ``b``
    vectors of a block at once (vmapped): up to about as many GGN products as there are blocks,
    less for blocks near the outputs.

    Args:
        model, dataloader, criterion, use_gpu, fp16, full_dataset, max_possible_gpu_samples: as
            for :class:`HVPOperator`, and so are the keyword options (``params``, ``eval_mode``,
            ``reduction``, caches, ...).
        residual: "abs" (default): the PCH of Chen et al. (2018), negative residuals cast to their
            absolute value; "clip": negative residuals set to zero; "keep": the residual
            unchanged, i.e. the Hessian's diagonal blocks (not positive semi-definite); "drop":
            the residual left out, i.e. the GGN's diagonal blocks (for any model: the model is
            not checked then).
        blocks: "parameter" (default) or "module", see above.

    Attributes:
        block_names: the parameter names of each block, in order.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        use_gpu: bool = True,
        fp16: bool = False,
        full_dataset: bool = True,
        max_possible_gpu_samples: int = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
        *,
        residual: str = "abs",
        blocks: str = "parameter",
        **kwargs: Any,
    ) -> None:
        if not isinstance(residual, str) or residual not in RESIDUAL_MODES:
            raise ValueError(
                f"residual={residual!r} is not known; use 'abs' (the PCH), 'clip', 'keep' (the Hessian's blocks) "
                f"or 'drop' (the GGN's blocks)."
            )
        if not isinstance(blocks, str) or blocks not in BLOCK_MODES:
            raise ValueError(
                f"blocks={blocks!r} is not known; use 'parameter' (one block per parameter tensor) or 'module' "
                f"(one block per module)."
            )
        super().__init__(
            model, dataloader, criterion, use_gpu, fp16, full_dataset, max_possible_gpu_samples, **kwargs
        )
        check_activation_modules(self._work_model, type(self).__name__)
        self.residual = residual
        self.blocks = blocks
        self._blocks = _group(self.param_names, blocks)
        self.block_names: list[tuple[str, ...]] = [tuple(self.param_names[i] for i in b) for b in self._blocks]
        self._block_of = {id(self._params[i]): k for k, members in enumerate(self._blocks) for i in members}

    # None: not tried yet; True/False: whether vmapped backward passes work for this model.
    _batched: Optional[bool] = None

    def build(self, inputs: Any, targets: Any, label: str) -> _PCHWork:
        """The forward pass of one micro-batch (checked, see the class docstring), the modified
        residuals of its activations, and the first-order graphs of its products."""
        owner = type(self).__name__
        check_activation_modules(self._work_model, owner)
        with recording_forward(self._work_model) as record:
            outputs = self._forward(inputs)
        loss = self._batch_loss(outputs, targets, label, inputs)
        leaves = [t for t in _float_leaves(outputs) if t.requires_grad]
        if not leaves:
            return _PCHWork(loss, [], (), [], [], [], [], (), frozenset())
        calls: list[ActivationCall] = []
        if self.residual != "drop":  # without residuals these are the GGN's blocks, defined for any model
            check_unchanged_in_place(record, owner)
            names = ["+".join(names) for names in self.block_names]
            deps = check_curvature_structure([get_gradient_edge(t).node for t in leaves], loss.grad_fn, record,
                                             self._block_of, names, owner)
            calls = [c for c in record.activations if reached(c, deps)]
        pre, weights = self._residuals(loss, calls)
        # dL/df with its graph, so that a second differentiation gives H_out times a vector.
        loss_grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        curved = [i for i, g in enumerate(loss_grads) if g is not None and g.requires_grad]
        if not curved and not pre:
            return _PCHWork(loss, leaves, loss_grads, [], [], [], [], (), frozenset())
        # J^T u of the outputs and activation inputs for dummies u: differentiating it w.r.t. u along
        # v gives J v at all of them (forward mode through reverse mode), as GGNOperator does.
        targets_of_j = leaves + pre
        dummies = [torch.zeros_like(t, requires_grad=True) for t in targets_of_j]
        jt_u = torch.autograd.grad(targets_of_j, self._params, grad_outputs=dummies, create_graph=True,
                                   allow_unused=True)
        live = frozenset(i for i, g in enumerate(jt_u) if g is not None and g.requires_grad)
        return _PCHWork(loss, leaves, loss_grads, curved, pre, weights, dummies, jt_u, live)

    def _residuals(self, loss: Tensor, calls: list[ActivationCall]) -> tuple[list[Tensor], list[Tensor]]:
        """The inputs of the activations whose residual enters, and their modified residuals
        ``m(phi''(z) * dL/da)`` (constants, shaped like the inputs)."""
        if not calls:
            return [], []
        upstream = torch.autograd.grad(loss, [c.post for c in calls], retain_graph=True, allow_unused=True)
        modify = _MODIFY[self.residual]
        pre, weights = [], []
        for call, grad_post in zip(calls, upstream):
            if grad_post is None:
                continue
            # phi' and phi'' by differentiating the activation's own graph (elementwise: the
            # gradient of the sum is the derivative at each entry).
            first = torch.autograd.grad(call.post, call.pre, torch.ones_like(call.post), create_graph=True)[0]
            if not first.requires_grad:
                continue  # linear where evaluated: no residual
            second = torch.autograd.grad(first, call.pre, torch.ones_like(first), retain_graph=True)[0]
            pre.append(call.pre)
            weights.append(modify(second.detach() * grad_post.detach()).to(call.pre.dtype))
        return pre, weights

    def work_bytes(self, work: _PCHWork) -> int:
        return tensor_bytes([*work.leaves, *work.loss_grads, *work.weights, *work.dummies, *work.jt_u])

    def product(self, work: _PCHWork, tangents: Tangents, keep: bool) -> Tensor:
        """The micro-batch's PCH times the b vectors of ``tangents``, (n, b), block by block; the
        graphs are always retained (every block's passes run through them)."""
        out = torch.zeros(self.size, tangents.width, dtype=self.dtype, device=self.device)
        if not work.live:
            return out
        if self._batched is not False:
            try:
                self._write(out, self._all_blocks(work, tangents.per_parameter, batched=True), batched=True)
                self._batched = True
                return out
            except RuntimeError as exc:
                if self._batched:  # it worked before, so this is a real error
                    raise
                logger.info("PCHOperator: batched products are not supported by this model (%s); "
                            "using one product at a time.", exc)
                self._batched = False
                out.zero_()
        for j in range(tangents.width):
            pieces = [t[j] for t in tangents.per_parameter]
            self._write(out[:, j : j + 1], self._all_blocks(work, pieces, batched=False), batched=False)
        return out

    def _all_blocks(self, work: _PCHWork, pieces: list[Tensor], batched: bool) -> dict[int, Tensor]:
        """{parameter index: its rows of the product} over every block (a leading vector dimension
        when ``batched``)."""
        rows: dict[int, Tensor] = {}
        for members in self._blocks:
            rows.update(self._block_product(work, [i for i in members if i in work.live], pieces, batched))
        return rows

    def _block_product(self, work: _PCHWork, live: list[int], pieces: list[Tensor], batched: bool) -> dict[int, Tensor]:
        """One block's product ``J_B^T (H_out J_B v + sum_k m(r_k) J_{k,B} v)`` for the vector pieces
        of its parameters ``live`` (the rest of the vector is zero for this block)."""
        if not live:
            return {}
        grad = torch.autograd.grad
        tangents_in = [pieces[i].to(work.jt_u[i].dtype) for i in live]
        # J v at the outputs and at the activation inputs, for v zero outside the block.
        jv = grad([work.jt_u[i] for i in live], work.dummies, grad_outputs=tangents_in, retain_graph=True,
                  allow_unused=True, is_grads_batched=batched)
        n_leaves = len(work.leaves)
        roots: list[Tensor] = []
        seeds: list[Tensor] = []
        reaching = [c for c in work.curved if jv[c] is not None]
        if reaching:
            h_jv = grad([work.loss_grads[c] for c in reaching], work.leaves, grad_outputs=[jv[c] for c in reaching],
                        retain_graph=True, allow_unused=True, is_grads_batched=batched)
            for leaf, h in zip(work.leaves, h_jv):
                if h is not None:
                    roots.append(leaf)
                    seeds.append(h)
        for k, (pre, weight) in enumerate(zip(work.pre, work.weights)):
            t = jv[n_leaves + k]
            if t is not None:
                roots.append(pre)
                seeds.append(weight * t)
        if not roots:
            return {}
        back = grad(roots, [self._params[i] for i in live], grad_outputs=seeds, retain_graph=True,
                    allow_unused=True, is_grads_batched=batched)
        return {i: g for i, g in zip(live, back) if g is not None}

    def _write(self, out: Tensor, rows: dict[int, Tensor], batched: bool) -> None:
        """Put each parameter's rows into the (n, b) result, laid out like the flat vector."""
        offsets = self._offsets
        b = out.shape[1]
        for i, g in rows.items():
            out[offsets[i] : offsets[i + 1], :] = g.reshape(b, -1).T.to(self.dtype) if batched \
                else g.reshape(-1, 1).to(self.dtype)


def _group(names: list[str], blocks: str) -> list[list[int]]:
    """Indices of the chosen parameters grouped into blocks: one each, or by owning module."""
    if blocks == "parameter":
        return [[i] for i in range(len(names))]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name.rpartition(".")[0], []).append(i)
    return list(groups.values())
