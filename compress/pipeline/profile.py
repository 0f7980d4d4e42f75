"""Statistics of every layer before a layer loop: for passes that choose globally (their profile),
and for sweeps, which profile the dense model once and reuse the statistics at every grid point."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..passes.base import Pass
from .capture import Batch, capture_layer0_inputs, run_layer
from .context import calibration_forward_context
from .distributed import Dist, reduce_stats
from .gradients import SEARCH_SAMPLES, sensitivity_statistics
from .loop import layer_loop
from .state import Engine
from .stats import SENSITIVITY, LayerStats


def run_profiles(model: nn.Module, adapter: ModelAdapter, passes: list[Pass[Any]], input_ids: torch.Tensor | None, engine: Engine) -> None:
    """Hand every layer's statistics to the passes that asked for a profile (one forward per layer,
    or the sweep's precomputed statistics)."""
    if not passes:
        return
    kinds = frozenset().union(*(p.caps.profile for p in passes))
    layers = adapter.layers(model)
    sensitivity = _sensitivity(model, adapter, input_ids, engine) if SENSITIVITY in kinds else None
    kinds = kinds - {SENSITIVITY}

    def on_layer(i: int, stats: LayerStats) -> None:
        if sensitivity is not None:
            prefix = f"{adapter.layers_path}.{i}."
            stats.sensitivity = {n[len(prefix):]: st for n, st in sensitivity.targets.items() if n.startswith(prefix)}
        for p in passes:
            p.profile_layer(i, layers[i], stats)

    if engine.stats_provider is not None:
        for i, layer in enumerate(layers):
            on_layer(i, engine.stats_provider(i, [n for g in adapter.groups(layer) for n in g], kinds))
    else:
        if input_ids is None:
            raise ValueError(f"{passes[0].name} profiles the model's statistics but no calibration data was given")
        profile_statistics(model, adapter, input_ids, kinds, device=engine.device, batch_size=engine.batch_size,
                           on_layer=on_layer, dist=engine.dist)
    for p in passes:
        p.profile_done()


def _sensitivity(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor | None, engine: Engine) -> Any:
    """The loss-gradient statistics of every target (:mod:`compress.pipeline.gradients`), for passes
    whose global choice weighs each target by how much the loss depends on it."""
    if input_ids is None:
        raise ValueError("a global allocation weighs targets by the loss gradient, which needs calibration token ids")
    if engine.dist is not None:
        raise ValueError("a global allocation weighed by the loss gradient runs in one process; run it without torchrun")
    return sensitivity_statistics(model, adapter, input_ids[:SEARCH_SAMPLES], device=engine.device, batch_size=engine.batch_size)


def profile_statistics(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    kinds: frozenset[str],
    *,
    device: torch.device,
    batch_size: int,
    on_layer: Callable[[int, LayerStats], None],
    dist: Dist | None = None,
) -> None:
    """Statistics of every linear of the (unchanged) model in one forward per layer: the profile a
    sweep reuses across its grid. ``on_layer(index, stats)`` receives each layer's statistics (summed
    over the processes of ``dist``)."""
    with calibration_forward_context(model):
        inputs_by: dict[str | None, list[Batch]] = {None: capture_layer0_inputs(model, adapter, input_ids, batch_size, device)}

        def body(i: int, layer: nn.Module) -> dict[str | None, list[torch.Tensor]]:
            names = [n for g in adapter.groups(layer) for n in g]
            stats = LayerStats(kinds)
            handles = [
                layer.get_submodule(n).register_forward_pre_hook(lambda _m, a, n=n: stats.observe(n, a[0].detach()))
                for n in names
            ]
            outs = []
            try:
                for b in inputs_by[None]:
                    stats.reset_sharing()
                    outs.append(run_layer(layer, b, device).detach().to("cpu"))
            finally:
                for h in handles:
                    h.remove()
            stats.reset_sharing()
            on_layer(i, reduce_stats(stats, dist) if dist is not None else stats)
            return {None: outs}

        layer_loop(adapter, model, inputs_by, device, body)
