"""Inference speed of a (compressed) causal LM: prefill and decode tokens per second.

Protocol (printed with every number): batch 1, a prompt of ``prompt_len`` random token ids (seeded),
then ``new_tokens`` greedy decode steps with the KV cache; one warm-up run, then the median of
``repeats`` runs. On CUDA every phase is synchronized. The same protocol on the dense model in the
same process gives the ratio that is comparable across machines.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from ..modules.base import hf_config


def protocol(prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    return {"batch": 1, "prompt_len": prompt_len, "new_tokens": new_tokens, "repeats": repeats, "statistic": "median",
            "decode": "greedy, KV cache", "threads": torch.get_num_threads()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generation_speed(model: nn.Module, *, prompt_len: int = 256, new_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """{"prefill_tokens_per_s", "decode_tokens_per_s", "protocol"} of ``model`` on its device."""
    device = next(model.parameters()).device
    vocab = int(hf_config(model).vocab_size)
    ids = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(seed)).to(device)
    prefill, decode = [], []
    with torch.inference_mode():
        for k in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            _sync(device)
            t1 = time.perf_counter()
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            t2 = time.perf_counter()
            if k:  # the first run warms up
                prefill.append(prompt_len / (t1 - t0))
                decode.append(new_tokens / (t2 - t1))
    return {"prefill_tokens_per_s": statistics.median(prefill), "decode_tokens_per_s": statistics.median(decode),
            "protocol": protocol(prompt_len, new_tokens, repeats)}


def speed_metrics(model: nn.Module, baseline: nn.Module | None = None, **kwargs: Any) -> list[dict[str, Any]]:
    """Metrics ``speed_prefill`` and ``speed_decode`` (tokens/s), each with the baseline's value
    and the ratio when a dense ``baseline`` is given (measured here, one after the other)."""
    ours = generation_speed(model, **kwargs)
    base = generation_speed(baseline, **kwargs) if baseline is not None else None
    out = []
    for key, name in (("prefill_tokens_per_s", "speed_prefill"), ("decode_tokens_per_s", "speed_decode")):
        m: dict[str, Any] = {"name": name, "value": ours[key], "unit": "tokens/s", "protocol": ours["protocol"]}
        if base is not None:
            m["baseline"] = base[key]
            m["ratio"] = ours[key] / base[key]
            m["change"] = m["ratio"] - 1
        out.append(m)
    return out
