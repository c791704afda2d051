"""The run store: every run's parameters, metrics, codebook statistics and inspection sample in one DuckDB file.

RunStore is the one object callers use; its methods come from one small module per group of tables:

``schema``             every table's DDL, the schema version and the check that a file is a run store
``connection``         StoreFile: a short connection per batch, read-only readers, batched writes
``runs``               ``runs`` and the run directories (RunRecord, RUN_LOCK, new_run_id)
``metrics``            ``metrics``
``codebooks``          ``codebook_usage``, ``codeword_counts``, ``quantizer_stats``, ``icim_stats``
``inspection_sample``  ``inspect_*``, ``codebook_vectors``, ``item_vectors``
``benches``            ``benches``, ``bench_runs``

Each group is a mixin over StoreFile, and RunStore is their union. Mixins rather than a facade that
forwards to group objects: every group must share the one StoreFile (its path and the cached schema
check), which inheritance gives without wiring; and each public method is defined once, with its
signature and docstring, instead of again as a forwarding stub that could drift from it. Methods that
span groups (delete_epochs_after) are RunStore's own and write one transaction of the groups' statements.
"""

from __future__ import annotations

import os
from pathlib import Path

from dmqn_core.runs.store import codebooks, metrics
from dmqn_core.runs.store.benches import BenchTables
from dmqn_core.runs.store.codebooks import CodebookTables
from dmqn_core.runs.store.inspection_sample import INSPECTION_COLUMNS, InspectionTables
from dmqn_core.runs.store.metrics import MetricTables
from dmqn_core.runs.store.runs import RUN_COLUMNS, RUN_LOCK, RunRecord, RunTables, iter_param_rows, new_run_id
from dmqn_core.runs.store.schema import SCHEMA, SCHEMA_VERSION

__all__ = [
    "INSPECTION_COLUMNS",
    "RUN_COLUMNS",
    "RUN_LOCK",
    "SCHEMA",
    "SCHEMA_VERSION",
    "RunRecord",
    "RunStore",
    "iter_param_rows",
    "new_run_id",
]


class RunStore(RunTables, MetricTables, CodebookTables, InspectionTables, BenchTables):
    """Read and write ``runs.duckdb``. Cheap to construct; connections are opened per call.

    ``runs_dir`` holds a directory per run with its lock (RUN_LOCK); by default the workspace's
    ``runs/`` beside the store.
    """

    def __init__(self, path: str | os.PathLike, runs_dir: str | os.PathLike | None = None) -> None:
        super().__init__(Path(path))
        self.runs_dir = Path(runs_dir) if runs_dir is not None else self.path.parent / "runs"

    def delete_epochs_after(self, run_id: str, epoch: int) -> None:
        """Forget what a crashed run logged past its last checkpoint, before resuming it."""
        self._write([*metrics.epochs_after(run_id, epoch), *codebooks.epochs_after(run_id, epoch)])
