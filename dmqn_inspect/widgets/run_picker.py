"""A modal list of the workspace's DMQN runs, newest first; Enter opens one."""

from __future__ import annotations

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.widgets import OptionList, Static
from textual.widgets.option_list import Option

from dmqn_core.errors import printable
from dmqn_core.runs.inspection import RunSummary


def _metric(value: float | None) -> str:
    return "  -" if value is None else f"{value:.4f}"


class RunPicker(ModalScreen[str | None]):
    """Dismissed with the chosen run id, or None when cancelled."""

    BINDINGS = [Binding("escape", "dismiss_picker", "cancel"), Binding("q", "dismiss_picker", "cancel", show=False)]

    def __init__(self, runs: list[RunSummary], current_run_id: str) -> None:
        super().__init__()
        self.runs = runs
        self.current_run_id = current_run_id

    def compose(self) -> ComposeResult:
        with Vertical(id="run-picker"):
            yield Static("Open a run (Enter), Esc to cancel.  * = the run on screen", id="run-picker-title")
            yield Static(Text(f"  {'run':<20} {'model':<11} {'dataset':<14} {'status':<11} test AUC", style="bold"))
            yield OptionList(*(self._option(run) for run in self.runs), id="run-list")

    def _option(self, run: RunSummary) -> Option:
        mark = "*" if run.run_id == self.current_run_id else " "
        # Content, not a str: a data set may be called "[red]x", which is a name, not markup; printable:
        # names read from a run store are escaped before they reach the terminal.
        line = (
            f"{mark} {run.run_id:<20} {run.model:<11} {run.dataset[:14]:<14} {run.status[:11]:<11} "
            f"{_metric(run.test_auc)}"
        )
        return Option(Content(printable(line)), id=run.run_id)

    def on_mount(self) -> None:
        options = self.query_one(OptionList)
        current = [i for i, run in enumerate(self.runs) if run.run_id == self.current_run_id]
        options.highlighted = current[0] if current else 0
        options.focus()

    @on(OptionList.OptionSelected)
    def _selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(event.option.id)

    def action_dismiss_picker(self) -> None:
        self.dismiss(None)
