"""The chosen candidate's attention (CTAM) over the user's clusters of one codebook, as terminal bars."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from dmqn_core.runs.inspection import UserInspection
from dmqn_inspect.widgets.formatting import HorizontalBar, codeword_text, number_text

_BAR_COLOUR = "#5fafff"
_MATCH_COLOUR = "#87d787"


class AttentionChart(Static):
    """One bar per non-empty cluster, heaviest first; clusters led by the candidate's category in green."""

    def show(self, inspection: UserInspection | None, codebook: int, candidate: int | None) -> None:
        if inspection is None:
            self.update("")
            return
        if candidate is None:
            self.update(
                f"User {inspection.user_id} has no test candidates, so no candidate attends to the "
                "clusters. Press / to search another user."
            )
            return
        clusters = inspection.clusters(codebook)
        category = int(inspection.candidate_category[candidate])
        heading = Text.assemble(
            (f"candidate {candidate + 1}/{len(inspection.candidate_item)}", "bold"),
            f": item {int(inspection.candidate_item[candidate])}, ",
            ("category ", _MATCH_COLOUR),
            (str(category), f"bold {_MATCH_COLOUR}"),
            ", ",
            ("clicked", "bold") if inspection.label[candidate] else "not clicked",
            f", predicted {float(inspection.score[candidate]):.3f}",
        )
        if not clusters:
            self.update(Group(heading, Text("The user has no history: no cluster to attend to.")))
            return
        weights = inspection.attention[candidate, codebook]
        peak = max(float(weights[c.codeword]) for c in clusters)
        table = Table(box=None, expand=True, pad_edge=False, padding=(0, 1))
        table.add_column("codeword", justify="right", no_wrap=True)
        table.add_column("weight", justify="right", no_wrap=True)
        table.add_column("", ratio=1, no_wrap=True)
        table.add_column("size", justify="right", no_wrap=True)
        table.add_column("top category", no_wrap=True)
        for cluster in sorted(clusters, key=lambda c: (-float(weights[c.codeword]), c.codeword)):
            weight = float(weights[cluster.codeword])
            top, count = cluster.top_categories[0]
            matches = top == category
            table.add_row(
                codeword_text(cluster.codeword),
                number_text(weight, 3),
                HorizontalBar(weight, peak, _MATCH_COLOUR if matches else _BAR_COLOUR),
                number_text(cluster.size),
                Text(f"{top}×{count}", style=f"bold {_MATCH_COLOUR}" if matches else ""),
            )
        self.update(Group(heading, table))
