"""Export of per-OC uniform-quantized models in the GPTQ checkpoint format read by GPTQ loaders
(AutoGPTQ, GPTQModel, transformers' GPTQ integration, vLLM), "gptq" (v1) checkpoint format.

Per quantized linear (d_out × d_in, b bits, group g, n = d_in/g groups):
- ``qweight`` int32 (d_in·b/32, d_out): for each output column, the d_in codes along the input
  dimension form one little-endian bit stream, b bits per code, least significant first, read as
  32-bit words (for 3 bits, 32 codes span 3 words; a code may straddle two words).
- ``qzeros`` int32 (n, d_out·b/32): the zero-points minus one (the v1 convention), packed the same
  way along the output dimension for each group.
- ``scales`` float16 (n, d_out); ``g_idx`` int32 (d_in,) = j // g; ``bias`` float16 if present.
W[:, j] = scales[g_idx[j]] · (q[j] − (stored_zero[g_idx[j]] + 1)), i.e. (q − zero)·scale. A zero-point
of 0 would be stored as −1, which readers turn back into 2^b, not 0 (they add 1 without wrapping, or
word-wise with a carry): such layers are refused.
Everything else is written in float16. ``quantize_config.json`` and ``config.json``'s
``quantization_config`` describe bits, group size, symmetry and desc_act = false (codes are stored in
the original column order; activation-order runs use static groups, so g_idx stays j // g).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import dedupe, write_weights
from .errors import CompressError
from .modules import CompressedLinear
from .modules.base import hf_config
from .modules.quant import QuantLinear
from .solvers.packing import pack_bits


def _pack_rows_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, length) codes → (rows, length·bits/32) int32, each row one LSB-first stream."""
    rows, length = codes.shape
    packed = pack_bits(codes.reshape(-1), bits).reshape(rows, length * bits // 8)
    return packed.contiguous().view(torch.int32)


def gptq_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    s = m.qspec
    d_out, d_in = m.out_features, m.in_features
    g, n = s.groups(d_out, d_in)
    codes = m.codes()  # (d_out, d_in)
    zeros = (m.zeros().to(torch.int64) - 1) & s.maxq  # v1 stores zero − 1
    out = {
        "qweight": _pack_rows_int32(codes, s.bits).T.contiguous(),  # (d_in·b/32, d_out)
        "qzeros": _pack_rows_int32(zeros.T.contiguous(), s.bits),  # (n, d_out·b/32)
        "scales": m.scales.T.contiguous().to(torch.float16),  # (n, d_out)
        "g_idx": (torch.arange(d_in, dtype=torch.int32) // g),
    }
    if m.bias is not None:
        out["bias"] = m.bias.detach().to(torch.float16)
    return out


def check_gptq_exportable(model: nn.Module, layers_path: str) -> dict[str, Any]:
    """The common quantization settings, or a CompressError naming the layers that cannot be exported."""
    bad: list[str] = []
    packing = False  # a layer whose widths the format's 32-bit words cannot hold at its bits
    settings: set[tuple[int, int, bool]] = set()
    for name, m in model.named_modules():
        if not name.startswith(layers_path + "."):
            continue
        if isinstance(m, QuantLinear):
            s = m.qspec
            if s.dim != "oc":
                bad.append(f"{name} (per-IC groups)")
                continue
            if s.levels != "uniform":
                bad.append(f"{name} ({s.levels} levels)")
                continue
            if (m.in_features * s.bits) % 32 or (m.out_features * s.bits) % 32:
                bad.append(f"{name} ({m.out_features}x{m.in_features} at {s.bits} bits: not packable into 32-bit words)")
                packing = True
                continue
            if not s.sym and bool((m.zeros() == 0).any()):
                # v1 stores zero − 1; readers add 1 back word-wise (0x11111111 for 4 bits), so a stored
                # −1 wraps to 2^b − 1 and carries into the neighbouring zero-point
                bad.append(f"{name} (a zero-point of 0, which the v1 layout cannot store: quantize with sym=true, or use --export compressed-tensors)")
                continue
            settings.add((s.bits, s.group_size or m.in_features, s.sym))
        elif isinstance(m, nn.Linear):
            bad.append(f"{name} (not quantized)")
        elif isinstance(m, CompressedLinear):
            bad.append(f"{name} ({type(m).__name__})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        fix = ("this model's widths do not pack at these bits: keep the compress checkpoint (from_pretrained after import compress) or use --export dense"
               if packing and all("packable" in b for b in bad) else "quantize every decoder linear with rtn/gptq dim=oc")
        raise CompressError(
            "the GPTQ format holds only per-OC uniform-quantized linears packed in 32-bit words; cannot export "
            + ", ".join(bad[:3]) + more + "; " + fix
        )
    if len(settings) != 1:
        raise CompressError(f"the GPTQ format needs one bits/group/sym setting for all layers, found {sorted(settings)}")
    bits, group, sym = settings.pop()
    return {"bits": bits, "group_size": group, "sym": sym}


def export_gptq(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str = "model.layers") -> None:
    """Write a GPTQ-format checkpoint of ``model`` into ``directory``."""
    qcfg = check_gptq_exportable(model, layers_path)
    quant_config = {
        "quant_method": "gptq", "bits": qcfg["bits"], "group_size": qcfg["group_size"], "sym": qcfg["sym"],
        "desc_act": False, "true_sequential": True, "checkpoint_format": "gptq", "damp_percent": 0.01,
    }
    directory.mkdir(parents=True, exist_ok=True)
    state: dict[str, torch.Tensor] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for k, v in model.state_dict().items():
        owner = k.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        state[k] = v.to(torch.float16) if v.is_floating_point() else v
    for name, m in quantized.items():
        for k, v in gptq_tensors(m).items():
            state[f"{name}.{k}"] = v
    state, _ = dedupe(state)
    write_weights(state, directory)
    config = hf_config(model).to_dict()
    config["quantization_config"] = quant_config
    config["torch_dtype"] = "float16"
    config["dtype"] = "float16"
    (directory / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    (directory / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
