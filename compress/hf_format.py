"""The compressed checkpoint as a transformers quantization method, so that stock
``AutoModelForCausalLM.from_pretrained(OUT)`` opens it (after ``import compress``).

A checkpoint's ``config.json`` carries::

    "quantization_config": {
        "quant_method": "compress",
        "format_version": 2,                 # refused when newer than this library reads
        "library_version": "0.1.0",
        "modules": {name: {"type": "QuantLinear", "spec": {...}}, ...},   # every compressed module
        "structure": {pass: description, ...},                            # what slicegpt/modegpt added
        "tied": {alias: source, ...}                                      # tensors written once
    }

transformers builds the plain model on the meta device, then :class:`CompressQuantizer` rebuilds the
added structure, swaps in each compressed module (empty, from its spec), resizes what the weights
say was resized (sliced models), and declares the aliases as tied, all before one weight is read;
transformers then loads the weights by name. No remote code runs.

Registration is lazy: :func:`install` (called by ``import compress``) registers at once when
transformers' quantizer registry is already imported, and otherwise when it is first imported, so
``import compress`` stays light.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "compress"
_REGISTRY_MODULE = "transformers.quantizers.auto"
_registered = False


def quantization_config(modules: dict[str, dict[str, Any]], structure: dict[str, Any], tied: dict[str, str]) -> dict[str, Any]:
    """The ``quantization_config`` entry of a checkpoint's config.json."""
    from .version import FORMAT_VERSION, __version__

    return {
        "quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "library_version": __version__,
        "modules": {n: {"type": e["type"], "spec": e["spec"]} for n, e in modules.items()},
        "structure": structure, "tied": tied,
    }


def write_quantization_config(directory: Path, entry: dict[str, Any]) -> None:
    """Add ``entry`` to the config.json already written in ``directory``."""
    p = directory / "config.json"
    config = json.loads(p.read_text())
    config["quantization_config"] = entry
    p.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")


def is_compress_checkpoint(directory: str | Path) -> bool:
    """Whether ``directory`` is a local checkpoint this format wrote (a manifest, or the config entry)."""
    d = Path(directory)
    if (d / "manifest.json").is_file():
        return True
    try:
        entry = json.loads((d / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return isinstance(entry, dict) and entry.get("quant_method") == QUANT_METHOD


def check_entry(entry: dict[str, Any], where: str = "the checkpoint") -> None:
    """Refuse a newer format version or a module type this version does not know (one line each)."""
    from .errors import CompressError
    from .modules import MODULE_TYPES
    from .readers import integer
    from .version import FORMAT_VERSION, __version__

    version = integer(entry.get("format_version", 0), "format_version", f"{where}'s quantization_config")
    if version > FORMAT_VERSION:
        raise CompressError(
            f"{where} has compress format version {version}, newer than this library reads ({FORMAT_VERSION}, compress "
            f"{__version__}); upgrade compress (pip install -U compress)"
        )
    modules = entry.get("modules") or {}
    if not isinstance(modules, dict) or not all(isinstance(m, dict) and isinstance(m.get("spec", {}), dict) for m in modules.values()):
        raise CompressError(f"{where}'s quantization_config has damaged 'modules' (each must be {{type, spec}}); restore config.json or rerun compress run")
    for name, m in modules.items():
        if m.get("type") != "Linear" and m.get("type") not in MODULE_TYPES:
            raise CompressError(
                f"{where} uses module type '{m.get('type')}' (at {name}), unknown to compress {__version__}; upgrade compress"
            )


def _define() -> tuple[type[QuantizationConfigMixin], type[HfQuantizer]]:
    import torch
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from .version import FORMAT_VERSION

    class CompressConfig(QuantizationConfigMixin):
        """``quantization_config`` of a compress checkpoint (see the module docstring)."""

        def __init__(self, modules: dict[str, Any] | None = None, structure: dict[str, Any] | None = None,
                     tied: dict[str, str] | None = None, format_version: int = FORMAT_VERSION,
                     library_version: str | None = None, **kwargs: Any) -> None:
            from .readers import integer

            self.quant_method = QUANT_METHOD  # type: ignore[assignment]
            self.format_version = integer(format_version, "format_version", "the checkpoint's quantization_config")
            self.library_version = library_version
            self.modules = dict(modules or {})
            self.structure = dict(structure or {})
            self.tied = dict(tied or {})
            check_entry(self.to_dict())

        def to_dict(self) -> dict[str, Any]:
            return {"quant_method": QUANT_METHOD, "format_version": self.format_version, "library_version": self.library_version,
                    "modules": self.modules, "structure": self.structure, "tied": self.tied}

    class CompressQuantizer(HfQuantizer):
        """Rebuilds a compress checkpoint's modules on the meta-device model before its weights load."""

        requires_calibration = True  # opens checkpoints; compressing is `compress run`

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            return None

        def _process_model_before_weight_loading(self, model: Any, checkpoint_files: list[str] | None = None,
                                                 dtype: torch.dtype | None = None, **kwargs: Any) -> Any:
            entry = self.quantization_config.to_dict()
            files = checkpoint_files or []
            saved = _saved_shapes(files)
            prepare_model(model, entry, dtype or torch.float32, files, saved)
            if saved:
                check_saved(model, saved, entry.get("tied") or {}, f"checkpoint '{Path(files[0]).parent}'")
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            finish_model(model, self.quantization_config.to_dict())
            return model

        def get_state_dict_and_metadata(self, model: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
            # tensors written once (safetensors holds no aliases); the tied ones are in the config's entry
            from .model_tensors import dedupe

            return dedupe(model.state_dict())[0], {}

        def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return CompressConfig, CompressQuantizer


def register() -> None:
    """Register the format with transformers (idempotent)."""
    global _registered, CompressConfig, CompressQuantizer
    if _registered:
        return
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    config_cls, quantizer_cls = _define()
    CompressConfig, CompressQuantizer = config_cls, quantizer_cls  # noqa: F841 - module attributes for users
    AUTO_QUANTIZATION_CONFIG_MAPPING.setdefault(QUANT_METHOD, config_cls)
    AUTO_QUANTIZER_MAPPING.setdefault(QUANT_METHOD, quantizer_cls)
    _registered = True


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers the format right after transformers' quantizer registry module is executed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            register()

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is."""
    if _REGISTRY_MODULE in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())


# --- rebuilding a model from the entry --------------------------------------------------------------------------


def _saved_shapes(files: list[str]) -> dict[str, tuple[int, ...]]:
    """Each saved tensor's shape, from the headers (a truncated or damaged file is a one-line error here,
    before transformers reads a byte of it)."""
    from .sources import read_header

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if str(f).endswith(".safetensors"):
            shapes.update(read_header(Path(f)))
    return shapes


def check_saved(model: Any, saved: dict[str, tuple[int, ...]], tied: dict[str, str], where: str) -> None:
    """Refuse weight files whose tensors are not the ones the rebuilt model expects: a tensor missing
    (transformers would initialize it at random), one the model does not have, or one of another shape."""
    import re

    from .errors import CompressError

    skip = set(tied) | set(dict(getattr(model, "all_tied_weights_keys", None) or {}))
    ignore = [*(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])]
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in skip}
    missing = sorted(k for k in expected if k not in saved and not any(re.search(p, k) for p in ignore))
    unexpected = sorted(k for k in saved if k not in expected and k not in skip)
    wrong = sorted(f"{k} {saved[k]} != {expected[k]}" for k in expected if k in saved and saved[k] != expected[k])
    if missing or unexpected or wrong:
        parts = [f"{label} {', '.join(names[:3])}{' and %d more' % (len(names) - 3) if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
        raise CompressError(f"{where}: the weight files do not match the checkpoint's description ({'; '.join(parts)}); "
                            "the checkpoint is damaged: restore it or rerun compress run")


def prepare_model(model: Any, entry: dict[str, Any], dtype: Any, files: list[str],
                  saved: dict[str, tuple[int, ...]] | None = None) -> None:
    """Give a freshly built (meta or real) model the checkpoint's structure, compressed modules, saved
    shapes and tied aliases, so that its state dict names and shapes match the checkpoint's."""
    import torch

    from .model_tensors import rebuild_structure, resize_to
    from .modules import MODULE_TYPES
    from .pipeline.capture import set_submodule

    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    rebuild_structure(model, entry.get("structure") or {}, dtype)
    for name, m in (entry.get("modules") or {}).items():
        set_submodule(model, name, MODULE_TYPES[m["type"]].from_spec(m["spec"], dtype=dtype, device=device))
    if entry.get("structure"):  # a sliced model stores smaller plain matrices; a compressed module's spec has its shapes
        modules = tuple(f"{n}." for n in entry.get("modules") or {})
        shapes = _saved_shapes(files) if saved is None else saved
        resize_to(model, {k: v for k, v in shapes.items() if not k.startswith(modules)}, device=device)
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    tied = entry.get("tied") or {}
    if any(a in params for a in tied):
        # transformers ties a declared parameter alias to its source after loading (and does not report it missing)
        keys = dict(getattr(model, "all_tied_weights_keys", None) or {})
        keys.update({a: s for a, s in tied.items() if a in params})
        model.all_tied_weights_keys = keys
    for alias in tied:
        if alias not in params:  # a buffer written once (a dictionary shared across layers): out of the loaded
            owner, _, attr = alias.rpartition(".")  # state until :func:`finish_model` ties it to its source
            model.get_submodule(owner)._non_persistent_buffers_set.add(attr)


def finish_model(model: Any, entry: dict[str, Any]) -> None:
    """After the weights loaded: tie the buffer aliases :func:`prepare_model` set aside, and make them part
    of the state dict again."""
    from .model_tensors import retie
    from .modules.base import drop_caches

    tied = entry.get("tied") or {}
    retie(model, tied)
    for alias in tied:
        owner, _, attr = alias.rpartition(".")
        model.get_submodule(owner)._non_persistent_buffers_set.discard(attr)
    drop_caches(model)


CompressConfig: Any = None
CompressQuantizer: Any = None
