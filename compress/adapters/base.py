"""Architecture adapters.

To add a new model family: create ``compress/adapters/<family>.py`` with a :class:`ModelAdapter`
instance naming the ``config.model_type`` values it covers, where the decoder layers live and the
sequential sub-groups of linears (modules whose inputs do not depend on each other, in execution
order), then add it to ``ADAPTERS`` in ``compress/adapters/__init__.py``. Families not listed fall
back to :data:`GENERIC`, which treats every ``nn.Linear`` inside the decoder layers as a target in
one group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Declarative knowledge of one model family."""

    name: str
    #: ``config.model_type`` values this adapter covers (empty for the generic fallback)
    model_types: tuple[str, ...] = ()
    #: dotted path of the ``nn.ModuleList`` of decoder layers
    layers_path: str = "model.layers"
    #: linears (names relative to a decoder layer) in groups that run one after the other;
    #: a later group is calibrated on the outputs of the already compressed earlier groups
    sequential_groups: tuple[tuple[str, ...], ...] = ()
    #: sub-blocks whose output measures the error of the linears that read the block's input
    #: (AdaDim evaluates q/k/v through the attention block, gate/up through the MLP)
    blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: residual-stream layout, for rotation passes (SliceGPT); empty when the family does not describe it
    embed: str = ""  # token embedding, relative to the model
    final_norm: str = ""
    lm_head: str = ""
    attn_norm: str = ""  # the following names are relative to a decoder layer
    mlp_norm: str = ""
    attn_inputs: tuple[str, ...] = ()
    attn_output: str = ""
    mlp_inputs: tuple[str, ...] = ()
    mlp_output: str = ""
    #: the attention and MLP pieces, for module-pair passes (MoDeGPT); names relative to a decoder layer
    attention: str = ""  # the attention module (its config gives the head counts)
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    gate_proj: str = ""  # a gated MLP: down(act(gate(x)) * up(x)); down is mlp_output
    up_proj: str = ""

    def missing_modular_layout(self) -> list[str]:
        """The attention/MLP fields this adapter leaves empty (all are needed to reduce the modules' inner widths)."""
        names = ("attention", "q_proj", "k_proj", "v_proj", "attn_output", "gate_proj", "up_proj", "mlp_output")
        return [n for n in names if not getattr(self, n)]

    def missing_residual_layout(self) -> list[str]:
        """The residual-layout fields this adapter leaves empty (all are needed to rotate the model)."""
        names = ("embed", "final_norm", "lm_head", "attn_norm", "mlp_norm", "attn_inputs", "attn_output", "mlp_inputs", "mlp_output")
        return [n for n in names if not getattr(self, n)]

    def block_of(self, linear: str) -> str | None:
        """The sub-block through which ``linear`` is evaluated, or None (its own output)."""
        for block, members in self.blocks:
            if linear in members:
                return block
        return None

    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of ``model``."""
        obj: nn.Module = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        assert isinstance(obj, nn.ModuleList)
        return obj

    def groups(self, layer: nn.Module) -> list[list[str]]:
        """Sequential groups of the linears of ``layer`` that exist; linears not named in any
        group are appended as a last group so that nothing is silently skipped."""
        linears = [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]
        present = set(linears)
        groups = [[n for n in g if n in present] for g in self.sequential_groups]
        groups = [g for g in groups if g]
        named = {n for g in groups for n in g}
        rest = [n for n in linears if n not in named]
        if rest:
            groups.append(rest)
        return groups


def find_layers_path(model: nn.Module) -> str | None:
    """Locate the decoder layers of an unknown architecture: the ``nn.ModuleList`` whose length is
    ``config.num_hidden_layers`` (or the longest one holding linears)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[int, str] | None = None
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if not any(isinstance(m, nn.Linear) for m in mod[0].modules()):
            continue
        if n_layers is not None and len(mod) == n_layers:
            return name
        if best is None or len(mod) > best[0]:
            best = (len(mod), name)
    return None if best is None else best[1]
