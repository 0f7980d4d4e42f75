"""The compressed checkpoint: save, load, dense export.

Layout of an output directory::

    config.json, generation_config.json    the source model's HF config
    tokenizer files
    model.safetensors                      compressed state dict (or model-0000i-of-0000N.safetensors
                                           + model.safetensors.index.json when larger than a shard)
    manifest.json                          format version, library version, source model and weight
                                           fingerprint, resolved recipe, calibration, and per module:
                                           compressed type, constructor spec, pass, measured error
    recipe.yaml                            the resolved recipe
    dense/                                 (--export dense) plain HF checkpoint, factors multiplied out

Every write goes to a temporary sibling directory that is renamed into place at the end, so a crash
never leaves a directory that looks complete.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import CompressError, brief
from .fsutil import atomic_directory  # noqa: F401  (re-exported: writers import it from here)
from .hf_format import quantization_config, write_quantization_config
from .model_tensors import STRUCTURE_ATTR, dedupe  # noqa: F401  (STRUCTURE_ATTR re-exported)
from .modules import CompressedLinear
from .modules.base import hf_config
from .readers import integer, read_json
from .version import FORMAT_VERSION, __version__

MANIFEST = "manifest.json"
#: attribute of the model's config holding the structure passes added (pass name → description)
SHARD_BYTES = 2 * 1024**3
_FORMAT = "compress-checkpoint"


def write_weights(state: dict[str, torch.Tensor], directory: Path, shard_bytes: int | None = None) -> list[str]:
    """Write safetensors, sharded in the HF layout when larger than ``shard_bytes`` (default SHARD_BYTES)."""
    shard_bytes = SHARD_BYTES if shard_bytes is None else shard_bytes
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    files = []
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    return files


def compressed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The outermost compressed modules of ``model`` by name (registered CompressedLinear types); a
    module nested in another (the base of a LoRALinear) is described by its parent's spec."""
    out: dict[str, nn.Module] = {}
    for n, m in model.named_modules():
        if isinstance(m, CompressedLinear) and not any(n.startswith(p + ".") for p in out):
            out[n] = m
    return out


def write_config_and_tokenizer(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """config.json without a quantization_config (a model opened from a checkpoint carries this format's
    entry; the checkpoint writer adds the current one, the plain exports none), generation config, tokenizer."""
    hf_config(model).save_pretrained(directory)
    p = directory / "config.json"
    config = json.loads(p.read_text())
    if config.pop("quantization_config", None) is not None:
        p.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        with contextlib.suppress(Exception):  # some configs carry no generation settings
            gen.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def save_checkpoint(
    model: nn.Module,
    tokenizer: Any,
    directory: Path,
    manifest: dict[str, Any],
    recipe_yaml: str | None = None,
) -> None:
    """Write the compressed model into ``directory`` (which must exist and be empty)."""
    write_config_and_tokenizer(model, tokenizer, directory)
    state, aliases = dedupe(model.state_dict())
    files = write_weights(state, directory)
    write_manifest(model, directory, manifest, files, aliases, recipe_yaml)


def write_manifest(
    model: nn.Module, directory: Path, manifest: dict[str, Any], files: list[str], aliases: dict[str, str], recipe_yaml: str | None
) -> None:
    """``manifest.json`` (and ``recipe.yaml``) for the weights already written as ``files``."""
    modules = {
        name: {"type": type(m).__name__, "spec": m.spec()}  # type: ignore[operator]
        for name, m in compressed_modules(model).items()
    }
    for name, entry in modules.items():
        entry.update(manifest.get("modules", {}).get(name, {}))
    structure = model_structure(model)
    if structure:
        manifest = {**manifest, "structure": structure}
    full = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        **{k: v for k, v in manifest.items() if k != "modules"},
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "weights": {"files": files, "tied": aliases},
        "modules": modules,
    }
    (directory / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True, default=str) + "\n")
    if (directory / "config.json").is_file():  # from_pretrained rebuilds the model from this entry
        write_quantization_config(directory, quantization_config(modules, structure, aliases))
    if recipe_yaml is not None:
        (directory / "recipe.yaml").write_text(recipe_yaml)


def read_manifest(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    p = d / MANIFEST
    if not p.is_file():
        raise CompressError(f"'{d}' is not a compressed checkpoint (no {MANIFEST}); run 'compress run' to make one")
    manifest = read_json(p, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != _FORMAT:
        raise CompressError(f"'{p}' is not a compress manifest")
    version = integer(manifest.get("format_version", 0), "format_version", f"'{p}'")
    if version > FORMAT_VERSION:
        raise CompressError(
            f"checkpoint '{d}' has format version {version}, newer than this library reads ({FORMAT_VERSION}); upgrade compress"
        )
    return manifest


def load_checkpoint(
    directory: str | Path, *, device: str | torch.device = "cpu", trust_remote_code: bool = False
) -> tuple[nn.Module, Any]:
    """Open a compressed checkpoint with transformers' ``from_pretrained`` (the format is registered as a
    quantization method), strictly: a weight the checkpoint lacks or does not expect is an error here,
    where plain ``from_pretrained`` would initialize it and warn."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hf_format import QUANT_METHOD, register

    register()
    d = Path(directory)
    manifest = read_manifest(d) if (d / MANIFEST).is_file() else None
    try:
        config = AutoConfig.from_pretrained(d, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise CompressError(f"checkpoint '{d}' is incomplete: cannot read config.json ({brief(e)})") from None
    entry = getattr(config, "quantization_config", None)
    if entry is not None and not isinstance(entry, dict):
        entry = entry.to_dict()
    if not entry or entry.get("quant_method") != QUANT_METHOD:
        if manifest is None:
            raise CompressError(f"'{d}' is not a compressed checkpoint (no {MANIFEST}, no compress quantization_config); run 'compress run' to make one")
        # written before config.json carried the entry (format 2 of 2026-12-03 and older): the manifest has it
        config.quantization_config = quantization_config(manifest.get("modules", {}), manifest_structure(manifest),
                                                         manifest.get("weights", {}).get("tied", {}))
    for f in (manifest or {}).get("weights", {}).get("files", []):
        if not (d / f).is_file():
            raise CompressError(f"checkpoint '{d}' is incomplete: weight file '{f}' is missing")
    if (d / "model.safetensors.index.json").is_file():
        from .sources import read_weight_map

        read_weight_map(d / "model.safetensors.index.json")  # transformers would fail on a damaged index with its own traceback
    dtype: Any = getattr(torch, manifest["dtype"]) if manifest and "dtype" in manifest else "auto"
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the mismatch is reported below, in one line
    try:
        # with output_loading_info=True it returns (model, loading info), which its annotation does not say
        model, info = cast("tuple[nn.Module, dict[str, Any]]", AutoModelForCausalLM.from_pretrained(
            d, config=config, dtype=dtype, trust_remote_code=trust_remote_code, output_loading_info=True
        ))
    except OSError as e:
        raise CompressError(f"checkpoint '{d}' cannot be read ({brief(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    missing, unexpected = sorted(info.get("missing_keys", [])), sorted(info.get("unexpected_keys", []))
    mismatched = [k for k, *_ in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        raise CompressError(
            f"checkpoint '{d}' does not match its description (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {mismatched[:3]})"
        )
    model.to(device)
    model.eval()
    tokenizer = None
    with contextlib.suppress(Exception):
        tokenizer = AutoTokenizer.from_pretrained(d, trust_remote_code=trust_remote_code)
    return model, tokenizer


def model_structure(model: nn.Module) -> dict[str, Any]:
    """Structure that passes added to ``model`` (pass name → its description), as recorded on the
    model's config by the engine (and by :func:`rebuild_structure` on load)."""
    return dict(getattr(getattr(model, "config", None), STRUCTURE_ATTR, None) or {})


def manifest_structure(manifest: dict[str, Any]) -> dict[str, Any]:
    """The structure a manifest records (pass name → description); older formats kept a pass's
    structure under its own key."""
    from .registry import all_passes

    structure = dict(manifest.get("structure", {}))
    from .passes.base import ModelPass

    for name, cls in all_passes().items():
        if not issubclass(cls, ModelPass):
            continue
        if cls.legacy_manifest_key and cls.legacy_manifest_key in manifest and name not in structure:
            structure[name] = manifest[cls.legacy_manifest_key]
    return structure


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the equivalent plain model: every compressed module multiplied out."""
    state = dict(model.state_dict())
    for name, m in compressed_modules(model).items():
        for k in [k for k in state if k.startswith(name + ".")]:
            del state[k]
        with torch.no_grad():
            state[f"{name}.weight"] = m.dense_weight().detach()  # type: ignore[operator]
            bias = getattr(m, "bias", None)
            if bias is not None:
                state[f"{name}.bias"] = bias.detach()
    return state


def dense_export_blocker(model: nn.Module) -> str | None:
    """Why ``model`` has no plain transformers equivalent (a module type that declares it), or None."""
    for m in model.modules():
        reason = getattr(type(m), "dense_export_blocker", None)
        if isinstance(reason, str):
            return reason
    return None


def export_dense(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write a plain HF checkpoint (``from_pretrained`` without trust_remote_code) into ``directory``."""
    blocker = dense_export_blocker(model)
    if blocker is not None:
        raise CompressError(f"no dense export: {blocker}; load the checkpoint with compress.load(dir)")
    directory.mkdir(parents=True, exist_ok=True)
    write_config_and_tokenizer(model, tokenizer, directory)
    state, _ = dedupe(dense_state_dict(model))  # a tied head is re-tied by transformers on load
    write_weights(state, directory)
