"""Per-layer summaries: the top eigenvalue, trace and Frobenius norm of each diagonal block.

The block of a parameter group is the principal submatrix of the curvature (Hessian, GGN or
empirical Fisher) for that group's parameters: the curvature of the loss as a function of those
parameters alone, the others held fixed. It is computed with an operator restricted to the group
(``params=``), whose products differentiate only the group's parameters.

A small block is formed densely (one product per parameter) and its numbers are exact to
rounding; a large one gets a converged Lanczos eigenvalue and stochastic estimates of its trace
and squared Frobenius norm, with standard errors.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ..operators.model_operator import ModelOperator
from ..solvers.registry import get_solver
from ..spectrum.dense import dense_matrix
from ..spectrum.frobenius import FROBENIUS_METHODS, estimate_frobenius
from ..spectrum.trace import TRACE_METHODS, estimate_trace
from ..utils import check_positive_int, logger, progress

#: Blocks of at most this many parameters are formed densely (exact numbers) by default: that
#: costs one product per parameter, about what the three estimates of a larger block cost.
DEFAULT_EXACT_MAX_SIZE = 512


@dataclass
class LayerSummary:
    """The numbers of one diagonal block of a curvature matrix.

    Attributes:
        name: the group's label (a module name by default).
        curvature: "hessian", "ggn" or "fisher".
        params: the names of the group's parameters.
        size: the block is size x size (the group's number of parameters).
        top_eigenvalue: the largest (algebraic) eigenvalue of the block.
        trace: its trace (the sum of its eigenvalues).
        frobenius: its Frobenius norm ``sqrt(sum of squared eigenvalues)``.
        trace_std_error: standard error of ``trace`` (0 when exact).
        frobenius_std_error: standard error of ``frobenius`` (0 when exact; to first order).
        exact: the block was formed densely, so every number is exact to rounding.
        converged: the eigenvalue met its residual tolerance and the estimates their tolerances.
        num_products: products of the block operator spent on this row.
        info: extras: the eigenvalue's relative residual, the estimators used.
    """

    name: str
    curvature: str
    params: tuple
    size: int
    top_eigenvalue: float
    trace: float
    frobenius: float
    trace_std_error: float = 0.0
    frobenius_std_error: float = 0.0
    exact: bool = True
    converged: bool = True
    num_products: int = 0
    info: dict = field(default_factory=dict)

    @property
    def mean_eigenvalue(self) -> float:
        """``trace / size``, the average eigenvalue of the block."""
        return self.trace / self.size


class LayerTable(list):
    """A list of :class:`LayerSummary` records (one per group and curvature), printable and plottable.

    ``print(table)`` shows a plain-text table; :meth:`plot` draws bar charts; :meth:`to_dicts`
    gives plain dictionaries (e.g. for ``pandas.DataFrame(table.to_dicts())``).
    """

    def curvatures(self) -> list[str]:
        """The curvatures in the table, in order of first appearance."""
        return list(dict.fromkeys(row.curvature for row in self))

    def names(self) -> list[str]:
        """The group labels, in order of first appearance."""
        return list(dict.fromkeys(row.name for row in self))

    def get(self, name: str, curvature: Optional[str] = None) -> LayerSummary:
        """The record of group ``name`` for ``curvature`` (default: the table's first curvature, the
        analysed object's own; KeyError if there is no such record)."""
        if curvature is None:
            curvature = self[0].curvature if len(self) else "hessian"
        for row in self:
            if row.name == name and row.curvature == curvature:
                return row
        raise KeyError(f"no row for group {name!r} and curvature {curvature!r}; groups: {', '.join(self.names())}.")

    def to_dicts(self) -> list[dict]:
        """Every record as a plain dictionary."""
        return [asdict(row) for row in self]

    def format(self, digits: int = 4) -> str:
        """The table as text: one line per group and curvature; estimates as ``value +- standard error``."""
        headers = ["group", "params", "curvature", "top eigenvalue", "trace", "Frobenius norm", "how"]
        lines = []
        for row in self:
            how = "exact" if row.exact else ("estimated" if row.converged else "estimated, NOT converged")
            lines.append([
                row.name, str(row.size), row.curvature, _number(row.top_eigenvalue, digits),
                _with_error(row.trace, row.trace_std_error, row.exact, digits),
                _with_error(row.frobenius, row.frobenius_std_error, row.exact, digits), how,
            ])
        widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
        right = {1, 3, 4, 5}

        def render(cells: Sequence[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [render(headers), "  ".join("-" * w for w in widths)]
        out += [render(line) for line in lines]
        return "\n".join(line.rstrip() for line in out)

    def __str__(self) -> str:
        return self.format()

    def plot(self, path: Optional[Union[str, os.PathLike]] = None, **kwargs: Any) -> Any:
        """Bar charts of the table (needs matplotlib); see :func:`~hessian_eigenthings.analysis.plot_layers`."""
        from .plots import plot_layers

        return plot_layers(self, path, **kwargs)


def _number(value: float, digits: int) -> str:
    return f"{value:.{digits}g}"


def _with_error(value: float, error: float, exact: bool, digits: int) -> str:
    if exact:
        return _number(value, digits)
    return f"{_number(value, digits)} +- {error:.2g}"


@dataclass
class BlockSettings:
    """How :func:`summarize_block` computes the numbers of one block (see :meth:`Hessian.per_layer`)."""

    exact_max_size: int = DEFAULT_EXACT_MAX_SIZE
    mode: str = "auto"
    tol: float = 1e-5
    trace_method: str = "hutch++"
    frobenius_method: str = "hutch++"
    max_products: int = 102
    rtol: Optional[float] = None
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        size = self.exact_max_size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"exact_max_size must be an integer >= 0 (0: estimate every block), got {size!r}.")
        self.max_products = check_positive_int(self.max_products, "max_products")
        if self.max_products < 4:
            # every trace and Frobenius estimator needs two probes (or a sketch and a probe) for an error
            raise ValueError(f"max_products must be at least 4 (two probes with an error estimate), got "
                             f"{self.max_products}; the default is 102.")
        get_solver(self.mode)  # a ValueError naming the modes, before any block is computed
        for method, known, name in ((self.trace_method, TRACE_METHODS, "trace_method"),
                                    (self.frobenius_method, FROBENIUS_METHODS, "frobenius_method")):
            if method not in known:
                raise ValueError(f"{name}={method!r} is not known; choose one of {', '.join(map(repr, known))}.")


def summarize_block(op: ModelOperator, name: str, curvature: str, settings: BlockSettings) -> LayerSummary:
    """The :class:`LayerSummary` of the block operator ``op`` (restricted to one group's parameters).

    All its products run in one ``frozen()`` block, so that they share the block's kept graphs.
    """
    first = op.num_products
    params = tuple(op.param_names)
    with op.frozen():
        if op.size <= settings.exact_max_size or op.size < 3:
            matrix = dense_matrix(op, verbose=False).double()
            matrix = (matrix + matrix.T) / 2
            values = torch.linalg.eigvalsh(matrix)
            return LayerSummary(
                name, curvature, params, op.size, float(values[-1]), float(values.sum()),
                float(torch.linalg.matrix_norm(matrix)), num_products=op.num_products - first,
                info={"smallest_eigenvalue": float(values[0])},
            )
        eig = get_solver(settings.mode).run(op, 1, which="LA", tol=settings.tol, seed=settings.seed, verbose=False)
        estimator_options = dict(max_products=settings.max_products, rtol=settings.rtol, seed=settings.seed,
                                 verbose=False)
        trace = estimate_trace(op, settings.trace_method, **estimator_options)
        frob = estimate_frobenius(op, settings.frobenius_method, **estimator_options)
    converged = bool(np.all(eig.converged)) and trace.converged and frob.converged
    return LayerSummary(
        name, curvature, params, op.size, float(eig.eigenvalues[0]), trace.estimate, frob.norm,
        trace.std_error, frob.norm_std_error if math.isfinite(frob.norm_std_error) else math.inf, exact=False,
        converged=converged, num_products=op.num_products - first,
        info={"relative_residual": float(eig.relative_residuals[0]), "trace_method": trace.method,
              "frobenius_method": frob.method, "frobenius_squared": frob.estimate,
              "frobenius_squared_std_error": frob.std_error},
    )


def summarize_groups(
    groups: dict[str, list[str]],
    curvatures: Iterable[str],
    block_operator: Callable[[str, list[str]], ModelOperator],
    settings: BlockSettings,
    verbose: bool,
) -> LayerTable:
    """A :class:`LayerTable` with one row per group and curvature; ``block_operator(curvature,
    names)`` builds the operator restricted to a group. Each block operator is dropped after its
    row (its kept graphs, and a device copy of the model if it made one, go with it)."""
    curvatures = list(curvatures)
    table = LayerTable()
    with progress(total=len(groups) * len(curvatures), desc="per-layer blocks", verbose=verbose) as bar:
        for name, names in groups.items():
            for curvature in curvatures:
                op = block_operator(curvature, names)
                row = summarize_block(op, name, curvature, settings)
                logger.info("per_layer: %s (%s, %d parameters): top eigenvalue %.6g, trace %.6g, Frobenius %.6g "
                            "(%d products).", name, curvature, row.size, row.top_eigenvalue, row.trace,
                            row.frobenius, row.num_products)
                table.append(row)
                del op
                bar.update(1)
    return table
