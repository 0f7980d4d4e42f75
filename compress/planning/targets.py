"""Every pass against every target, before any compute: each pass is checked on the shapes and stored
bits the passes before it leave, and what it leaves is recorded per target — the plan's per-target
assignment (which pass, with which options, touches which module, and the bits it will store)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..dtypes import element_bits
from ..errors import ConfigError
from ..passes.base import LayerPass, Pass, PassPlan, Shapes, Site, Stored, dense_bits, matches
from ..passes.targeting import layer_qualified
from ..pipeline.capture import linear_shape
from ..pipeline.loop import check_segments
from .order import check_order


@dataclass(frozen=True)
class TargetStep:
    """What one pass leaves of one target."""

    pass_index: int
    shape: tuple[int, int]
    #: bits its weight is stored in after the pass (None: known only once the pass has run)
    bits: int | None
    kinds: frozenset[str]


@dataclass(frozen=True)
class TargetPlan:
    """One target linear of the model and what each pass of the recipe leaves of it."""

    name: str
    shape: tuple[int, int]
    dense_bits: int
    steps: tuple[TargetStep, ...]


def linear_shapes(model: nn.Module, adapter: ModelAdapter) -> Shapes:
    """(d_out, d_in) of every linear in the decoder layers, by full name."""
    out: Shapes = {}
    for i, layer in enumerate(adapter.layers(model)):
        for group in adapter.groups(layer):
            for n in group:
                out[f"{adapter.layers_path}.{i}.{n}"] = linear_shape(layer.get_submodule(n))
    return out


def plan_targets(model: nn.Module, adapter: ModelAdapter, passes: list[Pass[Any]]) -> tuple[list[PassPlan], list[TargetPlan]]:
    """The pass order on this model's linears, then every pass's options against every target's shape
    (each pass sees the shapes the passes before it leave). Widths a pass chooses only at run time
    (:meth:`Pass.size_variants`) are checked against every later pass; the refused ones go into that
    pass's :class:`PassPlan`, and the pass avoids them."""
    layers = adapter.layers(model)
    if len(layers) == 0:
        raise ConfigError("the model has no decoder layers to compress")
    names = sorted({n for g in adapter.groups(layers[0]) for n in g})
    indexed = [f"{i}.{n}" for i, layer in enumerate(layers) for g in adapter.groups(layer) for n in g]
    for p in passes:
        pattern = p.config.targets
        if pattern != "*" and not any(matches(n, pattern) for n in indexed):
            raise ConfigError(f"pass '{p.name}': targets={pattern} matches no linear of this model; its linears are {', '.join(names)}"
                              f" in layers 0-{len(layers) - 1} (a layer's own: '3.{names[0]}')")
    # passes narrowed to some layers are checked on every layer's linears
    check_order(passes, indexed if any(layer_qualified(p.config.targets) for p in passes) else names)
    check_segments(passes)
    return _Walk(model, adapter, passes).run()


class _Walk:
    """The shapes and stored bits of every target, pass after pass."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, passes: list[Pass[Any]]) -> None:
        self.model, self.adapter, self.passes = model, adapter, passes
        self.dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
        self.elt = element_bits(self.dtype)
        self.refused: dict[int, dict[str, set[int]]] = {}

    def plan(self, k: int) -> PassPlan:
        refused = {part: frozenset(sizes) for part, sizes in self.refused.get(k, {}).items()}
        return PassPlan(k, tuple(self.passes[:k]), tuple(self.passes[k + 1:]), refused)

    def run(self) -> tuple[list[PassPlan], list[TargetPlan]]:
        shapes = linear_shapes(self.model, self.adapter)
        start_shapes = dict(shapes)
        stored = {n: Stored(dense_bits(o, i, self.dtype), None, self.elt) for n, (o, i) in shapes.items()}
        # widths a pass may choose per layer only at run time (a global allocation), each as the shapes it
        # would give: the later passes are checked on every one, and the pass avoids those they refuse
        variants: list[tuple[int, str, int, Shapes]] = []
        entering: list[tuple[Shapes, dict[str, Stored]]] = []  # shapes and stored entering each pass
        steps: list[dict[str, TargetStep]] = []
        for k, p in enumerate(self.passes):
            variants, owners = self._check_variants(k, p, variants, stored)
            if owners:  # the owner's own choice avoids the refused widths now: the shapes it leaves may change
                start = min(owners)
                shapes, stored = entering[start][0], dict(entering[start][1])
                entering, steps = entering[:start], steps[:start]
                for q in range(start, k):
                    entering.append((shapes, dict(stored)))
                    shapes, stored, changed = self._after(q, shapes, stored)
                    steps.append(changed)
            entering.append((shapes, dict(stored)))
            self._consumes(k, p, stored)
            before = shapes
            shapes, stored, changed = self._after(k, shapes, stored)
            steps.append(changed)
            variants += [(k, part, size, v) for part, size, v in p.size_variants(self._site(k, before, stored))]
        return [self.plan(k) for k in range(len(self.passes))], self._targets(start_shapes, steps)

    def _site(self, k: int, shapes: Shapes, stored: dict[str, Stored]) -> Site:
        return Site(self.model, self.adapter, shapes, stored, self.plan(k))

    def _check_variants(self, k: int, p: Pass[Any], variants: list[tuple[int, str, int, Shapes]],
                        stored: dict[str, Stored]) -> tuple[list[tuple[int, str, int, Shapes]], set[int]]:
        kept, owners = [], set()
        for owner, part, size, v_shapes in variants:
            try:
                kept.append((owner, part, size, p.check(self._site(k, v_shapes, stored))))
            except ConfigError:
                self.refused.setdefault(owner, {}).setdefault(part, set()).add(size)
                owners.add(owner)
        return kept, owners

    def _consumes(self, k: int, p: Pass[Any], stored: dict[str, Stored]) -> None:
        if p.consumes_previous and not any(st.by for n, st in stored.items() if p.selects(n, self.adapter)):
            earlier = ", ".join(q.name for q in self.passes[:k])
            raise ConfigError(f"{p.name} has nothing to work on after {earlier}: no earlier pass compresses the linears it targets "
                              f"(it works on a per-linear pass's result); put a quantization or pruning pass before {p.name}")

    def _after(self, k: int, shapes: Shapes, stored: dict[str, Stored]) -> tuple[Shapes, dict[str, Stored], dict[str, TargetStep]]:
        """Check pass ``k`` on the shapes and stored bits the passes before it leave; return what it leaves."""
        p = self.passes[k]
        after = p.check(self._site(k, shapes, stored))
        stored = dict(stored)
        changed: dict[str, TargetStep] = {}
        for n, (o, i) in after.items():
            if p.selects(n, self.adapter) or after[n] != shapes[n]:
                # a layer pass (a rotation, a rescaling) gives the later passes a new dense starting point,
                # which is also what the engine keeps as their original weights
                layer_pass = isinstance(p, LayerPass)
                by = None if layer_pass else p.name
                shaped_by = p.name if after[n] != shapes[n] else stored[n].shaped_by
                kinds = p.produces(stored[n].kinds) if p.selects(n, self.adapter) and not layer_pass else stored[n].kinds
                stored[n] = Stored(p.stored_bits(o, i, self.dtype, before=stored[n]), by, self.elt, shaped_by, kinds)
                changed[n] = TargetStep(k, (o, i), stored[n].bits, kinds)
        return after, stored, changed

    def _targets(self, shapes: Shapes, steps: list[dict[str, TargetStep]]) -> list[TargetPlan]:
        return [
            TargetPlan(n, (o, i), dense_bits(o, i, self.dtype), tuple(s[n] for s in steps if n in s))
            for n, (o, i) in shapes.items()
        ]


__all__ = ["TargetPlan", "TargetStep", "linear_shapes", "plan_targets"]
