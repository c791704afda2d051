"""The tables of DMQN's codebooks and quantizer, one set of rows per epoch (see docs/run-store.md).

``codebook_usage``  (run_id, epoch, codebook, used, dead, perplexity): utilisation of each
                    DMQN codebook on the validation histories after each epoch.
``codeword_counts`` (run_id, epoch, codebook, codeword, count): how many validation behaviors
                    each codeword received after each epoch (N·W rows per epoch).
``quantizer_stats`` (run_id, epoch, codebook, agreement, margin): DMQN's MCQM after each epoch, on the
                    real behaviors of a fixed validation sample: the share whose training-path codeword
                    (sampled as the run's options sample it) is the inference-path argmax, and the mean
                    gap between the best and second-best codeword score.
``icim_stats``      (run_id, epoch, layer, norm_ratio): |output - input| / |input| of each ICIM layer over
                    the non-empty clusters of the same sample (none for dmqn-simple).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dmqn_core.runs.store.connection import Statement, StoreFile


class CodebookTables(StoreFile):
    """The methods of RunStore that read and write the codebook and quantizer statistics."""

    def log_codebook_usage(
        self, run_id: str, epoch: int, counts: Sequence[Sequence[int]], usage: Sequence[tuple[int, int, float]]
    ) -> None:
        """counts[codebook][codeword]; usage[codebook] = (used, dead, perplexity)."""
        count_rows = [[run_id, epoch, j, k, int(c)] for j, row in enumerate(counts) for k, c in enumerate(row)]
        usage_rows = [[run_id, epoch, j, int(u), int(d), float(p)] for j, (u, d, p) in enumerate(usage)]
        self._write(
            [
                ("INSERT INTO codeword_counts VALUES (?, ?, ?, ?, ?)", count_rows),
                ("INSERT INTO codebook_usage VALUES (?, ?, ?, ?, ?, ?)", usage_rows),
            ]
        )

    def codebook_usage(self, run_id: str) -> list[tuple[int, int, int, int, float]]:
        """(epoch, codebook, used, dead, perplexity) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, codebook, used, dead, perplexity FROM codebook_usage WHERE run_id = ? "
                "ORDER BY epoch, codebook",
                [run_id],
            )
        ]

    def codeword_counts(self, run_id: str, epoch: int) -> list[tuple[int, int, int]]:
        """(codebook, codeword, count) of one epoch's validation assignments."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT codebook, codeword, count FROM codeword_counts WHERE run_id = ? AND epoch = ? "
                "ORDER BY codebook, codeword",
                [run_id, epoch],
                table="codeword_counts",
            )
        ]

    def log_quantizer_stats(
        self, run_id: str, epoch: int, codebooks: Sequence[tuple[float, float]], layers: Sequence[float]
    ) -> None:
        """codebooks[codebook] = (agreement, margin); layers[layer] = ICIM norm ratio (NaN is stored as NULL)."""
        codebook_rows = [[run_id, epoch, j, float(a), float(m)] for j, (a, m) in enumerate(codebooks)]
        layer_rows = [[run_id, epoch, i, None if math.isnan(r) else float(r)] for i, r in enumerate(layers)]
        statements = [("INSERT INTO quantizer_stats VALUES (?, ?, ?, ?, ?)", codebook_rows)]
        if layer_rows:  # dmqn-simple has no ICIM layer
            statements.append(("INSERT INTO icim_stats VALUES (?, ?, ?, ?)", layer_rows))
        self._write(statements)

    def quantizer_stats(self, run_id: str) -> list[tuple[int, int, float, float]]:
        """(epoch, codebook, agreement, margin) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, codebook, agreement, margin FROM quantizer_stats WHERE run_id = ? "
                "ORDER BY epoch, codebook",
                [run_id],
                table="quantizer_stats",
            )
        ]

    def icim_stats(self, run_id: str) -> list[tuple[int, int, float | None]]:
        """(epoch, layer, norm_ratio) rows of a run."""
        return [
            tuple(r)
            for r in self._read(
                "SELECT epoch, layer, norm_ratio FROM icim_stats WHERE run_id = ? ORDER BY epoch, layer",
                [run_id],
                table="icim_stats",
            )
        ]


def epochs_after(run_id: str, epoch: int) -> list[Statement]:
    """The deletion of every statistic recorded past ``epoch``."""
    return [
        ("DELETE FROM codebook_usage WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
        ("DELETE FROM codeword_counts WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
        ("DELETE FROM quantizer_stats WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
        ("DELETE FROM icim_stats WHERE run_id = ? AND epoch > ?", [run_id, epoch]),
    ]
