"""Loading a causal LM from a hub ID, a local directory, or a directory holding a GGUF file."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .dtypes import USER_DTYPES, parse_dtype
from .errors import CompressError, brief

if TYPE_CHECKING:
    from .modules.base import CompressedLinear

logger = logging.getLogger(__name__)

_WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt", "*.msgpack", "*.h5")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when available)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    accepted = "cpu, cuda, cuda:N or auto"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        hint = " ('cuda' is the GPU)" if str(device).strip().lower() in ("gpu", "nvidia") else ""
        raise CompressError(f"unknown --device '{device}'{hint}; accepted values: {accepted}") from None
    if dev.type not in ("cpu", "cuda"):
        raise CompressError(f"--device '{device}' is not supported; accepted values: {accepted}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompressError("--device cuda was asked for but CUDA is not available; use --device cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CompressError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 …); choose one of them")
    return dev


def _gguf_file(directory: Path, gguf_file: str | None) -> str | None:
    if gguf_file is not None:
        if not (directory / gguf_file).is_file():
            raise CompressError(f"GGUF file '{gguf_file}' not found in '{directory}'")
        return gguf_file
    found = sorted(p.name for p in directory.glob("*.gguf"))
    if len(found) > 1:
        raise CompressError(f"'{directory}' holds several GGUF files ({', '.join(found)}); choose one with --gguf-file")
    return found[0] if found else None


def load_model(
    source: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    device: str | torch.device | None = "cpu",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Load (model, tokenizer, info) from a hub ID, a local HF directory or a GGUF directory.

    A GGUF model is dequantized by transformers (needs the ``gguf`` and ``accelerate`` packages);
    its tokenizer is read from the directory when the directory has tokenizer files.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(device)
    src = str(source)
    path = Path(src).expanduser()
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    info = source_info(src)
    tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if path.exists():
        if not path.is_dir():
            raise CompressError(f"'{path}' is a file; give the directory that holds the model")
        gguf = _gguf_file(path, gguf_file)
        has_weights = any(any(path.glob(g)) for g in _WEIGHT_GLOBS)
        if gguf is None and not ((path / "config.json").is_file() and has_weights):
            raise CompressError(
                f"directory '{path}' holds no model: expected config.json with *.safetensors/*.bin weights, or a .gguf file"
            )
        if gguf is not None and not has_weights:
            kwargs["gguf_file"] = gguf
            info["gguf_file"] = gguf
            if torch_dtype == "auto":
                torch_dtype = torch.float32
            if not any(path.glob("tokenizer*")):
                tok_kwargs["gguf_file"] = gguf
        src = str(path)
    elif path.is_absolute() or src.startswith((".", "~")) or src.count("/") > 1:
        raise CompressError(f"model path '{src}' does not exist")
    else:
        from .hub import hub_reachable

        if not hub_reachable():
            raise CompressError(
                f"model '{src}' is not a local directory and the Hugging Face hub is unreachable; "
                "give a local model directory or go online"
            )
    kwargs["dtype"] = torch_dtype
    try:
        # typed as a module: transformers' @wraps-decorated PreTrainedModel.to does not type-check as a bound method
        model: nn.Module = AutoModelForCausalLM.from_pretrained(src, **kwargs)
    except ImportError as e:
        raise CompressError(f"cannot load '{src}': {brief(e)} (for GGUF: pip install 'compress[gguf]')") from None
    except (OSError, ValueError) as e:
        first = brief(e, 300)
        if not path.exists():
            raise CompressError(
                f"model '{src}' is not a local directory and could not be fetched from the hub (offline or unknown ID): {first[:200]}"
            ) from None
        raise CompressError(f"cannot load model from '{src}': {first[:300]}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **tok_kwargs)
    except Exception as e:  # tokenizer problems should not hide behind a traceback
        raise CompressError(f"cannot load the tokenizer of '{src}' ({brief(e)}); put its tokenizer files (tokenizer.json, tokenizer_config.json) in the model directory") from None
    model.to(dev)
    model.eval()
    info["dtype"] = str(next(model.parameters()).dtype).replace("torch.", "")
    info["model_type"] = getattr(model.config, "model_type", None)
    return model, tokenizer, info


def open_streamed(
    source: str | Path,
    *,
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """(StreamedModel, tokenizer, info): the model's skeleton with its parameters on the meta device
    and its checkpoint opened for reading tensor by tensor (see :mod:`compress.stream`). A hub ID is
    downloaded first (the files, not the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .adapters import get_adapter
    from .errors import CannotStream
    from .sources import open_source
    from .stream import StreamedModel, params_on_meta

    src = str(source)
    info = source_info(src)
    path = _local_files(src, gguf_file)
    if not path.is_dir():
        raise CompressError(f"'{path}' is a file; give the directory that holds the model")
    has_weights = any(any(path.glob(g)) for g in _WEIGHT_GLOBS)
    gguf = None if has_weights and gguf_file is None else _gguf_file(path, gguf_file)
    cfg_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    tok_kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf is not None:
        cfg_kwargs["gguf_file"] = gguf
        info["gguf_file"] = gguf
        if not any(path.glob("tokenizer*")):
            tok_kwargs["gguf_file"] = gguf
    elif not ((path / "config.json").is_file() and has_weights):
        raise CompressError(f"directory '{path}' holds no model: expected config.json with *.safetensors/*.bin weights, or a .gguf file")
    try:
        config = AutoConfig.from_pretrained(path, **cfg_kwargs)
    except Exception as e:  # a damaged config.json or .gguf header, an unknown model_type
        what = f"the .gguf file '{gguf}' may be damaged or truncated" if gguf else "check its config.json"
        raise CompressError(f"cannot read the config of '{src}' ({brief(e)}); {what}") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None and gguf is None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", "?")
        raise CannotStream(f"the checkpoint is quantized ({method}); its layers cannot be read one at a time here; load it whole with --no-stream")
    try:
        tensors = open_source(path, gguf, config)
    except CompressError as e:
        if gguf is None:
            raise
        raise CannotStream(f"{e}; load it whole with --no-stream") from None
    dt = _skeleton_dtype(dtype, gguf, config, tensors)
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dt, trust_remote_code=trust_remote_code)
    model.eval()
    streamed = StreamedModel(model, tensors, get_adapter(model).layers_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **tok_kwargs)
    except Exception as e:  # tokenizer problems should not hide behind a traceback
        raise CompressError(f"cannot load the tokenizer of '{src}' ({brief(e)}); put its tokenizer files (tokenizer.json, tokenizer_config.json) in the model directory") from None
    info["dtype"] = str(dt).replace("torch.", "")
    info["model_type"] = getattr(config, "model_type", None)
    return streamed, tokenizer, info


def source_info(src: str) -> dict[str, Any]:
    """How a checkpoint records its source: a local folder by its absolute path (so that a relative
    path typed in another folder still finds it), with the path as typed beside it; a hub ID as given."""
    path = Path(src).expanduser()
    if path.exists():
        return {"source": str(path.resolve()), "source_as_given": src}
    return {"source": src}


def _local_files(src: str, gguf_file: str | None) -> Path:
    """The local directory of ``src``; a hub ID is downloaded first (the files, not the model)."""
    path = Path(src).expanduser()
    if path.exists():
        return path
    from .hub import hub_reachable

    if path.is_absolute() or src.startswith((".", "~")) or src.count("/") > 1:
        raise CompressError(f"model path '{src}' does not exist")
    if not hub_reachable():
        raise CompressError(
            f"model '{src}' is not a local directory and the Hugging Face hub is unreachable; give a local model directory or go online"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "tokenizer*", *([gguf_file] if gguf_file else [])]))
    except Exception as e:  # unknown repo, gated model, network failure
        raise CompressError(f"cannot download '{src}' from the hub: {brief(e)}") from None


def _skeleton_dtype(dtype: str | torch.dtype | None, gguf: str | None, config: Any, tensors: Any) -> torch.dtype:
    """The compute dtype of a streamed model: the one asked for, else float32 for GGUF, else the config's
    declared dtype, else the checkpoint's first floating dtype."""
    dt = parse_dtype(dtype)
    if isinstance(dt, torch.dtype):
        return dt
    if gguf is not None:
        return torch.float32
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    found = declared if isinstance(declared, torch.dtype) else USER_DTYPES.get(str(declared), None)
    if found is None:
        floats = [tensors.dtype(n) for n in tensors.names() if tensors.dtype(n).is_floating_point]
        found = floats[0] if floats else torch.float32
    return found


def weights_fingerprint(model: nn.Module) -> str:
    """blake2b over the names, shapes, dtypes and bytes of every tensor of the state dict."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        t = t.detach().to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once), with the weights that quantized modules
    hold as integer codes counted as the parameters they represent."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in storage_roots(model):
        total += int(m.num_weights())
    return total


def storage_roots(model: nn.Module) -> list[CompressedLinear]:
    """The outermost modules that hold their weight in buffers (a module of that kind nested in
    another, such as the quantized atoms of a quantized dictionary layer, is counted by its owner)."""
    out: list[CompressedLinear] = []

    def walk(m: nn.Module) -> None:
        if getattr(m, "weights_in_buffers", False):
            out.append(cast("CompressedLinear", m))  # the compressed module types set weights_in_buffers
            return
        for child in m.children():
            walk(child)

    walk(model)
    return out


def storage_bytes(model: nn.Module) -> int:
    """Bytes of the model as stored: distinct parameters at their dtype, plus each quantized
    module's packed storage (codes, scales, zero-points)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel() * p.element_size()
    for m in storage_roots(model):
        total += -(-int(m.storage_bits()) // 8)
    return total
