"""Phi-3 decoders (Phi-3, Phi-3.5, Phi-4-mini): the Llama residual layout with fused projections.

Attention computes q, k and v with one ``qkv_proj`` (rows: the query heads, then the key heads, then
the value heads) and the MLP computes gate and up with one ``gate_up_proj`` (rows: gate, then up);
the residual adds pass through dropouts that are the identity at inference. Passes that work on
linears take the fused ones as they are; passes that need q/k/v or gate/up apart (MoDeGPT) are
refused in one line, and AWQ scales the two norm → linear groups only."""

from .base import ModelAdapter

PHI3 = ModelAdapter(
    name="phi3",
    model_types=("phi3",),
    layers_path="model.layers",
    embed="model.embed_tokens",
    final_norm="model.norm",
    lm_head="lm_head",
    attn_norm="input_layernorm",
    attention="self_attn",
    qkv_proj="self_attn.qkv_proj",
    o_proj="self_attn.o_proj",
    mlp_norm="post_attention_layernorm",
    mlp="mlp",
    gate_up_proj="mlp.gate_up_proj",
    down_proj="mlp.down_proj",
)

ADAPTERS = (PHI3,)
