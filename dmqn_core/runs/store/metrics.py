"""The ``metrics`` table: (run_id, epoch, split, name, value), the history of every metric of a run, per
epoch; epoch is NULL for evaluations made after training (``dmqn eval``)."""

from __future__ import annotations

from dmqn_core.runs.store.connection import Statement, StoreFile, utc_now


class MetricTables(StoreFile):
    """The methods of RunStore that read and write ``metrics``."""

    def log_metrics(self, run_id: str, split: str, metrics: dict[str, float], epoch: int | None = None) -> None:
        now = utc_now()
        rows = [[run_id, epoch, split, name, float(value), now] for name, value in metrics.items()]
        if rows:
            self._write([("INSERT INTO metrics VALUES (?, ?, ?, ?, ?, ?)", rows)])

    def metric_history(self, run_id: str) -> list[tuple[int | None, str, str, float]]:
        """(epoch, split, name, value) in the order they were recorded."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, split, name, value FROM metrics WHERE run_id = ? "
                "ORDER BY recorded_at, epoch NULLS LAST, split, name",
                [run_id],
            )
        ]


def epochs_after(run_id: str, epoch: int) -> list[Statement]:
    """The deletion of the metrics logged past ``epoch``, and of those logged after training."""
    return [("DELETE FROM metrics WHERE run_id = ? AND (epoch > ? OR epoch IS NULL)", [run_id, epoch])]
