"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (GQA included; the k/v projections are
simply narrower than q). They share one layout; each family has its own adapter so that a family
whose layout diverges later changes in one place (Qwen2 adds q/k/v biases and Qwen3 per-head q/k
norms inside attention, which no pass touches)."""

import dataclasses

from .base import ModelAdapter

LLAMA = ModelAdapter(
    name="llama",
    model_types=("llama",),
    layers_path="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    attention="self_attn",
    q_proj="self_attn.q_proj",
    k_proj="self_attn.k_proj",
    v_proj="self_attn.v_proj",
    o_proj="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp="mlp",
    gate_proj="mlp.gate_proj",
    up_proj="mlp.up_proj",
    down_proj="mlp.down_proj",
)
MISTRAL = dataclasses.replace(LLAMA, name="mistral", model_types=("mistral",))
QWEN2 = dataclasses.replace(LLAMA, name="qwen2", model_types=("qwen2",))
QWEN3 = dataclasses.replace(LLAMA, name="qwen3", model_types=("qwen3",))

ADAPTERS = (LLAMA, MISTRAL, QWEN2, QWEN3)
