"""The machinery shared by curvature operators of a model, a loss and a dataloader.

A curvature operator says only what one micro-batch contributes, in two steps:

* ``build(inputs, targets, label) -> work``: everything that does not depend on the vectors, such
  as the forward pass and first-order graphs; ``work.loss`` is the micro-batch's loss.
* ``product(work, tangents, keep) -> (n, b)``: the micro-batch's curvature times the b vectors.

:class:`ModelOperator` does everything else: the data loop (:mod:`.batches`), combining the
micro-batches as the criterion's reduction says (:mod:`.reduction`), keeping each micro-batch's
work between products inside :meth:`~ModelOperator.frozen` (:mod:`.graph_cache`), the compute
device and its copy of the model, the guarantees about the model and the random state, the
NaN/Inf checks (:mod:`.finite`) and the all-reduce under torch.distributed.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import distributed
from ..data import BatchSizeFn, as_batches, call_model, check_reiterable, map_tensors, tensors_in
from ..model_utils import ParamSpec, common_device, common_dtype, preserved_model_state, select_parameters, unflatten
from ..utils import check_bool, check_positive_int, preserved_global_rng, resolve_device, user_stacklevel
from .base import Operator
from .batches import BatchReader, MicroBatch
from .compute_model import ComputeModel
from .finite import Check, FiniteChecks, NonFiniteError
from .graph_cache import WorkKeeper, model_state_key
from ..threads import check_cpu_threads
from .options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, resolve_max_possible_gpu_samples
from .precision import autocast_context, resolve_precision
from .reduction import ReductionProbe, WeightedSum, finish, resolve_reduction

# Batches are kept on the compute device between products while they take at most this much memory.
DEFAULT_CACHE_MAX_BYTES = 2**30


class Tangents:
    """The b vectors of a block product, in the forms a micro-batch's product may want; each form
    is made once per product and shared by its micro-batches.

    Attributes:
        block: the (n, b) block, laid out like the flat parameter vector.
    """

    def __init__(self, block: Tensor, params: list[Tensor]) -> None:
        self.block = block
        self._params = params

    @property
    def width(self) -> int:
        """b, the number of vectors."""
        return self.block.shape[1]

    @functools.cached_property
    def columns(self) -> list[list[Tensor]]:
        """Per vector, its pieces shaped like the parameters (views into the block)."""
        return [unflatten(self.block[:, j], self._params) for j in range(self.width)]

    @functools.cached_property
    def per_parameter(self) -> list[Tensor]:
        """Per parameter p, the b vectors' pieces as one (b, *p.shape) tensor."""
        return [torch.stack([column[i] for column in self.columns]) for i in range(len(self._params))]


class ModelOperator(Operator):
    """Base of curvature operators of ``criterion(model(inputs), targets)`` over a dataloader.

    The operator is the mean over micro-batches of their curvature, weighted by their numbers of
    samples (their sum, for a criterion that sums over samples; see :mod:`.reduction`); see
    :class:`HVPOperator` for the meaning of every argument.

    A subclass implements :meth:`build` and :meth:`product` for one micro-batch (see the module
    docstring), using :meth:`_loss` (or :meth:`_forward` and :meth:`_batch_loss`), ``_params``
    (the parameter tensors to differentiate, on the compute device) and ``_work_model`` (the
    model the products run). Whether work is kept between products is decided here; ``product``
    is only told whether its ``work`` will be used again (``keep``).

    Under torch.distributed (an initialised process group), each rank passes the dataloader of
    its own shard of the data and every product is ONE all-reduce of the weighted sums and sample
    counts: every rank gets the same product with the curvature of the mean (or summed) loss over
    the union of the shards, exact for uneven shards (``num_samples`` is then the global count).
    Every rank must make the same products in the same order, with the same vectors (checked). An
    error inside a product on one rank (a NaN/Inf, a bad batch) is raised on every rank instead of
    leaving the others waiting. A ``DistributedDataParallel``-wrapped model is unwrapped: products
    use ``model.module`` (the same parameter tensors; parameter names are those of
    ``model.module``), so DDP's hooks and collectives never run. Set ``reduce_across_ranks =
    False`` on an operator for a rank-local one, or ``process_group`` to reduce over a subgroup.
    """

    #: All-reduce every product over the ranks of ``process_group`` when torch.distributed is
    #: initialised; False makes this operator rank-local (its own shard only).
    reduce_across_ranks: bool = True
    #: The process group of the all-reduce; None is the default (world) group.
    process_group: Any = None
    #: Whether the memory of :meth:`build`'s work is what autograd saves while building it (False:
    #: only :meth:`work_bytes`, e.g. for work made by ``torch.func`` transforms, which refuse the
    #: hooks that measure it).
    measures_saved_tensors: bool = True
    #: Whether :meth:`product` returns the per-sample mean curvature of a micro-batch whatever the
    #: criterion's reduction (the empirical Fisher, from per-sample gradients), rather than the
    #: curvature of the criterion's loss of the micro-batch (the Hessian, the GGN).
    per_sample_mean_products: bool = False

    def __init__(
        self,
        model: nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        use_gpu: bool = True,
        fp16: bool = False,
        full_dataset: bool = True,
        max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
        *,
        params: ParamSpec = None,
        eval_mode: bool = True,
        device: Any = None,
        check_finite: bool = True,
        cache_batches: bool = True,
        cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES,
        cache_graphs: bool = True,
        graph_cache_max_bytes: Optional[int] = None,
        precision: Optional[str] = None,
        reduction: Optional[str] = None,
        batch_size_fn: Optional[BatchSizeFn] = None,
    ) -> None:
        model = distributed.unwrap_model(model)
        names, chosen = select_parameters(model, params)
        if any(p.is_inference() for p in chosen):
            raise ValueError(
                "The model's parameters were created under torch.inference_mode(), and such tensors can never "
                "be differentiated. Create or load the model outside inference_mode() (torch.no_grad() is "
                "fine), or replace its parameters with clones made outside it."
            )
        if not callable(criterion):
            raise TypeError(f"criterion must be a callable loss(outputs, targets), got {type(criterion).__name__}.")
        for flag, name in ((use_gpu, "use_gpu"), (fp16, "fp16"), (full_dataset, "full_dataset"),
                           (eval_mode, "eval_mode"), (check_finite, "check_finite"),
                           (cache_batches, "cache_batches"), (cache_graphs, "cache_graphs")):
            check_bool(flag, name)
        if batch_size_fn is not None and not callable(batch_size_fn):
            raise TypeError(
                f"batch_size_fn must be a callable (inputs, targets) -> number of samples, got "
                f"{type(batch_size_fn).__name__}."
            )
        dataloader = as_batches(dataloader)
        check_reiterable(dataloader, full_dataset)
        if max_possible_gpu_samples is not None:
            check_positive_int(max_possible_gpu_samples, "max_possible_gpu_samples")
        cache_max_bytes = check_positive_int(cache_max_bytes, "cache_max_bytes")
        if graph_cache_max_bytes is not None:
            check_positive_int(graph_cache_max_bytes, "graph_cache_max_bytes")
        model_device = common_device(chosen)
        if device is not None:
            target = resolve_device(device)
        elif model_device.type != "cpu" or not use_gpu or not torch.cuda.is_available():
            target = model_device
        else:
            target = torch.device("cuda")
        self.precision = resolve_precision(precision, bool(fp16), target)
        max_possible_gpu_samples = resolve_max_possible_gpu_samples(max_possible_gpu_samples, target)
        check_cpu_threads(target)  # warns once per process when torch's threads oversubscribe the cores
        super().__init__(sum(p.numel() for p in chosen), common_dtype(chosen), target)

        self.model = model
        self.criterion = criterion
        self.param_names = names
        # "mean" or "sum" (see operators/reduction.py); None until the data shows which.
        self.reduction = resolve_reduction(reduction, criterion)
        # True when products run under autocast (the meaning fp16 always had).
        self.fp16 = self.precision in ("fp16", "bf16")
        self.is_stochastic = not full_dataset
        self.eval_mode = bool(eval_mode)
        self.check_finite = bool(check_finite)
        self.cache_graphs = cache_graphs
        self.graph_cache_max_bytes = graph_cache_max_bytes
        self.dropout_seed = 0
        self.num_samples: Optional[int] = None  # of the last full pass

        self._compute = ComputeModel(model, names, chosen, target, type(self).__name__)
        # What subclasses differentiate: the module products run, and its chosen parameters.
        self._work_model = self._compute.module
        self._params = self._compute.params
        self._batches = BatchReader(dataloader, target, bool(full_dataset), max_possible_gpu_samples, batch_size_fn,
                                    cache_batches, cache_max_bytes, type(self).__name__)
        self._keeper = WorkKeeper(type(self).__name__, target, graph_cache_max_bytes)
        self._checks = FiniteChecks()
        self._frozen_depth = 0  # nesting depth of frozen() blocks
        self._keeping = False  # the product in progress keeps/reuses per-micro-batch work
        # While the criterion's reduction is unknown: the probe that looks at the micro-batch in
        # progress (see _batch_loss), and whether it has seen that micro-batch's outputs.
        self._probing: Optional[ReductionProbe] = None
        self._probed = False

    # -- the options that live in the data loop ------------------------------------------------
    @property
    def dataloader(self) -> Any:
        """The dataloader the operator reads (a single (inputs, targets) pair as a list of one batch)."""
        return self._batches.dataloader

    @property
    def full_dataset(self) -> bool:
        """Every batch in every product (True), or the next mini-batch (False)."""
        return self._batches.full_dataset

    @property
    def max_possible_gpu_samples(self) -> int:
        """The most rows of a micro-batch."""
        return self._batches.max_possible_gpu_samples

    @property
    def batch_size_fn(self) -> Optional[BatchSizeFn]:
        """The user's count of a batch's samples, or None (its rows)."""
        return self._batches.batch_size_fn

    @property
    def cache_batches(self) -> bool:
        """Whether batches are kept on the compute device between products."""
        return self._batches.cache_batches

    @property
    def cache_max_bytes(self) -> int:
        """The memory the batches kept on the compute device may take."""
        return self._batches.cache_max_bytes

    # -- what subclasses provide -------------------------------------------------------------
    def build(self, inputs: Any, targets: Any, label: str) -> Any:
        """The work of one micro-batch that does not depend on the vectors (forward pass, first-order
        graphs, ...), with its loss as ``work.loss``. ``label`` names the micro-batch in messages."""
        raise NotImplementedError(f"{type(self).__name__} must implement build")

    def product(self, work: Any, tangents: Tangents, keep: bool) -> Tensor:
        """The micro-batch's curvature times the b vectors of ``tangents``, shape (n, b), from its
        ``work``. ``keep``: the work is used again by later products (do not free its graphs)."""
        raise NotImplementedError(f"{type(self).__name__} must implement product")

    def work_bytes(self, work: Any) -> int:
        """Bytes of ``work`` that autograd does not save while building it (e.g. gradients it returns),
        counted against ``graph_cache_max_bytes`` when the work is kept."""
        return 0

    def _keeps_work(self) -> bool:
        """Whether this operator's work is worth keeping between products at all."""
        return True

    # -- helpers for subclasses ----------------------------------------------------------------
    @property
    def keeping_work(self) -> bool:
        """True while the product in progress keeps each micro-batch's work for later products."""
        return self._keeping

    def _forward(self, inputs: Any, parameters: Optional[Mapping[str, Tensor]] = None) -> Any:
        """The model's outputs for ``inputs`` (under autocast in the fp16/bf16 modes).

        ``parameters`` ({name: tensor}) stand in for those parameters of the model during the call
        (``torch.func.functional_call``; the module's own tensors are back in place afterwards,
        also on error), which is how ``torch.func`` transforms differentiate the loss.
        """
        with autocast_context(self.precision, self.device):
            if parameters is None:
                return call_model(self._work_model, inputs)
            return call_model(self._work_model, inputs, parameters)

    def _batch_loss(self, outputs: Any, targets: Any, label: str, inputs: Any = None) -> Tensor:
        """The criterion's checked loss of one micro-batch (or sample) from its model outputs.

        Given the ``inputs`` too, it also shows the outputs to the check of the criterion's
        reduction while that is unknown, which then needs no forward pass of its own.
        """
        with autocast_context(self.precision, self.device):
            loss = self.criterion(outputs, targets)
        self._check_loss(loss, label)
        if inputs is not None and self._probing is not None and self._probing.found is None:
            self._probed = True
            detached = map_tensors(lambda t: t.detach(), outputs)
            self._observe_reduction(self._probing, inputs, targets, detached)
        return loss

    def _loss(
        self, inputs: Any, targets: Any, label: str, parameters: Optional[Mapping[str, Tensor]] = None
    ) -> Tensor:
        """The checked loss of one micro-batch (see :meth:`_forward` for ``parameters``)."""
        # Inside torch.func transforms (parameters given) the outputs are not plain tensors to look at.
        return self._batch_loss(self._forward(inputs, parameters), targets, label,
                                inputs=inputs if parameters is None else None)

    @property
    def _offsets(self) -> list[int]:
        offsets = [0]
        for p in self._params:
            offsets.append(offsets[-1] + p.numel())
        return offsets

    # -- layout ---------------------------------------------------------------------------------
    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a flat (n,) vector into {parameter name: tensor shaped like that parameter}."""
        return dict(zip(self.param_names, unflatten(vec, self._params)))

    def parameters_vector(self) -> Tensor:
        """The current values of the chosen parameters as one flat (n,) vector on the operator's device."""
        return torch.cat([p.detach().reshape(-1) for p in self._params]).to(self.device)

    # -- products ------------------------------------------------------------------------------
    def _matvec(self, vec: Tensor) -> Tensor:
        return self._matmat(vec.unsqueeze(1)).squeeze(1)

    def _matmat(self, mat: Tensor) -> Tensor:
        return self._guarded(self._product, mat)

    def _guarded(self, run: Callable[..., Any], *args: Any) -> Any:
        """``run(*args)`` as one pass over the data: refused where it cannot work, keeping work where
        it may, with the global random state put back afterwards, also on error."""
        self._check_callable_now()
        self._keeping = self._may_keep_work()
        try:
            # The dataloader, dropout and random layers or losses draw from the global generators.
            with preserved_global_rng():
                out = run(*args)
        except BaseException:
            self._keeper.kept.clear()  # a pass that failed half-way may have kept part of its work
            raise
        if self._keeping and not self._batches.positions_fixed:
            # The next pass may read other samples at the same positions (the batches did not stay
            # on the device), so work kept by position cannot be matched to them.
            self._keeper.kept.clear()
        return out

    def _product(self, mat: Tensor) -> Tensor:
        """The block product: the micro-batches' products combined as the criterion's reduction says."""
        tangents = Tangents(mat, self._params)
        return self._over_data(mat, lambda chunk: self._micro_batch_product(chunk, tangents), mat, checked=True)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss over the dataloader and its gradient, flat (n,), at the current parameters.

        The loss is the one whose curvature the operator is: the mean over every sample (or the
        sum, for a summing criterion), through the same data loop, device, micro-batching and
        model-state guarantees as the products (eval mode unless built with ``eval_mode=False``;
        the model's ``.grad`` is not touched). With ``full_dataset=False`` it is that of the next
        mini-batch. Under torch.distributed it is over every rank's shard, in one all-reduce, and
        an error on one rank is raised on every rank instead of leaving the others waiting.

        Returns:
            (loss as a float, gradient as an (n,) tensor in the operator's dtype and on its device).
        """
        like = torch.zeros(self.size + 1, dtype=torch.float64, device=self.device)
        result = self._guarded(self._over_loss, like, self._loss_and_gradient_of, None)
        return float(result[-1]), result[:-1].to(self.dtype)

    def losses_at(self, points: Tensor) -> Tensor:
        """The loss over the dataloader with the chosen parameters set to each column of ``points``.

        The loss is that of :meth:`loss_and_gradient` (the mean over every sample, or the sum for a
        summing criterion; same data loop, mode and guarantees), without gradients. The model is
        never written: each column enters the forward pass through ``torch.func.functional_call``;
        parameters that are not chosen, and the buffers, are the model's own. With
        ``eval_mode=False`` every column sees the same dropout masks.

        Args:
            points: (n, p) block in the operator's dtype and on its device; column j holds values
                of the chosen parameters, laid out like the operator's vectors.

        Returns:
            (p,) float64 tensor on the operator's device; NaN/Inf losses are returned, not raised.
        """
        self._check_input(points, ndim=2)
        like = torch.zeros(points.shape[1], dtype=torch.float64, device=self.device)
        if points.shape[1] == 0:
            return like
        return self._guarded(self._over_loss, like, lambda chunk: self._losses_of(chunk, points), points)

    def _over_loss(self, like: Tensor, per_micro_batch: Callable[[MicroBatch], tuple[Tensor, Tensor]],
                   vectors: Optional[Tensor]) -> Tensor:
        """:meth:`_over_data` for values of the criterion's own loss (losses, gradients), which are
        combined as the reduction says even where products are per-sample means (the Fisher)."""
        return self._over_data(like, per_micro_batch, vectors, per_sample_mean=False)

    def _losses_of(self, chunk: MicroBatch, points: Tensor) -> tuple[Tensor, Tensor]:
        """(loss at the first point, losses at every point as a float64 vector) of one micro-batch."""
        rewind = rng_rewinder(self.device)
        values = torch.empty(points.shape[1], dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for j in range(points.shape[1]):
                rewind()  # the same dropout masks (eval_mode=False) at every point
                parameters = dict(zip(self.param_names, unflatten(points[:, j], self._params)))
                outputs = self._forward(chunk.inputs, parameters)
                with autocast_context(self.precision, self.device):
                    loss = self.criterion(outputs, chunk.targets)
                if not isinstance(loss, Tensor) or loss.dim() != 0:
                    self._check_loss(loss, chunk.label)  # raises, saying what the criterion must return
                values[j] = loss
        return values[0], values

    def share_batches(self, other: "ModelOperator") -> None:
        """Read the data through ``other``'s batches from now on, so that the two operators read the
        dataloader once between them and share its copies on the compute device.

        Both must read the same dataloader object the same way (the full dataset, the same device,
        ``max_possible_gpu_samples``, ``batch_size_fn`` and cache settings): build this operator
        with ``other.dataloader``. ``clear_batch_cache()`` of either then clears the shared copies
        (and that operator's kept work: call it on both inside a ``frozen()`` block).
        """
        if not isinstance(other, ModelOperator):
            raise TypeError(f"share_batches needs another model operator, got {type(other).__name__}.")
        mine, theirs = self._batches, other._batches
        differs = ["dataloader"] if mine.dataloader is not theirs.dataloader else []
        differs += [name for name, a, b in (
            ("device", mine.device, theirs.device),
            ("full_dataset", mine.full_dataset, theirs.full_dataset),
            ("max_possible_gpu_samples", mine.max_possible_gpu_samples, theirs.max_possible_gpu_samples),
            ("batch_size_fn", mine.batch_size_fn, theirs.batch_size_fn),
            ("cache_batches", mine.cache_batches, theirs.cache_batches),
            ("cache_max_bytes", mine.cache_max_bytes, theirs.cache_max_bytes),
        ) if a != b]
        if differs or not mine.full_dataset:
            raise ValueError(
                f"share_batches: the two operators read their data differently ({', '.join(differs) or 'mini-batches'}"
                f"); both must read the full dataset of the same dataloader object with the same options. Build "
                f"this operator with dataloader=other.dataloader and the other's data options."
            )
        self._batches = theirs

    def _loss_and_gradient_of(self, chunk: MicroBatch) -> tuple[Tensor, Tensor]:
        """(loss, [gradient, loss] as one float64 vector) of one micro-batch."""
        loss = self._loss(chunk.inputs, chunk.targets, chunk.label)
        pieces = torch.autograd.grad(loss, self._params, allow_unused=True)
        row = torch.zeros(self.size + 1, dtype=torch.float64, device=self.device)
        offsets = self._offsets
        for i, piece in enumerate(pieces):
            if piece is not None:
                row[offsets[i] : offsets[i + 1]] = piece.reshape(-1)
        row[-1] = loss.detach()
        return loss, row

    def _over_data(
        self, like: Tensor, per_micro_batch: Callable[[MicroBatch], tuple[Tensor, Tensor]], vectors: Optional[Tensor],
        checked: bool = False, per_sample_mean: Optional[bool] = None,
    ) -> Tensor:
        """One pass over the data: ``per_micro_batch(chunk) -> (loss, value shaped like like)``
        combined over the micro-batches (and the ranks) as the reduction says.

        ``vectors`` (the block multiplied, or None) lets the ranks check they multiply the same;
        ``checked`` runs the NaN/Inf checks of products; ``per_sample_mean`` says whether the values
        are per-sample means whatever the reduction (default: :attr:`per_sample_mean_products`;
        False for values of the criterion's own loss, such as losses and gradients).
        """
        if per_sample_mean is None:
            per_sample_mean = self.per_sample_mean_products
        total = WeightedSum(like, self.reduction, per_sample_mean)
        probe = ReductionProbe(self.criterion, self.batch_size_fn) if self.reduction is None else None
        checks: list[Check] = []
        # Under a process group, an error on this rank is held until every rank has joined the
        # pass's all-reduce, then raised on all of them (single process: a no-op).
        guard = distributed.ProductGuard(self.process_group, self.reduce_across_ranks, (NonFiniteError,))
        with guard, self._product_context():
            for chunk in self._batches.micro_batches():
                self._probing, self._probed = (probe if total.reduction is None else None), False
                try:
                    loss, value = per_micro_batch(chunk)
                finally:
                    self._probing = None
                if total.reduction is None:
                    if not self._probed:  # its work was kept, or made inside torch.func transforms
                        self._observe_reduction(probe, chunk.inputs, chunk.targets)
                    if probe.found is not None:
                        total.decide(probe.found)
                        self.reduction = probe.found
                total.add(value, chunk.samples)
                if checked and self.check_finite:
                    checks.append((chunk.label, loss.detach(), torch.isfinite(value).all()))
            # Under a process group the checks stay immediate: every rank must raise alike.
            self._checks.submit(checks, may_defer=not distributed.is_distributed(self.process_group))
            if probe is not None:
                self._settle_reduction(probe, total)
        summed, seen, reduction = guard.reduce(total.total(), total.samples, vectors, total.reduction)
        if seen == 0:
            raise ValueError("Every batch of the dataloader was empty (0 samples); there is nothing to compute.")
        if reduction is not None:
            self.reduction = reduction
        if self.full_dataset:
            self.num_samples = seen
        return finish(summed, seen, reduction)

    def _micro_batch_product(self, chunk: MicroBatch, tangents: Tangents) -> tuple[Tensor, Tensor]:
        """(loss, (n, b) product) of one micro-batch, from its kept work or work built now."""
        rewind = rng_rewinder(self.device)
        work, kept = self._work_of(chunk, rewind)
        try:
            value = self.product(work, tangents, keep=kept)
            return work.loss, value  # read after the product, which may be what computes the loss
        except torch.cuda.OutOfMemoryError:
            if not len(self._keeper):
                raise  # nothing kept to free
            self._keeper.give_up_out_of_memory()
        # Outside the except block, so that the failed attempt's tensors are freed before the retry.
        del work
        rewind()  # the work is built again, drawing the same dropout masks
        work = self.build(chunk.inputs, chunk.targets, chunk.label)
        value = self.product(work, tangents, keep=False)
        return work.loss, value

    def _work_of(self, chunk: MicroBatch, rewind: Callable[[], None]) -> tuple[Any, bool]:
        """The micro-batch's work, kept from an earlier product or built now (and kept if this
        product keeps work and it fits); returns (work, whether it is kept)."""
        def build() -> Any:
            return self.build(chunk.inputs, chunk.targets, chunk.label)

        if not self._keeping:
            return build(), False
        held = list(self._params) + tensors_in((chunk.inputs, chunk.targets))
        work, kept = self._keeper.get_or_build(chunk.key, build, self.work_bytes, held, self.measures_saved_tensors,
                                               all_or_nothing=not self.eval_mode, rewind=rewind)
        if self._keeper.refused:
            self.cache_graphs = False
        return work, kept

    # -- work kept between products inside frozen() ----------------------------------------------
    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """A block in which the caller promises not to change the model (parameters, buffers, modes)
        nor its data, so that work shared by all products may be kept between them (see
        ``cache_graphs`` of :class:`HVPOperator`). Nested blocks are one block; what was kept is
        freed when the outermost block ends, also on error."""
        self._frozen_depth += 1
        try:
            yield
        finally:
            self._frozen_depth -= 1
            if self._frozen_depth == 0:
                self._keeper.release()

    def _may_keep_work(self) -> bool:
        """Whether this pass keeps/reuses per-micro-batch work (see ``cache_graphs``); drops work
        kept for another state of the model."""
        if not (self._frozen_depth > 0 and self.cache_graphs and not self._keeper.refused
                and self._batches.keys_reusable and self._keeps_work()):
            return False
        if not self.eval_mode and next(self._work_model.buffers(), None) is not None:
            # Restoring the buffers after each product writes into tensors the graphs saved.
            return False
        self._keeper.start((model_state_key(self.model), self.dropout_seed))
        return True

    def clear_batch_cache(self) -> None:
        """Forget the device copies of the batches; the next product reads the dataloader again.

        Call it after changing the data behind the dataloader (with ``cache_batches=True`` the
        batches are read once and reused by every later product).
        """
        self._batches.clear()
        self._keeper.kept.clear()  # built from the old data

    # -- NaN/Inf checks ------------------------------------------------------------------------
    def deferred_checks(self) -> contextlib.AbstractContextManager:
        """Postpone the NaN/Inf checks of the products in this block to :meth:`flush_checks` or the
        block's end, saving the host sync of every product. Under a process group the checks stay
        immediate (the product's all-reduce synchronises anyway, and every rank must raise alike)."""
        return self._checks.deferring()

    def flush_checks(self) -> None:
        """Run the checks postponed by :meth:`deferred_checks` now (one host sync for all of them)."""
        self._checks.flush()

    def _check_loss(self, loss: Any, label: str) -> None:
        if not isinstance(loss, Tensor):
            raise TypeError(
                f"criterion returned a {type(loss).__name__} for {label}; it must return the loss of the "
                f"batch as a scalar torch.Tensor (do not call .item())."
            )
        if loss.dim() != 0:
            raise ValueError(
                f"criterion returned a tensor of shape {tuple(loss.shape)} for {label}; it must return the "
                f"loss of the batch as a scalar. Use reduction='mean' (the default of torch losses) or 'sum'."
            )
        if not loss.requires_grad:
            raise ValueError(
                f"The loss of {label} does not depend on the chosen parameters (it has no grad_fn). Make "
                f"sure criterion computes it from the model outputs without .detach()/.item(), that it is "
                f"not called under torch.no_grad(), and that params selects parameters the loss uses."
            )

    # -- the criterion's reduction ---------------------------------------------------------------
    def _observe_reduction(self, probe: ReductionProbe, inputs: Any, targets: Any, outputs: Any = None) -> None:
        """Show one micro-batch to the check of whether the criterion averages or sums its samples.
        Forward passes it needs (all of them without ``outputs``) run without gradients, in eval
        mode (so that neither dropout nor batch statistics enter), with the random state put back."""
        with torch.no_grad(), preserved_global_rng(), \
                preserved_model_state(self._work_model, eval_mode=True, restore_buffers=False):
            probe.observe(inputs, targets, lambda batch: call_model(self._work_model, batch), outputs)

    def _settle_reduction(self, probe: ReductionProbe, total: WeightedSum) -> None:
        """At the end of a pass whose data never showed the reduction: take it as a mean (the
        documented convention) where a mean and a sum would differ, and say so. Not while a loss
        was NaN/Inf (the product's own check reports that); the next pass looks again."""
        if not total.ambiguous or probe.non_finite:
            return
        why = (f"the model or criterion fails on part of a batch ({probe.failure[:200]})" if probe.failure
               else "one sample in all, or losses that are all zero")
        warnings.warn(
            f"Cannot tell whether the criterion averages or sums over the samples of a batch: the batches "
            f"{type(self).__name__} read do not show it ({why}). It is taken as a mean (the Hessian of the mean "
            f"loss over the {total.samples} samples); pass reduction='sum' to the operator for the Hessian of the "
            f"summed loss, or reduction='mean' to silence this warning.",
            stacklevel=user_stacklevel(),
        )
        total.decide("mean")
        self.reduction = "mean"

    # -- the model -----------------------------------------------------------------------------
    def _check_callable_now(self) -> None:
        """Raise, before touching the model or the data, where no product can be computed now."""
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__} was called inside torch.inference_mode(): tensors made there can never "
                f"be differentiated, so no curvature product can be computed. Call it outside the "
                f"inference_mode() block (inside torch.no_grad() is fine: products turn gradients on themselves)."
            )
        self._compute.check_unchanged()

    def _product_context(self) -> contextlib.AbstractContextManager:
        """The model in the operator's mode (state restored afterwards), gradients on, kernels that
        can be differentiated twice, and the chosen float32 precision."""
        # Kept work is valid only for an unchanged model, so the device copy is then up to date;
        # syncing it would also write into tensors the kept graphs saved.
        return self._compute.running(self.eval_mode, self.dropout_seed, allow_tf32=self.precision == "tf32",
                                     sync=not (self._keeping and len(self._keeper)))


def rng_rewinder(device: torch.device) -> Callable[[], None]:
    """A function that puts the random state (CPU, and the device's if CUDA) back to what it is now."""
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, device)

    return rewind
