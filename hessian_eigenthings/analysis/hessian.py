"""One object for a whole analysis of a model's loss curvature: :class:`Hessian`.

It holds one model operator and hands it to the solvers and estimators of this package, so that
every call reads the data from the same device copies of the batches (the dataloader is read once
for the object and all its views and per-layer blocks), and, inside ``with Hessian(...) as h:``,
reuses each micro-batch's first-order graphs across calls (see :meth:`Operator.frozen`).
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..data import as_batches
from ..operators.algebra import deflate as projected_away
from ..operators.graph_cache import model_state_key
from ..operators.model_operator import ModelOperator
from ..operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, check_operator_options, operator_options
from ..solvers.registry import get_solver
from ..solvers.result import EigenResult
from ..spectrum.api import CURVATURES
from ..spectrum.dense import dense_matrix
from ..spectrum.density import SpectralDensity, spectral_density
from ..spectrum.diagonal import estimate_diagonal
from ..spectrum.estimates import DiagonalEstimate, FrobeniusEstimate, TraceEstimate
from ..spectrum.frobenius import estimate_frobenius
from ..spectrum.trace import estimate_trace
from ..utils import check_bool
from .groups import GroupSpec, parameter_groups
from .landscape import (
    Landscape1D,
    Landscape2D,
    check_directions,
    check_grid,
    filter_normalized_direction,
    landscape_1d,
    landscape_2d,
)
from .layers import DEFAULT_EXACT_MAX_SIZE, BlockSettings, LayerTable, summarize_groups

# A landscape direction: an eigenvector's index, "random" (filter-normalised), or a vector.
DirectionSpec = Union[int, str, Tensor, np.ndarray]


class _Family:
    """What a :class:`Hessian` shares with its views and per-layer blocks: how operators are built,
    the operator whose batches every other one reads, the views by curvature, and the ``frozen()``
    blocks that an open ``with`` block holds."""

    def __init__(self, model: nn.Module, dataloader: Any, loss: Callable, settings: dict, options: dict,
                 verbose: bool) -> None:
        self.model = model
        self.dataloader = dataloader
        self.loss = loss
        self.settings = settings  # use_gpu, fp16, max_possible_gpu_samples
        self.options = options  # the user's keyword options of the operator
        self.verbose = verbose
        self.root: Optional[ModelOperator] = None
        self.views: dict[tuple[str, str], "Hessian"] = {}  # by curvature and the view's own options
        self.stack: Optional[contextlib.ExitStack] = None
        self.depth = 0  # nesting of with blocks
        self._frozen: "weakref.WeakSet[ModelOperator]" = weakref.WeakSet()

    def build(self, curvature: str, extra: Mapping[str, Any], params: Any = None) -> ModelOperator:
        """A ``curvature`` operator over the family's data, reading the root operator's batches.

        Options of the family that ``curvature``'s class does not take (``backend`` for the GGN)
        are left out; ``extra`` are options for this one; ``params`` replaces the parameter choice.
        """
        cls = CURVATURES[curvature]
        accepted = operator_options(cls)
        check_operator_options(f"Hessian.{curvature}()", cls, extra)
        options = {name: value for name, value in self.options.items() if name in accepted}
        options.update(extra)
        if params is not None:
            options["params"] = params
        if self.root is not None and options.get("reduction") is None and self.root.reduction is not None:
            options["reduction"] = self.root.reduction  # found by the root's products: no need to look again
        dataloader = self.root.dataloader if self.root is not None else self.dataloader
        op = cls(self.model, dataloader, self.loss, full_dataset=True, **self.settings, **options)
        if self.root is None:
            self.root = op
        else:
            op.share_batches(self.root)
        return op

    def hold(self, op: ModelOperator) -> None:
        """Keep ``op``'s work between calls while a ``with`` block is open."""
        if self.stack is not None and op not in self._frozen:
            self.stack.enter_context(op.frozen())
            self._frozen.add(op)

    def enter(self, operators: Sequence[ModelOperator]) -> None:
        if self.depth == 0:
            self.stack = contextlib.ExitStack()
        self.depth += 1
        for op in operators:
            self.hold(op)

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0 and self.stack is not None:
            stack, self.stack = self.stack, None
            self._frozen = weakref.WeakSet()
            stack.close()


def _data_and_loss(dataloader: Any, loss: Any, data: Any) -> tuple[Any, Callable]:
    """(dataloader, loss) from the two ways of calling: ``(model, dataloader, loss)`` and PyHessian's
    ``(model, criterion, data=(inputs, targets))``."""
    if data is not None:
        if loss is None and callable(dataloader) and not isinstance(dataloader, (list, tuple)):
            dataloader, loss = None, dataloader  # Hessian(model, criterion, data=(x, y))
        if dataloader is not None:
            raise TypeError(
                "Hessian got both a dataloader and data=; pass one of them: data=(inputs, targets) for a single "
                "batch, or a dataloader of batches."
            )
        if not (isinstance(data, (tuple, list)) and len(data) == 2):
            raise TypeError(
                f"data must be one (inputs, targets) pair (a single batch), got {type(data).__name__}"
                f"{' of length ' + str(len(data)) if isinstance(data, (tuple, list)) else ''}; pass several batches "
                f"as the dataloader instead."
            )
        if isinstance(data, list) and all(isinstance(part, (tuple, list)) and len(part) == 2 for part in data):
            raise TypeError(
                "data=[(x1, y1), (x2, y2)] reads as a list of two batches, but data= takes one (inputs, targets) "
                "pair: pass the batches as the dataloader, Hessian(model, batches, loss), or one batch as a tuple, "
                "data=(inputs, targets)."
            )
        dataloader = [tuple(data)]
    if dataloader is None:
        raise TypeError("Hessian needs data: Hessian(model, dataloader, loss) or Hessian(model, loss, data=(x, y)).")
    if loss is None:
        raise TypeError("Hessian needs the loss: Hessian(model, dataloader, loss), loss(outputs, targets) -> scalar.")
    return as_batches(dataloader), loss


class Hessian:
    """A model's loss Hessian (or its Gauss-Newton matrix or empirical Fisher) over a dataset, as one
    object for a whole analysis: eigenvalues, trace, diagonal, density, dense matrix, per-layer
    blocks and loss landscapes.

    It holds one model operator (``.operator``; see :class:`HVPOperator` for its meaning and every
    option), and every method hands it to the package's solvers and estimators:

    * the batches are read from the dataloader once and kept on the compute device for every later
      call of this object, of its views (:meth:`ggn`, :meth:`fisher`) and of its per-layer blocks
      (``cache_batches=True``, the default; call :meth:`clear_batch_cache` after changing the data);
    * used as a context manager, ``with Hessian(...) as h:``, it keeps one ``frozen()`` block
      open on each of its operators, so the forward pass and first-order graphs of every
      micro-batch are built once and reused by all calls inside the block (outside it, each call
      builds them once for itself). Kept work is dropped and rebuilt when the model changes in
      place in a way its version counters show (an optimizer step, ``p.add_(...)``, a new
      parameter tensor, a train/eval switch); writes through ``.data`` and fused optimizer
      kernels bump no version and are NOT seen, so leave the block (or do not change the model in
      it) after such writes. The graphs take memory (``graph_cache_max_bytes`` bounds it); they are
      freed when the block ends.

    The model is never changed by any call (parameters, buffers, ``.grad``, ``requires_grad``,
    modes, global random state), also on error. A model on the CPU analysed on a GPU
    (``use_gpu=True``) is copied to it by every operator of the object: the object, each view, and
    each per-layer block while it is computed; move the model to the GPU first to avoid the copies.

    Args:
        model: the network.
        dataloader: iterable of ``(inputs, targets)`` batches, or one ``(inputs, targets)`` pair.
            Always the full dataset (every estimator here needs a fixed operator).
        loss: ``loss(outputs, targets)`` returning the batch's loss as a scalar (mean or sum over its
            samples).
        data: PyHessian's spelling for a single batch: ``Hessian(model, criterion, data=(inputs,
            targets))`` (the criterion may then come second, as in PyHessian).
        curvature: "hessian" (default), "ggn" (:class:`GGNOperator`), "fisher"
            (:class:`EmpiricalFisherOperator`) or "pch" (:class:`PCHOperator`).
        use_gpu, fp16, max_possible_gpu_samples: as for :class:`HVPOperator`.
        verbose: progress bars of every call (a call's own ``verbose=`` overrides it).
        **operator_options: any keyword option of the curvature's operator class (``params``,
            ``eval_mode``, ``reduction``, ``batch_size_fn``, ``precision``, ``cache_max_bytes``,
            ``graph_cache_max_bytes``, ``backend``, ...). Views use the ones their class takes.

    Attributes:
        operator: the model operator every call multiplies with.
        curvature: "hessian", "ggn" or "fisher".
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Any = None,
        loss: Optional[Callable[[Any, Any], Tensor]] = None,
        *,
        data: Any = None,
        curvature: str = "hessian",
        use_gpu: bool = True,
        fp16: bool = False,
        max_possible_gpu_samples: int = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
        verbose: bool = True,
        **operator_options: Any,
    ) -> None:
        if "full_dataset" in operator_options:
            raise TypeError(
                "Hessian always uses the whole dataset (its estimators need the same operator for every product), "
                "so it takes no full_dataset; for one mini-batch pass data=(inputs, targets)."
            )
        if "cuda" in operator_options:
            raise TypeError(
                "Hessian takes no cuda=; PyHessian's cuda=True/False is use_gpu=True/False here (the default "
                "use_gpu=True computes on the GPU when there is one)."
            )
        if "criterion" in operator_options:
            raise TypeError("Hessian takes the criterion as loss= (or positionally: Hessian(model, dataloader, loss) "
                            "or Hessian(model, loss, data=(inputs, targets))), not criterion=.")
        _check_curvature(curvature)
        check_operator_options("Hessian", CURVATURES[curvature], operator_options)
        check_bool(verbose, "verbose")
        dataloader, loss = _data_and_loss(dataloader, loss, data)
        settings = dict(use_gpu=use_gpu, fp16=fp16, max_possible_gpu_samples=max_possible_gpu_samples)
        family = _Family(model, dataloader, loss, settings, dict(operator_options), verbose)
        self._attach(family, curvature, {})

    def _attach(self, family: _Family, curvature: str, options: dict) -> None:
        self._family = family
        self.curvature = curvature
        self._options = dict(options)  # this view's own options, beyond the family's
        self.operator = family.build(curvature, options)
        self._eigen: Optional[tuple[EigenResult, tuple]] = None
        family.views[(curvature, _options_key(options))] = self
        family.hold(self.operator)

    # -- what it analyses ---------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The network (never changed by this object)."""
        return self._family.model

    @property
    def loss(self) -> Callable[[Any, Any], Tensor]:
        """The criterion ``loss(outputs, targets)``."""
        return self._family.loss

    @property
    def size(self) -> int:
        """n, the number of analysed parameters (the matrix is n x n)."""
        return self.operator.size

    @property
    def param_names(self) -> list[str]:
        """The analysed parameters, in the order of the flat vectors."""
        return list(self.operator.param_names)

    @property
    def verbose(self) -> bool:
        """The default of every call's ``verbose``."""
        return self._family.verbose

    def __repr__(self) -> str:
        return (f"Hessian(curvature={self.curvature!r}, n={self.size}, parameters={len(self.param_names)}, "
                f"device={self.operator.device}, dtype={self.operator.dtype})")

    # -- the context manager ------------------------------------------------------------------------
    def __enter__(self) -> "Hessian":
        views = list(self._family.views.values())
        self._family.enter([view.operator for view in views] + [self.operator])
        return self

    def __exit__(self, *exc: Any) -> None:
        self._family.exit()

    def clear_batch_cache(self) -> None:
        """Forget the device copies of the batches (shared by the views) and the kept work; the next
        call reads the dataloader again. Call it after changing the data behind the dataloader."""
        for view in self._family.views.values():
            view.operator.clear_batch_cache()

    # -- views ----------------------------------------------------------------------------------------
    def view(self, curvature: str, **options: Any) -> "Hessian":
        """The same analysis of another curvature ("hessian", "ggn", "fisher" or "pch"), sharing this object's
        data, batch cache and ``with`` block. ``options`` are keyword options of that curvature's
        operator class (e.g. ``per_sample="loop"`` for the Fisher) beyond the object's own. A view
        is made once for each curvature and options and then returned again: ``h.fisher()`` is
        always the view without options of its own."""
        _check_curvature(curvature)
        family = self._family
        key = (curvature, _options_key(options))
        if key in family.views:
            return family.views[key]
        other = object.__new__(Hessian)
        other._attach(family, curvature, options)
        return other

    def hessian(self, **options: Any) -> "Hessian":
        """The loss Hessian view (see :meth:`view`)."""
        return self.view("hessian", **options)

    def ggn(self, **options: Any) -> "Hessian":
        """The generalized Gauss-Newton view, ``J^T H_out J`` (see :meth:`view` and :class:`GGNOperator`)."""
        return self.view("ggn", **options)

    def fisher(self, **options: Any) -> "Hessian":
        """The empirical Fisher view (see :meth:`view` and :class:`EmpiricalFisherOperator`)."""
        return self.view("fisher", **options)

    def pch(self, **options: Any) -> "Hessian":
        """The positive-curvature Hessian view, block diagonal and positive semi-definite (see :meth:`view`
        and :class:`PCHOperator`; e.g. ``residual="clip"``, ``blocks="module"``)."""
        return self.view("pch", **options)

    # -- spectrum -----------------------------------------------------------------------------------
    def eigenvalues(self, k: int = 10, which: str = "LM", *, mode: str = "auto", **solver_options: Any) -> EigenResult:
        """The ``k`` extreme eigenpairs, converged to the solver's tolerance.

        Args:
            k: how many.
            which: "LM" (largest magnitude, default), "LA" (largest algebraic: the sharpest
                directions) or "SA" (smallest algebraic).
            mode: the solver, as in :func:`compute_hessian_eigenthings` ("auto": thick-restart Lanczos).
            **solver_options: ``tol``, ``max_steps``, ``seed``, ``verbose``, ``init_vecs``, ... (see
                the solver).

        Returns:
            An :class:`EigenResult` (unpacks as ``(eigenvalues (k,), eigenvectors (k, n))`` numpy
            arrays). The object keeps it: :meth:`trace` (``deflate=True``) and the landscapes use
            its eigenvectors while the model is unchanged.
        """
        solver_options.setdefault("verbose", self.verbose)
        result = get_solver(mode).run(self.operator, k, which=which, **solver_options)
        self._eigen = (result, model_state_key(self.model))
        return result

    @property
    def eigenpairs(self) -> Optional[EigenResult]:
        """The result of the last :meth:`eigenvalues` call if the model has not changed since (by its
        version counters), else None."""
        if self._eigen is None:
            return None
        result, key = self._eigen
        return result if key == model_state_key(self.model) else None

    def trace(self, method: str = "hutch++", *, deflate: bool = False, **options: Any) -> TraceEstimate:
        """The trace, with its standard error (:func:`hutchpp_trace`, :func:`hutchinson_trace` or
        :func:`xtrace` by ``method``).

        Args:
            method: "hutch++" (default), "hutchinson" or "xtrace".
            deflate: use the eigenpairs of the last :meth:`eigenvalues` call (every pair converged;
                the model unchanged since): the trace is their eigenvalues' sum, exact, plus the
                estimate of the trace of the rest ``P A P``, ``P = I - V V^T``, whose variance no
                longer holds the top eigenvalues. Same products, smaller error. ``tol`` and ``rtol``
                then apply to the estimate of the rest.
            **options: the estimator's (``max_products``, ``tol``, ``rtol``, ``seed``, ``verbose``, ...).
        """
        options.setdefault("verbose", self.verbose)
        if not check_bool(deflate, "deflate"):
            return estimate_trace(self.operator, method, **options)
        values, vectors = self._converged_pairs("trace(deflate=True)")
        rest = estimate_trace(projected_away(self.operator, vectors.T), method, **options)
        exact_part = float(np.sum(values))
        info = dict(rest.info, deflated=len(values), eigenvalue_part=exact_part, rest=rest.estimate)
        return TraceEstimate(exact_part + rest.estimate, rest.std_error, rest.num_products, rest.num_probes,
                             rest.method, rest.converged, rest.samples, info)

    def _converged_pairs(self, caller: str) -> tuple[np.ndarray, Tensor]:
        pairs = self.eigenpairs
        if pairs is None:
            raise ValueError(f"{caller} needs eigenpairs of the current model: call eigenvalues(k) first (again after "
                             f"changing the model).")
        if not bool(np.all(pairs.converged)):
            raise ValueError(f"{caller}: not every eigenpair of the last eigenvalues() call converged; solve again "
                             f"with a larger max_steps.")
        values = np.asarray(_numpy(pairs.eigenvalues), dtype=np.float64)
        vectors = torch.as_tensor(_numpy(pairs.eigenvectors)).to(self.operator.device, self.operator.dtype)
        return values, vectors

    def frobenius(self, method: str = "hutch++", **options: Any) -> FrobeniusEstimate:
        """The squared Frobenius norm ``||A||_F^2 = sum of squared eigenvalues`` (``.norm`` is ``||A||_F``),
        with its standard error; ``method`` "hutch++" (default), "hutchinson" or "xtrace"."""
        options.setdefault("verbose", self.verbose)
        return estimate_frobenius(self.operator, method, **options)

    def diagonal(self, method: str = "hutchinson", **options: Any) -> DiagonalEstimate:
        """The diagonal: "hutchinson" (default, with per-entry standard errors), "xdiag" or "exact" (n
        products); ``info["by_parameter"]`` holds it split by parameter."""
        options.setdefault("verbose", self.verbose)
        result = estimate_diagonal(self.operator, method, **options)
        result.info["by_parameter"] = self.operator.unflatten(result.diagonal)
        return result

    def density(self, num_probes: int = 10, num_steps: int = 80, **options: Any) -> SpectralDensity:
        """The spectral density by stochastic Lanczos quadrature (:func:`spectral_density`; options
        ``sigma``, ``grid``, ``seed``, ``verbose``, ...); ``.plot(path)`` draws it."""
        options.setdefault("verbose", self.verbose)
        return spectral_density(self.operator, num_probes, num_steps, **options)

    def dense(self, **options: Any) -> Tensor:
        """The matrix itself, (n, n), from n products (small models or ``params=`` blocks; options as
        for :func:`dense_matrix`, e.g. ``max_memory_bytes``)."""
        options.setdefault("verbose", self.verbose)
        return dense_matrix(self.operator, **options)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """The loss over the dataset and its gradient (n,) at the current parameters."""
        return self.operator.loss_and_gradient()

    # -- per-layer blocks ---------------------------------------------------------------------------
    def per_layer(
        self,
        groups: Union[None, Sequence[GroupSpec], Mapping[str, GroupSpec]] = None,
        *,
        depth: Optional[int] = None,
        curvatures: Optional[Sequence[str]] = None,
        exact_max_size: int = DEFAULT_EXACT_MAX_SIZE,
        mode: str = "auto",
        tol: float = 1e-5,
        trace_method: str = "hutch++",
        frobenius_method: str = "hutch++",
        max_products: int = 102,
        rtol: Optional[float] = None,
        seed: Optional[int] = 0,
        verbose: Optional[bool] = None,
    ) -> LayerTable:
        """Top eigenvalue, trace and Frobenius norm of the diagonal block of each parameter group.

        The block of a group is the principal submatrix of the curvature for its parameters,
        computed with an operator restricted to them (``params=``: its products differentiate only
        the group's parameters), which reads this object's cached batches. A block of at most
        ``exact_max_size`` parameters is formed densely (that many products) and its numbers are
        exact; a larger one gets a converged Lanczos eigenvalue (``mode``, ``tol``) and stochastic
        estimates of trace and squared Frobenius norm (``trace_method``, ``frobenius_method``,
        ``max_products`` each, ``rtol``), with standard errors.

        Args:
            groups: None (default: one group per module that owns parameters directly), or a list of
                parameter names / module prefixes / tensors (or lists of them, one group each), or
                ``{label: names}`` (see :func:`~hessian_eigenthings.analysis.parameter_groups`).
            depth: instead of ``groups``, one group per module at this depth (1: top-level children).
            curvatures: which matrices, e.g. ``("hessian", "ggn")``; default this object's own (with this
                view's options; the others without options of their own).
            exact_max_size: largest block formed densely (0: estimate every block of 3+ parameters).
            mode, tol: the eigensolver and its relative residual tolerance.
            trace_method, frobenius_method, max_products, rtol: the estimators and their budget
                and relative tolerance (None: the whole budget).
            seed: seed of start vectors and probes.
            verbose: a progress bar over the blocks (default: the object's).

        Returns:
            A :class:`LayerTable`: a list of :class:`LayerSummary` records, one per group and
            curvature; ``print(table)`` shows it, ``table.plot(path)`` draws it.
        """
        if isinstance(curvatures, str) or (curvatures is not None and not len(curvatures)):
            raise TypeError(f"curvatures must be a non-empty list such as ('hessian', 'ggn'), got {curvatures!r}.")
        curvatures = [self.curvature] if curvatures is None else list(curvatures)
        for curvature in curvatures:
            _check_curvature(curvature)
        found = parameter_groups(self.model, self.param_names, groups, depth)
        if not found:
            raise ValueError("per_layer: no group holds any of the analysed parameters.")
        settings = BlockSettings(exact_max_size, mode, tol, trace_method, frobenius_method, max_products, rtol, seed)
        family = self._family

        def block(curvature: str, names: list[str]) -> ModelOperator:
            extra = self._options if curvature == self.curvature else {}
            return family.build(curvature, extra, params=names)

        return summarize_groups(found, curvatures, block, settings, self.verbose if verbose is None else verbose)

    # -- loss landscapes ----------------------------------------------------------------------------
    def landscape_1d(
        self,
        direction: DirectionSpec = 0,
        *,
        alphas: Any = None,
        radius: Optional[float] = None,
        steps: int = 21,
        seed: Optional[int] = 0,
        biases: str = "zero",
        verbose: Optional[bool] = None,
    ) -> Landscape1D:
        """The exact loss along one direction, ``alpha -> L(theta + alpha d)``, with its quadratic model
        ``L0 + alpha g.d + alpha^2 / 2 d^T A d`` (``A``: this object's curvature).

        Costs one gradient, one product and one forward pass over the data per step.

        Args:
            direction: an int i: the i-th eigenvector of :attr:`eigenpairs` (if none is held for the
                current model, the top ``which="LA"`` ones are computed now); "random": a
                filter-normalised random direction (:func:`filter_normalized_direction` with
                ``seed`` and ``biases``); or a vector (n,) of your own, used as it is.
            alphas: the steps; default ``steps`` points evenly in ``[-radius, radius]``.
            radius: default 1 for a random direction (the scale of the parameters' own filters) and,
                for an eigenvector or your vector, where the quadratic model's curvature term
                ``alpha^2 / 2 |d^T A d|`` reaches four times the loss.
            steps: points of the default grid.
            seed, biases: of a random direction.
            verbose: progress bars (default: the object's).

        Returns:
            A :class:`Landscape1D`; ``.plot(path)`` draws it.
        """
        verbose = self.verbose if verbose is None else verbose
        if alphas is None:
            check_grid(radius, steps)  # before any eigenvector is computed
        rows, labels, eigenvalues = self._directions([direction], seed, biases)
        return landscape_1d(self.operator, rows[0], alphas, radius=radius, steps=steps,
                            random=isinstance(direction, str), label=labels[0], curvature_kind=self.curvature,
                            eigenvalue=None if eigenvalues is None else eigenvalues[0], verbose=verbose)

    def landscape_2d(
        self,
        directions: Sequence[DirectionSpec] = (0, 1),
        *,
        alphas: Any = None,
        betas: Any = None,
        radius: Optional[float] = None,
        steps: int = 21,
        seed: Optional[int] = 0,
        biases: str = "zero",
        verbose: Optional[bool] = None,
    ) -> Landscape2D:
        """The exact loss on the plane of two directions, ``L(theta + alpha d1 + beta d2)`` on a grid,
        with its quadratic model (cross term ``d1^T A d2`` included).

        ``directions`` are two of what :meth:`landscape_1d` takes, or one (2, n) array with two
        vectors as rows (default: the top two eigenvectors; ``("random", "random")`` for the plot of
        Li et al., with seeds ``seed`` and ``seed + 1``). Each axis gets its own default steps (``steps`` points, ``radius`` as in
        :meth:`landscape_1d`). Costs one gradient, two products and ``steps**2`` forward passes.

        Returns:
            A :class:`Landscape2D`; ``.plot(path)`` draws it.
        """
        if isinstance(directions, (Tensor, np.ndarray)) and directions.ndim == 2 and directions.shape[0] == 2:
            directions = list(directions)  # the two directions as the rows of one array
        if isinstance(directions, (str, Tensor, np.ndarray)) or len(directions) != 2:
            raise TypeError("directions must be a pair, e.g. (0, 1) for the top two eigenvectors, "
                            "('random', 'random'), two vectors (n,), or one (2, n) array of them as rows.")
        verbose = self.verbose if verbose is None else verbose
        if alphas is None or betas is None:
            check_grid(radius, steps)  # before any eigenvector is computed
        rows, labels, eigenvalues = self._directions(list(directions), seed, biases)
        return landscape_2d(self.operator, torch.stack(rows), alphas, betas, radius=radius, steps=steps,
                            random=[isinstance(d, str) for d in directions], labels=labels,
                            curvature_kind=self.curvature, eigenvalues=eigenvalues, verbose=verbose)

    def _directions(self, specs: list, seed: Optional[int], biases: str) -> tuple[list[Tensor], list[str], Any]:
        """The direction vectors, their labels and (where all are eigenvectors) their eigenvalues."""
        indices = [s for s in specs if _is_index(s)]
        if any(i < 0 for i in indices):
            raise ValueError(f"an eigenvector index must be >= 0, got {min(indices)}.")
        if indices and max(indices) >= self.size - 1:
            # index i needs the top i + 1 eigenpairs, and the iterative solvers find fewer than n
            raise ValueError(
                f"eigenvector index {max(indices)} is out of reach: the landscapes compute the top (index + 1) "
                f"eigenpairs iteratively, which needs index + 1 < n={self.size}. Pass the eigenvector itself as "
                f"the direction (e.g. from torch.linalg.eigh(h.dense())), or a smaller index."
            )
        pairs = None
        if indices:
            pairs = self.eigenpairs
            if pairs is None or len(_numpy(pairs.eigenvalues)) <= max(indices):
                pairs = self.eigenvalues(max(indices) + 1, which="LA")
        rows, labels, values = [], [], []
        for position, spec in enumerate(specs):
            if _is_index(spec):
                vector = torch.as_tensor(_numpy(pairs.eigenvectors)[spec])
                value = float(_numpy(pairs.eigenvalues)[spec])
                rows.append(check_directions(vector, self.operator, 1)[0])
                labels.append(f"eigenvector {spec} (lambda={value:.4g})")
                values.append(value)
            elif isinstance(spec, str):
                if spec != "random":
                    raise ValueError(f"direction {spec!r} is not known: use an eigenvector index, 'random' or a "
                                     f"vector.")
                offset = None if seed is None else seed + position
                rows.append(filter_normalized_direction(self.operator, seed=offset, biases=biases))
                labels.append("random direction (filter-normalised)")
            else:
                rows.append(check_directions(spec, self.operator, 1)[0])
                labels.append("your direction")
        return rows, labels, (values if len(values) == len(specs) else None)


def _options_key(options: Mapping[str, Any]) -> str:
    return repr(sorted(options.items()))


def _check_curvature(curvature: Any) -> None:
    if curvature not in CURVATURES:
        raise ValueError(f"curvature={curvature!r} is not known; choose one of {', '.join(map(repr, CURVATURES))}.")


def _is_index(spec: Any) -> bool:
    return isinstance(spec, (int, np.integer)) and not isinstance(spec, bool)


def _numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
