"""The model skeleton of a streamed run: every parameter on the meta device, the tensors read from
the checkpoint (:class:`~compress.sources.TensorSource`) when the engine needs them, and a finished
layer's tensors dropped again (:func:`release`)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import CannotStream, CompressError
from ..sources import TensorSource


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Build modules with their parameters on the meta device (buffers stay real: rotary
    frequencies and other computed buffers are needed as they are)."""
    register = nn.Module.register_parameter

    def on_meta(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


class StreamedModel:
    """A model skeleton whose tensors come from a :class:`~compress.sources.TensorSource`."""

    def __init__(self, model: nn.Module, source: TensorSource, layers_path: str) -> None:
        self.model = model
        self.source = source
        self.layers_path = layers_path
        self._names = self._match_names()

    def _owners(self, root: nn.Module, prefix: str) -> dict[str, list[tuple[nn.Module, str, bool]]]:
        """State-dict name (first of tied names) → every (module, attribute, is_parameter) holding that tensor."""
        by_id: dict[int, str] = {}
        out: dict[str, list[tuple[nn.Module, str, bool]]] = {}
        for mname, mod in root.named_modules(remove_duplicate=False):
            full = f"{prefix}{mname}." if mname else prefix
            for attr, t in mod._parameters.items():
                if t is not None:
                    key = by_id.setdefault(id(t), full + attr)
                    out.setdefault(key, []).append((mod, attr, True))
            for attr, t in mod._buffers.items():
                if t is not None and attr not in mod._non_persistent_buffers_set:
                    key = by_id.setdefault(id(t), full + attr)
                    out.setdefault(key, []).append((mod, attr, False))
        return out

    def _match_names(self) -> dict[str, str]:
        """Model tensor name → checkpoint tensor name (the same, or without the base model's prefix)."""
        have = set(self.source.names())
        prefix = getattr(self.model, "base_model_prefix", "") + "."
        names: dict[str, str] = {}
        missing: list[str] = []
        used: set[str] = set()
        owners = self._owners(self.model, "")
        for name, holders in owners.items():
            aliases = [name] + [n for n in _all_names(self.model, holders) if n != name]
            hit = next((a for a in aliases if a in have), None) or next(
                (a.removeprefix(prefix) for a in aliases if a.removeprefix(prefix) in have), None
            )
            if hit is None:
                if not holders[0][2] and holders[0][0]._buffers[holders[0][1]].device.type != "meta":  # type: ignore[union-attr]
                    continue  # a computed buffer the checkpoint does not carry
                missing.append(name)
                continue
            names[name] = hit
            used.update(a for a in aliases if a in have)
            used.update(a.removeprefix(prefix) for a in aliases if a.removeprefix(prefix) in have)
            mod, attr, is_param = holders[0]
            want = tuple((mod._parameters if is_param else mod._buffers)[attr].shape)  # type: ignore[union-attr]
            if tuple(self.source.shape(hit)) != want:
                raise CompressError(
                    f"checkpoint tensor '{hit}' has shape {tuple(self.source.shape(hit))}, the model's config expects {want}; "
                    "the checkpoint and its config.json disagree: re-download the model"
                )
        if missing:
            raise CannotStream(
                f"the checkpoint has no tensor for '{missing[0]}' ({len(missing)} missing) under the model's names; "
                "load it whole with --no-stream"
            )
        extra = sorted(n for n in have - used if not n.endswith("rotary_emb.inv_freq"))
        if extra:
            raise CannotStream(
                f"the checkpoint holds tensors the model does not take as they are ('{extra[0]}', {len(extra)} in all: "
                "a converted or quantized layout); load it whole with --no-stream"
            )
        return names

    def _load(self, root: nn.Module, prefix: str, only: Any = None) -> None:
        """Read the tensors under ``root`` (whose names start with ``prefix``) that are still on the
        meta device, and the persistent buffers the checkpoint carries; ``only(name)`` filters."""
        for name, holders in self._owners(root, prefix).items():
            key = self._names.get(name)
            if key is None or (only is not None and not only(name)):
                continue
            mod, attr, is_param = holders[0]
            cur = (mod._parameters if is_param else mod._buffers)[attr]
            assert cur is not None
            if is_param and cur.device.type != "meta":
                continue
            t = self.source.get(key)
            if tuple(t.shape) != tuple(cur.shape):
                raise CompressError(
                    f"checkpoint tensor '{key}' has shape {tuple(t.shape)}, the model's config expects {tuple(cur.shape)}; "
                    "the checkpoint and its config.json disagree"
                )
            if t.is_floating_point() and cur.is_floating_point():
                t = t.to(cur.dtype)
            new: torch.Tensor = nn.Parameter(t, requires_grad=False) if is_param else t
            for m, a, p in holders:
                (m._parameters if p else m._buffers)[a] = new  # type: ignore[assignment]

    def load_outside(self) -> None:
        """Everything but the decoder layers (embeddings, final norm, head)."""
        inside = self.layers_path + "."
        self._load(self.model, "", lambda n: not n.startswith(inside))

    def release_outside(self) -> None:
        """Drop the tensors outside the decoder layers (embeddings and head: 2 GiB of an 8B model)
        once the layer-0 inputs are captured; :meth:`load_outside` reads them again for the
        checkpoint (per-layer passes leave them as the checkpoint has them)."""
        inside = self.layers_path + "."
        for name, holders in self._owners(self.model, "").items():
            mod, attr, is_param = holders[0]
            if name.startswith(inside) or name not in self._names or not is_param:
                continue
            cur = mod._parameters[attr]
            assert cur is not None
            meta = nn.Parameter(torch.empty_like(cur, device="meta"), requires_grad=False)
            for m, a, p in holders:
                (m._parameters if p else m._buffers)[a] = meta

    def load_layer(self, i: int, layer: nn.Module) -> None:
        self._load(layer, f"{self.layers_path}.{i}.")

    def bytes_of(self, prefix: str) -> int:
        """Bytes of the checkpoint's tensors under ``prefix`` (as stored)."""
        return sum(
            _numel(self.source.shape(k)) * torch.empty((), dtype=self.source.dtype(k)).element_size()
            for n, k in self._names.items() if n.startswith(prefix)
        )

    def bytes_outside(self) -> int:
        """Bytes of the tensors outside the decoder layers (embeddings, final norm, head; tied ones once)."""
        inside = self.layers_path + "."
        return sum(
            _numel(self.source.shape(k)) * torch.empty((), dtype=self.source.dtype(k)).element_size()
            for k in {k for n, k in self._names.items() if not n.startswith(inside)}
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _all_names(model: nn.Module, holders: list[tuple[nn.Module, str, bool]]) -> list[str]:
    names = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    return [f"{names[id(m)]}.{a}" if names.get(id(m)) else a for m, a, _p in holders if id(m) in names]


def release(layer: nn.Module) -> None:
    """Drop a finished layer's tensors (they are on disk now) and the modules' caches of dense
    weights; its structure stays for the report."""
    from ..modules.base import drop_caches

    drop_caches(layer)
    layer.to("meta")
