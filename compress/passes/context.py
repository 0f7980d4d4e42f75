"""What passes and the engine exchange: the facts planning knows of a target (:class:`Stored`), what
a pass needs (:class:`Capabilities`), what planning decided for it (:class:`PassPlan`), what it is
checked against (:class:`Site`), what it returns for a linear (:class:`PassResult`), and the
contexts the engine hands it while it works (:class:`LayerContext`, :class:`ModelContext`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from ..pipeline.stats import LayerStats, LinearStats

#: shapes of the target linears of a model, by full name: (d_out, d_in)
Shapes = dict[str, tuple[int, int]]

#: module type name of a plain linear in ``accepts``/``produces``
LINEAR = "Linear"
#: in ``accepts``: any module type
ANY = "*"
#: in ``accepts``: any compressed module type that offers quantizable parts (see CompressedLinear.quantized_as)
QUANTIZABLE = "<quantizable parts>"
#: the name under which :meth:`LayerContext.observe` reports the decoder layer's own output
LAYER_OUTPUT = "<output>"


@dataclass(frozen=True)
class Stored:
    """What the recipe's passes so far leave of one target, as known before any compute."""

    #: bits its weight occupies as stored (None: known only once the pass has run, e.g. a global allocation)
    bits: int | None
    #: the last pass that changed it (None: the source model's weight)
    by: str | None = None
    #: bits of one element of the model's dense weights
    elt_bits: int = 32
    #: the last pass that changed its shape (None: the source model's shape)
    shaped_by: str | None = None
    #: module types it may have (what the last pass that selected it produces)
    kinds: frozenset[str] = frozenset({LINEAR})


@dataclass
class PassResult:
    """What :meth:`LinearPass.apply` returns for one linear.

    ``module`` replaces the linear (``None`` leaves it unchanged); ``info`` goes to the manifest
    and the per-layer table (rank, error, why a layer was left dense, ...).
    """

    module: nn.Module | None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Capabilities:
    """What the engine must provide to one configured pass."""

    #: calibration activations are needed (no forward runs when no pass needs them)
    requires_calibration: bool = False
    #: statistics of each target linear's input to accumulate (names known to LinearStats)
    statistics: frozenset[str] = frozenset()
    #: the pass reads the layer's calibration inputs itself (sub-block forwards, observations of
    #: points that are not linear inputs), so precomputed statistics are not enough for it
    uses_layer_inputs: bool = False
    #: the pass reads each linear's weight from before the recipe (``ctx.original(name)``)
    needs_original: bool = False
    #: calibration source of the pass's statistics when it differs from the recipe's (None = same)
    calib_source: str | None = None
    #: statistics of every layer's targets, over the model as the pass finds it, before its layer
    #: loop (one forward per layer, handed to :meth:`Pass.profile_layer`): for choices that need the
    #: whole model's statistics at once (a global allocation, a dictionary shared across layers)
    profile: frozenset[str] = frozenset()
    #: :meth:`Pass.prepare` reads every layer's weights before the first layer (a global allocation):
    #: after other passes the pass starts a new layer loop so that it sees their results
    reads_all_weights: bool = False
    #: a per-linear pass observes every sub-group's inputs in one forward of the layer as the pass finds
    #: it (False: each sub-group after the ones before it were compressed, one forward per sub-group)
    observe_once: bool = False
    #: with ``observe_once``: the next layer's calibration inputs are this layer's outputs from that
    #: one forward (before the pass changed it) instead of from one more forward of the compressed
    #: layer; a later layer then does not see the earlier layers' errors
    propagate_dense: bool = False


class Neighbour(Protocol):
    """Another pass of the recipe as a pass sees it in its :class:`PassPlan`: its name and options."""

    @property
    def name(self) -> str: ...

    @property
    def config(self) -> Any: ...


@dataclass(frozen=True)
class PassPlan:
    """What planning decided for one pass of a run; the engine hands it to the pass in its contexts."""

    #: position of the pass in the recipe
    index: int = 0
    #: the passes before and after it in the recipe
    before: tuple["Neighbour", ...] = ()
    later: tuple["Neighbour", ...] = ()
    #: sizes of each part that a later pass of the recipe cannot take (see :meth:`Pass.size_variants`)
    refused: Mapping[str, frozenset[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Site:
    """What a pass is checked against before any compute: the model (its shapes; a skeleton on the
    meta device is enough), the targets' shapes and what the passes before it leave of them."""

    model: nn.Module
    adapter: "ModelAdapter"
    shapes: Shapes
    stored: Mapping[str, Stored]
    plan: PassPlan


class LayerContext(Protocol):
    """What a pass may use while one decoder layer is compressed (the engine implements it)."""

    layer: nn.Module
    index: int
    device: torch.device
    adapter: "ModelAdapter"
    #: the model's config (head counts, widths)
    config: Any
    plan: PassPlan

    def observe(self, names: list[str], kinds: frozenset[str]) -> "LayerStats":
        """Statistics of the inputs of the submodules ``names`` (relative to the layer; LAYER_OUTPUT
        for the layer's output) over the calibration set, the layer as it is now."""

    def block_error(self, block: str, replace: dict[str, nn.Module], samples: int | None = None) -> float:
        """Σ‖out − ref‖² of sub-block ``block`` with the linears in ``replace`` swapped in (over the
        calibration batches holding the first ``samples`` sequences; None: all)."""

    def map_outputs(self, fn: Any) -> None:
        """Declare that the layer's outputs are now ``fn(h)`` of the outputs seen by the last
        ``observe`` of LAYER_OUTPUT (e.g. a rotation): when no later pass changes the layer, the
        engine propagates these instead of re-running the layer."""

    def original(self, name: str) -> torch.Tensor:
        """The weight of linear ``name`` before any pass of the recipe changed it."""


class ModelContext(Protocol):
    """What a model-level pass may use before and after the layer loop."""

    model: nn.Module
    adapter: "ModelAdapter"
    device: torch.device
    plan: PassPlan

    def input_stats(self, kinds: frozenset[str]) -> "LinearStats":
        """Statistics of the hidden states entering decoder layer 0 (the calibration set)."""

    def head_input_stats(self, kinds: frozenset[str]) -> "LinearStats":
        """Statistics of what the LM head reads (the final norm's output) over a forward of the
        model as it is now."""

    def block_influence(self) -> list[float]:
        """Per decoder layer, the mean over calibration tokens of 1 − cos(layer input, layer output),
        from one forward of the model as it is now."""

    def map_hidden(self, fn: Any) -> None:
        """Replace the hidden states entering the next layer by ``fn(hidden)`` (e.g. a rotation)."""
