"""Operators: symmetric linear maps given by their products ``v -> A v``."""

from .base import LambdaOperator, MatrixOperator, Operator, as_operator
from .hvp import HVPOperator
from .model_operator import ModelOperator, NonFiniteError

__all__ = ["Operator", "LambdaOperator", "MatrixOperator", "as_operator", "HVPOperator", "ModelOperator", "NonFiniteError"]

# operators built from operators: linear combinations and shifts, deflation, principal submatrices
from .algebra import LinearCombination, ProjectedOperator, SubmatrixOperator, deflate, submatrix  # noqa: E402

__all__ += ["LinearCombination", "ProjectedOperator", "SubmatrixOperator", "deflate", "submatrix"]

# the positive-curvature Hessian (block diagonal, positive semi-definite)
from .pch import PCHOperator  # noqa: E402

__all__ += ["PCHOperator"]
