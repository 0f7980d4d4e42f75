"""Memory before anything is loaded: whether a model loaded whole fits, and the estimated peak of a
streamed run (printed before it starts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..calib.data import CalibConfig
from ..dtypes import parse_dtype
from ..errors import CompressError


def available_memory() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def whole_model_bytes(model_source: str | Path, dtype: str | torch.dtype | None) -> int | None:
    """Bytes a model loaded whole takes, from its local weight files and the compute dtype (None: unknown)."""
    from ..sources import SafetensorsSource, weight_files

    path = Path(str(model_source)).expanduser()
    files = weight_files(path) if path.is_dir() else []
    if not files:
        return None
    dt = parse_dtype(dtype)
    need = sum(f.stat().st_size for f in files if f.suffix == ".bin")
    st = [f for f in files if f.suffix == ".safetensors"]
    if st:
        src = SafetensorsSource(st)
        for n in src.names():
            t = torch.empty(0, dtype=src.dtype(n))
            size = dt.itemsize if isinstance(dt, torch.dtype) and t.is_floating_point() else t.element_size()
            need += size * int(torch.Size(src.shape(n)).numel())
    return need


def check_fits(model_source: str | Path, dtype: str | torch.dtype | None, why: str) -> None:
    """Refuse, before loading, a model loaded whole that cannot fit in the memory available now."""
    need, avail = whole_model_bytes(model_source, dtype), available_memory()
    if need is None or avail is None or need <= avail:
        return
    if why.startswith("--baseline"):
        raise CompressError(
            f"--baseline evaluates the dense model loaded whole, which needs about {need / 1024**3:.1f} GiB of the "
            f"{avail / 1024**3:.1f} GiB available; drop --baseline and evaluate the source model on a larger machine"
        )
    fix = "drop --no-stream (every pass of this recipe works layer by layer)" if why.startswith("--no-stream") else (
        "use a machine with more memory" if why.startswith("the checkpoint") else
        "use a machine with more memory, or a recipe whose passes work layer by layer (then the model is streamed)")
    raise CompressError(
        f"the whole model must be loaded ({why}), but its weights need about {need / 1024**3:.1f} GiB and "
        f"{avail / 1024**3:.1f} GiB of memory are available; {fix}"
    )


def streamed_estimate(sm: Any, adapter: ModelAdapter, model: nn.Module, cfg: CalibConfig, needs_calibration: bool,
                      dtype: torch.dtype, offload_dir: Path | None) -> str:
    """One line: the calibration activations' size and the estimated peak memory of a streamed run."""
    from ..pipeline.capture import linear_shape

    n_layers = len(adapter.layers(model))
    esize = torch.empty((), dtype=dtype).element_size()
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    acts = cfg.samples * cfg.seqlen * hidden * esize if needs_calibration else 0
    layer_bytes = max(sm.bytes_of(f"{adapter.layers_path}.{i}.") for i in range(n_layers))
    outside = sm.bytes_outside()
    stats = 0
    if needs_calibration:  # the largest sub-group's float64 Gram matrices (one per linear)
        layer = adapter.layers(model)[0]
        stats = max(sum(linear_shape(layer.get_submodule(n))[1] ** 2 * 8 for n in g) for g in adapter.groups(layer))
    peak = outside + 2 * layer_bytes + (0 if offload_dir else 2 * acts) + stats
    where = f"memory-mapped in {offload_dir}" if offload_dir else "in memory"
    return (f"streaming {n_layers} layers of {layer_bytes / 1024**3:.2f} GiB; calibration activations {acts / 1024**3:.2f} GiB {where}; "
            f"estimated peak memory {peak / 1024**3:.1f} GiB")
