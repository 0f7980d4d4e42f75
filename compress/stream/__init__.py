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
every layer's weights, no whole-model profile, no model-level pass):
:func:`compress.planning.stream_blocker` names the pass that cannot.

The package: :mod:`~compress.stream.skeleton` (the meta-device skeleton and its tensor source),
:mod:`~compress.stream.progress` (``OUT.partial/``) and :mod:`~compress.stream.writer` (the engine's
per-layer hook and the checkpoint's weight files).
"""

from __future__ import annotations

from .progress import STATE, Progress
from .skeleton import StreamedModel, params_on_meta, release
from .writer import LayerStream, write_streamed_weights

__all__ = ["STATE", "LayerStream", "Progress", "StreamedModel", "params_on_meta", "release", "write_streamed_weights"]
