"""``--budget``: the recipe is the search's choice (:mod:`compress.search`), made before planning it.

The budget and the candidates are parsed and checked first (a candidate that does not compose, a
budget below the cheapest plan or at or above dense: one line each, before any statistics); then the
dense model is loaded, its statistics gathered on the calibration set, and the knapsack picks one
candidate per target. The plan is then made on that recipe like on any other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import get_adapter
from ..calib.data import CalibConfig, calibration_ids
from ..errors import ConfigError
from ..models import load_model
from ..pipeline.gradients import SEARCH_SAMPLES
from ..recipe import Recipe
from ..search import Budget, SearchResult, parse_search, search
from ..search.select import cost_tables


def searched_recipe(model: str | Path | nn.Module, budget: str | Budget, candidates: str | None, cfg: CalibConfig, calib: Any, *,
                    tokenizer: Any, data_dir: Any, device: torch.device, dtype: str | None, gguf_file: str | None,
                    trust_remote_code: bool, calibration: dict[str, Any]) -> tuple[Recipe, SearchResult]:
    """The recipe ``--budget`` chooses, and the search's account of it."""
    b = budget if isinstance(budget, Budget) else Budget.parse(budget)
    cands = parse_search(candidates, b.structured)
    if isinstance(model, nn.Module):
        m, tok = model, tokenizer
    else:
        m, tok, _ = load_model(str(model), dtype=dtype, device="cpu", gguf_file=gguf_file, trust_remote_code=trust_remote_code)
    adapter = get_adapter(m)
    cost_tables(m, adapter, b, cands)  # the budget against dense and the cheapest plan, before any statistics
    if isinstance(calib, torch.Tensor):
        ids = calib
    else:
        if tok is None:
            raise ConfigError("--budget needs calibration text and the model has no tokenizer; give token ids as calib")
        ids = calibration_ids(tok, cfg, data_dir)
    result = search(m, adapter, ids[:SEARCH_SAMPLES], b, cands, device=device, batch_size=cfg.batch_size)
    rec = Recipe(result.recipe.passes, dict(calibration))
    result.recipe = rec
    return rec, result
