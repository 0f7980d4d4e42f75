"""Architecture adapters: where a model family keeps its pieces, declared once.

To add a new model family: create ``compress/adapters/<family>.py`` with a :class:`ModelAdapter`
instance naming the ``config.model_type`` values it covers, where the decoder layers live and the
names of the pieces of a layer (its norms, attention and MLP, and their linears; fused q/k/v or
gate/up projections are named as such); every adapter module of the package is found on import and
its adapters registered (:mod:`compress.adapters`). Everything else is derived from those names:
the sequential sub-groups of linears (modules whose inputs do not depend on each other, in
execution order), the sub-blocks through which a linear's error is measured, and the residual
layout that rotation passes need. A pass that needs a piece the adapter does not name is refused in
one line naming it. Families not listed fall back to :data:`compress.adapters.GENERIC`, which
treats every ``nn.Linear`` inside the decoder layers as a target in one group.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelAdapter:
    """Declarative knowledge of one model family: a pre-norm decoder layer computes
    h ← h + attention(attn_norm(h)), then h ← h + mlp(mlp_norm(h))."""

    name: str
    #: ``config.model_type`` values this adapter covers (empty for the generic fallback)
    model_types: tuple[str, ...] = ()
    #: dotted path of the ``nn.ModuleList`` of decoder layers
    layers_path: str = "model.layers"
    #: outside the decoder layers, relative to the model
    embed: str = ""  # token embedding
    final_norm: str = ""
    lm_head: str = ""
    #: inside a decoder layer, relative to it
    attn_norm: str = ""
    attention: str = ""  # the attention module (its config gives the head counts)
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    qkv_proj: str = ""  # one fused q/k/v projection instead of q_proj, k_proj, v_proj
    o_proj: str = ""
    mlp_norm: str = ""
    mlp: str = ""  # the MLP module
    gate_proj: str = ""  # a gated MLP: down(act(gate(x)) * up(x))
    up_proj: str = ""
    gate_up_proj: str = ""  # one fused gate/up projection instead of gate_proj, up_proj
    down_proj: str = ""
    #: a family that names none of the pieces above (the generic fallback) may give its groups directly
    groups_override: tuple[tuple[str, ...], ...] = ()

    # -- derived from the names above ------------------------------------------------------------

    @property
    def attn_inputs(self) -> tuple[str, ...]:
        """The linears reading the attention norm's output."""
        return (self.qkv_proj,) if self.qkv_proj else tuple(n for n in (self.q_proj, self.k_proj, self.v_proj) if n)

    @property
    def attn_output(self) -> str:
        return self.o_proj

    @property
    def mlp_inputs(self) -> tuple[str, ...]:
        """The linears reading the MLP norm's output."""
        return (self.gate_up_proj,) if self.gate_up_proj else tuple(n for n in (self.gate_proj, self.up_proj) if n)

    @property
    def mlp_output(self) -> str:
        return self.down_proj

    @property
    def sequential_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears in groups that run one after the other; a later group is calibrated on the outputs
        of the already compressed earlier groups."""
        if self.groups_override:
            return self.groups_override
        groups = (self.attn_inputs, (self.attn_output,), self.mlp_inputs, (self.mlp_output,))
        return tuple(g for g in groups if g and all(g))

    @property
    def blocks(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """Sub-blocks whose output measures the error of the linears that read the block's input
        (AdaDim evaluates q/k/v through the attention block, gate/up through the MLP)."""
        out = []
        if self.attention and self.attn_inputs:
            out.append((self.attention, self.attn_inputs))
        if self.mlp and self.mlp_inputs:
            out.append((self.mlp, self.mlp_inputs))
        return tuple(out)

    def missing_modular_layout(self) -> list[str]:
        """The pieces a module-pair pass (MoDeGPT) needs and this adapter does not name separately."""
        names = ("attention", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return [n for n in names if not getattr(self, n)]

    def missing_residual_layout(self) -> list[str]:
        """The residual-layout pieces a rotation pass (SliceGPT) needs and this adapter leaves empty."""
        names = ("embed", "final_norm", "lm_head", "attn_norm", "attention", "o_proj", "mlp_norm", "mlp", "down_proj")
        missing = [n for n in names if not getattr(self, n)]
        missing += [n for n, v in (("attention inputs", self.attn_inputs), ("mlp inputs", self.mlp_inputs)) if not v]
        return missing

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
