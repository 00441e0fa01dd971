"""Retrieval evaluation: metrics, `evaluate` and its report."""

from qembed.eval.evaluate import MODEL_DEFAULT, QueryFormat, evaluate

__all__ = ["MODEL_DEFAULT", "QueryFormat", "evaluate"]
