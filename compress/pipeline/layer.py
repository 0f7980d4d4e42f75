"""What the engine hands a pass while it works: :class:`LayerState` (one decoder layer) and
:class:`ModelState` (the whole model, for model-level passes). Both implement the protocols of
:mod:`compress.passes.base`; every statistic they return is accumulated by
:mod:`compress.pipeline.stats`, so a data-parallel engine reduces them in one place."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..passes.base import LAYER_OUTPUT, PassPlan
from .capture import Batch, StopForward, hidden_of, map_tensors, module_device, run_layer, set_submodule, to_cpu, with_hidden
from .stats import LayerStats, LinearStats


def observe(
    layer: nn.Module, names: list[str], kinds: frozenset[str], inputs: list[Batch], device: torch.device,
    outputs: list[torch.Tensor] | None = None,
) -> LayerStats:
    """Run the calibration batches through ``layer`` with hooks on the inputs of ``names``
    (``LAYER_OUTPUT``: the layer's own output); stop each forward as soon as every hooked point has
    been seen. When a list ``outputs`` is given, every forward runs to the end and the layer's
    outputs are appended to it (on the CPU)."""
    stats = LayerStats(kinds)
    inner = [n for n in names if n != LAYER_OUTPUT]
    want_output = LAYER_OUTPUT in names or outputs is not None
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            stats.observe(name, args[0].detach())
            seen.add(name)
            if not want_output and len(seen) == len(inner):
                raise StopForward

        return hook

    def output_hook(_mod: nn.Module, _args: Any, out: Any) -> None:
        h = (out[0] if isinstance(out, (tuple, list)) else out).detach()
        if LAYER_OUTPUT in names:
            stats.observe(LAYER_OUTPUT, h)
        if outputs is not None:
            outputs.append(h.to("cpu"))

    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in inner]
    if want_output:
        handles.append(layer.register_forward_hook(output_hook))
    try:
        for batch in inputs:
            seen.clear()
            stats.reset_sharing()
            try:
                run_layer(layer, batch, device)
            except StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    stats.reset_sharing()
    return stats


class LayerState:
    """The :class:`~compress.passes.base.LayerContext` of one decoder layer (for a per-linear pass,
    of one sub-group): the layer, its calibration inputs, the compute device and the adapter.
    Sub-block inputs and reference outputs are captured lazily and cached."""

    def __init__(
        self, layer: nn.Module, index: int, inputs: list[Batch], device: torch.device, adapter: ModelAdapter,
        originals: dict[str, torch.Tensor] | None = None, config: Any = None, plan: PassPlan | None = None,
    ) -> None:
        self.layer = layer
        self.index = index
        self.inputs = inputs
        self.device = device
        self.adapter = adapter
        self.config = config
        self.plan = plan or PassPlan()
        self.originals = originals or {}
        self._block_inputs: dict[str, list[Batch]] = {}
        self._block_ref: dict[str, list[torch.Tensor]] = {}
        self._seen_outputs: list[torch.Tensor] | None = None
        #: the layer's outputs on ``inputs`` as declared by :meth:`map_outputs` (None: not known)
        self.outputs: list[torch.Tensor] | None = None

    def observe(self, names: list[str], kinds: frozenset[str]) -> LayerStats:
        seen: list[torch.Tensor] | None = [] if LAYER_OUTPUT in names else None
        stats = observe(self.layer, names, kinds, self.inputs, self.device, seen)
        if seen is not None:
            self._seen_outputs = seen
        self.outputs = None  # whatever was declared before may no longer hold
        return stats

    def map_outputs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self._seen_outputs is None:
            raise RuntimeError("map_outputs needs the layer's outputs: observe LAYER_OUTPUT first")
        self.outputs = [fn(h) for h in self._seen_outputs]
        self._seen_outputs = None

    def original(self, name: str) -> torch.Tensor:
        if name not in self.originals:
            raise KeyError(f"no original weight kept for {name}: the pass must declare needs_original")
        return self.originals[name]

    def block_inputs(self, block: str) -> list[Batch]:
        """(args, kwargs) entering sub-block ``block`` for each calibration batch (on the CPU)."""
        if block not in self._block_inputs:
            captured: list[Batch] = []

            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                captured.append(to_cpu((args, kwargs)))
                raise StopForward

            h = self.layer.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
            try:
                for b in self.inputs:
                    try:
                        run_layer(self.layer, b, self.device)
                    except StopForward:
                        pass
            finally:
                h.remove()
            self._block_inputs[block] = captured
        return self._block_inputs[block]

    def _block_outputs(self, block: str, k: int | None = None) -> list[torch.Tensor]:
        mod = self.layer.get_submodule(block)
        return [run_layer(mod, b, self.device) for b in self.block_inputs(block)[:k]]

    def _batches_for(self, samples: int | None) -> int | None:
        """How many leading calibration batches hold ``samples`` sequences (None: all)."""
        if not samples:
            return None
        n = 0
        for k, b in enumerate(self.inputs, 1):
            n += hidden_of(b).shape[0]
            if n >= samples:
                return k
        return None

    def block_error(self, block: str, replace: dict[str, nn.Module], samples: int | None = None) -> float:
        k = self._batches_for(samples)
        key = block if k is None else f"{block}[:{k}]"
        if key not in self._block_ref:
            self._block_ref[key] = self._block_outputs(block, k)
        originals = {n: self.layer.get_submodule(n) for n in replace}
        for n, m in replace.items():
            set_submodule(self.layer, n, m)
        try:
            outs = self._block_outputs(block, k)
        finally:
            for n, m in originals.items():
                set_submodule(self.layer, n, m)
        return float(sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outs, self._block_ref[key])))


class ModelState:
    """The :class:`~compress.passes.base.ModelContext` of one layer loop: the model and the
    calibration inputs of the next layer, for every calibration source."""

    def __init__(self, model: nn.Module, adapter: ModelAdapter, device: torch.device, inputs_by: dict[str | None, list[Batch]],
                 plan: PassPlan | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.device = device
        self.inputs_by = inputs_by
        self.plan = plan or PassPlan()

    def input_stats(self, kinds: frozenset[str]) -> LinearStats:
        inputs = self.inputs_by.get(None)
        if not inputs:
            raise RuntimeError("no calibration inputs: the pass must declare requires_calibration")
        st = LinearStats(hidden_of(inputs[0]).shape[-1], kinds)
        for b in inputs:
            st.update(hidden_of(b).to(self.device))
        return st

    def _forward_layers(self, each: Callable[[list[torch.Tensor], list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """One layer-by-layer forward of the calibration set through the model as it is now; ``each``
        sees every layer's (inputs, outputs). Returns the last layer's outputs."""
        inputs = self.inputs_by[None]
        hs = [hidden_of(b) for b in inputs]
        for layer in self.adapter.layers(self.model):
            home = module_device(layer)
            layer.to(self.device)
            outs = [run_layer(layer, with_hidden(b, h), self.device).detach().to("cpu") for b, h in zip(inputs, hs)]
            layer.to(home)
            if each is not None:
                each(hs, outs)
            hs = outs
        return hs

    def block_influence(self) -> list[float]:
        """Per decoder layer, the mean over calibration tokens of 1 − cos(layer input, layer output)
        (block influence: how much the layer changes the residual stream), from one forward."""
        scores: list[float] = []

        def each(ins: list[torch.Tensor], outs: list[torch.Tensor]) -> None:
            total, n = 0.0, 0
            for x, y in zip(ins, outs):
                cos = torch.nn.functional.cosine_similarity(x.double().flatten(0, -2), y.double().flatten(0, -2), dim=-1)
                total += float((1 - cos).sum())
                n += cos.numel()
            scores.append(total / max(n, 1))

        self._forward_layers(each)
        return scores

    def head_input_stats(self, kinds: frozenset[str]) -> LinearStats:
        """Statistics of what the LM head reads (the final norm's output) on the calibration set, from
        one layer-by-layer forward of the model as it is now."""
        hs = self._forward_layers()
        norm = self.model.get_submodule(self.adapter.final_norm)
        home = module_device(norm)
        norm.to(self.device)
        st = LinearStats(hs[0].shape[-1], kinds)
        for h in hs:
            st.update(norm(h.to(self.device)))
        norm.to(home)
        return st

    def map_hidden(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for src, inputs in self.inputs_by.items():
            self.inputs_by[src] = [with_hidden(b, fn(hidden_of(b))) for b in inputs]


__all__ = ["LayerState", "ModelState", "observe", "map_tensors"]
