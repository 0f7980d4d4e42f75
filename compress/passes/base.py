"""The pass protocol.

A pass compresses the linear layers of each decoder layer. The pipeline drives it in two phases
per sub-group of linears: *observe* (the pipeline runs calibration data through the layer with
hooks that accumulate the statistics the pass declares) then *apply* (the pass turns each target
linear and its statistics into a compressed module). Capabilities are class attributes that the
pipeline reads; the pipeline never tests a pass's class.

To add a pass: write its math in ``compress/solvers``, a ``PassConfig`` dataclass and a ``Pass``
subclass here-like in ``compress/passes/<name>.py`` decorated with ``@register_pass``, and add the
module to ``compress.registry._PASS_MODULES``.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from torch import nn

from ..config import PassConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from ..adapters.base import ModelAdapter
    from ..pipeline.sequential import LayerContext
    from ..pipeline.stats import LinearStats


@dataclass
class PassResult:
    """What :meth:`Pass.apply` returns for one linear.

    ``module`` replaces the linear (``None`` leaves it unchanged); ``info`` goes to the manifest
    and the per-layer table (rank, error, why a layer was left dense, ...).
    """

    module: nn.Module | None
    info: dict[str, Any] = field(default_factory=dict)


def layer_relative_name(name: str, layers_path: str) -> str:
    """'model.layers.3.self_attn.q_proj' → 'self_attn.q_proj'."""
    prefix = layers_path + "."
    rest = name[len(prefix):] if name.startswith(prefix) else name
    return rest.split(".", 1)[1] if "." in rest else rest


class Pass:
    """Base class of every compression pass."""

    name: ClassVar[str]
    config_cls: ClassVar[type[PassConfig]]
    #: the pass needs calibration activations (the pipeline skips all forwards when no pass does)
    requires_calibration: ClassVar[bool] = False
    #: statistics of each target linear's input that the pipeline must accumulate
    #: (names understood by :class:`compress.pipeline.stats.LinearStats`)
    statistics: ClassVar[frozenset[str]] = frozenset()
    #: the pass reads the decoder layer's calibration inputs itself (through the LayerContext), so
    #: precomputed statistics are not enough for it
    uses_layer_inputs: ClassVar[bool] = False
    #: the pass reads each linear's weight from before the recipe (``context.original(name)``)
    needs_original: ClassVar[bool] = False
    #: the pass works on the result of an earlier pass (a recipe may not start with it)
    consumes_previous: ClassVar[bool] = False
    #: calibration source of this pass's statistics when it differs from the recipe's (None = same)
    calib_source: str | None = None
    #: "linear": the pipeline calls observe/apply per linear; "model": the pass transforms the whole
    #: model in ``run_model`` (e.g. SliceGPT rotates embeddings, layers and head together)
    granularity: ClassVar[str] = "linear"
    #: whether the result can be written as a plain transformers checkpoint (--export dense)
    dense_exportable: ClassVar[bool] = True

    def run_model(self, model: nn.Module, adapter: "ModelAdapter", input_ids: Any, *, device: Any, batch_size: int = 8,
                  on_layer: Any = None) -> list[Any]:
        """Model-level passes: transform ``model`` in place and return per-module records."""
        raise NotImplementedError

    def __init__(self, config: PassConfig) -> None:
        self.config = config

    def prepare(self, model: nn.Module, adapter: "ModelAdapter") -> None:
        """Called once before the layer loop (e.g. for a global rank allocation)."""

    def targets(self, name: str, module: nn.Module) -> bool:
        """Whether this pass compresses ``module`` (``name`` is relative to its decoder layer).
        A selected module that an earlier pass already turned into a compressed type is an error,
        never a silent skip."""
        pattern = getattr(self.config, "targets", "*")
        if not any(fnmatch.fnmatchcase(name, p.strip()) for p in str(pattern).split("|")):
            return False
        if not isinstance(module, nn.Linear):
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
        """Compress one linear; ``name`` is its full dotted name in the model; ``context`` gives
        access to the decoder layer and its calibration inputs (e.g. for sub-block errors)."""
        raise NotImplementedError
