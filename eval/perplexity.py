"""Token-level perplexity with the protocol the papers use (GPTQ / SparseGPT / SVD-LLM):
the split's rows joined with "\\n\\n" (PTB: sentences joined with spaces), tokenized once, cut into
non-overlapping windows of ``seqlen`` tokens (the tail shorter than a window is dropped), and
perplexity = exp(Σ NLL / number of predicted tokens) over the windows, each window predicting its
tokens 2..seqlen from the preceding ones within the window.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..calib.data import join_documents, load_documents
from ..errors import CompressError

#: dataset name → (source, split)
PPL_DATASETS = {"wikitext2": ("wikitext2", "test"), "c4": ("c4", "validation"), "ptb": ("ptb", "test")}


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def check_ppl(dataset: str, seqlen: int, max_windows: int | None, config: Any = None) -> None:
    """Refuse evaluation options that cannot run on a model with this ``config`` (one line each)."""
    if dataset not in PPL_DATASETS:
        raise CompressError(f"unknown perplexity dataset '{dataset}'; use one of {', '.join(PPL_DATASETS)} with --ppl")
    if seqlen < 2:
        raise CompressError(f"--ppl-seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise CompressError(f"--max-windows must be positive, got {max_windows}")
    max_pos = getattr(config, "max_position_embeddings", None)
    if max_pos is not None and seqlen > max_pos:
        raise CompressError(f"--ppl-seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}; pass --ppl-seqlen {max_pos}")


def check_ppl_data(dataset: str, data_dir: str | Path | None = None) -> None:
    """The evaluation text can be read (local file present, or the hub reachable)."""
    source, split = PPL_DATASETS[dataset]
    load_documents(source, split, data_dir)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    tokenizer: Any,
    dataset: str = "wikitext2",
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    split: str | None = None,
    data_dir: str | Path | None = None,
    on_window: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Perplexity of ``model`` on ``dataset``; returns {"value", "protocol"}."""
    check_ppl(dataset, seqlen, max_windows, getattr(model, "config", None))
    source, default_split = PPL_DATASETS[dataset]
    split = split or default_split
    text = join_documents(source, load_documents(source, split, data_dir))
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n_windows = ids.numel() // seqlen
    if n_windows == 0:
        raise CompressError(f"{dataset} {split} has {ids.numel()} tokens, fewer than one window of {seqlen}")
    total_windows = n_windows
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    nll = 0.0
    t0 = time.perf_counter()
    try:
        for w in range(n_windows):
            window = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0).to(device)
            logits = model(input_ids=window, use_cache=False).logits  # (1, seqlen, vocab)
            nll += float(
                F.cross_entropy(logits[0, :-1].float(), window[0, 1:], reduction="sum").double()
            )
            if on_window is not None:
                on_window(w, n_windows)
    finally:
        model.train(was_training)
    n_tokens = n_windows * (seqlen - 1)
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    return {
        "value": math.exp(nll / n_tokens),
        "protocol": {
            "metric": "perplexity",
            "level": "token",
            "dataset": dataset,
            "split": split,
            "join": "' '" if source == "ptb" else "'\\n\\n'",
            "seqlen": seqlen,
            "windows": n_windows,
            "windows_available": total_windows,
            "predicted_tokens": n_tokens,
            "dtype": dtype,
            "device": str(device),
        },
        "seconds": time.perf_counter() - t0,
    }
