"""The user's behaviors, oldest first, with each one's codeword in the selected codebook."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import DataTable

from dmqn_core.errors import printable
from dmqn_core.runs.inspection import UserInspection
from dmqn_inspect.widgets.formatting import codeword_text, id_text, number_text, utc_minute


class TimelineTable(DataTable):
    """One row per behavior of the encoded history: time (UTC), item, category, type, codeword."""

    def __init__(self, **kwargs) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self._shown: UserInspection | None = None

    def on_mount(self) -> None:
        self.add_column("#", key="position")
        self.add_column("time (UTC)", key="time")
        self.add_column("item", key="item")
        self.add_column("category", key="category")
        self.add_column("type", key="behavior")
        self.add_column("codeword", key="codeword")

    def show(self, inspection: UserInspection | None, codebook: int) -> None:
        """Rebuild the rows; the cursor stays on its row while the user stays the same."""
        row = self.cursor_row if inspection is self._shown else 0
        self._shown = inspection
        self.clear()
        if inspection is None:
            return
        self.add_rows(
            (
                number_text(position + 1),
                utc_minute(timestamp),
                id_text(item),
                id_text(category),
                Text(printable(str(behavior))),
                codeword_text(int(codeword)),
            )
            for position, (timestamp, item, category, behavior, codeword) in enumerate(
                zip(
                    inspection.timestamp,
                    inspection.item,
                    inspection.category,
                    inspection.behavior,
                    inspection.codeword[codebook],
                )
            )
        )
        if self.row_count:
            self.move_cursor(row=min(row, self.row_count - 1), animate=False)
