"""The non-empty clusters of the selected codebook for this user, largest first."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from dmqn_core.runs.inspection import UserInspection
from dmqn_inspect.widgets.formatting import categories_text, codeword_text, number_text, utc_day


class ClustersTable(DataTable):
    """Codeword, size, the chosen candidate's attention, time span and dominant categories of each cluster."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: UserInspection | None = None

    def on_mount(self) -> None:
        self.add_column("codeword", key="codeword")
        self.add_column("size", key="size")
        self.add_column("attention", key="attention")
        self.add_column("first", key="first")
        self.add_column("last", key="last")
        self.add_column("top categories (id×count)", key="categories")

    def show(self, inspection: UserInspection | None, codebook: int, candidate: int | None) -> None:
        """``candidate`` None (a user without candidates) leaves the attention column empty; the cursor
        stays on its row while the user stays the same."""
        row = self.cursor_row if inspection is self._shown else 0
        self._shown = inspection
        self.clear()
        if inspection is None:
            return
        for cluster in inspection.clusters(codebook):
            weight = (
                number_text(float(inspection.attention[candidate, codebook, cluster.codeword]), 3)
                if candidate is not None
                else Text("")
            )
            self.add_row(
                codeword_text(cluster.codeword),
                number_text(cluster.size),
                weight,
                utc_day(cluster.first_timestamp),
                utc_day(cluster.last_timestamp),
                categories_text(cluster.top_categories),
            )
        if self.row_count:
            self.move_cursor(row=min(row, self.row_count - 1), animate=False)
