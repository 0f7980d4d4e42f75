"""Data-parallel calibration on torch.distributed.

Launched with ``torchrun --nproc-per-node N -m compress run ...``: every rank holds the model (or
streams it), takes every N-th calibration batch (the same batch boundaries as one process, so each
batch's products are computed exactly as in a single-process run), and runs the layer loop on its
share. Each layer's statistics are all-reduced in float64 (sums; maximum for ``abs_max``); rank 0
solves each linear and broadcasts the result (module type, spec and tensors); every rank rebuilds
it and propagates its own share of the activations through the compressed layer. Rank 0 writes the
checkpoint and the progress; each rank keeps its own share of the next layer's inputs for a resume.

Gloo on CPU, NCCL on GPUs (collectives on ``cuda:LOCAL_RANK``). Passes that read the layer's raw
inputs while they solve (AdaDim's sub-block errors, model-level passes) are refused up front.
"""

from __future__ import annotations

import copy
import datetime
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from ..errors import CompressError
from .stats import ACCUM_DTYPE, LayerStats


@dataclass(frozen=True)
class Dist:
    rank: int
    world: int
    device: torch.device  # where collectives run (the rank's GPU for NCCL, else the CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """This process was started by torchrun with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launcher_rank() -> int | None:
    """This process's rank when torchrun (or another torch elastic launcher) started it, else None."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and "LOCAL_RANK" not in os.environ:
        return None
    return int(os.environ.get("RANK", "0"))


def end_launcher(parent: int) -> None:
    """End the torchrun process that launched this one, without its report.

    torchrun answers any worker that exits non-zero with its own ``ChildFailedError`` traceback block,
    however the worker ends; for a refusal of the user's input (printed once, by rank 0) that block
    is noise around the one line that matters. Rank 0 therefore ends the launcher with SIGUSR2, a
    signal torchrun leaves to its default action (it handles SIGTERM, SIGINT, SIGHUP and SIGQUIT):
    the launcher exits at once, non-zero (status 140), printing nothing. Only a parent whose command
    line is torch's launcher is signalled; the other ranks end on the same refusal themselves."""
    import signal

    if os.getppid() != parent:
        return
    try:
        with open(f"/proc/{parent}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if "torchrun" in cmdline or "torch.distributed.run" in cmdline or "torch.distributed.launch" in cmdline:
        os.kill(parent, signal.SIGUSR2)


def launcher_ended(parent: int, wait_s: float) -> bool:
    """Whether the launcher ``parent`` (this process's parent when it started) ended, or ends within
    ``wait_s`` seconds (rank 0 ends it on a refusal that every rank meets; a rank that met an error of
    its own finds it still running)."""
    import time

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if os.getppid() != parent:
            return True
        time.sleep(0.05)
    return False


def init(device: torch.device) -> tuple[Dist | None, torch.device]:
    """Join the process group that torchrun describes (once); return it and this rank's compute
    device (``cuda:LOCAL_RANK`` when computing on CUDA)."""
    if not launched() and not (dist.is_available() and dist.is_initialized()):
        return None, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        minutes = float(os.environ.get("COMPRESS_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(minutes=minutes))
    return current(), device


def current() -> Dist | None:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    backend = dist.get_backend()
    dev = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Dist(dist.get_rank(), dist.get_world_size(), dev)


def check_passes(passes: list[Any], d: Dist) -> None:
    from ..passes.base import LayerPass

    for p in passes:
        if isinstance(p, LayerPass) or p.caps.uses_layer_inputs:
            raise CompressError(
                f"{p.name} reads the layer's calibration inputs while it solves, which a data-parallel run does not gather; "
                "run it in one process (without torchrun)"
            )


def shard_batches(ids: torch.Tensor, batch_size: int, d: Dist) -> torch.Tensor:
    """This rank's calibration samples: batches rank, rank + N, ... of the single-process batching."""
    n_batches = -(-ids.shape[0] // batch_size)
    if n_batches < d.world:
        raise CompressError(
            f"{ids.shape[0]} calibration samples in batches of {batch_size} give {n_batches} batches for {d.world} processes; "
            f"use more --calib-samples or a smaller --batch-size"
        )
    return torch.cat([ids[b * batch_size : (b + 1) * batch_size] for b in range(d.rank, n_batches, d.world)])


def reduce_stats(stats: LayerStats, d: Dist) -> LayerStats:
    """Sum every rank's statistics in place (float64; ``abs_max`` by maximum)."""
    for name in sorted(stats.linears):
        st = stats.linears[name]
        for key, t in st.tensors().items():
            buf = t.to(device=d.device, dtype=ACCUM_DTYPE)
            dist.all_reduce(buf, op=dist.ReduceOp.MAX if key == "abs_max" else dist.ReduceOp.SUM)
            if key == "n_tokens":
                st.n_tokens = int(buf.item())
            else:
                setattr(st, key, buf.to("cpu"))
    return stats


def solve_on_main(d: Dist, module: nn.Module, solve: Callable[[], Any], result_type: Any) -> Any:
    """Rank 0 runs ``solve()`` (a :class:`PassResult`); every other rank receives the same result:
    the new module itself (pickled on the CPU, so its types and dtypes are rank 0's), or the new
    tensors of a module changed in place. An error on rank 0 is raised on every rank."""
    from ..modules.base import drop_caches

    payload: list[Any] = [None]
    result = None
    if d.is_main:
        try:
            result = solve()
        except CompressError as e:
            payload = [{"error": str(e)}]
        else:
            if result.module is not None:
                drop_caches(result.module)
                new = copy.deepcopy(result.module).to("cpu") if _device_of(result.module).type != "cpu" else result.module
                payload = [{"module": new, "info": result.info}]
            else:
                payload = [{"state": {k: v.detach().to("cpu") for k, v in module.state_dict().items()}, "info": result.info}]
    dist.broadcast_object_list(payload, src=0, device=d.device if d.device.type == "cuda" else None)
    msg = payload[0]
    if "error" in msg:
        raise CompressError(msg["error"])
    if d.is_main:
        return result
    if "state" in msg:
        module.load_state_dict(msg["state"])
        return result_type(module=None, info=msg["info"])
    return result_type(module=msg["module"].to(_device_of(module)), info=msg["info"])


def _device_of(module: nn.Module) -> torch.device:
    t: torch.Tensor
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def agree(d: Dist | None, decide: Callable[[], Any]) -> Any:
    """Rank 0 runs ``decide()``; its result, or its one-line error, reaches every rank."""
    if d is None:
        return decide()
    payload: list[Any] = [None]
    if d.is_main:
        try:
            payload = [("ok", decide())]
        except CompressError as e:
            payload = [("error", str(e))]
    dist.broadcast_object_list(payload, src=0, device=d.device if d.device.type == "cuda" else None)
    kind, value = payload[0]
    if kind == "error":
        raise CompressError(value)
    return value


def barrier(d: Dist | None) -> None:
    if d is not None:
        dist.barrier()
