"""What the engine calls around each decoder layer of a streamed model (:class:`LayerStream`), and
the checkpoint's weight files written from the finished layers' files (:func:`write_streamed_weights`)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..checkpoint import SHARD_BYTES, compressed_modules, dedupe, write_weights
from ..fsutil import atomic_write, writing
from ..modules import MODULE_TYPES
from ..records import ModuleRecord
from .progress import Progress
from .skeleton import StreamedModel, _numel, release


class LayerStream:
    """What the engine's layer loop calls around each decoder layer when the model is streamed."""

    def __init__(self, streamed: StreamedModel, progress: Progress, dtype: torch.dtype, offload_dir: Path | None = None) -> None:
        self.streamed = streamed
        self.progress = progress
        self.dtype = dtype
        self.start = progress.done
        self.offload_dir = offload_dir
        self.records: list[ModuleRecord] = []
        self._offloaded = 0

    def resume(self, model: nn.Module) -> list[ModuleRecord]:
        """Put the finished layers' compressed modules (on the meta device) back into the skeleton
        and return their records."""
        from ..pipeline.capture import set_submodule

        records: list[ModuleRecord] = []
        for i in range(self.start):
            meta = self.progress.layer_meta(i)
            for name, entry in meta["modules"].items():
                cls = MODULE_TYPES[entry["type"]]
                set_submodule(model, name, cls.from_spec(entry["spec"], dtype=self.dtype).to("meta"))
            records += [ModuleRecord(**{**r, "shape": tuple(r["shape"])}) for r in meta["records"]]
        return records

    def resume_inputs(self) -> Any:
        return self.progress.inputs()

    def load(self, i: int, layer: nn.Module) -> None:
        self.streamed.load_layer(i, layer)

    def done(self, i: int, n_layers: int, layer: nn.Module, inputs: Any) -> Any:
        prefix = f"{self.streamed.layers_path}.{i}."
        state = {prefix + k: v for k, v in layer.state_dict().items()}
        modules = {
            f"{prefix}{name}": {"type": type(m).__name__, "spec": m.spec()}  # type: ignore[operator]
            for name, m in compressed_modules(layer).items()
        }
        meta = {"records": [dataclasses.asdict(r) for r in self.records if r.layer == i], "modules": modules}
        per_layer = sum(t.numel() * t.element_size() for t in state.values())
        self.progress.save_layer(i, n_layers, state, meta, inputs if i + 1 < n_layers else None, per_layer * (n_layers - i - 1))
        release(layer)
        return self.keep(inputs)

    def captured(self) -> None:
        """The layer-0 inputs are in hand: the embeddings and head are not needed until the end."""
        self.streamed.release_outside()

    def keep(self, inputs: Any) -> Any:
        """With an offload directory, the activations live in a memory-mapped file there."""
        if self.offload_dir is None or inputs is None:
            return inputs
        path = self.offload_dir / f"activations-{os.getpid()}-{self._offloaded % 2}.pt"
        self._offloaded += 1
        need = sum(t.numel() * t.element_size() for t in _tensors(inputs))
        kept = (f"the finished layers ({self.progress.done}) are kept in '{self.progress.dir}'; " if self.progress.done
                else "no layer was finished yet; ")
        then = kept + "free space or choose another --offload-dir, and rerun the same command"
        with writing(path, need, then):
            atomic_write(path, lambda p: torch.save(inputs, p), unique=False)
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        path.unlink()  # the mapping keeps the data readable; the space is freed when it is dropped
        return loaded


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def write_streamed_weights(model: nn.Module, layers_path: str, progress: Progress, n_layers: int, directory: Path) -> tuple[list[str], dict[str, str]]:
    """The checkpoint's weight files from the in-memory parts and the finished layers' files: one
    ``model.safetensors`` (as an in-memory model is written) when the whole fits one shard, else the
    rest plus one shard per layer (hard links to the progress files, no copy) and the index."""
    rest = {k: v for k, v in model.state_dict().items() if not k.startswith(layers_path + ".")}
    kept, aliases = dedupe(rest)
    for i in range(n_layers):
        aliases.update(progress.layer_meta(i).get("tied", {}))
    layer_bytes = sum(progress.layer_file(i).stat().st_size for i in range(n_layers))
    rest_bytes = sum(t.numel() * t.element_size() for t in kept.values())
    if rest_bytes + layer_bytes <= SHARD_BYTES:
        state = dict(kept)
        for i in range(n_layers):
            state.update(load_file(str(progress.layer_file(i))))
        return write_weights(state, directory), aliases
    total = n_layers + 1
    files = [f"model-{k + 1:05d}-of-{total:05d}.safetensors" for k in range(total)]
    save_file(kept, str(directory / files[0]), metadata={"format": "pt"})
    weight_map = {k: files[0] for k in kept}
    size = rest_bytes
    for i in range(n_layers):
        src, dst = progress.layer_file(i), directory / files[i + 1]
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
        from ..sources import SafetensorsSource

        s = SafetensorsSource([dst])
        for name in s.names():
            weight_map[name] = files[i + 1]
            size += _numel(s.shape(name)) * torch.empty((), dtype=s.dtype(name)).element_size()
        s.close()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    return files, aliases
