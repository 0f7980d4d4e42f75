"""Sweeps: a grid of pass configurations on one model, sharing the calibration work.

Statistics that do not depend on the grid point (Gram matrices, activation statistics) are computed
once from the dense model (one forward per layer) and cached on disk (:mod:`compress.statscache`);
every grid point then compresses a fresh copy of the dense model from the cached statistics with no
calibration forward. Note the difference from a single ``compress run``: there the statistics of
layer i are measured on the outputs of the already compressed layers before it (error propagation);
in a sweep they are the dense model's, as in SVD-LLM's reusable profiling. A pass that reads layer
inputs itself (AdaDim) still runs its calibration forwards.

Outputs in the sweep directory: ``rows/<label>-<hash>.json`` (one result per finished point, written
atomically as the point finishes, so an interrupted sweep resumes where it stopped; delete one to run
its point again), ``sweep.csv`` and ``sweep.md`` (every finished point, in grid order), ``sweep.png``
(metric vs achieved compression, one line per method, the dense model as a reference line),
``dense.json`` (the baseline) and, with ``save_checkpoints``, one compressed checkpoint per point
under ``points/``.

Sharding: ``shard=(i, n)`` (1-based, ``--shard i/n``) runs the points whose index in the grid is
congruent to i - 1 modulo n, so n jobs started on the same directory run disjoint points. They
share it safely: a point's result is its own file (temporary file + rename); ``sweep.csv``,
``sweep.md`` and ``sweep.png`` are rewritten from all finished results under an exclusive lock
(``.sweep.lock``, fcntl.flock) after every point, so the last job to finish leaves the complete
table, identical to an unsharded run's; the dense baseline (``.dense.lock``) and the statistics
cache (``.profile.lock`` in its folder) are computed by one job while the others wait, then reuse
them. A sweep directory from before per-point files (``sweep.csv`` only) is imported on first use.

The package: :mod:`~compress.sweeps.grid` (the grid and its shards), :mod:`~compress.sweeps.store`
(the sweep directory: result files, table, csv, markdown and plot) and :mod:`~compress.sweeps.driver`
(:func:`sweep`: the dense baseline, the statistics and the points).
"""

from __future__ import annotations

from .driver import sweep
from .grid import GridPoint, make_grid, parse_shard, shard_points
from .store import FIELDS, SweepResult, write_outputs

__all__ = ["FIELDS", "GridPoint", "SweepResult", "make_grid", "parse_shard", "shard_points", "sweep", "write_outputs"]
