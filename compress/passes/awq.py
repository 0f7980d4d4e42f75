"""``awq``: activation-aware per-input-channel scales (Lin et al., arXiv 2306.00978), folded exactly
into the norm or linear that produces each input, for the ``rtn`` or ``gptq`` pass that follows.

Per decoder layer, four scale groups (from the adapter's layout):

- attention norm → q/k/v, measured through the attention block;
- v → o (query heads that share a key/value head share the scale of its channel, so grouped-query
  attention is covered too), measured on o's output (through o's input Gram: ‖X(W − Ŵ)ᵀ‖² = tr(ΔHΔᵀ));
- MLP norm → gate/up, measured through the MLP;
- up → down, measured on down's output (through down's input Gram).

For each group the pass tries the identity and ``grid`` exponents α (see
:mod:`compress.solvers.awq`), each by quantizing the scaled weights round-to-nearest with the
bits, group size and symmetry of the quantization pass that follows it in the recipe, and keeps the
scale with the smallest squared error of the sub-block's output over the calibration set. The model
computes the same function after the fold (to float rounding); the quantization pass then sees the
scaled weights. A group whose linears the quantization pass does not target is left alone.

Example::

    compress run MODEL --pass awq --pass gptq:bits=4,group=128 --out out/awq-gptq
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, TypeGuard, cast

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules.base import weight_of
from ..registry import register_pass
from ..solvers.awq import candidate_scales, fake_quantized, kv_expand, reduce_to, weight_column_mean
from ..solvers.metrics import output_error
from ..solvers.quant import QuantSpec
from .base import Capabilities, LayerContext, LayerPass, PassPlan, Shapes, Site, matches, require_layout

logger = logging.getLogger(__name__)


@dataclass
class AWQConfig(PassConfig):
    grid: int = option(20, "exponents α = i/grid tried per scale group (plus the identity)", min=1)
    duo: bool = option(True, "scales from activations and weights, x̄^α / w̄^(1−α) (false: x̄^α alone)")
    vo: bool = option(True, "also scale the value → output projection pair")
    samples: int = option(0, "calibration sequences the scale search runs the attention and MLP blocks on (0 = all; the "
                          "channel magnitudes always use all); fewer is proportionally faster", min=0)


@dataclass(frozen=True)
class _Group:
    name: str
    prev: str  # the module producing the input: a norm or a linear
    linears: tuple[str, ...]
    block: str  # whose output measures the error


@dataclass(frozen=True)
class _Target:
    """The quantization pass AWQ prepares the weights for, as the recipe gives it."""

    spec: QuantSpec
    pattern: str
    label: str
    #: the llama.cpp block type the pass quantizes to (its ``format``), None for the integer grid
    ggml_type: str | None = None


def _target(plan: PassPlan) -> _Target | None:
    """The first rtn or gptq pass after awq in the recipe (None when there is none)."""
    from .quant import GPTQConfig, RTNConfig

    q = next((p for p in plan.later if isinstance(p.config, (RTNConfig, GPTQConfig))), None)
    if q is None:
        return None
    c = q.config
    assert isinstance(c, RTNConfig)
    if c.format != "int":
        from ..solvers.ggml import TYPES

        t = TYPES[c.format]
        return _Target(QuantSpec(bits=t.bits, group_size=t.sub, sym=t.form != "affine", dim="oc"), c.targets,
                       f"{q.name}:format={c.format}", c.format)
    return _Target(QuantSpec(bits=c.bits, group_size=c.group, sym=c.sym, dim=c.dim), c.targets, f"{q.name}:bits={c.bits},group={c.group}")


@register_pass
class AWQPass(LayerPass[AWQConfig]):
    """AWQ: searched per-input-channel scales folded into the preceding norm or linear."""

    name = "awq"
    accepts_reason = "it rescales dense weights before they are quantized"

    def capabilities(self) -> Capabilities:
        return Capabilities(requires_calibration=True, uses_layer_inputs=True)

    # -- before any compute ----------------------------------------------------------------------

    def check(self, site: Site) -> Shapes:
        adapter, model = site.adapter, site.model
        missing = [n for n in ("attn_norm", "mlp_norm", "attention") if not getattr(adapter, n)]
        missing += [n for n, v in (("attn_inputs", adapter.attn_inputs), ("mlp_inputs", adapter.mlp_inputs)) if not v]
        missing += [n for n in ("attn_output", "mlp_output") if not getattr(adapter, n)]
        require_layout(self.name, adapter, "norm → linear layout", missing)
        if site.plan.before:
            raise ConfigError(f"awq searches its scales on the dense model, but {', '.join(p.name for p in site.plan.before)} runs before it "
                              "here: put awq first")
        target = _target(site.plan)
        if target is None:
            after = ", ".join(p.name for p in site.plan.later) or "nothing"
            raise ConfigError(f"awq only rescales weights for the rtn or gptq pass that follows it, and {after} follows it here: "
                              "add one after it, e.g. --pass awq --pass gptq:bits=4,group=128")
        if target.spec.dim == "ic":
            q = target.label.split(":")[0]
            raise ConfigError(f"awq's per-input-channel scales cancel out under {q}:dim=ic (each group lies inside one input "
                              f"column); use {q}:dim=oc or dim=ada")
        layer = adapter.layers(model)[0]
        for g in self._groups(adapter, target.pattern):
            mod = layer.get_submodule(g.prev)
            if not isinstance(mod, nn.Linear) and not _scales_with_weight(mod):
                raise ConfigError(f"awq cannot fold scales into {g.prev} ({type(mod).__name__}): its output is not proportional "
                                  f"to its weight; run {target.label} without awq")
            if g.name == "vo":  # the head layout, before the first layer rather than inside it
                self._kv_map(model.config, mod, layer.get_submodule(g.linears[0]))
        return site.shapes

    # -- layout ----------------------------------------------------------------------------------

    def _groups(self, adapter: ModelAdapter, pattern: str) -> list[_Group]:
        """The scale groups of a layer; the value → output and up → down groups need separate v and up
        projections (a layout that fuses them into qkv / gate_up has only the two norm groups)."""
        a = adapter
        groups = [_Group("attn", a.attn_norm, tuple(a.attn_inputs), a.block_of(a.attn_inputs[0]) or a.attention)]
        if a.v_proj and self.config.vo:
            groups.append(_Group("vo", a.v_proj, (a.attn_output,), a.attn_output))
        groups.append(_Group("mlp", a.mlp_norm, tuple(a.mlp_inputs), a.block_of(a.mlp_inputs[0]) or a.mlp_output))
        if a.up_proj:
            groups.append(_Group("ud", a.up_proj, (a.mlp_output,), a.mlp_output))
        return [g for g in groups if all(matches(n, pattern) for n in g.linears)]

    @staticmethod
    def _kv_map(cfg: Any, v: nn.Module, o: nn.Module) -> torch.Tensor | None:
        """o's input channel → v's output channel (None when they are the same channels)."""
        assert isinstance(v, nn.Linear) and isinstance(o, nn.Linear)
        if v.out_features == o.in_features:
            return None
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        if heads * hd != o.in_features or kv * hd != v.out_features or heads % kv:
            raise ConfigError(f"awq: cannot map the attention output's {o.in_features} inputs to the value projection's "
                              f"{v.out_features} outputs; run with awq:vo=false")
        return kv_expand(heads, kv, hd)

    # -- per layer -------------------------------------------------------------------------------

    def compress_layer(self, index: int, layer: nn.Module, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        target = _target(ctx.plan)
        assert target is not None
        spec = QuantSpec(bits=target.spec.bits, group_size=target.spec.group_size, sym=target.spec.sym, dim="oc")
        adapter = ctx.adapter
        groups = self._groups(adapter, target.pattern)
        firsts = [g.linears[0] for g in groups]
        # a group measured on one linear's own output (o, down) needs only that input's Gram:
        # ‖X(W − Ŵ)ᵀ‖² = tr(ΔHΔᵀ), far cheaper per candidate than re-running the linear on every token
        stats = ctx.observe(firsts, frozenset({"abs_mean", "gram"}))
        infos: dict[str, dict[str, Any]] = {}
        for g in groups:
            prev = layer.get_submodule(g.prev)
            mods = [layer.get_submodule(n) for n in g.linears]
            if not _all_plain_linears(mods):
                raise ConfigError(f"awq: {g.linears[0]} in layer {index} is no longer a plain linear; put awq first in the recipe")
            x_mean = stats.linears[g.linears[0]].mean_abs.float()
            W = torch.cat([m.weight.detach() for m in mods], dim=0)
            w_mean = weight_column_mean(W, spec.group_size) if self.config.duo else None
            expand = self._kv_map(ctx.config, prev, mods[0]) if g.name == "vo" else None
            if expand is not None:  # one scale per value channel, shared by the query heads that read it
                assert isinstance(prev, nn.Linear)  # the value projection (checked by _kv_map)
                x_mean = reduce_to(x_mean, expand, prev.out_features)
                w_mean = reduce_to(w_mean, expand, prev.out_features) if w_mean is not None else None
            best: tuple[float, float | None, torch.Tensor] | None = None
            plain = 0.0
            own = g.linears == (g.block,)
            H = cast(torch.Tensor, stats.linears[g.linears[0]].gram).to(W.device, torch.float32) if own else None  # observed above
            for alpha, s in candidate_scales(x_mean, w_mean, self.config.grid):
                s_in = s[expand] if expand is not None else s
                if H is not None:
                    D = mods[0].weight.detach().float() - fake_quantized(mods[0].weight.detach(), s_in.to(W.device), spec, target.ggml_type).float()
                    err = output_error(D, H)
                else:
                    trial: dict[str, nn.Module] = {n: _with_weight(m, fake_quantized(m.weight.detach(), s_in.to(m.weight.device), spec, target.ggml_type))
                             for n, m in zip(g.linears, mods)}
                    err = ctx.block_error(g.block, trial, samples=self.config.samples or None)
                if alpha is None:
                    plain = err
                if best is None or err < best[0]:
                    best = (err, alpha, s)
            assert best is not None
            err, alpha, s = best
            if alpha is not None:
                _fold(prev, mods, s, expand)
            info = {"awq_alpha": alpha, "awq_error_vs_plain": err / plain if plain > 0 else 1.0, "awq_for": target.label}
            for n in g.linears:
                infos[n] = info
        return infos


def _all_plain_linears(mods: list[nn.Module]) -> TypeGuard[list[nn.Linear]]:
    """Whether every module is a plain ``nn.Linear`` (not a subclass)."""
    return all(type(m) is nn.Linear for m in mods)


def _with_weight(m: nn.Linear, W: torch.Tensor) -> nn.Linear:
    """A linear like ``m`` (its bias shared) with weight ``W``."""
    t = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
    t.weight = nn.Parameter(W, requires_grad=False)
    t.bias = m.bias
    return t


def _scales_with_weight(norm: nn.Module) -> bool:
    """Whether doubling the module's weight (and bias) doubles its output (an RMSNorm or LayerNorm
    with an affine weight does; Gemma's 1 + weight does not)."""
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.is_meta:
        return isinstance(w, torch.Tensor) and w.dim() == 1  # on the meta device: checked again when the layer is loaded
    test = copy.deepcopy(norm).float()
    x = torch.randn(2, w.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = test(x)
        weight_of(test).mul_(2)
        if getattr(test, "bias", None) is not None:
            cast(torch.Tensor, test.bias).mul_(2)
        y2 = test(x)
    return bool(torch.allclose(y2, 2 * y, rtol=1e-4, atol=1e-5))


@torch.no_grad()
def _fold(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, expand: torch.Tensor | None) -> None:
    """Divide what ``prev`` produces by s (a norm's weight, a linear's output rows) and multiply the
    input columns of ``linears`` by s: the same function, scaled weights."""
    if not isinstance(prev, nn.Linear) and not _scales_with_weight(prev):
        raise ConfigError(f"awq cannot fold scales into a {type(prev).__name__}: its output is not proportional to its weight")
    w = weight_of(prev)
    sd = s.to(w.device, torch.float64)
    if isinstance(prev, nn.Linear):
        w.copy_((w.double() / sd[:, None]).to(w.dtype))
    else:
        w.copy_((w.double() / sd).to(w.dtype))
    b = getattr(prev, "bias", None)
    if b is not None:
        b.copy_((b.double() / sd).to(b.dtype))
    s_in = sd[expand.to(w.device)] if expand is not None else sd
    for m in linears:
        m.weight.copy_((m.weight.double() * s_in[None, :]).to(m.weight.dtype))
