"""Export of the low-rank branches of LoRALinear layers as a PEFT-style LoRA adapter directory
(``adapter_config.json`` + ``adapter_model.safetensors`` with ``lora_A``/``lora_B`` per module),
for serving stacks that run a quantized base plus an adapter. The branches are written
dequantized, in float16, with lora_alpha = r so that PEFT's scaling alpha/r is 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CompressError
from .modules.lora import LoRALinear


def check_peft_exportable(model: nn.Module) -> int:
    """The one rank of the model's branches, or a CompressError saying why there is no adapter to write."""
    loras = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not loras:
        raise CompressError("no low-rank branches to export: add an eora or lq-lora pass to the recipe")
    ranks = {m.rank for m in loras}
    if len(ranks) != 1:
        raise CompressError(f"a PEFT adapter has one rank; this model's branches have ranks {sorted(ranks)}")
    return ranks.pop()


def export_peft(model: nn.Module, directory: Path, base_model: str | None = None) -> None:
    r = check_peft_exportable(model)
    loras = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    tensors: dict[str, torch.Tensor] = {}
    for name, m in loras.items():
        A, B = m.branch_weights()
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to(torch.float16).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to(torch.float16).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none",
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in loras}), "base_model_name_or_path": base_model,
        "fan_in_fan_out": False, "inference_mode": True,
    }
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
