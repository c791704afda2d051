"""`dmqn inspect`: the Textual app driven with Pilot on a tiny DMQN run, snapshots, and the command line.

The behaviour tests read a real run trained here. The snapshot tests use a seeded stand-in for
RunInspector instead, so that what they draw does not move with the model's numerics (a different
CPU may round a score differently); they are compared with the SVG files under
tests/__snapshots__/test_inspect_tui/ by pytest-textual-snapshot. After a deliberate change of the
screens, look at the report pytest writes on failure, then refresh them with

    pytest tests/test_inspect_tui.py --snapshot-update
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Awaitable, Callable

import numpy as np
import pytest
from rich.console import Console
from textual.pilot import Pilot
from typer.testing import CliRunner

from dmqn_cli.main import app as cli
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.runs.inspection import RunInspector, RunSummary, UserInspection
from dmqn_core.training.train import train
from dmqn_inspect.app import InspectApp
from dmqn_inspect.widgets.attention import AttentionChart
from dmqn_inspect.widgets.clusters import ClustersTable
from dmqn_inspect.widgets.help_screen import HelpScreen
from dmqn_inspect.widgets.info_bar import InfoBar
from dmqn_inspect.widgets.run_picker import RunPicker
from dmqn_inspect.widgets.timeline import TimelineTable

SIZE = (80, 24)
MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8}
# Five recorded users: every other user of the tiny set is computed from the checkpoint on demand.
TRAIN = {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 5}


@pytest.fixture(scope="module")
def inspect_run(tiny_workspace) -> str:
    return train(tiny_workspace, "tiny", "dmqn", MODEL, TRAIN).run_id


@pytest.fixture(scope="module")
def other_run(tiny_workspace, inspect_run) -> str:
    """A second, newer run with three codebooks, for the run picker."""
    return train(tiny_workspace, "tiny", "dmqn", {**MODEL, "n_codebooks": 3}, TRAIN).run_id


def drive(app: InspectApp, scenario: Callable[[Pilot], Awaitable[None]]) -> None:
    """Run ``scenario`` against ``app`` in an 80×24 headless terminal, the first user loaded."""

    async def main() -> None:
        async with app.run_test(size=SIZE) as pilot:
            await settle(pilot)
            await scenario(pilot)

    asyncio.run(main())


async def settle(pilot: Pilot) -> None:
    """Wait for the reading workers, then for the messages they posted to be handled."""
    await pilot.app.workers.wait_for_complete()
    await pilot.pause()


async def search(pilot: Pilot, user_id: int) -> None:
    await pilot.press("slash", *str(user_id), "enter")
    await settle(pilot)


def column(table, key: str) -> list[str]:
    return [str(cell) for cell in table.get_column(key)]


def plain(renderable) -> str:
    console = Console(width=SIZE[0], record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def info(app: InspectApp) -> str:
    return plain(app.query_one(InfoBar).content)


def message(app: InspectApp) -> str:
    return str(app.query_one("#message").content)


# -- behaviour, on a real run --------------------------------------------------------------
def test_codebook_keys_switch_the_codewords_shown(tiny_workspace, inspect_run):
    inspector = RunInspector(tiny_workspace, inspect_run)
    user = inspector.sampled_users()[0]
    expected = inspector.user(user)
    assert not np.array_equal(expected.codeword[0], expected.codeword[1])

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        timeline, clusters = app.query_one(TimelineTable), app.query_one(ClustersTable)
        assert column(timeline, "codeword") == [str(w) for w in expected.codeword[0]]
        assert "codebook 1/2" in info(app)
        await pilot.press("right_square_bracket")
        assert column(timeline, "codeword") == [str(w) for w in expected.codeword[1]]
        assert column(clusters, "codeword") == [str(c.codeword) for c in expected.clusters(1)]
        assert "codebook 2/2" in info(app)
        await pilot.press("right_square_bracket")  # wraps around
        assert column(timeline, "codeword") == [str(w) for w in expected.codeword[0]]
        await pilot.press("left_square_bracket")
        assert "codebook 2/2" in info(app)

    drive(InspectApp(tiny_workspace, inspector, user), scenario)


def test_candidate_keys_switch_the_attention_shown(tiny_workspace, inspect_run):
    inspector = RunInspector(tiny_workspace, inspect_run)
    user = next(u for u in inspector.sampled_users() if len(inspector.user(u).candidate_item) >= 2)
    expected = inspector.user(user)
    words = [c.codeword for c in expected.clusters(0)]

    def weights(candidate: int) -> list[str]:
        return [f"{expected.attention[candidate, 0, w]:.3f}" for w in words]

    assert weights(0) != weights(1)

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        chart, clusters = app.query_one(AttentionChart), app.query_one(ClustersTable)
        await pilot.press("3")
        assert app.query_one("TabbedContent").active == "attention"
        assert f"candidate 1/{len(expected.candidate_item)}: item {expected.candidate_item[0]}," in plain(chart.content)
        assert column(clusters, "attention") == weights(0)
        await pilot.press("n")
        assert f"candidate 2/{len(expected.candidate_item)}: item {expected.candidate_item[1]}," in plain(chart.content)
        assert column(clusters, "attention") == weights(1)
        await pilot.press("p")
        assert column(clusters, "attention") == weights(0)

    drive(InspectApp(tiny_workspace, inspector, user), scenario)


def test_searching_a_user_loads_them_from_the_checkpoint(tiny_workspace, inspect_run):
    inspector = RunInspector(tiny_workspace, inspect_run)
    sampled = inspector.sampled_users()
    data = PreparedSet.open(tiny_workspace.dataset_path("tiny"))
    others = [u for u in data.raw_user(np.arange(1, data.n_users + 1)).tolist() if u not in sampled]
    other = int(others[0])

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        await search(pilot, other)
        assert app.inspection.user_id == other and not app.inspection.recorded
        assert f"user {other} · " in info(app) and "computed on demand" in info(app)
        expected = RunInspector(tiny_workspace, inspect_run).user(other)
        assert column(app.query_one(TimelineTable), "item") == [str(i) for i in expected.item]
        assert message(app) == "" and not app.query_one("#search").display

    drive(InspectApp(tiny_workspace, inspector, sampled[0]), scenario)


def test_an_unknown_user_is_a_message_not_a_crash(tiny_workspace, inspect_run):
    inspector = RunInspector(tiny_workspace, inspect_run)
    known = inspector.sampled_users()[0]

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        await search(pilot, 987654321)
        assert "unknown user 987654321" in message(app) and "Press / to search" in message(app)
        assert app.query_one("#message").has_class("-error")
        assert app.inspection.user_id == known  # the user on screen stays
        await search(pilot, known)
        assert message(app) == ""

    drive(InspectApp(tiny_workspace, inspector, known), scenario)

    async def starts_unknown(pilot: Pilot) -> None:
        app = pilot.app
        assert app.inspection is None and "unknown user 987654321" in message(app)
        assert "not loaded" in info(app) and app.query_one(TimelineTable).row_count == 0
        await search(pilot, known)
        assert app.inspection.user_id == known

    drive(InspectApp(tiny_workspace, inspector, 987654321), starts_unknown)


def test_help_screen_lists_the_keys(tiny_workspace, inspect_run):
    inspector = RunInspector(tiny_workspace, inspect_run)

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = " ".join(plain(static.content) for static in app.screen.query("Static"))
        for tooltip in ("next codebook", "previous candidate", "search a user by id", "open another DMQN run"):
            assert tooltip in text
        await pilot.press("escape")
        assert not isinstance(app.screen, HelpScreen)

    drive(InspectApp(tiny_workspace, inspector, inspector.sampled_users()[0]), scenario)


def test_run_picker_opens_another_run(tiny_workspace, inspect_run, other_run):
    inspector = RunInspector(tiny_workspace, inspect_run)
    user = inspector.sampled_users()[0]

    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        await pilot.press("r")
        await settle(pilot)
        picker = app.screen
        assert isinstance(picker, RunPicker)
        ids = [run.run_id for run in picker.runs]
        assert ids.index(other_run) < ids.index(inspect_run)  # newest first
        options = picker.query_one("OptionList")
        assert options.highlighted == ids.index(inspect_run)  # the run on screen
        options.highlighted = ids.index(other_run)
        await pilot.press("enter")
        await settle(pilot)
        assert app.run_data.inspector.run_id == other_run
        assert f"run {other_run}" in info(app) and "codebook 1/3" in info(app)
        assert app.inspection.user_id == user

    drive(InspectApp(tiny_workspace, inspector, user), scenario)


def test_a_user_without_candidates_is_explained(tiny_workspace):
    async def scenario(pilot: Pilot) -> None:
        app = pilot.app
        await pilot.press("3", "n", "p")  # nothing to step through: a bell, not an error
        assert app.candidate is None and "no test candidates" in info(app)
        assert "has no test candidates" in plain(app.query_one(AttentionChart).content)
        await pilot.press("slash", "escape")  # a cancelled search changes nothing
        assert not app.query_one("#search").display and app.inspection.user_id == 9

    drive(seeded_app(tiny_workspace, 9), scenario)


# -- the command line ------------------------------------------------------------------------
def test_an_unknown_run_or_a_missing_store_fails_before_the_tui(tiny_workspace, inspect_run, tmp_path):
    runner = CliRunner()
    unknown = runner.invoke(
        cli, ["inspect", "--run", "no-such-run", "--user", "1", "--workspace", str(tiny_workspace.root)]
    )
    assert unknown.exit_code == 1 and "unknown run 'no-such-run'" in unknown.output
    assert len(unknown.output.strip().splitlines()) == 1
    missing = runner.invoke(cli, ["inspect", "--user", "1", "--workspace", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no run store" in missing.output
    assert not (tmp_path / "nowhere").exists()  # a read-only command creates no workspace


# -- snapshots, on seeded data ------------------------------------------------------------------
class SeededInspector:
    """Stands in for RunInspector with fixed, seeded data: users 7 and 8 (recorded), 9 (no candidates)."""

    run_id = "20250101-120000-abcd"
    model = "dmqn"
    dataset = "snapshot"
    n_codebooks = 2
    codebook_size = 12
    embed_dim = 8

    def sampled_users(self) -> list[int]:
        return [7, 8]

    def utilisation(self, epoch: int | None = None) -> np.ndarray:
        counts = np.random.default_rng(0).integers(20, 400, size=(self.n_codebooks, self.codebook_size))
        counts[0, [3, 10]] = 0  # two dead codewords
        return counts

    def user(self, user_id: int) -> UserInspection:
        if user_id not in (7, 8, 9):
            raise DmqnError(f"unknown user {user_id} in data set {self.dataset}")
        rng = np.random.default_rng(user_id)
        L, N, W = 40, self.n_codebooks, self.codebook_size
        categories = np.array([101, 202, 303, 404, 505])
        category = categories[rng.choice(5, size=L, p=[0.4, 0.25, 0.15, 0.1, 0.1])]
        # Codewords mostly follow the category, as a trained quantizer's would.
        codeword = np.stack(
            [
                np.where(
                    rng.random(L) < 0.3,
                    rng.integers(0, W, size=L),
                    (np.searchsorted(categories, category) * (n + 2)) % W,
                )
                for n in range(N)
            ]
        )
        C = 0 if user_id == 9 else 3
        candidate_category = categories[[0, 2, 4]][:C]
        attention = np.zeros((C, N, W))
        for c in range(C):
            for n in range(N):
                words = np.unique(codeword[n])
                # A cluster holding the candidate's category draws more attention.
                logits = rng.normal(size=len(words)) + 2.0 * np.array(
                    [np.any(category[codeword[n] == w] == candidate_category[c]) for w in words]
                )
                attention[c, n, words] = np.exp(logits) / np.exp(logits).sum()
        return UserInspection(
            run_id=self.run_id,
            user_id=user_id,
            recorded=True,
            n_codebooks=N,
            codebook_size=W,
            timestamp=1511740800 + np.sort(rng.integers(0, 9 * 86400, size=L)),
            item=rng.integers(100000, 999999, size=L),
            category=category,
            behavior=rng.choice(np.array(["pv", "cart", "fav", "buy"]), size=L, p=[0.85, 0.07, 0.05, 0.03]),
            codeword=codeword,
            candidate_item=np.array([424242, 515151, 606060])[:C],
            candidate_category=candidate_category,
            label=np.array([1, 0, 0])[:C],
            score=np.array([0.734, 0.412, 0.087])[:C],
            attention=attention,
        )


SNAPSHOT_RUNS = [
    RunSummary(SeededInspector.run_id, "dmqn", "snapshot", "finished", "2025-01-01T12:00:00", 0.7312, 0.7021, 0.5512),
    RunSummary(
        "20241231-090000-beef", "dmqn-simple", "snapshot", "finished", "2024-12-31T09:00:00", 0.7107, 0.6890, 0.5634
    ),
    RunSummary("20241230-080000-cafe", "dmqn", "taobao-head", "interrupted", "2024-12-30T08:00:00", None, None, None),
]


def seeded_app(tiny_workspace, user_id: int = 7) -> InspectApp:
    return InspectApp(tiny_workspace, SeededInspector(), user_id)


@pytest.mark.parametrize(
    "keys", [(), ("2",), ("3", "n"), ("4",)], ids=["timeline", "clusters", "attention", "utilisation"]
)
def test_snapshot_views(snap_compare, tiny_workspace, keys):
    assert snap_compare(seeded_app(tiny_workspace), press=keys, terminal_size=SIZE, run_before=settle)


def test_snapshot_help(snap_compare, tiny_workspace):
    assert snap_compare(seeded_app(tiny_workspace), press=["question_mark"], terminal_size=SIZE, run_before=settle)


def test_snapshot_unknown_user(snap_compare, tiny_workspace):
    assert snap_compare(seeded_app(tiny_workspace, 12345), terminal_size=SIZE, run_before=settle)


def test_snapshot_user_without_candidates(snap_compare, tiny_workspace):
    assert snap_compare(seeded_app(tiny_workspace, 9), press=["3"], terminal_size=SIZE, run_before=settle)


def test_snapshot_run_picker(snap_compare, tiny_workspace, monkeypatch):
    monkeypatch.setattr("dmqn_inspect.app.dmqn_runs", lambda workspace: SNAPSHOT_RUNS)

    async def open_picker(pilot: Pilot) -> None:
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)

    assert snap_compare(seeded_app(tiny_workspace), terminal_size=SIZE, run_before=open_picker)
