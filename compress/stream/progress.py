"""``OUT.partial/``: the progress of a streamed run (finished layers, the next layer's inputs,
``state.json`` with the run's fingerprint), locked while a run works in it; a full disk is a
one-line error that says how to resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ..checkpoint import dedupe
from ..errors import CompressError
from ..fsutil import atomic_write, try_lock, writing

STATE = "state.json"


def _lock(directory: Path) -> Any:
    """An exclusive lock on ``directory`` held while this process works in it (released at exit)."""
    f = try_lock(directory / ".lock")
    if f is None:
        raise CompressError(f"another run is writing '{directory}' now; wait for it to finish or choose another --out")
    return f


class Progress:
    """``OUT.partial/``: finished layers, the next layer's inputs and the run's fingerprint."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], restart: bool = False, dist: Any = None) -> None:
        from ..pipeline.distributed import agree

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
        if diff == ["processes"]:
            was, now = old.get("processes"), self.fingerprint.get("processes")
            how = "in one process (without torchrun)" if was in (None, 1) else f"with torchrun --nproc-per-node {was}"
            raise CompressError(
                f"'{self.dir}' holds the progress of a run of {was or 1} process(es) and this run has {now or 1}: resume it {how}, "
                "or rerun with --restart to start over"
            )
        if diff:
            raise CompressError(
                f"'{self.dir}' holds the progress of a different run ({', '.join(diff)} changed); "
                "rerun with --restart to discard it, or choose another --out"
            )
        return int(saved.get("done", 0))

    def layer_file(self, i: int) -> Path:
        return self.dir / f"layer-{i:05d}.safetensors"

    def _write(self, path: Path, write: Any, need: int) -> None:
        then = (f"the finished layers ({self.done}) are kept in '{self.dir}': free space and rerun the same command to resume" if self.done
                else "no layer was finished yet: free space and rerun the same command")
        with writing(path, need, then):  # one writer per directory (the lock): a fixed temporary name, overwritten after a kill
            atomic_write(path, write, fsync=True, unique=False)

    def save_layer(
        self, i: int, n_layers: int, state: dict[str, torch.Tensor], meta: dict[str, Any], inputs: Any, remaining_bytes: int
    ) -> None:
        from ..pipeline.distributed import barrier

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
        p = self.dir / f"layer-{i:05d}.json"
        try:
            return dict(json.loads(p.read_text()))
        except (OSError, ValueError, TypeError):
            raise CompressError(f"'{p}', a finished layer's description, is missing or damaged; rerun with --restart to start over") from None

    def check_layers(self, n: int) -> None:
        """Every one of the first ``n`` finished layers has its files (a resume or the final write needs them)."""
        for i in range(n):
            for p in (self.layer_file(i), self.dir / f"layer-{i:05d}.json"):
                if not p.is_file():
                    raise CompressError(
                        f"'{self.dir}' lacks '{p.name}', the file of finished layer {i + 1}; "
                        "rerun with --restart to start over (or restore the file)"
                    )

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
