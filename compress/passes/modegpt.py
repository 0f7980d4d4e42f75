"""MoDeGPT: reduce the inner width of each decoder layer's three module pairs (arXiv 2408.09632).

The pass removes a fraction ``ratio`` of the decoder layers' linear parameters, without a gradient step:
the MLP's intermediate width (Nyström), the query/key head width (CR, in whole rotary pairs, per
key-value group) and the value/output head width (whitened SVD per key-value group), leaving dense,
smaller matrices (faster on any hardware). Math: :mod:`compress.solvers.modular`; attention with
reduced widths: :mod:`compress.modules.modular`.

Per-layer sparsity φ (the fraction of the layer's linear parameters removed): ``allocate=global``
(default) takes φ = L·ratio·softmax(−s/ε) over the block-influence scores s (1 − cos of a layer's
input and output, from one forward of the dense model before the first layer), capped at
``max_sparsity``; ``allocate=uniform`` takes φ = ratio in every layer. Removing φ of every module's
inner width removes φ of the layer's linear parameters, so ``ratio`` is the fraction of all decoder
linear parameters removed, up to rounding (reported).

Choices where the paper is silent, with the reason:

* the value–output factorization is the exact optimum of the stated objective (the stacked
  O_h·W_v of a group's query heads, whitened by the input correlation), not the unofficial
  implementation's SVD of the whitened W_v alone;
* MLP channels are ranked by their removal cost, not by leverage alone (``select``; the solver says why);
* query/key scores use the diagonal energies of W_q C W_qᵀ and W_k C W_kᵀ (the paper's column norms
  of C_q^{1/2}, C_k^{1/2});
* a q/k/v bias (Qwen2) enters both solvers as an input column ([W | b] on [x; 1]): Qwen2.5's q/k
  biases carry 22–100 % of those outputs' energy, and its value bias often cancels the mean of W_v x;
* each part is re-observed on the layer as the earlier parts left it (attention first, then the MLP
  on the compressed attention's output), like the engine's other passes.

Qwen3's per-head q/k norms normalize over the whole head width, so query–key slicing would change
them: there the pass is refused unless ``parts`` leaves out ``qk``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping, cast

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..config import PassConfig, option
from ..errors import ConfigError
from ..modules.base import CompressedLinear, hf_config, linear_at, set_linear_weight, weight_of
from ..modules.modular import NO_DENSE_REASON, full_rope_index, make_modular
from ..pipeline.stats import LinearStats
from ..registry import register_pass
from ..solvers.allocate import allocate_sparsity, knapsack
from ..solvers.modular import MLP_RIDGE, MLP_SELECT, affine_system, cr_qk, nystrom_errors, nystrom_mlp, qk_errors, svd_vo, vo_errors
from .base import Capabilities, LayerContext, ModelContext, ModelPass, PassPlan, Shapes, Site, Stored, layer_relative_name, require_layout

logger = logging.getLogger(__name__)

PARTS = ("mlp", "qk", "vo")


@dataclass
class MoDeGPTConfig(PassConfig):
    ratio: float = option(0.25, "fraction of the decoder layers' linear parameters removed", min=0.0, max=1.0, min_open=True, max_open=True)
    allocate: str = option(
        "global", "per-layer sparsity: from block-influence scores ('global'), the same in every layer ('uniform'), or a knapsack "
        "over each layer's measured relative reconstruction errors ('knapsack')", choices=("global", "uniform", "knapsack"))
    temperature: float = option(0.1, "global allocation: softmax temperature ε over block influence (smaller: more uneven)", min=0.0, min_open=True)
    max_sparsity: float = option(0.8, "global allocation: the most any layer loses", min=0.0, max=1.0, min_open=True, max_open=True)
    parts: str = option("mlp+qk+vo", "modules to reduce, '+'-separated: mlp (Nyström), qk (CR), vo (SVD)")
    ridge: float = option(MLP_RIDGE, "MLP selection ridge, times the mean diagonal of the correlation", min=0.0, min_open=True)
    select: str = option("obs", "MLP channels kept: largest removal cost ‖W_down[:,i]‖²/[(C+λI)⁻¹]_ii ('obs'), or the paper's leverage of C alone", choices=MLP_SELECT)
    round_to: int = option(8, "round each layer's kept MLP width to a multiple of this", min=1)


def _projections(adapter: ModelAdapter) -> tuple[str, str, str, str]:
    """The adapter's q, k, v and o projections, relative to its attention module."""
    q, k, v, o = (n.removeprefix(adapter.attention + ".") for n in (adapter.q_proj, adapter.k_proj, adapter.v_proj, adapter.o_proj))
    return q, k, v, o


#: statistics of the attention input: its Gram, and its sum for a q/k/v bias
ATTN_KINDS = frozenset({"gram", "mean"})


def _affine(st: LinearStats, lins: list[nn.Linear]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    assert st.gram is not None  # the solvers run where the statistics are (the CPU), as set_linear_weight moves results back
    dev = st.gram.device
    return affine_system(st.gram, st.x_sum, st.n_tokens, [m.weight.detach().to(dev) for m in lins],
                         [None if m.bias is None else m.bias.detach().to(dev) for m in lins])


@dataclass(frozen=True)
class _Geometry:  # query heads, key-value heads, head width, hidden size, MLP width
    heads: int; kv_heads: int; head_dim: int; hidden: int; intermediate: int  # noqa: E702


@register_pass
class MoDeGPTPass(ModelPass[MoDeGPTConfig]):
    """MoDeGPT: Nyström MLP, CR query–key, SVD value–output, with a global sparsity allocation."""

    name = "modegpt"
    accepts_reason = "it reduces the inner widths of dense module pairs"
    whole_model_reason = "is a model-level pass (it sets every layer's sparsity from the whole model before the first layer)"

    def __init__(self, config: MoDeGPTConfig) -> None:
        super().__init__(config)
        self.parts = self._parse_parts(config.parts)
        self._phi: list[float] = []
        self._dims: dict[int, dict[str, int]] = {}
        #: sizes a later pass of the recipe cannot take (from planning), by part
        self._refused: Mapping[str, frozenset[int]] = {}

    @staticmethod
    def _parse_parts(text: str) -> tuple[str, ...]:
        parts = tuple(p.strip() for p in str(text).split("+") if p.strip())
        bad = [p for p in parts if p not in PARTS]
        if bad or not parts:
            raise ConfigError(f"modegpt: parts={text!r}: each part must be one of {', '.join(PARTS)} ('+'-separated), e.g. parts=mlp+vo")
        return tuple(p for p in PARTS if p in parts)

    def dense_blocker(self) -> str | None:
        if "qk" in self.parts or "vo" in self.parts:
            return NO_DENSE_REASON
        if self.config.allocate != "uniform":
            return ("a global allocation gives each layer its own MLP width, which a plain transformers config (one intermediate_size) "
                    "cannot express; use modegpt:parts=mlp,allocate=uniform for a plain checkpoint")
        return None

    def capabilities(self) -> Capabilities:
        # the knapsack reads every layer's correlations (dense model) before the first layer is reduced
        return Capabilities(requires_calibration=True, uses_layer_inputs=True,
                            profile=ATTN_KINDS if self.config.allocate == "knapsack" else frozenset())

    #: layer sparsities the knapsack chooses from
    GRID = tuple(j / 20 for j in range(20))

    def prepare(self, model: nn.Module, adapter: ModelAdapter, plan: PassPlan) -> None:
        self._refused = plan.refused
        self._g = self._geometry(model, adapter)
        self._adapter = adapter
        self._options: list[list[tuple[int, float]]] = []

    def profile_layer(self, index: int, layer: nn.Module, stats: Any) -> None:
        """Knapsack: each grid sparsity's kept parameters and summed relative errors of the layer's
        three modules, from the dense layer's correlations."""
        a, g = self._adapter, self._g
        grid = [phi for phi in self.GRID if phi <= self.config.max_sparsity + 1e-12]
        sizes = [self._sizes(g, phi) for phi in grid]
        C_attn, (q, k, v) = _affine(stats.linears[a.q_proj], [linear_at(layer, n) for n in (a.q_proj, a.k_proj, a.v_proj)])
        o = weight_of(layer.get_submodule(a.attn_output)).detach().cpu()
        err = [0.0] * len(grid)
        if "qk" in self.parts:
            e = qk_errors(q, k, C_attn, g.heads, g.kv_heads, g.head_dim, [s["qk"] // 2 for s in sizes])
            err = [x + y for x, y in zip(err, e)]
        if "vo" in self.parts:
            e = vo_errors(v, o, C_attn, g.heads, g.kv_heads, g.head_dim, [s["vo"] for s in sizes])
            err = [x + y for x, y in zip(err, e)]
        if "mlp" in self.parts:
            down = weight_of(layer.get_submodule(a.mlp_output)).detach().cpu()
            e = nystrom_errors(stats.linears[a.mlp_output].gram, down, [s["mlp"] for s in sizes], self.config.ridge, self.config.select)
            err = [x + y for x, y in zip(err, e)]
        kept = [((g.heads + g.kv_heads) * (s["qk"] + s["vo"]) + 3 * s["mlp"]) * g.hidden for s in sizes]
        self._options.append(list(zip(kept, err)))

    def profile_done(self) -> None:
        g = self._g
        dense = ((g.heads + g.kv_heads) * 2 * g.head_dim + 3 * g.intermediate) * g.hidden
        budget = (1.0 - min(self.config.ratio, self.config.max_sparsity)) * dense * len(self._options)
        picks = knapsack(self._options, budget)
        grid = [phi for phi in self.GRID if phi <= self.config.max_sparsity + 1e-12]
        self._phi = [grid[j] for j in picks]

    # -- geometry and sizes ----------------------------------------------------------------------

    def _geometry(self, model: nn.Module, adapter: ModelAdapter) -> _Geometry:
        cfg = hf_config(model)
        heads = int(cfg.num_attention_heads)
        kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
        hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        layer = adapter.layers(model)[0]
        return _Geometry(heads, kv, hd, int(cfg.hidden_size), cast("nn.Linear | CompressedLinear", layer.get_submodule(adapter.up_proj)).out_features)

    def _part_sparsity(self, g: _Geometry, phi: float) -> float:
        """The sparsity of each reduced part that removes φ of the layer's linear parameters: φ itself
        when every part is reduced, more when ``parts`` leaves some out (capped at max_sparsity)."""
        qk = vo = (g.heads + g.kv_heads) * g.head_dim * g.hidden
        sizes = {"mlp": 3 * g.hidden * g.intermediate, "qk": qk, "vo": vo}
        scale = sum(sizes.values()) / sum(sizes[p] for p in self.parts)
        return min(phi * scale, self.config.max_sparsity)

    def _sizes(self, g: _Geometry, phi: float, refused: Mapping[str, frozenset[int]] | None = None) -> dict[str, int]:
        """Kept widths at layer sparsity φ: MLP channels, q/k width (even), v/o width; never zero,
        and never a size a later pass of the recipe refused."""
        keep = 1.0 - self._part_sparsity(g, phi)
        r = self.config.round_to
        inter = max(r, int(round(g.intermediate * keep / r)) * r) if g.intermediate >= r else g.intermediate
        sizes = {
            "mlp": min(inter, g.intermediate) if "mlp" in self.parts else g.intermediate,
            "qk": max(2, 2 * int(round(g.head_dim / 2 * keep))) if "qk" in self.parts else g.head_dim,
            "vo": max(1, int(round(g.head_dim * keep))) if "vo" in self.parts else g.head_dim,
        }
        refused = self._refused if refused is None else refused
        for part, size in sizes.items():
            if size in refused.get(part, frozenset()):
                step = 2 if part == "qk" else (r if part == "mlp" else 1)
                full = g.intermediate if part == "mlp" else g.head_dim
                ok = [s for s in range(step, full + 1, step) if s not in refused.get(part, frozenset())] + [full]
                sizes[part] = min(ok, key=lambda s: (abs(s - size), -s))
        return sizes

    @staticmethod
    def _shapes_at(shapes: Shapes, adapter: ModelAdapter, g: _Geometry, sizes: dict[str, int], layer: int | None = None) -> Shapes:
        """The targets' shapes with the given kept widths (every layer, or one)."""
        inter, qk, vo = sizes["mlp"], sizes["qk"], sizes["vo"]
        new = {
            adapter.q_proj: lambda o, i: (g.heads * qk, i), adapter.k_proj: lambda o, i: (g.kv_heads * qk, i),
            adapter.v_proj: lambda o, i: (g.kv_heads * vo, i), adapter.attn_output: lambda o, i: (o, g.heads * vo),
            adapter.gate_proj: lambda o, i: (inter, i), adapter.up_proj: lambda o, i: (inter, i),
            adapter.mlp_output: lambda o, i: (o, inter),
        }
        out = dict(shapes)
        prefix = adapter.layers_path + "."
        for name, (o, i) in shapes.items():
            if layer is not None and not name.startswith(f"{prefix}{layer}."):
                continue
            f = new.get(layer_relative_name(name, adapter.layers_path))
            if f is not None:
                out[name] = f(o, i)
        return out

    # -- before any compute ----------------------------------------------------------------------

    def check(self, site: Site) -> Shapes:
        model, adapter, shapes, stored = site.model, site.adapter, site.shapes, site.stored
        require_layout(self.name, adapter, "attention and MLP pieces", adapter.missing_modular_layout(),
                       fix="slicegpt or svd-llm reduce such a model structurally")
        g = self._geometry(model, adapter)
        cfg = hf_config(model)
        if "qk" in self.parts:
            if g.head_dim % 2:
                raise ConfigError(f"modegpt: head dimension {g.head_dim} is odd, so the query/key width cannot keep whole rotary pairs; "
                                  "use modegpt:parts=mlp+vo")
            rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
            partial = float(getattr(cfg, "partial_rotary_factor", None) or (rope.get("partial_rotary_factor", 1.0) if isinstance(rope, dict) else 1.0))
            if partial != 1.0:
                raise ConfigError(f"modegpt: this model rotates only {partial:g} of each head (partial rotary embedding), which query/key "
                                  "slicing does not handle; use modegpt:parts=mlp+vo")
            attn = adapter.layers(model)[0].get_submodule(adapter.attention)
            if getattr(attn, "q_norm", None) is not None:
                raise ConfigError(f"modegpt: {cfg.model_type} normalizes each query/key head over its whole width (q_norm/k_norm), which "
                                  "slicing head dimensions would change; use modegpt:parts=mlp+vo")
        ours = {n for n in shapes if layer_relative_name(n, adapter.layers_path) in self._pair_names(adapter)}
        for n in sorted(ours):
            st = stored.get(n)
            if st is not None and (st.by or st.shaped_by):
                raise ConfigError(f"modegpt must come first: {st.by or st.shaped_by} already changed {n}, and modegpt reduces "
                                  "dense module pairs of the source model; put modegpt before it")
        return self._shapes_at(shapes, adapter, g, self._sizes(g, self.config.ratio, site.plan.refused))

    def stored_bits(self, d_out: int, d_in: int, dtype: torch.dtype, before: Stored | None = None) -> int | None:
        """Dense weights of the reduced widths: known before the run for a uniform sparsity, chosen per layer
        at run time otherwise."""
        return super().stored_bits(d_out, d_in, dtype, before) if self.config.allocate == "uniform" else None

    @staticmethod
    def _part_names(adapter: ModelAdapter) -> dict[str, tuple[str, ...]]:
        return {"mlp": (adapter.gate_proj, adapter.up_proj, adapter.mlp_output), "qk": (adapter.q_proj, adapter.k_proj), "vo": (adapter.v_proj, adapter.attn_output)}

    def _pair_names(self, adapter: ModelAdapter) -> tuple[str, ...]:
        return tuple(n for p in self.parts for n in self._part_names(adapter)[p])

    def selects(self, name: str, adapter: ModelAdapter) -> bool:  # the module pairs, whatever targets= says
        return layer_relative_name(name, adapter.layers_path) in self._pair_names(adapter)

    def size_variants(self, site: Site) -> list[tuple[str, int, Shapes]]:
        """Every width a non-uniform allocation may give one part, as (part, width, shapes with that
        width in every layer): planning checks the later passes of the recipe on each, and the
        allocation avoids the widths they refuse (:attr:`PassPlan.refused`)."""
        model, adapter, shapes = site.model, site.adapter, site.shapes
        if self.config.allocate == "uniform":
            return []
        g = self._geometry(model, adapter)
        full = {"mlp": g.intermediate, "qk": g.head_dim, "vo": g.head_dim}
        step = {"mlp": self.config.round_to, "qk": 2, "vo": 1}
        out = []
        for part in self.parts:
            for s in range(step[part], full[part] + 1, step[part]):
                out.append((part, s, self._shapes_at(shapes, adapter, g, {**full, part: s})))
        return out

    # -- the lifecycle ---------------------------------------------------------------------------

    def begin(self, ctx: ModelContext) -> None:
        model, adapter = ctx.model, ctx.adapter
        self._refused = ctx.plan.refused
        self._g = g = self._geometry(model, adapter)
        n, c = len(adapter.layers(model)), self.config
        self._influence: list[float] = []
        if c.allocate == "uniform":
            self._phi = [min(c.ratio, c.max_sparsity)] * n
        elif c.allocate == "knapsack":
            assert len(self._phi) == n, "the knapsack allocation needs the profile of every layer"
        else:
            self._influence = ctx.block_influence()
            self._phi = allocate_sparsity(self._influence, c.ratio, c.temperature, c.max_sparsity)
        if c.ratio > c.max_sparsity:
            logger.warning("modegpt: ratio %.3f is above max_sparsity %.3f: every layer is capped there and %.3f is removed",
                           c.ratio, c.max_sparsity, c.max_sparsity)
        self._dims = {i: self._sizes(g, phi) for i, phi in enumerate(self._phi)}
        for i, d in self._dims.items():
            logger.info("modegpt: layer %d sparsity %.3f: mlp %d/%d, qk %d/%d, vo %d/%d", i, self._phi[i], d["mlp"], g.intermediate,
                        d["qk"], g.head_dim, d["vo"], g.head_dim)

    def compress_layer(self, index: int, layer: nn.Module, ctx: LayerContext) -> dict[str, dict[str, Any]]:
        a, g, dims = ctx.adapter, self._g, self._dims[index]
        base = {"sparsity": round(self._phi[index], 6)}
        if self._influence:
            base["influence"] = round(self._influence[index], 6)
        with torch.no_grad():
            attn = layer.get_submodule(a.attention)
            q, k, v, o = (linear_at(layer, n) for n in (a.q_proj, a.k_proj, a.v_proj, a.attn_output))
            rope = full_rope_index(g.kv_heads, g.head_dim)
            qk, vo = g.head_dim, g.head_dim
            if dims["qk"] < g.head_dim or dims["vo"] < g.head_dim:
                C, (Wq, Wk, Wv) = _affine(ctx.observe([a.q_proj], ATTN_KINDS).linears[a.q_proj], [q, k, v])
                if dims["qk"] < g.head_dim:
                    rope = cr_qk(Wq, Wk, C, g.heads, g.kv_heads, g.head_dim, dims["qk"] // 2).to(q.weight.device)
                    qk = dims["qk"]
                    rep = g.heads // g.kv_heads
                    q_rows = torch.cat([h * g.head_dim + rope[h // rep] for h in range(g.heads)])
                    k_rows = torch.cat([j * g.head_dim + rope[j] for j in range(g.kv_heads)])
                    for lin, rows in ((q, q_rows), (k, k_rows)):
                        set_linear_weight(lin, lin.weight[rows], None if lin.bias is None else lin.bias[rows])
                if dims["vo"] < g.head_dim:
                    vo = dims["vo"]
                    W_v, W_o, _ = svd_vo(Wv, o.weight, C, g.heads, g.kv_heads, g.head_dim, vo)
                    d_in = v.weight.shape[1]  # with a bias, the last column of the affine weight is the new bias
                    set_linear_weight(v, W_v[:, :d_in], None if v.bias is None else W_v[:, d_in])
                    set_linear_weight(o, W_o)
                del C
                make_modular(attn, qk, vo, rope.to(q.weight.device), _projections(a))
            if dims["mlp"] < g.intermediate:
                C_mlp = ctx.observe([a.mlp_output], frozenset({"gram"})).linears[a.mlp_output].gram
                assert C_mlp is not None
                gate, up, down = (linear_at(layer, n) for n in (a.gate_proj, a.up_proj, a.mlp_output))
                kept, W_down = nystrom_mlp(C_mlp, down.weight, dims["mlp"], self.config.ridge, self.config.select)
                kept = kept.to(gate.weight.device)
                for lin in (gate, up):
                    set_linear_weight(lin, lin.weight[kept], None if lin.bias is None else lin.bias[kept])
                set_linear_weight(down, W_down)
                del C_mlp
        # every pair of the parts is recorded, also where the layer's allocation keeps its whole width
        widths = {"qk": {"qk_dim": qk, "head_dim": g.head_dim}, "vo": {"v_dim": vo, "head_dim": g.head_dim},
                "mlp": {"intermediate": dims["mlp"], "intermediate_before": g.intermediate}}
        return {n: {**base, **widths[p]} for p in self.parts for n in self._part_names(a)[p]}

    def finish(self, ctx: ModelContext) -> None:
        widths = {d["mlp"] for d in self._dims.values()}
        if len(widths) == 1:  # one MLP width in every layer: the config says it, so a plain checkpoint loads
            hf_config(ctx.model).intermediate_size = widths.pop()

    # -- structure -------------------------------------------------------------------------------

    def structure(self, model: nn.Module) -> dict[str, Any] | None:
        if not self._dims:
            return None
        g = self._g
        layers = {str(i): {"qk_dim": d["qk"], "v_dim": d["vo"], "intermediate": d["mlp"]} for i, d in self._dims.items()
                  if (d["qk"], d["vo"], d["mlp"]) != (g.head_dim, g.head_dim, g.intermediate)}
        return {"layers": layers, "head_dim": g.head_dim, "kv_heads": g.kv_heads}

    @classmethod
    def rebuild(cls, model: nn.Module, adapter: ModelAdapter, structure: dict[str, Any], dtype: torch.dtype) -> None:
        kv, hd = int(structure["kv_heads"]), int(structure["head_dim"])
        layers = adapter.layers(model)
        for i, d in structure.get("layers", {}).items():
            layer = layers[int(i)]
            if (int(d["qk_dim"]), int(d["v_dim"])) != (hd, hd):
                # the weights' shapes (and rope_index's) come with the state dict
                make_modular(layer.get_submodule(adapter.attention), int(d["qk_dim"]), int(d["v_dim"]),
                             torch.zeros(kv, int(d["qk_dim"]), dtype=torch.long), _projections(adapter))

    def notes(self, summary: dict[str, Any]) -> list[str]:
        if not self._dims:
            return []
        g = self._g
        mean = {p: sum(d[p] for d in self._dims.values()) / len(self._dims) for p in PARTS}
        dense = ((g.heads + g.kv_heads) * 2 * g.head_dim + 3 * g.intermediate) * g.hidden
        kept = sum(((g.heads + g.kv_heads) * (d["qk"] + d["vo"]) + 3 * d["mlp"]) * g.hidden for d in self._dims.values())
        removed = 1 - kept / (dense * len(self._dims))
        alloc = {"global": f"global (block influence, temperature {self.config.temperature:g}, cap {self.config.max_sparsity:g})",
                 "knapsack": f"knapsack over measured relative errors (grid of {len(self.GRID)}, cap {self.config.max_sparsity:g})",
                 "uniform": "uniform"}[self.config.allocate]
        alloc += f"; layer sparsity {min(self._phi):.3f}-{max(self._phi):.3f}"
        return [
            f"MoDeGPT: ratio {self.config.ratio:g} requested, allocation {alloc}. Mean kept widths: MLP {mean['mlp']:.1f}/{g.intermediate}, "
            f"query/key {mean['qk']:.1f}/{g.head_dim}, value/output {mean['vo']:.1f}/{g.head_dim}. Decoder linear parameters removed: "
            f"{removed:.4f} (of its targets: {summary['target_ratio']:.4f}); whole model: {summary['model_ratio']:.4f} ({summary['model_params_before']:,} -> "
            f"{summary['model_params_after']:,})."
        ]


__all__ = ["MoDeGPTConfig", "MoDeGPTPass"]
