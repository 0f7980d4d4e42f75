"""Checks of the user's options that need no model: the output directory, the offload directory, the
evaluation options and their data. Each problem is one line naming it and a fix that exists."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CompressError
from ..evalspec import EvalSpec


def check_output_dir(out: Path, overwrite: bool, keep: tuple[object, ...] = (), flag: str = "--out") -> None:
    """OUT may be written: absent (or --overwrite), not a file, its parent creatable and writable, and
    not (nor inside, nor holding) one of the ``keep`` paths (the model read, the checkpoint exported):
    a run never replaces its own input."""
    if out.exists() and not out.is_dir():
        raise CompressError(f"output path '{out}' is a file; choose another {flag}")
    for k in keep:
        if not isinstance(k, (str, Path)) or not Path(k).expanduser().exists():
            continue
        src, dst = Path(k).expanduser().resolve(), out.expanduser().resolve()
        if src == dst or src.is_relative_to(dst) or dst.is_relative_to(src):
            raise CompressError(f"{flag} '{out}' would replace the input '{k}' it is made from; choose another {flag}")
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another {flag} or pass --overwrite")
    check_writable(out, flag)


def check_writable(path: Path, flag: str, inside: bool = False) -> None:
    """``path`` (a file or folder still to be made; with ``inside``, an existing folder) can be written:
    the nearest existing folder takes a new file. A real file is made and removed, because os.access
    says yes to root even where nothing can be created (/proc, read-only mounts)."""
    folder = path if inside else path.parent
    while not folder.exists():
        folder = folder.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".compress-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise CompressError(f"{flag} '{path}' is not writable: no file can be made in '{folder}' ({e.strerror or e}); choose another {flag}") from None


def check_offload_dir(path: Path) -> None:
    """--offload-dir exists (or can be created) and is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CompressError(f"--offload-dir '{path}' is not writable ({e.strerror or e}); choose another --offload-dir") from None
    check_writable(path, "--offload-dir", inside=True)


def check_eval(spec: EvalSpec, data_dir: str | Path | None, config: Any = None) -> None:
    """Evaluation options and their data (``config``: the model's, once it is opened)."""
    from ..eval.perplexity import check_ppl, check_ppl_data

    for name in spec.ppl:
        check_ppl(name, spec.ppl_seqlen, spec.max_windows, config)
        if config is None:
            check_ppl_data(name, data_dir)
    if spec.tasks and config is None:
        from ..eval.harness import check_tasks

        check_tasks(list(spec.tasks), spec.tasks_dir, data_dir)


def check_calib_length(seqlen: int, config: Any) -> None:
    """Calibration sequences no longer than the positions the model was trained for."""
    max_pos = getattr(config, "max_position_embeddings", None)
    if isinstance(max_pos, int) and seqlen > max_pos:
        raise CompressError(f"--calib-seqlen {seqlen} exceeds the model's max_position_embeddings {max_pos}; pass --calib-seqlen {max_pos} or less")


def check_finite(model: nn.Module) -> None:
    """Refuse a source model with NaN or Inf weights, naming the first such tensor."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not t.is_meta and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompressError(
                f"source weight '{name}' has {bad:,} non-finite values (NaN/Inf) of {t.numel():,}: the checkpoint is damaged; "
                "re-download or re-convert the model before compressing it"
            )
