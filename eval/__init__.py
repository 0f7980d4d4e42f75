"""Evaluation (installed as ``compress.eval``): perplexity natively; lm-eval tasks later, lazily."""

from .perplexity import PPL_DATASETS, perplexity

__all__ = ["PPL_DATASETS", "perplexity"]
