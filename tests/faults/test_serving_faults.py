"""Faults around serving and the files the commands write: Redis passwords never printed, ids beyond
int64, a corrupt state cache, paths the system refuses. Each is one line on stderr, never a traceback."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import free_port, redis_server, small_dmqn_run, tiny_set_workspace
from typer.testing import CliRunner

from dmqn_cli.common import handle_errors
from dmqn_cli.main import app
from dmqn_core.errors import DmqnError
from dmqn_core.runs.inspection import RunInspector
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import CachedScorer, export_states
from dmqn_core.serving.state_store import EmbeddedStateStore, RedisStateStore
from dmqn_core.uris import redact_uri
from dmqn_core.workspace import Workspace

PASSWORD = "Pa55-w0rd-s3cret"
BEYOND_INT64 = str(2**63)  # one more than the largest int64
BELOW_INT64 = str(-(2**63) - 1)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Workspace, str]:
    """A workspace of its own with a small DMQN run (five users recorded for the inspector)."""
    ws = tiny_set_workspace(tmp_path_factory.mktemp("served"))
    return ws, small_dmqn_run(ws, inspect_users=5)


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory) -> Iterator[tuple[str, int]]:
    """A real redis-server that asks for PASSWORD, as conftest.redis_url starts one without: (host, port)."""
    with redis_server(tmp_path_factory.mktemp("redis-auth"), "--requirepass", PASSWORD) as port:
        yield "127.0.0.1", port


def invoke(*args: str):
    # Wide enough that Typer's usage-error panel does not wrap a message (Rich folds a long path anywhere).
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def one_line_error(result, code: int = 1) -> str:
    """The result's only line (on stderr), checked to be an error with no traceback."""
    assert result.exit_code == code, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    return result.stderr.strip()


# ---- 3: a Redis password is never printed ----


@pytest.mark.parametrize(
    "uri, shown",
    [
        ("redis://:s3cret@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://bob:s3cret@cache:6379/0", "redis://bob:***@cache:6379/0"),
        ("rediss://s3cret@cache/1", "rediss://***@cache/1"),  # the old PASSWORD@host form
        ("redis://:se/cr@et@cache:6379/0", "redis://:***@cache:6379/0"),  # unescaped '/' and '@'
        ("redis://cache:6379/0?password=s3cret&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("unix://:s3cret@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("/srv/cache/states.sqlite", "/srv/cache/states.sqlite"),
    ],
)
def test_redact_uri_hides_every_form_of_password(uri, shown):
    assert redact_uri(uri) == shown


def test_a_redis_password_never_shows_in_the_export_summary_or_the_unknown_user_warning(served, password_redis):
    ws, run_id = served
    host, port = password_redis
    data = Run.open(ws, run_id).data
    users_file = ws.root / "two-users.txt"
    users_file.write_text("\n".join(map(str, data.raw_user(np.arange(1, 3)).tolist())) + "\n")
    item = str(int(data.raw_item(1)))
    for uri in (f"redis://:{PASSWORD}@{host}:{port}/0", f"redis://default:{PASSWORD}@{host}:{port}/0"):
        exported = invoke("export-cache", run_id, "--users", str(users_file), "--to", uri, "-w", str(ws.root))
        assert exported.exit_code == 0, exported.output
        assert "2 users written" in exported.stdout and redact_uri(uri) in exported.stdout
        scored = invoke("score", run_id, "--user", "999999999999", "--items", item, "--from", uri, "-w", str(ws.root))
        assert scored.exit_code == 0, scored.output
        assert "no cached state" in scored.stderr and redact_uri(uri) in scored.stderr
        assert PASSWORD not in exported.output + scored.output

    uri = f"redis://:{PASSWORD}@{host}:{port}/0"
    assert PASSWORD not in export_states(ws, run_id, users=[], to=uri).store
    with CachedScorer(ws, run_id, source=uri) as scorer, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer.score(999999999999, [int(item)])
    assert caught and all(PASSWORD not in str(w.message) for w in caught)


@pytest.mark.parametrize(
    "uri",
    [
        f"redis://:{PASSWORD}@127.0.0.1:{{port}}/0",
        f"redis://default:{PASSWORD}@127.0.0.1:{{port}}/0",
        f"redis://:{PASSWORD[:4]}/{PASSWORD[5:]}@127.0.0.1:{{port}}/0",  # urllib quotes the piece before '/' as a port
        f"redis://127.0.0.1:{{port}}/0?password={PASSWORD}",
    ],
)
def test_a_redis_password_never_shows_in_connection_errors(served, uri):
    ws, run_id = served
    dead = uri.format(port=free_port())
    with pytest.raises(DmqnError) as raised:
        RedisStateStore(dead, timeout=1.0)
    assert PASSWORD[:4] not in str(raised.value) and PASSWORD[5:] not in str(raised.value)
    for args in (
        ["export-cache", run_id, "--to", dead],
        ["score", run_id, "--user", "1", "--items", "1", "--from", dead],
    ):
        line = one_line_error(invoke(*args, "-w", str(ws.root)))
        assert "Redis" in line and PASSWORD[:4] not in line and PASSWORD[5:] not in line


def test_a_wrong_redis_password_is_refused_without_showing_it(served, password_redis):
    ws, run_id = served
    host, port = password_redis
    wrong = f"redis://:not-{PASSWORD}@{host}:{port}/0"
    line = one_line_error(invoke("export-cache", run_id, "--to", wrong, "-w", str(ws.root)))
    assert "refused the connection" in line and PASSWORD not in line


# ---- 11: ids beyond int64, a corrupt cache, paths the system refuses ----


@pytest.mark.parametrize(
    "args",
    [
        ["score", "--user", BEYOND_INT64, "--items", "1"],
        ["score", "--user", BELOW_INT64, "--items", "1"],
        ["score", "--user", "1", "--items", f"1,{BEYOND_INT64}"],
        ["inspect", "--user", BEYOND_INT64],
        ["report", "--user", "1", "--user", BEYOND_INT64],
    ],
)
def test_ids_beyond_int64_are_refused_before_anything_starts(tmp_path, args):
    # An empty workspace: had the command started, it would stop at the missing run store instead.
    result = invoke(*args, "-w", str(tmp_path))
    assert result.exit_code == 2, result.output
    assert "outside the 64-bit range of ids" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs.duckdb").exists()


def test_a_users_file_with_an_id_beyond_int64_is_refused(served, tmp_path):
    ws, run_id = served
    users_file = tmp_path / "users.txt"
    users_file.write_text(f"1\n{BEYOND_INT64}\n")
    result = invoke(
        "export-cache", run_id, "--users", str(users_file), "--to", str(tmp_path / "s.sqlite"), "-w", str(ws.root)
    )
    assert result.exit_code == 2 and f"{users_file}:2: {BEYOND_INT64} is outside the 64-bit range" in result.output
    assert not (tmp_path / "s.sqlite").exists()


def test_the_inspector_search_refuses_an_id_beyond_int64(served):
    from dmqn_inspect.app import InspectApp

    ws, run_id = served
    inspector = RunInspector(ws, run_id)
    user = inspector.sampled_users()[0]

    async def main() -> None:
        app = InspectApp(ws, inspector, user)
        async with app.run_test(size=(80, 24)) as pilot:
            await app.workers.wait_for_complete()
            await pilot.press("slash", *BEYOND_INT64, "enter")
            await app.workers.wait_for_complete()
            await pilot.pause()
            message = app.query_one("#message")
            assert "outside the 64-bit range of ids" in str(message.content) and message.has_class("-error")
            assert app.inspection is not None and app.inspection.user_id == user  # still showing the user

    asyncio.run(main())


def test_a_corrupt_state_cache_is_a_one_line_error_naming_the_file(served, tmp_path):
    ws, run_id = served
    cache = tmp_path / "states.sqlite"
    cache.write_bytes(b"this is no SQLite database\n" * 200)
    with pytest.raises(DmqnError, match="file is not a database"):
        EmbeddedStateStore(cache).manifest("any-version")
    for args in (
        ["export-cache", run_id, "--to", str(cache)],
        ["score", run_id, "--user", "1", "--items", "1", "--from", str(cache)],
    ):
        line = one_line_error(invoke(*args, "-w", str(ws.root)))
        assert str(cache) in line and "file is not a database" in line


LONG_NAME = "w" * 300  # beyond NAME_MAX (255) of every common file system: ENAMETOOLONG, even for root


@pytest.mark.parametrize(
    "args",
    [
        ["prep", "LOG", "--format", "taobao", "--out", "tiny"],
        ["train", "tiny", "--model", "pop"],
        ["export-cache"],
        ["report"],
        ["bench", "tiny", "--models", "pop", "--seeds", "1"],
    ],
)
def test_a_workspace_the_system_refuses_is_one_line(served, tmp_path, args):
    ws, _ = served
    args = [str(ws.root / "tiny.csv") if a == "LOG" else a for a in args]
    refused = tmp_path / LONG_NAME
    line = one_line_error(invoke(*args, "-w", str(refused)))
    assert line == f"error: File name too long: {refused}"


def test_outputs_under_a_file_are_one_line(served, tmp_path):
    ws, run_id = served
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    line = one_line_error(invoke("export-cache", run_id, "--to", str(blocker / "states.sqlite"), "-w", str(ws.root)))
    assert line == f"error: File exists: {blocker}"
    line = one_line_error(invoke("report", run_id, "--out", str(blocker / "report.html"), "-w", str(ws.root)))
    assert line == f"error: File exists: {blocker}"


def test_other_exceptions_keep_their_traceback():
    @handle_errors
    def buggy() -> None:
        raise ValueError("a bug, not the user's doing")

    with pytest.raises(ValueError, match="a bug"):
        buggy()
