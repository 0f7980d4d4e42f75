"""Checkpoint files read one tensor at a time.

A :class:`TensorSource` maps the model's state-dict names to tensors on disk and reads each one on
demand into its own memory: safetensors (single file, or shards followed through
``model.safetensors.index.json``) are read with plain positioned reads rather than a memory map, so
that streaming a 16 GB checkpoint never makes the file's pages count as the process's resident
memory; PyTorch ``.bin`` files are memory-mapped by ``torch.load``; GGUF files are dequantized one
tensor at a time (:mod:`compress.sources_gguf`).

Damaged files are refused with one line naming the file and the tensor: a header that does not
parse, data offsets past the end of the file (a truncated download), an index that points to a
missing shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Iterator, Protocol

import torch

from .dtypes import SAFETENSORS_DTYPES
from .errors import CannotStream, CompressError


class TensorSource(Protocol):
    """Named tensors of a checkpoint, read on demand."""

    files: list[Path]

    def names(self) -> list[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def dtype(self, name: str) -> torch.dtype: ...

    def get(self, name: str) -> torch.Tensor: ...

    def close(self) -> None: ...


class _SafetensorsFile:
    """One .safetensors file: its header parsed up front, tensors read by offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.is_file():
            raise CompressError(f"weight file '{path}' is missing; re-download the checkpoint")
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CompressError(f"weight file '{path}' is truncated ({size} bytes); re-download the checkpoint")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 * 1024**2):
                raise CompressError(f"weight file '{path}' has a corrupt header; re-download the checkpoint")
            try:
                header = json.loads(f.read(n))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise CompressError(f"weight file '{path}' has a corrupt header; re-download the checkpoint") from None
        self.start = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, e in header.items():
            dt = SAFETENSORS_DTYPES.get(e.get("dtype"))
            if dt is None:
                raise CompressError(f"weight file '{path}': tensor '{name}' has unsupported dtype {e.get('dtype')}")
            begin, end = e["data_offsets"]
            shape = tuple(int(s) for s in e["shape"])
            numel = 1
            for s in shape:
                numel *= s
            if end - begin != numel * torch.empty((), dtype=dt).element_size():
                raise CompressError(f"weight file '{path}': tensor '{name}' has a corrupt header (size does not match shape)")
            if self.start + end > size:
                raise CompressError(
                    f"weight file '{path}' is truncated: tensor '{name}' ends at byte {self.start + end:,} of {size:,}; re-download the checkpoint"
                )
            self.entries[name] = (dt, shape, begin, end)
        self._fd: int | None = None

    def read(self, name: str) -> torch.Tensor:
        dt, shape, begin, end = self.entries[name]
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view = memoryview(buf.numpy())  # type: ignore[arg-type]  # numpy's stubs give ndarray __buffer__ only for Python >= 3.12
        pos, off = 0, self.start + begin
        while pos < len(view):
            got = os.preadv(self._fd, [view[pos:]], off + pos)
            if got <= 0:
                raise CompressError(f"weight file '{self.path}' is truncated while reading tensor '{name}'; re-download the checkpoint")
            pos += got
        return buf.view(dt).reshape(shape) if buf.numel() else torch.empty(shape, dtype=dt)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_weight_map(index: Path) -> dict[str, str]:
    """The ``weight_map`` of a sharded checkpoint's index (tensor name → file), checked."""
    from .readers import read_json

    data = read_json(index, "checkpoint index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise CompressError(f"checkpoint index '{index}' is not a valid index (no weight_map of tensor names to files); restore or re-download it")
    return weight_map


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """The shape of each tensor in a .safetensors file, its header checked against the file's size."""
    return {name: e[1] for name, e in _SafetensorsFile(path).entries.items()}


class SafetensorsSource:
    """A single ``model.safetensors`` or the shards listed by ``model.safetensors.index.json``."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._where: dict[str, _SafetensorsFile] = {}
        for p in files:
            f = _SafetensorsFile(p)
            for name in f.entries:
                self._where[name] = f

    @classmethod
    def from_index(cls, index: Path) -> "SafetensorsSource":
        weight_map = read_weight_map(index)
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (index.parent / f).is_file():
                raise CompressError(f"checkpoint index '{index.name}' points to '{f}', which is missing from '{index.parent}'; re-download it")
        src = cls([index.parent / f for f in files])
        for name, f in weight_map.items():
            if name not in src._where:
                raise CompressError(f"checkpoint index '{index.name}' lists tensor '{name}' in '{f}', which does not hold it; re-download it")
        return src

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].entries[name][1]

    def dtype(self, name: str) -> torch.dtype:
        return self._where[name].entries[name][0]

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].read(name)

    def close(self) -> None:
        for f in set(self._where.values()):
            f.close()


class TorchBinSource:
    """PyTorch ``.bin`` state dicts (memory-mapped by torch.load; each tensor copied out on read)."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self._state: dict[str, torch.Tensor] = {}
        for p in files:
            try:
                self._state.update(torch.load(p, map_location="cpu", mmap=True, weights_only=True))
            except Exception as e:  # a legacy (not zip) file, or a damaged one
                raise CannotStream(f"weight file '{p}' cannot be memory-mapped ({type(e).__name__}); load it whole with --no-stream") from None

    def names(self) -> list[str]:
        return list(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._state[name].dtype

    def get(self, name: str) -> torch.Tensor:
        return self._state[name].clone()

    def close(self) -> None:
        self._state.clear()


def weight_files(directory: Path) -> list[Path]:
    """The weight files a load of ``directory`` reads (the index's shards, else the single file)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"), ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (directory / index).is_file():
            try:
                return [directory / f for f in sorted(set(read_weight_map(directory / index).values()))]
            except CompressError:
                return []
        if (directory / single).is_file():
            return [directory / single]
    return sorted(directory.glob("*.safetensors"))


def open_source(directory: Path, gguf_file: str | None = None, config: object = None) -> TensorSource:
    """The tensors of the checkpoint in ``directory`` (a GGUF file when ``gguf_file`` is given)."""
    if gguf_file is not None:
        from .sources_gguf import GGUFSource

        return GGUFSource(directory / gguf_file, config)
    for index, single, cls in (
        ("model.safetensors.index.json", "model.safetensors", SafetensorsSource),
        ("pytorch_model.bin.index.json", "pytorch_model.bin", TorchBinSource),
    ):
        if (directory / index).is_file():
            if cls is SafetensorsSource:
                return SafetensorsSource.from_index(directory / index)
            files = [directory / f for f in sorted(set(read_weight_map(directory / index).values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CompressError(f"checkpoint index '{index}' points to '{missing[0]}', which is missing from '{directory}'; re-download it")
            return TorchBinSource(files)
        if (directory / single).is_file():
            return cls([directory / single])
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return SafetensorsSource(found)
    raise CompressError(f"'{directory}' holds no weights that can be streamed (*.safetensors, pytorch_model.bin or .gguf)")


def iter_tensors(source: TensorSource, names: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    for name in names if names is not None else sorted(source.names()):
        yield name, source.get(name)


def scan(source: TensorSource, on_tensor: object = None) -> str:
    """Read every tensor once: refuse NaN/Inf weights (naming the tensor) and return a blake2b
    fingerprint of the names, shapes, dtypes and bytes (what a resumed run must find unchanged)."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in iter_tensors(source):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompressError(
                f"source weight '{name}' has {bad:,} non-finite values (NaN/Inf) of {t.numel():,}: the checkpoint is damaged; "
                "re-download or re-convert the model before compressing it"
            )
        if callable(on_tensor):
            on_tensor(name)
    return h.hexdigest()
