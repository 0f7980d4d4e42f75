"""Models larger than memory: a skeleton on the meta device, decoder layers read from the checkpoint
one at a time, each finished layer written to ``OUT.partial/`` and dropped, and a crashed or
interrupted run resumed from there.

The skeleton holds every parameter on the meta device; the embeddings, final norm and head are read
from the checkpoint (:mod:`compress.sources`) before compression, each decoder layer just before the
engine reaches it. After a layer is compressed and the calibration inputs are propagated through it,
:class:`LayerStream` writes the layer's tensors (``layer-NNNNN.safetensors``), the engine's records
and the compressed modules' specs (``layer-NNNNN.json``) and the next layer's inputs
(``inputs.pt``), then records the progress in ``state.json`` — each file through a temporary name and
an atomic rename, so the directory is valid whenever the process dies. ``state.json`` carries the
run's fingerprint (source weights, recipe, calibration, dtype, library version): a rerun with the
same fingerprint resumes at the first unfinished layer; any other is refused.

Only recipes whose passes work on one layer at a time can stream (no global preparation that reads
every layer's weights, no whole-model profile, no model-level pass): :func:`stream_blocker` names
the pass that cannot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import SHARD_BYTES, dedupe, compressed_modules, write_weights
from .errors import CannotStream, CompressError
from .modules import MODULE_TYPES
from .records import ModuleRecord
from .sources import TensorSource

STATE = "state.json"



def stream_blocker(passes: list[Any]) -> str | None:
    """Why this recipe needs the whole model in memory (the first pass that does), or None."""
    for p in passes:
        if p.granularity == "model" and not p.layer_local:
            return f"{p.name} {p.whole_model_reason}"
        if p.global_prepare:
            return f"{p.name} reads every layer's weights before its first layer"
        if p.caps.profile:
            return f"{p.name} with these options reads every layer's statistics before its first layer"
    return None


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
                (m._parameters if p else m._buffers)[a] = meta  # type: ignore[assignment]

    def load_layer(self, i: int, layer: nn.Module) -> None:
        self._load(layer, f"{self.layers_path}.{i}.")

    def bytes_of(self, prefix: str) -> int:
        return sum(
            _numel(self.source.shape(k)) * torch.empty((), dtype=self.source.dtype(k)).element_size()
            for n, k in self._names.items() if n.startswith(prefix)
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
    from .modules.base import drop_caches

    drop_caches(layer)
    layer.to("meta")


def _disk_full(path: Path, need: int) -> CompressError:
    amount = (f"about {need / 1024**3:.1f} GiB more are needed" if need >= 2**30 else
              f"about {need / 1024**2:.1f} MiB more are needed" if need >= 2**20 else "more space is needed")
    return CompressError(
        f"disk full while writing '{path}': {amount}; the progress so far is kept in "
        f"'{path.parent}'; free space and rerun the same command to resume"
    )


def _lock(directory: Path) -> Any:
    """An exclusive lock on ``directory`` held while this process works in it (released at exit)."""
    import fcntl

    f = open(directory / ".lock", "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise CompressError(f"another run is writing '{directory}' now; wait for it to finish or choose another --out") from None
    return f


class Progress:
    """``OUT.partial/``: finished layers, the next layer's inputs and the run's fingerprint."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], restart: bool = False, dist: Any = None) -> None:
        from .pipeline.distributed import agree

        self.dir = out.parent / f"{out.name}.partial"
        self.fingerprint = fingerprint
        self.done = 0
        self.dist = dist
        self.is_main = dist is None or dist.is_main
        self.rank_tag = "" if dist is None else f"-rank{dist.rank}"
        self._lock: Any = None
        self.done = agree(dist, lambda: self._open(restart))  # rank 0 decides, every rank learns it (or its error)

    def _open(self, restart: bool) -> int:
        """Lock the directory, then resume (the number of finished layers) or start afresh (0)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.dir)
        if restart:
            for p in self.dir.iterdir():
                if p.name != ".lock":
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        state = self.dir / STATE
        if not state.is_file():  # a new run (files of a run killed before its first layer finished are stale)
            for p in self.dir.glob("layer-*"):
                p.unlink()
            self._write_state(0)
            return 0
        try:
            saved = json.loads(state.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CompressError(f"'{state}' is damaged; rerun with --restart to start over") from None
        old = saved.get("fingerprint", {})
        diff = [k for k in sorted(set(old) | set(self.fingerprint)) if old.get(k) != self.fingerprint.get(k)]
        if diff:
            raise CompressError(
                f"'{self.dir}' holds the progress of a different run ({', '.join(diff)} changed); "
                "rerun with --restart to discard it, or choose another --out"
            )
        return int(saved.get("done", 0))

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer-{i:05d}.safetensors"

    def _write(self, path: Path, write: Any, need: int) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            write(tmp)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _disk_full(path, need) from None
            raise CompressError(f"cannot write '{path}': {e.strerror or e}") from None

    def save_layer(
        self, i: int, n_layers: int, state: dict[str, torch.Tensor], meta: dict[str, Any], inputs: Any, remaining_bytes: int
    ) -> None:
        from .pipeline.distributed import barrier

        if self.is_main:
            kept, aliases = dedupe(state)
            nbytes = sum(t.numel() * t.element_size() for t in kept.values())
            self._write(self.layer_file(i), lambda p: save_file(kept, str(p), metadata={"format": "pt"}), nbytes + remaining_bytes)
            self._write(self.dir / f"layer-{i:05d}.json", lambda p: p.write_text(json.dumps({**meta, "tied": aliases}, default=str)), remaining_bytes)
        if inputs is not None:
            self._write(self.inputs_file(i + 1), lambda p: torch.save(inputs, p), remaining_bytes)
        barrier(self.dist)  # every rank's inputs are on disk before the layer counts as done
        self.done = i + 1
        if self.is_main:
            self._write_state(n_layers)
        barrier(self.dist)
        old = self.inputs_file(i)
        if old.exists():  # superseded only once state.json points past it
            old.unlink()

    def _write_state(self, n_layers: int) -> None:
        body = json.dumps({"fingerprint": self.fingerprint, "done": self.done, "layers": n_layers}, indent=1)
        self._write(self.dir / STATE, lambda p: p.write_text(body), 4096)

    def inputs_file(self, layer: int) -> Path:
        """The inputs of decoder layer ``layer`` (this rank's share in a data-parallel run)."""
        return self.dir / f"inputs-{layer:05d}{self.rank_tag}.pt"

    def layer_meta(self, i: int) -> dict[str, Any]:
        return json.loads((self.dir / f"layer-{i:05d}.json").read_text())

    def inputs(self) -> Any:
        path = self.inputs_file(self.done)
        if not path.is_file():
            raise CompressError(f"'{self.dir}' lacks the inputs of layer {self.done + 1} ({path.name}); rerun with --restart")
        return torch.load(path, map_location="cpu", weights_only=False)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.release()

    def release(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()
            self._lock = None


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
        from .pipeline.capture import set_submodule

        records: list[ModuleRecord] = []
        for i in range(self.start):
            meta = self.progress.layer_meta(i)
            for name, entry in meta["modules"].items():
                cls = MODULE_TYPES[entry["type"]]
                set_submodule(model, name, cls.from_spec(entry["spec"], dtype=self.dtype).to("meta"))  # type: ignore[attr-defined]
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
        try:
            torch.save(inputs, path)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CompressError(f"disk full while offloading activations to '{self.offload_dir}'; free space or choose another --offload-dir") from None
            raise CompressError(f"cannot write activations to --offload-dir '{self.offload_dir}': {e.strerror or e}") from None
        loaded = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
        path.unlink()  # the mapping keeps the data readable; the space is freed when it is dropped
        return loaded


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
        from .sources import SafetensorsSource

        s = SafetensorsSource([dst])
        for name in s.names():
            weight_map[name] = files[i + 1]
            size += _numel(s.shape(name)) * torch.empty((), dtype=s.dtype(name)).element_size()
        s.close()
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map}, indent=2, sort_keys=True)
    )
    return files, aliases
