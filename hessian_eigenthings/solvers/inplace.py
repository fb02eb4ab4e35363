"""In-place products of a tall block with a small matrix, with a temporary of about one column.

A basis of m vectors of length n is the largest thing a solver holds; rotating it (``V <- V Y`` at a
thick restart, or to Ritz vectors) out of place would hold a second copy of the kept columns. Done a
slice of rows at a time, each slice is read before it is overwritten, so the result can go into
the block's own storage.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def right_multiply_(block: Tensor, matrix: Tensor) -> Tensor:
    """``block[:, :c] = block @ matrix`` in place, for ``block`` (n, m) and ``matrix`` (m, c), c <= m.

    ``block`` may be any strided view (e.g. the transpose of row-stored vectors). The rows are
    processed in slices of about n / c, so the temporary holds about n numbers. Returns
    ``block[:, :c]``.
    """
    n, m = block.shape
    c = matrix.shape[1]
    if matrix.shape[0] != m or c > m:
        raise ValueError(
            f"right_multiply_ needs a ({m}, c <= {m}) matrix for a ({n}, {m}) block, got {tuple(matrix.shape)}."
        )
    matrix = matrix.to(device=block.device, dtype=block.dtype)
    rows = max(1, math.ceil(n / max(c, 1)))
    for start in range(0, n, rows):
        part = block[start : start + rows]
        part[:, :c] = part @ matrix
    return block[:, :c]


def orthonormalize_rows_(rows: Tensor) -> Tensor:
    """Make the k rows of ``rows`` (k, n) orthonormal in place, spanning the same space.

    Two passes of Cholesky QR (the Gram matrix is k x k, and each pass is one in-place
    :func:`right_multiply_`); for rows far from independent it falls back on a QR factorisation
    (a copy). Returns ``rows``.
    """
    for _ in range(2):
        gram = rows @ rows.T
        chol, info = torch.linalg.cholesky_ex((gram + gram.T) / 2)
        if int(info) != 0:
            q, _ = torch.linalg.qr(rows.T)
            rows.copy_(q.T)
            return rows
        eye = torch.eye(chol.shape[0], dtype=chol.dtype, device=chol.device)
        inverse = torch.linalg.solve_triangular(chol, eye, upper=False)
        right_multiply_(rows.T, inverse.T)
    return rows
