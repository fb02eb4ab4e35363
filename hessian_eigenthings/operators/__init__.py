"""Operators: symmetric linear maps given by their products ``v -> A v``."""

from .base import LambdaOperator, MatrixOperator, Operator, as_operator
from .hvp import HVPOperator
from .model_operator import ModelOperator, NonFiniteError

__all__ = ["Operator", "LambdaOperator", "MatrixOperator", "as_operator", "HVPOperator", "ModelOperator", "NonFiniteError"]
