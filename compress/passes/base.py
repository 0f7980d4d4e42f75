"""The pass protocol.

A pass is a class generic over its config (``class GPTQPass(LinearPass[GPTQConfig])``), registered
with :func:`compress.registry.register_pass` in its own file under ``compress/passes/``; importing
the package registers every pass. The engine (:mod:`compress.pipeline`) drives one of three
lifecycles, chosen by the base class:

* :class:`LinearPass` — per linear: the engine accumulates the statistics the pass declares for
  each sequential sub-group of a layer's linears (*observe*), then calls :meth:`LinearPass.apply`
  once per target (*apply*).
* :class:`LayerPass` — per decoder layer: :meth:`LayerPass.compress_layer` transforms the layer in
  place with what its :class:`LayerContext` offers (sub-block forwards, observations); nothing
  outside the layer changes, so a streamed run can take it.
* :class:`ModelPass` — a layer pass that also changes the embeddings, the head or the residual
  stream: :meth:`ModelPass.begin` and :meth:`ModelPass.finish` around the layer loop, and the
  structure it adds is described (:meth:`ModelPass.structure`) and rebuilt on load
  (:meth:`ModelPass.rebuild`).

Before any compute the planner (:mod:`compress.planning`) asks every pass, in recipe order, what it
needs (:meth:`Pass.capabilities`), what it makes of each module type (:meth:`Pass.produces`), and
checks its options against every target's shape and against what the passes before it leave
(:meth:`Pass.check`, :meth:`Pass.check_target`, :meth:`Pass.stored_bits`, :meth:`Pass.size_variants`).
These hooks have no side effects: what planning decides for a pass (its neighbours in the recipe,
sizes the later passes refuse) is a :class:`PassPlan` that the engine hands to the pass at run time
through its context. A pass whose choices need the whole model's weights or statistics before its
first layer (a global allocation) declares it in its capabilities and receives them through
:meth:`Pass.prepare` and :meth:`Pass.profile_layer` / :meth:`Pass.profile_done`.

To add a pass: its math in ``compress/solvers/``; a config dataclass and the pass class in
``compress/passes/<name>.py``; a row in the contract table of ``tests/test_pass_contract.py``
(see the README's "How to add a pass").
"""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Iterator, TypeVar

import torch
from torch import nn

from ..config import PassConfig
from ..errors import ConfigError
from .context import (
    ANY,
    LAYER_OUTPUT,
    LINEAR,
    QUANTIZABLE,
    Capabilities,
    LayerContext,
    ModelContext,
    PassPlan,
    PassResult,
    Shapes,
    Site,
    Stored,
)
from .targeting import accepts_kind, dense_bits, kind_of, layer_indexed_name, layer_relative_name, matches, meta_storage_bits, require_layout

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from ..pipeline.stats import LayerStats, LinearStats

C = TypeVar("C", bound=PassConfig)

__all__ = [
    "ANY", "LAYER_OUTPUT", "LINEAR", "QUANTIZABLE", "Capabilities", "LayerContext", "LayerPass", "LinearPass", "ModelContext", "ModelPass",
    "Pass", "PassPlan", "PassResult", "Shapes", "Site", "Stored", "accepts_kind", "dense_bits", "kind_of", "layer_relative_name", "lifecycle",
    "matches", "meta_storage_bits", "require_layout",
]


class Pass(Generic[C]):
    """Base of every compression pass: what planning asks of it."""

    name: ClassVar[str]
    #: the config type this pass takes, exactly (set from the generic parameter)
    config_cls: ClassVar[type[PassConfig]]
    #: module types the pass can take as input (LINEAR, ANY, QUANTIZABLE or type names)
    accepts: ClassVar[frozenset[str]] = frozenset({LINEAR})
    #: why it accepts only those (completes "X must come before Y: ...")
    accepts_reason: ClassVar[str] = "it works on dense weights"
    #: the pass works on the result of an earlier pass (a recipe may not start with it)
    consumes_previous: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for base in getattr(cls, "__orig_bases__", ()):
            args = typing.get_args(base)
            if args and isinstance(args[0], type) and issubclass(args[0], PassConfig):
                cls.config_cls = args[0]

    def __init__(self, config: C) -> None:
        if type(config) is not self.config_cls:
            raise ConfigError(f"pass '{self.name}' takes a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config: C = config
        self.caps = self.capabilities()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    @property
    def options(self) -> str:
        """The recipe step in shorthand: ``name:key=value,...`` (options that differ from the defaults)."""
        default = self.config_cls()
        given = [f"{k}={v}" for k, v in self.config.to_dict().items() if getattr(default, k) != v]
        return f"{self.name}:{','.join(given)}" if given else self.name

    # -- what the pass needs and does, from its options ------------------------------------------

    def capabilities(self) -> Capabilities:
        """What the engine must provide for this configuration (default: nothing, data-free)."""
        return Capabilities()

    def produces(self, kinds: frozenset[str]) -> frozenset[str]:
        """Module types a selected target may have after this pass, given the types it may have
        before (default: plain linears)."""
        return frozenset({LINEAR})

    def dense_blocker(self) -> str | None:
        """Why this configuration's result cannot be written as a plain transformers checkpoint (None: it can)."""
        return None

    def notes(self, summary: dict[str, Any]) -> list[str]:
        """Lines for the report about what this pass did, given the run's compression summary."""
        return []

    # -- before any compute (no side effects) ----------------------------------------------------

    def check(self, site: Site) -> Shapes:
        """Refuse options that cannot work on these targets (one-line :class:`ConfigError` naming
        the layer and the fix); return the shapes after the pass (default: unchanged)."""
        for name, (d_out, d_in) in site.shapes.items():
            if self.selects(name, site.adapter):
                before = site.stored.get(name)
                why = self.check_target(d_out, d_in, before)
                if why is not None:
                    last = (before.by or before.shaped_by) if before is not None else None
                    after = f" after {last}" if last else ""
                    raise ConfigError(f"{self.name}: {name} ({d_out}x{d_in}{after}): {why}")
        return site.shapes

    def check_target(self, d_out: int, d_in: int, stored: Stored | None) -> str | None:
        """Why this pass's options cannot compress a d_out × d_in target that earlier passes left
        as ``stored`` (None: they can)."""
        return None

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        """Bits a d_out × d_in target's weight occupies after this pass, known before any compute
        (None: only the run knows, e.g. a global allocation); ``before``: what the passes before it
        leave of the target. Default: a pass that produces only plain linears leaves a dense weight;
        otherwise unknown."""
        if self.produces(frozenset({LINEAR})) == frozenset({LINEAR}):
            return dense_bits(d_out, d_in, dtype)
        return None

    def work(self, d_out: int, d_in: int, tokens: int) -> float | None:
        """Estimated multiply-adds to compress one d_out × d_in target from ``tokens`` calibration
        tokens, beyond the layer forwards the engine runs anyway (None: not estimated). Only the
        ratio to GPTQ's estimate is used (:mod:`compress.planning.cost`)."""
        return None

    def faster(self) -> str | None:
        """Options of this pass that run faster, named when its estimate is far above GPTQ's."""
        return None

    def size_variants(self, site: Site) -> list[tuple[str, int, Shapes]]:
        """Widths the pass may choose per layer only at run time (a global allocation), each as
        (part, width, the shapes with that width in every layer): the planner checks the later
        passes on each and hands the refused ones back in :attr:`PassPlan.refused`."""
        return []

    def selects(self, name: str, adapter: "ModelAdapter") -> bool:
        """Whether the target ``name`` (full name) matches this pass's ``targets=`` option."""
        return matches(layer_indexed_name(name, adapter.layers_path), self.config.targets)

    # -- before the layer loop, at run time (global allocations) ---------------------------------

    def prepare(self, model: nn.Module, adapter: "ModelAdapter", plan: PassPlan) -> None:
        """Called once before the layer loop (e.g. for a global rank allocation)."""

    def profile_layer(self, index: int, layer: nn.Module, stats: "LayerStats") -> None:
        """With ``Capabilities.profile``: the statistics of decoder layer ``index`` of the model as it
        is before this pass's loop (keys: names relative to the layer), layer by layer."""

    def profile_done(self) -> None:
        """With ``Capabilities.profile``: after the last layer's :meth:`profile_layer`."""

    # -- helpers for the engine ------------------------------------------------------------------

    def targets(self, name: str, module: nn.Module) -> bool:
        """Whether this pass compresses ``module`` (``name`` is relative to its decoder layer, with or
        without the layer's index in front: '3.mlp.down_proj').
        A selected module of a type the pass does not accept is an error, never a silent skip."""
        if not matches(name, self.config.targets):
            return False
        if not accepts_kind(self.accepts, kind_of(module)):
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
                    if self.targets(f"{i}.{n}", mod):
                        yield f"{adapter.layers_path}.{i}.{n}", mod


class LinearPass(Pass[C]):
    """A pass that compresses one linear at a time: the engine observes, then calls :meth:`apply`."""

    def apply(self, name: str, module: nn.Module, stats: "LinearStats | None", ctx: LayerContext) -> PassResult:
        """Compress one linear; ``name`` is its full dotted name in the model."""
        raise NotImplementedError(f"pass '{self.name}' has no apply")


class LayerPass(Pass[C]):
    """A pass that transforms one decoder layer at a time, touching nothing outside it."""

    def compress_layer(self, index: int, layer: nn.Module, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        """Transform decoder layer ``index`` in place; return info per changed linear (relative name)."""
        raise NotImplementedError(f"pass '{self.name}' has no compress_layer")


class ModelPass(LayerPass[C]):
    """A layer pass that also changes what lies outside the layers (embeddings, head, the residual
    stream) and may add structure that plain transformers cannot express."""

    #: why it needs the whole model in memory (completes "<name> ...")
    whole_model_reason: ClassVar[str] = "transforms the whole model (embeddings, head and every layer together)"
    #: a key under which manifests of an older format recorded this pass's structure
    legacy_manifest_key: ClassVar[str | None] = None

    def begin(self, ctx: ModelContext) -> None:
        """Before the first layer (after the layer-0 calibration inputs were captured)."""

    def finish(self, ctx: ModelContext) -> None:
        """After the last layer."""

    def structure(self, model: nn.Module) -> dict[str, Any] | None:
        """JSON description of the structure this pass added (None: nothing beyond module types)."""
        return None

    @classmethod
    def rebuild(cls, model: nn.Module, adapter: "ModelAdapter", structure: dict[str, Any], dtype: torch.dtype) -> None:
        """Give a freshly built model the structure :meth:`structure` described (shapes come from the weights)."""


def lifecycle(p: Pass[Any]) -> str:
    """'per-linear', 'per-layer' or 'model-level'."""
    return "model-level" if isinstance(p, ModelPass) else "per-layer" if isinstance(p, LayerPass) else "per-linear"
