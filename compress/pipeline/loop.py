"""The layer loop itself: onload a decoder layer, run the work of one layer on it, propagate the
calibration inputs through it, offload; and how a recipe's passes are split into loops."""

from __future__ import annotations

import gc
import logging
import time
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..errors import ConfigError
from ..passes.base import ModelPass, Pass
from .capture import Batch, module_device, run_layer, with_hidden
from .context import cleanup_memory
from .state import OnLayer

if TYPE_CHECKING:
    from ..stream import LayerStream

logger = logging.getLogger(__name__)

#: body(index, layer) of one layer's work; returns the layer's outputs for the sources whose outputs
#: it already knows (the loop re-runs the layer for the others)
LayerBody = Callable[[int, nn.Module], "dict[str | None, list[torch.Tensor]] | None"]


def layer_loop(
    adapter: ModelAdapter, model: nn.Module, inputs_by: dict[str | None, list[Batch]], device: torch.device, body: LayerBody,
    on_layer: OnLayer | None = None, stream: "LayerStream | None" = None,
) -> list[float]:
    """For each decoder layer: onload, ``body``, propagate the calibration inputs, offload. With a
    ``stream``, layers before ``stream.start`` are done already (a resumed run), each layer is read
    from the checkpoint first and written and dropped afterwards (see :mod:`compress.stream`)."""
    layers = adapter.layers(model)
    seconds: list[float] = []
    # the objects alive now (the model, its modules) outlive the loop: keep the per-layer garbage
    # collection from walking them every layer (0.2 s a layer on a small model)
    gc.freeze()
    try:
        for i, layer in enumerate(layers):
            if stream is not None and i < stream.start:
                continue
            t0 = time.perf_counter()
            _one_layer(i, layer, len(layers), inputs_by, device, body, stream)
            seconds.append(time.perf_counter() - t0)
            logger.debug("layer %d/%d done in %.1f s", i + 1, len(layers), seconds[-1])
            if on_layer is not None:
                on_layer(i, len(layers), seconds[-1])
    finally:
        gc.unfreeze()
    return seconds


def _one_layer(
    i: int, layer: nn.Module, n_layers: int, inputs_by: dict[str | None, list[Batch]], device: torch.device, body: LayerBody,
    stream: "LayerStream | None",
) -> None:
    if stream is not None:
        stream.load(i, layer)
    home = module_device(layer)
    layer.to(device)
    outs = body(i, layer)
    if i + 1 < n_layers:
        for src, inputs in inputs_by.items():
            known = outs.get(src) if outs is not None else None
            hs = known if known is not None else [run_layer(layer, b, device).detach().to("cpu") for b in inputs]
            inputs_by[src] = [with_hidden(b, h) for b, h in zip(inputs, hs)]
    layer.to(home)
    if stream is not None:
        inputs_by.update(stream.done(i, n_layers, layer, dict(inputs_by)))
    cleanup_memory()


def starts_loop(p: Pass[Any]) -> bool:
    """Whether ``p`` after other passes starts a layer loop of its own: it reads every layer's weights
    or statistics first (a global allocation), or it changes the embeddings and the calibration stream
    in ``begin`` (which the passes before it in the same loop would otherwise see for layers they
    have not compressed yet)."""
    return p.caps.reads_all_weights or isinstance(p, ModelPass) or bool(p.caps.profile)


def segments(passes: list[Any], pass_of: Callable[[Any], Pass[Any]] = lambda p: p) -> list[list[Any]]:
    """Consecutive passes (or items holding one, read by ``pass_of``) that share one layer loop."""
    out: list[list[Any]] = []
    for item in passes:
        if not out or (starts_loop(pass_of(item)) and out[-1]):
            out.append([])
        out[-1].append(item)
    return out


def check_segments(passes: list[Pass[Any]]) -> None:
    """Refuse, before any compute, a pass that needs the recipe's original weights in a layer loop
    after the first (the earlier loops have replaced them by then)."""
    segs = segments(passes)
    for seg in segs[1:]:
        late = [p.name for p in seg if p.caps.needs_original]
        if late:
            starter = seg[0].name
            raise ConfigError(
                f"{late[0]} needs each layer's weights from before the recipe, but it runs after {starter}, which starts a second pass "
                f"over the model (it reads every layer first); put {late[0]} before {starter} or run {starter} in a recipe of its own"
            )
