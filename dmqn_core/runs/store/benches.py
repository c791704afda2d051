"""The tables of ``dmqn bench``.

``benches``     one row per bench: its name, data set and settings (JSON).
``bench_runs``  (bench, model, seed, run_id): the run that trains each model and seed of a bench;
                written before the run starts, so an interrupted bench finds it again.
"""

from __future__ import annotations

import json
from typing import Any

from dmqn_core.errors import DmqnError
from dmqn_core.runs.store.connection import StoreFile, utc_now


class BenchTables(StoreFile):
    """The methods of RunStore that read and write ``benches`` and ``bench_runs``."""

    def register_bench(self, bench: str, dataset: str, settings: dict[str, Any]) -> None:
        """Record a bench; an existing one must have been started with the same settings."""
        text = json.dumps(settings, sort_keys=True)
        query = ("SELECT settings FROM benches WHERE bench = ?", [bench], "benches")
        rows = self._read(*query)
        if not rows:
            # Two processes may start the same bench at once (each with its share of the models):
            # the one that writes second keeps the first one's row and is checked against it below.
            insert = "INSERT INTO benches VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING"
            self._write([(insert, [bench, dataset, utc_now(), text])])
            rows = self._read(*query)
        if json.loads(rows[0][0]) != json.loads(text):
            raise DmqnError(f"bench {bench!r} already exists with other settings; choose another --name")

    def bench_run(self, bench: str, model: str, seed: int) -> str | None:
        """The run id recorded for (bench, model, seed), if any."""
        rows = self._read(
            "SELECT run_id FROM bench_runs WHERE bench = ? AND model = ? AND seed = ?",
            [bench, model, seed],
            table="bench_runs",
        )
        return rows[0][0] if rows else None

    def set_bench_run(self, bench: str, model: str, seed: int, run_id: str) -> None:
        self._write(
            [
                ("DELETE FROM bench_runs WHERE bench = ? AND model = ? AND seed = ?", [bench, model, seed]),
                ("INSERT INTO bench_runs VALUES (?, ?, ?, ?)", [bench, model, seed, run_id]),
            ]
        )
