"""The export formats, in one table that ``compress run --export`` and ``compress export`` both read.

Each format says, from the recipe alone, why the recipe's modules cannot produce it (checked before
the model is loaded), checks the compressed model (before anything is written) and writes itself
into a directory. Exports run after the compressed checkpoint is written, so a failing export never
costs the compression.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from torch import nn

from .errors import CompressError

if TYPE_CHECKING:
    from .passes.base import Pass

#: the passes of a recipe, in order (built by the planner)
Passes = list["Pass[Any]"]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    help: str
    #: why a recipe (its passes, in order) cannot produce this format, or None
    check_recipe: Callable[[Passes], str | None]
    #: raise a CompressError when the compressed model cannot be written in this format
    check_model: Callable[[nn.Module, str], None]
    #: write(model, tokenizer, directory, layers_path, source)
    write: Callable[[nn.Module, Any, Path, str, str], None]
    #: why the opened model (its config, tokenizer and source) cannot be written, checked before compressing
    check_opened: Callable[[Any, Any, str], str | None] | None = None


def final_module_types(passes: Passes) -> set[str]:
    """Module types an untargeted linear may have after the recipe (passes narrowed with targets=
    leave the other linears as they were, so their types are added)."""
    from .passes.base import LINEAR

    kinds: frozenset[str] = frozenset({LINEAR})
    narrowed: set[str] = set()
    for p in passes:
        produced = p.produces(kinds)
        if str(p.config.targets).strip() == "*":
            kinds = produced
        else:
            narrowed |= produced
    return set(kinds) | narrowed


def _dense_recipe(passes: Passes) -> str | None:
    blocked = [(p.name, why) for p in passes if (why := p.dense_blocker())]
    return f"--export dense is not possible after {blocked[0][0]}: {blocked[0][1]}" if blocked else None


def _dense_model(model: nn.Module, layers_path: str) -> None:
    from .checkpoint import dense_export_blocker

    why = dense_export_blocker(model)
    if why is not None:
        raise CompressError(f"no dense export: {why}")


def _dense_write(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> None:
    from .checkpoint import export_dense

    export_dense(model, tokenizer, directory)


def _gptq_recipe(passes: Passes) -> str | None:
    kinds = final_module_types(passes)
    if kinds != {"QuantLinear"}:
        other = sorted(kinds - {"QuantLinear"})
        return (f"--export gptq needs every decoder linear quantized by rtn or gptq (dim=oc); this recipe leaves {', '.join(other)} "
                "modules; drop --export gptq or quantize last")
    for s in passes:
        why = _uniform_oc_reason("gptq", s)
        if why:
            return why
    return None


def _gptq_model(model: nn.Module, layers_path: str) -> None:
    from .export_gptq import check_gptq_exportable

    check_gptq_exportable(model, layers_path)


def _gptq_write(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> None:
    from .export_gptq import export_gptq

    export_gptq(model, tokenizer, directory, layers_path)


def _peft_recipe(passes: Passes) -> str | None:
    if "LoRALinear" not in final_module_types(passes):
        return "--export peft needs low-rank branches: add an eora or lq-lora pass to the recipe"
    return None


def _peft_model(model: nn.Module, layers_path: str) -> None:
    from .export_peft import check_peft_exportable

    check_peft_exportable(model)


def _peft_write(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> None:
    from .export_peft import export_peft

    export_peft(model, directory, source)


def _ct_recipe(passes: Passes) -> str | None:
    from .passes.base import LINEAR, ModelPass

    kinds = final_module_types(passes)
    if "QuantLinear" not in kinds or kinds - {"QuantLinear", LINEAR}:
        other = sorted(kinds - {"QuantLinear", LINEAR}) or ["no quantized"]
        return (f"--export compressed-tensors holds rtn/gptq-quantized (and plain) linears; this recipe leaves {', '.join(other)} "
                "modules; drop --export compressed-tensors or quantize last")
    for s in passes:
        if isinstance(s, ModelPass):
            return (f"--export compressed-tensors needs the model's own architecture; {s.name} changes it "
                    "(its checkpoint opens with from_pretrained after import compress)")
        why = _uniform_oc_reason("compressed-tensors", s)
        if why:
            return why
    return None


def _uniform_oc_reason(fmt: str, s: Any) -> str | None:
    """Why pass ``s`` can produce layers a per-output-channel uniform-integer format cannot hold."""
    if getattr(s.config, "dim", "oc") != "oc":
        return f"--export {fmt} holds per-output-channel groups only; {s.name}:dim={s.config.dim} can produce per-IC layers; use dim=oc"
    if getattr(s.config, "levels", "uniform") != "uniform":
        return f"--export {fmt} holds uniform integer levels only; {s.name} uses levels={s.config.levels}"
    return None


def _ct_model(model: nn.Module, layers_path: str) -> None:
    from .export_ct import check_ct_exportable

    check_ct_exportable(model)


def _ct_write(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> None:
    from .export_ct import export_compressed_tensors

    export_compressed_tensors(model, tokenizer, directory)


def _gguf_recipe(passes: Passes) -> str | None:
    from .export_gguf import recipe_reason

    return recipe_reason(None, passes, final_module_types(passes))


def _gguf_model(model: nn.Module, layers_path: str) -> None:
    from .export_gguf import check_model

    check_model(model, layers_path)


def _gguf_write(model: nn.Module, tokenizer: Any, directory: Path, layers_path: str, source: str) -> None:
    from .export_gguf import export_gguf

    export_gguf(model, tokenizer, directory, layers_path, source)


def _gguf_opened(model: Any, tokenizer: Any, source: str) -> str | None:
    from .export_gguf import opened_reason

    return opened_reason(model, tokenizer, source)


EXPORTS: dict[str, ExportFormat] = {
    f.name: f for f in (
        ExportFormat("dense", "plain HF checkpoint, factors multiplied out (from_pretrained without this library)",
                     _dense_recipe, _dense_model, _dense_write),
        ExportFormat("gptq", "GPTQ format (packed int32 qweight/qzeros, fp16 scales) for GPTQ kernels", _gptq_recipe, _gptq_model, _gptq_write),
        ExportFormat("compressed-tensors", "compressed-tensors pack-quantized (llm-compressor's format; vLLM, transformers)",
                     _ct_recipe, _ct_model, _ct_write),
        ExportFormat("peft", "the low-rank branches of eora/lq-lora as a PEFT LoRA adapter", _peft_recipe, _peft_model, _peft_write),
        ExportFormat("gguf", "one GGUF file for llama.cpp/Ollama (gptq:format=q4_k/q3_k/q6_k/q4_0/q4_1/q8_0 stored byte for byte, "
                     "or F16 of a plain or structurally smaller model)", _gguf_recipe, _gguf_model, _gguf_write, _gguf_opened),
    )
}


def get_export(name: str) -> ExportFormat:
    if name not in EXPORTS:
        raise CompressError(f"unknown export format '{name}'; available: {', '.join(EXPORTS)} (--export)")
    return EXPORTS[name]


def check_opened(names: tuple[str, ...] | list[str], model: Any, tokenizer: Any, source: str) -> None:
    """Refuse formats the opened model (architecture, tokenizer) cannot be written in, before any compute."""
    for n in names:
        check = get_export(n).check_opened
        why = check(model, tokenizer, source) if check is not None else None
        if why is not None:
            raise CompressError(why)


def check_exports(names: tuple[str, ...] | list[str], passes: Passes) -> None:
    """Refuse unknown formats and formats the recipe cannot produce, before any compute."""
    for n in names:
        why = get_export(n).check_recipe(passes)
        if why is not None:
            raise CompressError(why)
