"""Checks that run before any compute: every option that can fail is refused here, with one line
naming the problem and a fix that exists, before the first layer is compressed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CompressError, ConfigError

if TYPE_CHECKING:
    from .adapters.base import ModelAdapter
    from .api import EvalSpec
    from .calib.data import CalibConfig
    from .passes.base import Pass
    from .recipe import Recipe


def check_output_dir(out: Path, overwrite: bool) -> None:
    """OUT may be written: absent (or --overwrite), not a file, its parent creatable and writable."""
    if out.exists() and not out.is_dir():
        raise CompressError(f"output path '{out}' is a file; choose another --out")
    if out.exists() and not overwrite:
        raise CompressError(f"output directory '{out}' exists; choose another --out or pass --overwrite")
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CompressError(f"cannot create '{out}': '{parent}' is not writable; choose another --out")


def check_offload_dir(path: Path) -> None:
    """--offload-dir exists (or can be created) and is writable."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".compress-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CompressError(f"--offload-dir '{path}' is not writable ({e.strerror or e}); choose another --offload-dir") from None


def check_eval(spec: "EvalSpec", data_dir: str | Path | None, config: Any = None) -> None:
    """Evaluation options and their data, before compression (``config``: the model's, when loaded)."""
    from .eval.perplexity import check_ppl, check_ppl_data

    for name in spec.ppl:
        check_ppl(name, spec.ppl_seqlen, spec.max_windows, config)
        if config is None:
            check_ppl_data(name, data_dir)
    if spec.tasks and config is None:
        from .eval.harness import check_tasks

        check_tasks(list(spec.tasks), spec.tasks_dir, data_dir)


def check_calibration(rec: "Recipe", cfg: "CalibConfig", data_dir: str | Path | None) -> None:
    """The calibration sources that the recipe will read exist."""
    from .calib.data import load_documents
    from .registry import get_pass

    caps = [get_pass(p.name).capabilities(p.config) for p in rec.passes]
    if any(c.requires_calibration for c in caps):
        load_documents(cfg.source, cfg.split, data_dir)
    for src in sorted({c.calib_source for c in caps if c.calib_source}):
        load_documents(src, cfg.split, data_dir)


def check_finite(model: nn.Module) -> None:
    """Refuse a source model with NaN or Inf weights, naming the first such tensor."""
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise CompressError(
                f"source weight '{name}' has {bad:,} non-finite values (NaN/Inf) of {t.numel():,}: the checkpoint is damaged; "
                "re-download or re-convert the model before compressing it"
            )


def linear_shapes(model: nn.Module, adapter: "ModelAdapter") -> dict[str, tuple[int, int]]:
    """(d_out, d_in) of every linear in the decoder layers, by full name."""
    from .pipeline.capture import linear_shape

    out: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(adapter.layers(model)):
        for group in adapter.groups(layer):
            for n in group:
                out[f"{adapter.layers_path}.{i}.{n}"] = linear_shape(layer.get_submodule(n))
    return out


def check_passes(model: nn.Module, adapter: "ModelAdapter", rec: "Recipe", passes: list["Pass"]) -> None:
    """The pass order on this model's linears, then every pass's options against every target's shape
    (each pass sees the shapes the passes before it leave)."""
    from .recipe import check_order

    layers = adapter.layers(model)
    if len(layers) == 0:
        raise ConfigError("the model has no decoder layers to compress")
    names = sorted({n for g in adapter.groups(layers[0]) for n in g})
    from .passes.base import matches

    for spec in rec.passes:
        pattern = getattr(spec.config, "targets", None)
        if pattern is not None and not any(matches(n, pattern) for n in names):
            raise ConfigError(f"pass '{spec.name}': targets={pattern} matches no linear of this model; its linears are {', '.join(names)}")
    check_order(rec.passes, names)
    from .passes.base import Stored, dense_bits
    from .pipeline.sequential import check_segments

    check_segments(passes)
    for k, p in enumerate(passes):
        p.bind_recipe(passes[:k], passes[k + 1:])
    shapes = linear_shapes(model, adapter)
    dtype = next((t.dtype for t in model.parameters() if t.is_floating_point()), torch.float32)
    elt = dense_bits(1, 1, dtype)
    stored = {n: Stored(dense_bits(o, i, dtype), None, elt) for n, (o, i) in shapes.items()}
    # widths a pass may choose per layer only at run time (a global allocation), each as the shapes it
    # would give: the later passes are checked on every one, and the pass avoids those they refuse
    variants: list[tuple[Any, str, int, dict[str, tuple[int, int]]]] = []
    entering: list[tuple[dict[str, tuple[int, int]], dict[str, Any]]] = []  # shapes and stored entering each pass
    for k, p in enumerate(passes):
        kept, owners = [], set()
        for owner, part, size, v_shapes in variants:
            try:
                kept.append((owner, part, size, p.check(model, adapter, v_shapes, stored)))
            except ConfigError:
                owner.refuse_size(part, size)
                owners.add(passes.index(owner))
        variants = kept
        if owners:  # the owner's own choice avoids the refused widths now: the shapes it leaves may change
            start = min(owners)
            shapes, stored = entering[start][0], dict(entering[start][1])
            entering = entering[:start]
            for q in passes[start:k]:
                entering.append((shapes, dict(stored)))
                shapes, stored = _after(q, model, adapter, shapes, stored, dtype, elt)
        entering.append((shapes, dict(stored)))
        if p.consumes_previous and not any(st.by for n, st in stored.items() if p.selects(n, adapter)):
            earlier = ", ".join(q.name for q in passes[:k])
            raise ConfigError(f"{p.name} has nothing to work on after {earlier}: no earlier pass compresses the linears it targets "
                              f"(it works on a per-linear pass's result); put a quantization or pruning pass before {p.name}")
        before = shapes
        shapes, stored = _after(p, model, adapter, shapes, stored, dtype, elt)
        size_variants = getattr(p, "size_variants", None)
        if size_variants is not None:
            variants += [(p, part, size, v) for part, size, v in size_variants(model, adapter, before)]


def _after(p: "Pass", model: nn.Module, adapter: "ModelAdapter", shapes: dict[str, tuple[int, int]], stored: dict[str, Any],
           dtype: torch.dtype, elt: int) -> tuple[dict[str, tuple[int, int]], dict[str, Any]]:
    """Check pass ``p`` on the shapes and stored bits the passes before it leave; return what it leaves."""
    from .passes.base import Stored

    after = p.check(model, adapter, shapes, stored)
    stored = dict(stored)
    for n, (o, i) in after.items():
        if p.selects(n, adapter) or after[n] != shapes[n]:
            # a model-level pass (a rotation) gives the later passes a new dense starting point,
            # which is also what the engine keeps as their original weights
            by = None if p.granularity == "model" else p.name
            shaped_by = p.name if after[n] != shapes[n] else stored[n].shaped_by
            kinds = p.produces_from(p.config, stored[n].kinds) if p.selects(n, adapter) and p.granularity != "model" else stored[n].kinds
            stored[n] = Stored(p.stored_bits(o, i, dtype), by, elt, shaped_by, kinds)
    return after, stored
