"""The help screen: what each view shows, and the keys (read from the app's bindings)."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

INTRODUCTION = (
    "[b]dmqn inspect[/b] shows how a DMQN run compresses one user's history: each of the N codebooks assigns "
    "every behavior to one of W codewords, and the behaviors of a codeword form an interest cluster. "
    "A user outside the sample recorded at the end of training is computed from the checkpoint."
)

VIEWS = (
    (
        "1 Timeline",
        "the behaviors the model encodes (the last max_len), oldest first, with each one's codeword "
        "in the selected codebook",
    ),
    (
        "2 Clusters",
        "the user's non-empty clusters in that codebook: size, the chosen candidate's attention, "
        "first and last behavior, dominant categories (id×count)",
    ),
    (
        "3 Attention",
        "the candidate's target attention (CTAM) over the clusters, heaviest first; green: the "
        "cluster's top category is the candidate's",
    ),
    (
        "4 Utilisation",
        "validation behaviors per codeword at the best epoch (a dead codeword has no bar); the "
        "user's clusters in orange",
    ),
)


def _two_columns() -> Table:
    table = Table(box=None, show_header=False, pad_edge=False, padding=(0, 2, 0, 0), expand=True)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(ratio=1)
    return table


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss", "close")]

    def compose(self) -> ComposeResult:
        views = _two_columns()
        for name, text in VIEWS:
            views.add_row(name, text)
        keys = _two_columns()
        for binding in self.app.BINDINGS:
            if isinstance(binding, Binding) and binding.tooltip:
                keys.add_row(self.app.get_key_display(binding), binding.tooltip)
        with VerticalScroll(id="help"):
            yield Static(INTRODUCTION)
            yield Static(views, classes="help-section")
            yield Static(keys, classes="help-section")
            yield Static(Text("Esc, ? or q closes this screen; arrows scroll it.", style="dim"), classes="help-section")
