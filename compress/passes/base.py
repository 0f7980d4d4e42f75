"""The pass protocol.

Every pass is driven by the one layer loop of :mod:`compress.pipeline.sequential`, at fixed points:

1. ``check(model, adapter, shapes, stored)``: before the first layer is touched, every option
   against every target's shape (group sizes, N:M, block sizes, ranks) and against what the passes
   before it leave (``stored``: bits per target, from :meth:`Pass.stored_bits`); returns the shapes
   the pass leaves behind, so that the next pass is checked against them.
2. ``prepare(model, adapter)``: once before the loop (global allocations such as LoRD's ranks). A
   pass with ``global_prepare`` that follows other passes starts a new layer loop, so that it sees
   their results in every layer.
3. Model-level passes (``granularity = "model"``): ``begin(ctx)`` with a :class:`ModelContext`
   (embeddings, head, the layer-0 calibration inputs), then per layer
   ``compress_layer(index, layer, ctx)`` with a :class:`LayerContext`, then ``finish(ctx)``.
4. Per-linear passes (``granularity = "linear"``): per layer and sequential sub-group of linears,
   the engine accumulates the statistics the pass declares (*observe*), then calls
   ``apply(name, module, stats, ctx)`` for each target (*apply*).

After every pass has run on a layer, the engine re-runs the compressed layer on its calibration
inputs to produce the next layer's inputs (errors propagate as in GPTQ).

Capabilities that depend on the options (does ``rtn`` need calibration? with ``dim=ada`` it does)
are computed from the config instance by :meth:`Pass.capabilities`; facts about the method itself
(granularity, which module types it accepts and produces) are class attributes. The engine never
tests a pass's class or name.

Structure that a model-level pass adds to the model (sliced hidden sizes, mixing matrices) is
described by :meth:`Pass.structure`, written into the checkpoint's manifest under the pass's name,
and rebuilt by :meth:`Pass.rebuild` before the weights load.

To add a pass: its math in ``compress/solvers/``; a ``PassConfig`` dataclass (one per pass) and a
``Pass`` subclass in ``compress/passes/<name>.py`` decorated with ``@register_pass``; the module in
``compress.registry._PASS_MODULES``; a row in the contract table of ``tests/test_pass_contract.py``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator, Protocol

import torch
from torch import nn

from ..config import PassConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from ..pipeline.stats import LayerStats, LinearStats

#: shapes of the target linears of a model, by full name: (d_out, d_in)
Shapes = dict[str, tuple[int, int]]


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
    kinds: frozenset[str] = frozenset({"Linear"})


#: module type name of a plain linear in ``accepts``/``produces``
LINEAR = "Linear"
#: in ``accepts``: any module type
ANY = "*"
#: the name under which :meth:`LayerContext.observe` reports the decoder layer's own output
LAYER_OUTPUT = "<output>"


@dataclass
class PassResult:
    """What :meth:`Pass.apply` returns for one linear.

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
    #: a per-linear pass observes every sub-group's inputs in one forward of the layer as the pass finds
    #: it (False: each sub-group after the ones before it were compressed, one forward per sub-group)
    observe_once: bool = False
    #: with ``observe_once``: the next layer's calibration inputs are this layer's outputs from that
    #: one forward (before the pass changed it) instead of from one more forward of the compressed
    #: layer; a later layer then does not see the earlier layers' errors
    propagate_dense: bool = False


class LayerContext(Protocol):
    """What a pass may use while one decoder layer is compressed (the engine implements it)."""

    layer: nn.Module
    index: int
    device: torch.device
    adapter: "ModelAdapter"

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


def require_layout(pass_name: str, adapter: "ModelAdapter", what: str, missing: list[str]) -> None:
    """Refuse, in one line, an architecture whose adapter leaves the fields ``missing`` empty."""
    if missing:
        from ..adapters import supported_model_types

        raise ConfigError(
            f"{pass_name} needs the {what} of the architecture, which adapter '{adapter.name}' does not describe "
            f"(missing: {', '.join(missing)}); supported families: {', '.join(supported_model_types())}"
        )


def dense_bits(d_out: int, d_in: int, dtype: torch.dtype) -> int:
    """Bits of a plain d_out × d_in weight in ``dtype``."""
    return d_out * d_in * 8 * torch.empty((), dtype=dtype).element_size()


def meta_storage_bits(module_cls: Any, *args: Any, **kwargs: Any) -> int:
    """Stored bits of a compressed module of these constructor arguments, from an instance on the
    meta device (exact, and no memory is allocated)."""
    return int(module_cls(*args, device="meta", **kwargs).storage_bits())


def layer_relative_name(name: str, layers_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' → 'self_attn.q_proj'."""
    prefix = layers_path + "."
    rest = name[len(prefix):] if name.startswith(prefix) else name
    return rest.split(".", 1)[1] if "." in rest else rest


def matches(name: str, pattern: str) -> bool:
    """Whether a layer-relative linear name matches a ``targets=`` glob list ('|'-separated)."""
    return any(fnmatch.fnmatchcase(name, p.strip()) for p in str(pattern).split("|"))


class Pass:
    """Base class of every compression pass."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    #: "linear": the engine calls observe/apply per linear; "model": the pass has begin /
    #: compress_layer / finish hooks (it changes embeddings, layers and head together)
    granularity: ClassVar[str] = "linear"
    #: module types the pass can take as input (LINEAR for a plain nn.Linear, ANY for every type)
    accepts: ClassVar[frozenset[str]] = frozenset({LINEAR})
    #: why it accepts only those (completes "X must come before Y: ...")
    accepts_reason: ClassVar[str] = "it works on dense weights"
    #: the pass works on the result of an earlier pass (a recipe may not start with it)
    consumes_previous: ClassVar[bool] = False
    #: ``prepare`` reads every layer's weights (global allocation): after other passes it starts a
    #: new layer loop so that it sees their results
    global_prepare: ClassVar[bool] = False
    #: why the result cannot be written as a plain transformers checkpoint (None: it can)
    dense_export_blocker: ClassVar[str | None] = None
    #: a model-level pass: why it needs the whole model in memory (completes "<name> ...")
    whole_model_reason: ClassVar[str] = "transforms the whole model (embeddings, head and every layer together)"
    #: a model-level pass whose work stays inside each decoder layer (no begin/finish on the
    #: embeddings or head, no state across layers): a streamed run can take it
    layer_local: ClassVar[bool] = False
    #: a key under which manifests of an older format recorded this pass's structure
    legacy_manifest_key: ClassVar[str | None] = None

    @classmethod
    def dense_blocker(cls, config: PassConfig) -> str | None:
        """Why this configuration's result cannot be written as a plain transformers checkpoint
        (default: :attr:`dense_export_blocker`)."""
        return cls.dense_export_blocker

    def __init__(self, config: PassConfig) -> None:
        if not isinstance(config, self.config_cls):
            raise ConfigError(f"pass '{self.name}' takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config
        self.caps = self.capabilities(config)

    # -- what the pass needs and does, from its options ------------------------------------------

    @classmethod
    def capabilities(cls, config: PassConfig) -> Capabilities:
        """What the engine must provide for this configuration (default: nothing, data-free)."""
        return Capabilities()

    @classmethod
    def produces(cls, config: PassConfig) -> frozenset[str]:
        """Module types a target linear may have after this pass."""
        return frozenset({LINEAR})

    @classmethod
    def produces_from(cls, config: PassConfig, kinds: "set[str] | frozenset[str]") -> frozenset[str]:
        """Module types a target may have after this pass, given the types it may have before
        (default: :meth:`produces`, whatever the input)."""
        return cls.produces(config)

    @property
    def targets_pattern(self) -> str:
        return str(getattr(self.config, "targets", "*"))

    # -- before any compute ----------------------------------------------------------------------

    def bind_recipe(self, before: "list[Pass]", later: "list[Pass]") -> None:
        """Before any check: the passes before and after this one in the recipe (a pass that
        prepares weights for a later one takes that one's options here; :meth:`check` refuses a
        recipe without it)."""

    def check(self, model: nn.Module, adapter: "ModelAdapter", shapes: Shapes, stored: dict[str, Stored] | None = None) -> Shapes:
        """Refuse options that cannot work on these targets (one-line :class:`ConfigError` naming
        the layer and the fix); return the shapes after the pass (default: unchanged). ``stored``
        says what the passes before this one leave of each target."""
        for name, (d_out, d_in) in shapes.items():
            if self.selects(name, adapter):
                before = (stored or {}).get(name)
                why = self.check_target(d_out, d_in, before)
                if why is not None:
                    last = (before.by or before.shaped_by) if before is not None else None
                    after = f" after {last}" if last else ""
                    raise ConfigError(f"{self.name}: {name} ({d_out}x{d_in}{after}): {why}")
        return shapes

    def selects(self, name: str, adapter: "ModelAdapter") -> bool:
        """Whether the target ``name`` (full name) matches this pass's ``targets=`` option."""
        return matches(layer_relative_name(name, adapter.layers_path), self.targets_pattern)

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        """Why this pass's options cannot compress a d_out × d_in target that earlier passes left
        as ``stored`` (None: they can). Default: :meth:`check_shape`."""
        return self.check_shape(d_out, d_in)

    def check_shape(self, d_out: int, d_in: int) -> str | None:
        """Why this pass's options cannot compress a d_out × d_in target (None: they can)."""
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype) -> int | None:
        """Bits a d_out × d_in target's weight occupies after this pass, known before any compute
        (None: only the run knows, e.g. a global allocation). Default: a pass that produces only
        plain linears leaves a dense weight; otherwise unknown."""
        if self.produces(self.config) == frozenset({LINEAR}):
            return dense_bits(d_out, d_in, dtype)
        return None

    def prepare(self, model: nn.Module, adapter: "ModelAdapter") -> None:
        """Called once before the layer loop (e.g. for a global rank allocation)."""

    def profile_layer(self, index: int, layer: nn.Module, stats: "LayerStats") -> None:
        """With ``Capabilities.profile``: the statistics of decoder layer ``index`` of the model as it
        is before this pass's loop (keys: names relative to the layer), layer by layer."""

    def profile_done(self) -> None:
        """With ``Capabilities.profile``: after the last layer's :meth:`profile_layer`."""

    # -- per-linear passes -----------------------------------------------------------------------

    def targets(self, name: str, module: nn.Module) -> bool:
        """Whether this pass compresses ``module`` (``name`` is relative to its decoder layer).
        A selected module of a type the pass does not accept is an error, never a silent skip."""
        if not matches(name, self.targets_pattern):
            return False
        kind = LINEAR if type(module) is nn.Linear else type(module).__name__
        if ANY not in self.accepts and kind not in self.accepts:
            raise ConfigError(
                f"pass '{self.name}' cannot compress '{name}': an earlier pass made it a {type(module).__name__}; "
                f"reorder the recipe or narrow one pass with targets=..."
            )
        return True

    def iter_targets(self, model: nn.Module, adapter: "ModelAdapter") -> Iterator[tuple[str, nn.Module]]:
        """(full name, module) of every linear this pass targets, layer by layer (for ``prepare``)."""
        for i, layer in enumerate(adapter.layers(model)):
            for group in adapter.groups(layer):
                for n in group:
                    mod = layer.get_submodule(n)
                    if self.targets(n, mod):
                        yield f"{adapter.layers_path}.{i}.{n}", mod

    def apply(
        self, name: str, module: nn.Module, stats: "LinearStats | None", context: "LayerContext | None" = None
    ) -> PassResult:
        """Compress one linear; ``name`` is its full dotted name in the model."""
        raise NotImplementedError(f"pass '{self.name}' has no per-linear apply")

    # -- model-level passes ----------------------------------------------------------------------

    def begin(self, ctx: ModelContext) -> None:
        """Before the first layer (after the layer-0 calibration inputs were captured)."""

    def compress_layer(self, index: int, layer: nn.Module, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        """Transform decoder layer ``index`` in place; return info per changed linear (relative name)."""
        raise NotImplementedError(f"pass '{self.name}' has no per-layer hook")

    def finish(self, ctx: ModelContext) -> None:
        """After the last layer."""

    # -- structure it adds to the model ----------------------------------------------------------

    def structure(self, model: nn.Module) -> dict[str, Any] | None:
        """JSON description of the structure this pass added (None: nothing beyond module types)."""
        return None

    @classmethod
    def rebuild(cls, model: nn.Module, adapter: "ModelAdapter", structure: dict[str, Any], dtype: torch.dtype) -> None:
        """Give a freshly built model the structure :meth:`structure` described (shapes come from the weights)."""

    def notes(self, summary: dict[str, Any]) -> list[str]:
        """Lines for the report about what this pass did, given the run's compression summary."""
        return []
