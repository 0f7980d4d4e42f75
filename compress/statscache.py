"""On-disk cache of calibration statistics (one safetensors file per decoder layer), keyed by a
fingerprint of the model weights, the calibration token ids and the statistic kinds, so that sweeps
(and reruns) compute them once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .fsutil import atomic_write
from .pipeline.stats import LayerStats, LinearStats

CACHE_ENV = "COMPRESS_CACHE_DIR"


def default_cache_root() -> Path:
    root = os.environ.get(CACHE_ENV) or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "compress"
    return Path(root) / "stats"


def stats_key(model_fingerprint: str, input_ids: torch.Tensor, kinds: frozenset[str], adapter: str) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(model_fingerprint.encode())
    h.update(input_ids.to(torch.int64).contiguous().numpy().tobytes())
    h.update(json.dumps(sorted(kinds)).encode())
    h.update(adapter.encode())
    return h.hexdigest()


class StatsCache:
    """Per-layer statistics under ``root/key``; a layer file is written atomically."""

    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key
        self._loaded: tuple[int, LayerStats] | None = None
        self.loads = 0

    def _path(self, i: int) -> Path:
        return self.dir / f"layer_{i:04d}.safetensors"

    def complete(self, n_layers: int) -> bool:
        return all(self._path(i).is_file() for i in range(n_layers))

    def save_layer(self, i: int, stats: LayerStats) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, dict[str, str]] = {}
        stored: list[tuple[str, torch.Tensor]] = []
        for name, st in stats.linears.items():
            meta[name] = {}
            for k, t in st.tensors().items():
                alias = next((key for key, u in stored if u.shape == t.shape and torch.equal(u, t)), None)
                if alias is None:
                    alias = f"{name}/{k}"
                    tensors[alias] = t.contiguous()
                    stored.append((alias, t))
                meta[name][k] = alias
        metadata = {"kinds": json.dumps(sorted(stats.kinds)), "linears": json.dumps(meta)}
        atomic_write(self._path(i), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), unique=False)

    def load_layer(self, i: int) -> LayerStats:
        if self._loaded is not None and self._loaded[0] == i:
            return self._loaded[1]
        from safetensors import safe_open

        path = self._path(i)
        with safe_open(str(path), framework="pt") as f:
            md = f.metadata()
        tensors = load_file(str(path))
        kinds = frozenset(json.loads(md["kinds"]))
        stats = LayerStats(kinds)
        for name, keys in json.loads(md["linears"]).items():
            ref = tensors[keys["n_tokens"]]
            d_in = next(tensors[v].shape[-1] for k, v in keys.items() if k != "n_tokens")
            st = LinearStats(d_in, kinds)
            st.n_tokens = int(ref.item())
            for k, alias in keys.items():
                if k != "n_tokens":
                    setattr(st, k, tensors[alias].clone())
            stats.linears[name] = st
        self._loaded = (i, stats)
        self.loads += 1
        return stats

    def provider(self, i: int, names: list[str], kinds: frozenset[str]) -> LayerStats:
        """Statistics of ``names`` in layer ``i`` (for :func:`run_sequential`'s ``stats_provider``)."""
        full = self.load_layer(i)
        missing = set(kinds) - full.kinds
        if missing:
            raise KeyError(f"cached statistics lack {sorted(missing)}")
        out = LayerStats(kinds)
        for n in names:
            out.linears[n] = full.linears[n]
        return out
