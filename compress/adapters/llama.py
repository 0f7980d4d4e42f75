"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (GQA included; the k/v projections are
simply narrower than q). They share one layout; each family has its own adapter so that a family
whose layout diverges later changes in one place (Qwen2 adds q/k/v biases and Qwen3 per-head q/k
norms inside attention, which no pass touches)."""

import dataclasses

from .base import ModelAdapter

_ATTN_MLP_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)

LLAMA = ModelAdapter(
    name="llama",
    model_types=("llama",),
    layers_path="model.layers",
    sequential_groups=_ATTN_MLP_GROUPS,
    blocks=(
        ("self_attn", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp", ("mlp.gate_proj", "mlp.up_proj")),
    ),
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    mlp_norm="post_attention_layernorm",
    attn_inputs=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    attn_output="self_attn.o_proj",
    mlp_inputs=("mlp.gate_proj", "mlp.up_proj"),
    mlp_output="mlp.down_proj",
    attention="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    gate_proj="mlp.gate_proj",
    up_proj="mlp.up_proj",
)
MISTRAL = dataclasses.replace(LLAMA, name="mistral", model_types=("mistral",))
QWEN2 = dataclasses.replace(LLAMA, name="qwen2", model_types=("qwen2",))
QWEN3 = dataclasses.replace(LLAMA, name="qwen3", model_types=("qwen3",))
