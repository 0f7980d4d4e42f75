"""Export of per-output-channel uniform-quantized models in the compressed-tensors "pack-quantized"
format (what llm-compressor writes, vLLM serves and transformers opens with the compressed-tensors
package installed).

Per quantized linear (d_out × d_in, b bits, group g or the whole channel):
- ``weight_packed`` int32 (d_out, ⌈d_in·b/32⌉): each row's codes as one bit stream, b bits per code,
  least significant first, read as 32-bit words; a stored code is the format's signed value plus
  2^(b−1), which is exactly this library's unsigned code c ∈ [0, 2^b).
- ``weight_scale`` (d_out, d_in/g) (channel strategy: (d_out, 1)): float16 when the model computes
  in float16, else float32 (both hold this library's float16 scales exactly, and the package
  dequantizes in the scale's dtype, so its weights equal ours bit for bit).
- ``weight_zero_point`` (asymmetric only) int32 (⌈d_out·b/32⌉, d_in/g): the zero-points, packed the
  same way along the output dimension; symmetric layers store none (zero = 2^(b−1)).
- ``weight_shape`` int64 (2,) = (d_out, d_in); ``bias`` as it is.
W = (c − z)·s = (q − zp)·s with q = c − 2^(b−1), zp = z − 2^(b−1). Linears left unquantized (the
output head, or any a recipe narrowed away) are listed under ``ignore``; one config group per
(bits, group, symmetry) found. Activation-order runs use static groups, so no ``g_idx`` is needed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import dedupe, write_config_and_tokenizer, write_weights
from .errors import CompressError
from .modules import CompressedLinear
from .modules.quant import QuantLinear
from .solvers.packing import pack_bits

FORMAT = "pack-quantized"
#: compressed-tensors version whose config schema the export follows (checked by tests against the package)
CT_VERSION = "0.20.1"


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, n) unsigned codes → (rows, ⌈n·bits/32⌉) int32, each row one LSB-first bit stream."""
    rows, n = codes.shape
    pad = (-n) % 32
    if pad:
        codes = torch.cat([codes, codes.new_zeros(rows, pad)], dim=1)
    words = (n + pad) * bits // 32
    packed = pack_bits(codes.reshape(-1), bits).reshape(rows, words * 4).contiguous().view(torch.int32)
    return packed[:, : -(-n * bits // 32)].contiguous()


def ct_tensors(m: QuantLinear, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    s = m.qspec
    out = {
        "weight_packed": pack_int32(m.codes(), s.bits),
        "weight_scale": m.scales.to(scale_dtype).contiguous(),
        "weight_shape": torch.tensor([m.out_features, m.in_features], dtype=torch.int64),
    }
    if not s.sym:
        out["weight_zero_point"] = pack_int32(m.zeros().T.contiguous(), s.bits).T.contiguous()
    if m.bias is not None:
        out["bias"] = m.bias.detach()
    return out


def _why_not(m: QuantLinear) -> str | None:
    s = m.qspec
    if s.dim != "oc":
        return "per-IC groups"
    if s.levels != "uniform":
        return f"{s.levels} levels"
    if not 1 <= s.bits <= 8:
        return f"{s.bits} bits"
    return None


def check_ct_exportable(model: nn.Module) -> dict[tuple[int, int, bool], list[str]]:
    """Quantized linears by (bits, group, sym), or a CompressError naming the modules the format
    cannot hold (per-IC groups, NormalFloat levels, other compressed module types, added structure)."""
    from .checkpoint import model_structure

    structure = model_structure(model)
    if structure:
        raise CompressError(
            f"--export compressed-tensors needs the model's own architecture; {', '.join(structure)} changed it "
            "(the checkpoint itself opens with from_pretrained after import compress)"
        )
    bad: list[str] = []
    settings: dict[tuple[int, int, bool], list[str]] = {}
    for name, m in model.named_modules():
        if any(name.startswith(b.split(" ")[0] + ".") for b in bad):
            continue
        if isinstance(m, QuantLinear):
            why = _why_not(m)
            if why:
                bad.append(f"{name} ({why})")
                continue
            settings.setdefault((m.qspec.bits, m.qspec.group_size, m.qspec.sym), []).append(name)
        elif isinstance(m, CompressedLinear):
            bad.append(f"{name} ({type(m).__name__})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise CompressError(
            "the compressed-tensors format holds per-output-channel uniform-quantized linears (and plain ones); cannot export "
            + ", ".join(bad[:3]) + more + "; quantize with rtn/gptq dim=oc, or use the compress checkpoint itself"
        )
    if not settings:
        raise CompressError("--export compressed-tensors: the model has no quantized linear; quantize with rtn or gptq")
    return settings


def ct_quantization_config(settings: dict[tuple[int, int, bool], list[str]], ignore: list[str]) -> dict[str, Any]:
    groups: dict[str, dict[str, Any]] = {}
    for i, ((bits, group, sym), names) in enumerate(sorted(settings.items())):
        groups[f"group_{i}"] = {
            "targets": ["Linear"] if len(settings) == 1 else sorted(names),
            "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group else "channel",
                "group_size": group or None, "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {},
            },
            "input_activations": None, "output_activations": None, "format": FORMAT,
        }
    return {
        "quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
        "config_groups": groups, "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None,
        # no "sparsity_config" key, not even an empty one: vLLM 0.24-0.26 refuses a checkpoint that carries one
        "transform_config": {}, "version": CT_VERSION,
    }


def export_compressed_tensors(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write a compressed-tensors checkpoint of ``model`` into ``directory``."""
    settings = check_ct_exportable(model)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not any(n.startswith(q + ".") for q in quantized)]
    dtype = next(model.parameters()).dtype
    scale_dtype = torch.float16 if dtype == torch.float16 else torch.float32
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] not in quantized}
    for name, m in quantized.items():
        state.update({f"{name}.{k}": v for k, v in ct_tensors(m, scale_dtype).items()})
    state, _ = dedupe(state)
    write_weights(state, directory)
    write_config_and_tokenizer(model, tokenizer, directory)
    p = directory / "config.json"
    config = json.loads(p.read_text())
    config["quantization_config"] = ct_quantization_config(settings, ignore)
    p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
