"""`dmqn inspect`: one user's codeword assignments, clusters and candidate attention in a DMQN run.

Every read of the run store or the checkpoint runs in a thread worker and comes back to the UI
thread as a message, so the screen stays responsive while a user is computed on demand. The run
store is only ever opened read-only (through RunInspector), so a `dmqn train` may run meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.content import Content
from textual.message import Message
from textual.widgets import Footer, Static, TabbedContent, TabPane
from textual.worker import get_current_worker

from dmqn_core.errors import DmqnError, printable
from dmqn_core.runs.inspection import RunInspector, RunSummary, UserInspection, dmqn_runs
from dmqn_core.workspace import Workspace
from dmqn_inspect.widgets.attention import AttentionChart
from dmqn_inspect.widgets.clusters import ClustersTable
from dmqn_inspect.widgets.help_screen import HelpScreen
from dmqn_inspect.widgets.info_bar import InfoBar
from dmqn_inspect.widgets.run_picker import RunPicker
from dmqn_inspect.widgets.timeline import TimelineTable
from dmqn_inspect.widgets.user_search import UserSearch
from dmqn_inspect.widgets.utilisation import UtilisationChart

VIEWS = ("timeline", "clusters", "attention", "utilisation")
_CODEBOOK = Binding.Group("codebook", compact=True)
_CANDIDATE = Binding.Group("candidate", compact=True)
_VIEW = Binding.Group("view", compact=True)


@dataclass
class RunData:
    """What the screen needs of a run whoever the user is; read once when the run is opened."""

    inspector: RunInspector
    sampled_users: list[int]
    utilisation: np.ndarray | None  # (N, W) validation counts at the best epoch; None when none were recorded


class Loaded(Message):
    """A worker's result: the run (when one was opened) and the user, or why the user could not be read."""

    def __init__(self, user_id: int, run: RunData | None, inspection: UserInspection | None, error: str | None) -> None:
        super().__init__()
        self.user_id = user_id
        self.run = run
        self.inspection = inspection
        self.error = error


class RunsListed(Message):
    def __init__(self, runs: list[RunSummary]) -> None:
        super().__init__()
        self.runs = runs


class ReadFailed(Message):
    """A run could not be opened or listed; the screen keeps what it shows."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class InspectApp(App[None]):
    CSS_PATH = "app.tcss"
    TITLE = "dmqn inspect"
    # Every action has a key in the footer; a palette would only repeat them.
    ENABLE_COMMAND_PALETTE = False

    BINDINGS = [
        Binding("left_square_bracket", "codebook(-1)", "codebook", group=_CODEBOOK, tooltip="previous codebook"),
        Binding("right_square_bracket", "codebook(1)", "codebook", group=_CODEBOOK, tooltip="next codebook"),
        Binding("p", "candidate(-1)", "candidate", group=_CANDIDATE, tooltip="previous candidate"),
        Binding("n", "candidate(1)", "candidate", group=_CANDIDATE, tooltip="next candidate"),
        Binding("slash", "search_user", "user", tooltip="search a user by id"),
        Binding("r", "pick_run", "run", tooltip="open another DMQN run of this workspace"),
        *(
            Binding(str(number), f"view('{view}')", "view", group=_VIEW, tooltip=f"show the {view} view")
            for number, view in enumerate(VIEWS, 1)
        ),
        Binding("question_mark", "help", "help", tooltip="this help"),
        Binding("q", "quit", "quit", tooltip="quit"),
    ]

    def __init__(self, workspace: Workspace, inspector: RunInspector, user_id: int) -> None:
        super().__init__()
        self.workspace = workspace
        self.user_id = user_id  # the user asked for, shown even while unknown
        self.run_data: RunData | None = None
        self.inspection: UserInspection | None = None
        self.codebook = 0
        self.candidate: int | None = None
        self._first_inspector = inspector

    def compose(self) -> ComposeResult:
        yield InfoBar(id="info")
        yield Static(id="message")
        yield UserSearch(id="search")
        with TabbedContent(initial="timeline"):
            with TabPane("1 Timeline", id="timeline"):
                yield TimelineTable(id="timeline-table")
            with TabPane("2 Clusters", id="clusters"):
                yield ClustersTable(id="clusters-table")
            with TabPane("3 Attention", id="attention"):
                with VerticalScroll():
                    yield AttentionChart(id="attention-chart")
            with TabPane("4 Utilisation", id="utilisation"):
                with VerticalScroll():
                    yield UtilisationChart(id="utilisation-chart")
        yield Footer()

    def on_mount(self) -> None:
        self._show_message(f"loading user {self.user_id}…")
        self._load(self._first_inspector, self.user_id, new_run=True)

    # -- reading, in threads ------------------------------------------------------------
    def _read(self, inspector: RunInspector, user_id: int, new_run: bool) -> Loaded:
        run = None
        if new_run:
            try:
                utilisation = inspector.utilisation()
            except DmqnError:  # a run trained before utilisation was recorded
                utilisation = None
            run = RunData(inspector, inspector.sampled_users(), utilisation)
        try:
            return Loaded(user_id, run, inspector.user(user_id), None)
        except DmqnError as exc:
            return Loaded(user_id, run, None, str(exc))

    @work(thread=True, exclusive=True, group="read")
    def _load(self, inspector: RunInspector, user_id: int, new_run: bool) -> None:
        message = self._read(inspector, user_id, new_run)
        if not get_current_worker().is_cancelled:  # a newer request replaced this one
            self.post_message(message)

    @work(thread=True, exclusive=True, group="read")
    def _open_run(self, run_id: str, user_id: int) -> None:
        try:
            inspector = RunInspector(self.workspace, run_id)
        except DmqnError as exc:  # deleted since the picker listed it, or its store is gone
            message: Message = ReadFailed(str(exc))
        else:
            message = self._read(inspector, user_id, new_run=True)
        if not get_current_worker().is_cancelled:
            self.post_message(message)

    @work(thread=True, exclusive=True, group="runs")
    def _list_runs(self) -> None:
        try:
            self.post_message(RunsListed(dmqn_runs(self.workspace)))
        except DmqnError as exc:
            self.post_message(ReadFailed(str(exc)))

    # -- results, on the UI thread ------------------------------------------------------
    def on_loaded(self, message: Loaded) -> None:
        if message.run is not None:
            self.run_data = message.run
            self.inspection = None
            self.codebook = 0
            self.query_one(UserSearch).suggest_users(message.run.sampled_users)
        if message.error is not None:
            hint = self._sampled_hint()
            self._show_message(f"{message.error}. Press / to search another user{hint}.", error=True)
            self._refresh()
            return
        inspection = message.inspection
        assert inspection is not None  # the worker sends one wherever it sends no error
        self.user_id = message.user_id
        self.inspection = inspection
        self.candidate = 0 if len(inspection.candidate_item) else None
        self._show_message("")
        self._refresh()

    def on_runs_listed(self, message: RunsListed) -> None:
        if not message.runs:
            self._show_message(f"no dmqn run in {self.workspace.root}", error=True)
            return
        current = self.run_data.inspector.run_id if self.run_data else ""
        self.push_screen(RunPicker(message.runs, current), self._run_picked)

    def on_read_failed(self, message: ReadFailed) -> None:
        self._show_message(message.error, error=True)

    def _run_picked(self, run_id: str | None) -> None:
        if run_id is not None and (self.run_data is None or run_id != self.run_data.inspector.run_id):
            self._show_message(f"opening run {run_id}…")
            self._open_run(run_id, self.user_id)

    @on(UserSearch.Chosen)
    def _user_chosen(self, event: UserSearch.Chosen) -> None:
        if self.run_data is None:  # still opening the run: that worker will show someone
            return
        self._show_message(f"loading user {event.user_id}…")
        self._load(self.run_data.inspector, event.user_id, new_run=False)

    @on(UserSearch.Rejected)
    def _user_rejected(self, event: UserSearch.Rejected) -> None:
        self._show_message(event.reason, error=True)

    @on(UserSearch.Closed)
    def _search_closed(self) -> None:
        self._focus_view()

    @on(TabbedContent.TabActivated)
    def _view_changed(self) -> None:
        self._focus_view()

    # -- actions ------------------------------------------------------------------------
    def action_codebook(self, step: int) -> None:
        if self.run_data is not None:
            self.codebook = (self.codebook + step) % self.run_data.inspector.n_codebooks
            self._refresh()

    def action_candidate(self, step: int) -> None:
        if self.inspection is None or self.candidate is None:
            self.bell()
            return
        self.candidate = (self.candidate + step) % len(self.inspection.candidate_item)
        self._refresh()

    def action_search_user(self) -> None:
        self.query_one(UserSearch).open()

    def action_pick_run(self) -> None:
        self._list_runs()

    def action_view(self, view: str) -> None:
        self.query_one(TabbedContent).active = view

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    # -- drawing ------------------------------------------------------------------------
    def _refresh(self) -> None:
        if self.run_data is None:
            return
        inspector = self.run_data.inspector
        self.query_one(InfoBar).show(
            inspector.run_id,
            inspector.model,
            inspector.dataset,
            self.user_id,
            self.inspection,
            inspector.n_codebooks,
            self.codebook,
            self.candidate,
        )
        self.query_one(TimelineTable).show(self.inspection, self.codebook)
        self.query_one(ClustersTable).show(self.inspection, self.codebook, self.candidate)
        self.query_one(AttentionChart).show(self.inspection, self.codebook, self.candidate)
        self.query_one(UtilisationChart).show(self.run_data.utilisation, self.inspection, self.codebook)

    def _show_message(self, text: str, error: bool = False) -> None:
        message = self.query_one("#message", Static)
        # Content, not a str: the text quotes run ids, paths and error messages, which are not markup.
        # printable: nor are their control characters to be acted on.
        message.update(Content(printable(text)))
        message.display = bool(text)
        message.set_class(error, "-error")

    def _sampled_hint(self) -> str:
        users = self.run_data.sampled_users if self.run_data else []
        if not users:
            return ""
        return f" (recorded users: {', '.join(map(str, users[:5]))}{', …' if len(users) > 5 else ''})"

    def _focus_view(self) -> None:
        pane = self.query_one(TabbedContent).active_pane
        if pane is not None:
            pane.query("DataTable, VerticalScroll").first().focus()
