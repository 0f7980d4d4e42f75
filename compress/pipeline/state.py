"""The engine's state for one run, handed explicitly to every part of the layer loop (nothing is read
from module globals): the compute device, the calibration batch size, the data-parallel handle, a
provider of precomputed statistics (sweeps), the streamed model's layer stream and the progress
callback."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .stats import LayerStats

if TYPE_CHECKING:
    from ..stream import LayerStream
    from .distributed import Dist

#: statistics of the linears ``names`` of layer ``index`` with these kinds (a sweep's cache)
StatsProvider = Callable[[int, list[str], frozenset[str]], LayerStats]
#: on_layer(index, n_layers, seconds) after each layer
OnLayer = Callable[[int, int, float], None]


@dataclass(frozen=True)
class Engine:
    """How the layer loop runs: where, in what batches, in how many processes, from what."""

    device: torch.device
    batch_size: int = 8
    #: the data-parallel process group (None: one process)
    dist: "Dist | None" = None
    #: precomputed statistics instead of calibration forwards (sweeps reuse the dense model's)
    stats_provider: StatsProvider | None = None
    #: a model streamed from its checkpoint: layers read before and written after their turn
    stream: "LayerStream | None" = None
    on_layer: OnLayer | None = None
