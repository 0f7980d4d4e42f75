"""The plan of one run: what :func:`compress.planning.plan` decided, once, before any compute.

A :class:`RunPlan` holds the recipe with its pass objects, the calibration settings and their token
ids, the evaluation and output settings, the device and dtype, the streaming decision with the
memory estimate, the opened model (a skeleton on the meta device, or the model itself) and the
per-target assignment: which pass, with which options, touches which linear, and the bits it will
store. The drivers (:mod:`compress.drivers`) execute it; ``compress run --dry-run`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..adapters.base import ModelAdapter
from ..calib.data import CalibConfig
from ..evalspec import EvalSpec
from ..passes.base import Pass, PassPlan, layer_relative_name
from ..recipe import Recipe
from .targets import TargetPlan


@dataclass
class ModelHandle:
    """The model a plan was made on: loaded (``loaded``), or a skeleton whose tensors are read from its
    checkpoint (``streamed``: the :class:`~compress.stream.StreamedModel`), or a skeleton for the
    checks only, whose weights the driver loads whole (``source`` and ``load_kwargs``)."""

    model: nn.Module
    tokenizer: Any
    info: dict[str, Any] = field(default_factory=dict)
    streamed: Any = None
    loaded: bool = True
    source: str | None = None
    load_kwargs: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        if self.streamed is not None:
            self.streamed.source.close()


@dataclass(frozen=True)
class RunPlan:
    """Everything one run does, decided and checked once (see :func:`compress.planning.plan`)."""

    recipe: Recipe
    passes: tuple[Pass[Any], ...]
    pass_plans: tuple[PassPlan, ...]
    targets: tuple[TargetPlan, ...]
    handle: ModelHandle
    adapter: ModelAdapter
    calib: CalibConfig
    #: (samples, seqlen) token ids, when a pass needs calibration forwards
    calib_ids: torch.Tensor | None
    #: token ids of the other calibration sources passes name (``eora:calib=...``)
    extra_ids: Mapping[str, torch.Tensor]
    #: the calibration as the report records it
    calib_info: dict[str, Any] | None
    device: torch.device
    eval_spec: EvalSpec | None = None
    baseline: bool = False
    out: Path | None = None
    overwrite: bool = False
    exports: tuple[str, ...] = ()
    data_dir: str | Path | None = None
    #: the model is read one decoder layer at a time, with a resumable progress directory
    stream: bool = False
    #: why it is not (None when it is)
    stream_note: str | None = None
    restart: bool = False
    offload_dir: Path | None = None
    #: the memory estimate line of a streamed run
    memory: str | None = None
    #: the data-parallel process group (None: one process)
    dist: Any = None
    #: what ``--budget`` chose (a :class:`~compress.search.SearchResult`; the recipe is its choice)
    search: Any = None

    @property
    def steps(self) -> list[tuple[Pass[Any], PassPlan]]:
        return list(zip(self.passes, self.pass_plans))

    @property
    def model(self) -> nn.Module:
        return self.handle.model

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.is_main

    def table(self) -> list[dict[str, Any]]:
        """The per-target assignment, one row per module name and plan (layers with the same plan merged):
        layers, module, shape, each pass with its options and what it produces, bits per weight."""
        rows: dict[tuple[Any, ...], dict[str, Any]] = {}
        for t in self.targets:
            rel = layer_relative_name(t.name, self.adapter.layers_path)
            layer = int(t.name[len(self.adapter.layers_path) + 1:].split(".", 1)[0])
            chain = tuple((self.passes[s.pass_index].options, "|".join(sorted(s.kinds)), s.shape, s.bits) for s in t.steps)
            key = (rel, t.shape, chain)
            row = rows.setdefault(key, {"module": rel, "shape": t.shape, "layers": [], "chain": chain, "dense_bits": t.dense_bits})
            row["layers"].append(layer)
        return sorted(rows.values(), key=lambda r: (r["layers"][0], r["module"]))

    def describe(self) -> list[str]:
        """The plan in lines for the terminal (``--dry-run``)."""
        lines = [f"model: {self.handle.info.get('source', type(self.model).__name__)} ({self.adapter.name} adapter, "
                 f"{len(self.adapter.layers(self.model))} layers, {self.handle.info.get('dtype', '')})",
                 "recipe: " + " -> ".join(p.options for p in self.passes)]
        if self.calib_ids is not None:
            lines.append(f"calibration: {self.calib.samples} x {self.calib.seqlen} tokens from {self.calib.source} "
                         f"(seed {self.calib.seed}, batches of {self.calib.batch_size})")
        lines.append(f"device: {self.device}; " + ("streamed layer by layer" if self.stream else f"loaded whole ({self.stream_note})"))
        if self.memory:
            lines.append(self.memory)
        if self.out is not None:
            lines.append(f"output: {self.out}" + (f"; exports {', '.join(self.exports)}" if self.exports else ""))
        if self.eval_spec:
            lines.append(f"evaluation: {self.eval_spec.cli_args()}" + (" (and the dense baseline)" if self.baseline else ""))
        lines.append("targets (layers | module | shape | passes -> module types | bits per weight):")
        for r in self.table():
            layers = _ranges(r["layers"])
            steps = "; ".join(f"{opts} -> {kinds}" for opts, kinds, _, _ in r["chain"]) or "untouched"
            bits = r["chain"][-1][3] if r["chain"] else r["dense_bits"]
            n = r["shape"][0] * r["shape"][1]
            per = "set at run time" if bits is None else f"{bits / n:.3f}"
            lines.append(f"  {layers} | {r['module']} | {r['shape'][0]}x{r['shape'][1]} | {steps} | {r['dense_bits'] / n:.0f} -> {per}")
        return lines


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] → '0-2,5'."""
    out, start = [], xs[0]
    for a, b in zip(xs, xs[1:] + [None]):
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = b if b is not None else start
    return "layers " + ",".join(out)
