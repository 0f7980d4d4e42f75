"""Capturing and replaying decoder-layer inputs.

The inputs of decoder layer 0 are captured with a forward pre-hook that keeps every positional and
keyword argument (newer models pass ``position_embeddings``, ``cache_position`` ...) and stops the
forward with a private exception. A calibration batch is then the ``(args, kwargs)`` pair; the
engine replaces its hidden states as they flow through the compressed layers.
"""

from __future__ import annotations

from typing import Any, Callable, cast

import torch
from torch import nn

from ..adapters.base import ModelAdapter

Batch = tuple[tuple[Any, ...], dict[str, Any]]


class StopForward(Exception):
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


def to_cpu(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.detach().to("cpu"))


def hidden_of(batch: Batch) -> torch.Tensor:
    """The hidden states of a captured batch."""
    args, kwargs = batch
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(batch: Batch, hidden: torch.Tensor) -> Batch:
    """The same batch with other hidden states."""
    args, kwargs = batch
    if args:
        return (hidden,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def run_layer(layer: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """Run ``layer`` on one captured batch (moved to ``device``) and return its hidden-state output."""
    args, kwargs = map_tensors(batch, lambda t: t.to(device))
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at ``name`` under ``root``; it joins the dense-cache scopes its parent is in."""
    from ..modules.base import adopt_scope

    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    adopt_scope(parent, new)
    setattr(parent, child, new)


def module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(d_out, d_in) of a plain or compressed linear."""
    out_f = getattr(module, "out_features", None)
    in_f = getattr(module, "in_features", None)
    if out_f is None or in_f is None:
        w = getattr(module, "weight")
        return int(w.shape[0]), int(w.shape[1])
    return int(out_f), int(in_f)


def move_outside_layers(model: nn.Module, layers: nn.ModuleList, device: torch.device) -> Callable[[], None]:
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
                    else:  # store is m._buffers
                        cast("dict[str, torch.Tensor | None]", store)[k] = t.to(device)

    def restore() -> None:
        for m, kind, k, dev in saved:
            if kind == "p":
                m._parameters[k].data = m._parameters[k].data.to(dev)  # type: ignore[union-attr]
            else:
                m._buffers[k] = m._buffers[k].to(dev)  # type: ignore[union-attr]

    return restore


def capture_layer0_inputs(
    model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, batch_size: int, device: torch.device
) -> list[Batch]:
    """Run the model up to decoder layer 0 and keep the layer's (args, kwargs) for each batch, on the CPU."""
    layers = adapter.layers(model)
    captured: list[Batch] = []

    def hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((to_cpu(args), to_cpu(kwargs)))
        raise StopForward

    # everything but the decoder layers runs on the compute device during the capture
    restore = move_outside_layers(model, layers, device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except StopForward:
                pass
    finally:
        handle.remove()
        restore()
    if len(captured) == 0:
        raise RuntimeError("the forward pass never reached decoder layer 0")
    return captured
