"""Layer-sequential compression.

Capture the inputs of decoder layer 0 (every positional and keyword argument), then for each
layer: move it to the compute device, for each pass and each sequential sub-group of linears let
the pass observe the group's inputs through hooks and apply it, then re-run the compressed layer
to produce the next layer's inputs (errors propagate as in GPTQ), and move the layer back. One
decoder layer and one batch of activations are on the device at a time; activations live on the
CPU between layers.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..modules import storage_bits, weight_count
from ..passes.base import Pass
from .stats import LayerStats

logger = logging.getLogger(__name__)

Batch = tuple[tuple[Any, ...], dict[str, Any]]


class _StopForward(Exception):
    """Raised by a hook to stop a forward pass once what is needed has been seen."""


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


@contextlib.contextmanager
def calibration_forward_context(model: nn.Module) -> Iterator[None]:
    """no_grad, eval mode and no KV cache for the duration of calibration."""
    was_training = model.training
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    model.eval()
    if config is not None and use_cache is not None:
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)
        if config is not None and use_cache is not None:
            config.use_cache = use_cache


def cleanup_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        before = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        logger.debug("cuda reserved memory %d -> %d bytes", before, torch.cuda.memory_reserved())


class LayerContext:
    """What a pass may use beyond a linear's statistics while one sub-group of one decoder layer is
    compressed: the layer, its calibration inputs, the compute device and the adapter. Sub-block
    inputs and reference outputs are captured lazily and cached for the sub-group."""

    def __init__(
        self, layer: nn.Module, inputs: list[Batch], device: torch.device, adapter: ModelAdapter,
        originals: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.layer = layer
        self.inputs = inputs
        self.device = device
        self.adapter = adapter
        self.originals = originals or {}
        self._block_inputs: dict[str, list[Batch]] = {}
        self._block_ref: dict[str, list[torch.Tensor]] = {}

    def block_inputs(self, block: str) -> list[Batch]:
        """(args, kwargs) entering sub-block ``block`` for each calibration batch (on the CPU)."""
        if block not in self._block_inputs:
            captured: list[Batch] = []

            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                captured.append(map_tensors((args, kwargs), lambda t: t.detach().to("cpu")))
                raise _StopForward

            h = self.layer.get_submodule(block).register_forward_pre_hook(hook, with_kwargs=True)
            try:
                for b in self.inputs:
                    try:
                        _run_layer(self.layer, b, self.device)
                    except _StopForward:
                        pass
            finally:
                h.remove()
            self._block_inputs[block] = captured
        return self._block_inputs[block]

    def original(self, name: str) -> torch.Tensor:
        """The weight of linear ``name`` (relative to the layer) before any pass of the recipe changed it."""
        if name not in self.originals:
            raise KeyError(f"no original weight kept for {name}: the pass must declare needs_original")
        return self.originals[name]

    def _block_outputs(self, block: str) -> list[torch.Tensor]:
        mod = self.layer.get_submodule(block)
        return [_run_layer(mod, b, self.device) for b in self.block_inputs(block)]

    def block_error(self, block: str, replace: dict[str, nn.Module]) -> float:
        """Σ‖out − ref‖² of sub-block ``block`` with the linears in ``replace`` (names relative to the
        layer) swapped in, against the block's output before any swap in this sub-group."""
        if block not in self._block_ref:
            self._block_ref[block] = self._block_outputs(block)
        originals = {n: self.layer.get_submodule(n) for n in replace}
        for n, m in replace.items():
            _set_submodule(self.layer, n, m)
        try:
            outs = self._block_outputs(block)
        finally:
            for n, m in originals.items():
                _set_submodule(self.layer, n, m)
        return float(sum(((o.float() - r.float()) ** 2).sum() for o, r in zip(outs, self._block_ref[block])))


@dataclass
class ModuleRecord:
    """One compressed (or examined) linear, for the manifest and the per-layer table."""

    layer: int
    name: str
    pass_name: str
    module_type: str
    shape: tuple[int, int]
    params_before: int
    params_after: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)
    bits_before: int = 0
    bits_after: int = 0




def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def capture_layer0_inputs(
    model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[Batch]:
    """Run the model up to decoder layer 0 and keep the layer's (args, kwargs) for each batch, on the CPU."""
    layers = adapter.layers(model)
    captured: list[Batch] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        cpu = lambda t: t.detach().to("cpu")  # noqa: E731
        captured.append((map_tensors(args, cpu), map_tensors(kwargs, cpu)))
        raise _StopForward

    # everything but the decoder layers runs on the compute device during the capture
    restore = _move_outside_layers(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
        restore()
    if len(captured) == 0:
        raise RuntimeError("the forward pass never reached decoder layer 0")
    return captured


def _move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Callable[[], None]:
    """Move the parameters and buffers that are not inside the decoder layers to ``device``;
    return a function that moves them back."""
    inside = {id(m) for m in layers.modules()}
    saved: list[tuple[nn.Module, str, str, torch.device]] = []
    for m in model.modules():
        if id(m) in inside:
            continue
        for kind, store in (("p", m._parameters), ("b", m._buffers)):
            for k, t in store.items():
                if t is not None and t.device != device:
                    saved.append((m, kind, k, t.device))
                    if kind == "p":
                        t.data = t.data.to(device)
                    else:
                        store[k] = t.to(device)

    def restore() -> None:
        for m, kind, k, dev in saved:
            if kind == "p":
                m._parameters[k].data = m._parameters[k].data.to(dev)  # type: ignore[union-attr]
            else:
                m._buffers[k] = m._buffers[k].to(dev)  # type: ignore[union-attr]

    return restore


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _hidden_of(batch: Batch) -> torch.Tensor:
    args, kwargs = batch
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(batch: Batch, hidden: torch.Tensor) -> Batch:
    args, kwargs = batch
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_layer(layer: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    args, kwargs = map_tensors(batch, lambda t: t.to(device))
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _observe(
    layer: nn.Module, names: list[str], kinds: frozenset[str], inputs: list[Batch], device: torch.device
) -> LayerStats:
    """Run the calibration batches through ``layer`` with hooks on ``names``; stop each forward as
    soon as every hooked linear has seen its input."""
    stats = LayerStats(kinds)
    seen: set[str] = set()

    def make_hook(name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
            stats.observe(name, args[0].detach())
            seen.add(name)
            if len(seen) == len(names):
                raise _StopForward

        return hook

    handles = [layer.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for batch in inputs:
            seen.clear()
            stats.reset_sharing()
            try:
                _run_layer(layer, batch, device)
            except _StopForward:
                pass
    finally:
        for h in handles:
            h.remove()
    stats.reset_sharing()
    return stats


@dataclass
class PipelineResult:
    records: list[ModuleRecord]
    layer_seconds: list[float]
    calibration_tokens: int


def run_sequential(
    model: nn.Module,
    adapter: ModelAdapter,
    passes: list[Pass],
    input_ids: torch.Tensor | None,
    *,
    device: torch.device,
    batch_size: int = 8,
    on_layer: Callable[[int, int, float], None] | None = None,
    stats_provider: Callable[[int, list[str], frozenset[str]], LayerStats] | None = None,
    extra_ids: dict[str, torch.Tensor] | None = None,
) -> PipelineResult:
    """Apply ``passes`` to ``model`` in place, layer by layer.

    ``input_ids`` (n_samples, seqlen) is required when any pass requires calibration, unless
    ``stats_provider(layer_index, names, kinds)`` supplies precomputed statistics (sweeps reuse the
    dense model's statistics across grid points: no calibration forward at all, no propagation).
    Passes that read the layer's inputs themselves (``uses_layer_inputs``) still get them.
    A pass whose ``calib_source`` names another calibration set observes the inputs produced from
    ``extra_ids[calib_source]``, propagated through the compressed layers like the main set.
    Passes that declare ``needs_original`` can read each linear's weight from before the recipe
    through the LayerContext. ``on_layer(index, total, seconds)`` is called after each layer.
    """
    layers = adapter.layers(model)
    extra_ids = extra_ids or {}

    def source(p: Pass) -> str | None:
        return getattr(p, "calib_source", None) or None

    def needs_inputs(p: Pass) -> bool:
        return p.requires_calibration and (stats_provider is None or p.uses_layer_inputs or source(p) is not None)

    sources = {source(p) for p in passes if needs_inputs(p)}
    if any(p.uses_layer_inputs for p in passes):
        sources.add(None)
    keep_originals = any(getattr(p, "needs_original", False) for p in passes)
    records: list[ModuleRecord] = []
    layer_seconds: list[float] = []
    with calibration_forward_context(model):
        for p in passes:
            p.prepare(model, adapter)
        inputs_by: dict[str | None, list[Batch]] = {}
        for src in sources:
            ids = input_ids if src is None else extra_ids.get(src)
            if ids is None:
                raise ValueError(f"a pass requires calibration data{'' if src is None else f' from {src}'} but none was given")
            inputs_by[src] = capture_layer0_inputs(model, adapter, ids, batch_size, device)
        prefix = adapter.layers_path
        for i, layer in enumerate(layers):
            t_layer = time.perf_counter()
            home = _module_device(layer)
            layer.to(device)
            # the layer's linears as they were before any pass replaced them
            groups = adapter.groups(layer)
            originals = (
                {n: layer.get_submodule(n).weight.detach().clone() for g in groups for n in g} if keep_originals else None
            )
            for p in passes:
                for group in groups:
                    targets = [n for n in group if p.targets(n, layer.get_submodule(n))]
                    if not targets:
                        continue
                    if not p.requires_calibration:
                        stats = None
                    elif stats_provider is not None and source(p) is None:
                        stats = stats_provider(i, targets, p.statistics)
                    else:
                        stats = _observe(layer, targets, p.statistics, inputs_by[source(p)], device)
                    context = LayerContext(layer, inputs_by.get(None, []), device, adapter, originals)
                    for n in targets:
                        module = layer.get_submodule(n)
                        t0 = time.perf_counter()
                        before, bits_before = weight_count(module), storage_bits(module)
                        shape = _linear_shape(module)
                        full = f"{prefix}.{i}.{n}"
                        result = p.apply(full, module, stats.pop(n) if stats is not None else None, context)
                        new = result.module if result.module is not None else module
                        if result.module is not None:
                            _set_submodule(layer, n, result.module)
                        records.append(
                            ModuleRecord(
                                layer=i,
                                name=full,
                                pass_name=p.name,
                                module_type=type(new).__name__,
                                shape=shape,
                                params_before=before,
                                params_after=weight_count(new),
                                seconds=time.perf_counter() - t0,
                                info=result.info,
                                bits_before=bits_before,
                                bits_after=storage_bits(new),
                            )
                        )
                    del stats, context
            if i + 1 < len(layers):
                for src, inputs in inputs_by.items():
                    inputs_by[src] = [_with_hidden(b, _run_layer(layer, b, device).detach().to("cpu")) for b in inputs]
            del originals
            layer.to(home)
            cleanup_memory()
            layer_seconds.append(time.perf_counter() - t_layer)
            logger.debug("layer %d/%d done in %.1f s", i + 1, len(layers), layer_seconds[-1])
            if on_layer is not None:
                on_layer(i, len(layers), layer_seconds[-1])
    n_tokens = 0 if input_ids is None or None not in inputs_by else int(input_ids.numel())
    return PipelineResult(records, layer_seconds, n_tokens)


def profile_statistics(
    model: nn.Module,
    adapter: ModelAdapter,
    input_ids: torch.Tensor,
    kinds: frozenset[str],
    *,
    device: torch.device,
    batch_size: int = 8,
    on_layer: Callable[[int, LayerStats], None],
) -> None:
    """Statistics of every linear of the (unchanged) model in one forward per layer: the profile a
    sweep reuses across its grid. ``on_layer(index, stats)`` receives each layer's statistics."""
    layers = adapter.layers(model)
    with calibration_forward_context(model):
        inputs = capture_layer0_inputs(model, adapter, input_ids, batch_size, device)
        for i, layer in enumerate(layers):
            home = _module_device(layer)
            layer.to(device)
            names = [n for g in adapter.groups(layer) for n in g]
            stats = LayerStats(kinds)
            handles = [
                layer.get_submodule(n).register_forward_pre_hook(
                    lambda _m, a, n=n: stats.observe(n, a[0].detach())  # type: ignore[misc]
                )
                for n in names
            ]
            try:
                outs = []
                for b in inputs:
                    stats.reset_sharing()
                    outs.append(_run_layer(layer, b, device).detach().to("cpu"))
            finally:
                for h in handles:
                    h.remove()
            stats.reset_sharing()
            inputs = [_with_hidden(b, o) for b, o in zip(inputs, outs)]
            layer.to(home)
            on_layer(i, stats)
            cleanup_memory()


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    out_f = getattr(module, "out_features", None)
    in_f = getattr(module, "in_features", None)
    if out_f is None or in_f is None:
        w = getattr(module, "weight")
        return int(w.shape[0]), int(w.shape[1])
    return int(out_f), int(in_f)
