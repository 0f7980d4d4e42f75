"""Loss-gradient statistics of every target linear of the dense model (the budget search and global
allocations read them): the Gram of its inputs and the mean squared gradient of the calibration loss at
each of its outputs, from one backward pass.

The backward pass is walked one decoder layer at a time, the way the rest of the engine works: a
forward keeps every layer's input hidden states (on the CPU), the head gives the gradient at the last
layer's output, then each layer from the top down is run again with gradients on, and its input
gradient becomes the output gradient of the layer below. Only one layer's graph exists at a time. The
weights' own gradients are never formed.

For a target with inputs x and output gradients g (per token, of the summed token loss), the loss
grows by about ½·E[(gᵀ ΔW x)²] when W becomes W + ΔW (the Fisher approximation of the curvature).
Taking g independent of x and keeping the diagonal of E[g gᵀ] gives the estimate
½ · Σᵢ E[gᵢ²] · (ΔW H ΔWᵀ)ᵢᵢ with H = E[x xᵀ] (:func:`compress.solvers.metrics.predicted_increase`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..adapters.base import ModelAdapter
from ..errors import CompressError
from .capture import Batch, capture_layer0_inputs, hidden_of, module_device, move_outside_layers, run_layer, with_hidden
from .context import calibration_forward_context

#: accumulation precision of the statistics
STAT_DTYPE = torch.float64
#: calibration sequences the statistics read (the first of a run's set): the gradient pass costs about
#: three forwards of them
SEARCH_SAMPLES = 16


@dataclass
class TargetStats:
    """The statistics of one target (full name)."""

    #: E[x xᵀ] over the calibration tokens (shared by the linears that read the same input)
    gram: torch.Tensor
    #: E[gᵢ²] per output channel (g: gradient of the summed token loss at the output)
    grad_sq: torch.Tensor
    #: E[g gᵀ] (with ``full=True``): the estimate keeps the correlations between outputs
    grad_cov: torch.Tensor | None = None


@dataclass
class SensitivityStats:
    targets: dict[str, TargetStats]
    tokens: int
    #: mean calibration loss of the dense model (nats per token)
    loss: float
    seconds: dict[str, float] = field(default_factory=dict)


def _head(model: nn.Module, adapter: ModelAdapter) -> tuple[nn.Module, nn.Module]:
    missing = [f for f in ("final_norm", "lm_head") if not getattr(adapter, f)]
    if missing:
        raise CompressError(f"--budget needs the model's final norm and output head, which adapter '{adapter.name}' does not name "
                            f"(missing: {', '.join(missing)}); compress this model with --pass instead")
    return model.get_submodule(adapter.final_norm), model.get_submodule(adapter.lm_head)


def sensitivity_statistics(model: nn.Module, adapter: ModelAdapter, input_ids: torch.Tensor, *, device: torch.device,
                           batch_size: int, full: bool = False) -> SensitivityStats:
    """Grams and output-gradient second moments of every target linear over ``input_ids`` (with
    ``full``, the whole output-gradient covariance E[g gᵀ], d_out² per target)."""
    layers = adapter.layers(model)
    norm, head = _head(model, adapter)
    t0 = time.perf_counter()
    with calibration_forward_context(model):
        batches = capture_layer0_inputs(model, adapter, input_ids, batch_size, device)
        hidden = [[hidden_of(b) for b in batches]]
        for layer in layers:  # keep every layer's inputs
            home = module_device(layer)
            layer.to(device)
            hidden.append([run_layer(layer, with_hidden(b, h), device).to("cpu") for b, h in zip(batches, hidden[-1])])
            layer.to(home)
    seconds = {"forward": time.perf_counter() - t0}
    requires = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        t0 = time.perf_counter()
        grads, loss = _head_gradients(model, layers, norm, head, hidden.pop(), input_ids, batch_size, device)
        seconds["head"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats: dict[str, TargetStats] = {}
        tokens = int(input_ids.numel())
        for i in reversed(range(len(layers))):
            grads = _layer_backward(i, layers[i], adapter, batches, hidden.pop(), grads, device, tokens, stats, full)
        seconds["backward"] = time.perf_counter() - t0
    finally:
        model.train(was_training)
        for p in model.parameters():
            p.requires_grad_(requires[id(p)])
    return SensitivityStats(stats, tokens, loss, seconds)


def _head_gradients(model: nn.Module, layers: nn.ModuleList, norm: nn.Module, head: nn.Module, last: list[torch.Tensor],
                    input_ids: torch.Tensor, batch_size: int, device: torch.device) -> tuple[list[torch.Tensor], float]:
    """Gradients of the summed next-token loss at the last layer's outputs, and the mean loss."""
    restore = move_outside_layers(model, layers, device)
    grads, total, count = [], 0.0, 0
    try:
        for k, h in enumerate(last):
            ids = input_ids[k * batch_size : k * batch_size + h.shape[0]].to(device)
            x = h.to(device).requires_grad_(True)
            with torch.enable_grad():
                logits = head(norm(x)).float()
                loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                loss.backward()
            assert x.grad is not None
            grads.append(x.grad.to("cpu"))
            total += float(loss.detach())
            count += int(ids[:, 1:].numel())
    finally:
        restore()
    return grads, total / max(count, 1)


def _layer_backward(i: int, layer: nn.Module, adapter: ModelAdapter, batches: list[Batch], inputs: list[torch.Tensor],
                    grads: list[torch.Tensor], device: torch.device, tokens: int, stats: dict[str, TargetStats],
                    full: bool = False) -> list[torch.Tensor]:
    """Rerun layer ``i`` with gradients, accumulate its targets' statistics, return its input gradients."""
    home = module_device(layer)
    layer.to(device)
    groups = adapter.groups(layer)
    grams: dict[str, torch.Tensor] = {}
    grad_sq: dict[str, torch.Tensor] = {}
    grad_cov: dict[str, torch.Tensor] = {}

    def add(into: dict[str, torch.Tensor], key: str, value: torch.Tensor) -> None:
        into[key] = into[key] + value if key in into else value
    handles = []

    def on_input(key: str) -> Any:
        def hook(_m: nn.Module, a: tuple[Any, ...]) -> None:
            x = a[0].detach().reshape(-1, a[0].shape[-1]).to(STAT_DTYPE)
            add(grams, key, x.T @ x)
        return hook

    def on_output(name: str) -> Any:
        def hook(_m: nn.Module, _a: tuple[Any, ...], out: torch.Tensor) -> None:
            def acc(g: torch.Tensor) -> None:
                g2 = g.detach().reshape(-1, g.shape[-1]).to(STAT_DTYPE)
                add(grad_sq, name, g2.square().sum(0))
                if full:
                    add(grad_cov, name, g2.T @ g2)
            out.register_hook(acc)
        return hook

    for group in groups:  # the linears of a sub-group read the same input
        handles.append(layer.get_submodule(group[0]).register_forward_pre_hook(on_input(group[0])))
        for n in group:
            handles.append(layer.get_submodule(n).register_forward_hook(on_output(n)))
    below = []
    try:
        with torch.enable_grad():
            for b, h, g in zip(batches, inputs, grads):
                x = h.to(device).requires_grad_(True)
                out = run_layer(layer, with_hidden(b, x), device)
                out.backward(g.to(device))
                assert x.grad is not None
                below.append(x.grad.to("cpu"))
    finally:
        for hd in handles:
            hd.remove()
        layer.to(home)
    for group in groups:
        H = (grams[group[0]] / tokens).to(torch.float32)
        for n in group:
            cov = (grad_cov[n] / tokens).to(torch.float32) if full else None
            stats[f"{adapter.layers_path}.{i}.{n}"] = TargetStats(H, (grad_sq[n] / tokens).to(torch.float32), cov)
    return below
