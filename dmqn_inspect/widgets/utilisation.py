"""How often each codeword of one codebook was used on the validation set, the user's clusters marked."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from dmqn_core.runs.inspection import UserInspection
from dmqn_inspect.widgets.formatting import HorizontalBar, codeword_text, number_text

_BAR_COLOUR = "#5f87af"
_USER_COLOUR = "#ffaf5f"


def perplexity(counts: np.ndarray) -> float:
    """exp(entropy) of the assignment distribution: W when every codeword is used equally, 1 on collapse."""
    total = counts.sum()
    if total == 0:
        return 0.0
    shares = counts[counts > 0] / total
    return float(np.exp(-(shares * np.log(shares)).sum()))


class UtilisationChart(Static):
    """One bar per codeword (validation assignments at the best epoch), in codeword order."""

    def show(self, utilisation: np.ndarray | None, inspection: UserInspection | None, codebook: int) -> None:
        """``utilisation`` is the run's (N, W) count matrix, None when the run recorded none."""
        if utilisation is None or not utilisation.any():
            self.update("This run recorded no codeword utilisation yet.")
            return
        counts = utilisation[codebook]
        user_sizes = {c.codeword: c.size for c in inspection.clusters(codebook)} if inspection is not None else {}
        used = int((counts > 0).sum())
        heading = Text.assemble(
            (f"codebook {codebook + 1}/{len(utilisation)}", "bold"),
            f": {used}/{len(counts)} codewords used, {len(counts) - used} dead, perplexity {perplexity(counts):.1f}",
            f"\n{int(counts.sum()):,} validation behaviors at the best epoch",
        )
        if inspection is not None:
            heading.append("; user's clusters: ")
            heading.append(f"{len(user_sizes)}", style=f"bold {_USER_COLOUR}")
        peak = float(counts.max())
        total = float(counts.sum())
        table = Table(box=None, expand=True, pad_edge=False, padding=(0, 1))
        table.add_column("codeword", justify="right", no_wrap=True)
        table.add_column("count", justify="right", no_wrap=True)
        table.add_column("%", justify="right", no_wrap=True)
        table.add_column("", ratio=1, no_wrap=True)
        table.add_column("user", justify="right", no_wrap=True)
        for codeword, count in enumerate(counts.tolist()):
            mine = codeword in user_sizes
            table.add_row(
                codeword_text(codeword),
                number_text(int(count)),
                number_text(100 * count / total, 1),
                HorizontalBar(float(count), peak, _USER_COLOUR if mine else _BAR_COLOUR),
                Text(f"{user_sizes[codeword]:,}", style=f"bold {_USER_COLOUR}") if mine else Text(""),
            )
        self.update(Group(heading, table))
