"""Give a size, get a model: per-target choice among compression methods under one budget
(:func:`compress.search.select.search`), from a gradient-weighted loss estimate."""

from .candidates import Candidate, parse_search
from .select import Budget, SearchResult, search

__all__ = ["Budget", "Candidate", "SearchResult", "parse_search", "search"]
