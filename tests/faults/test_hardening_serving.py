"""Issue 23's serving cases: a Redis password holding '@', '/', '?' or '#' unescaped is used whole
against the host given and never shown in pieces; --ttl beyond what Redis takes, or without a Redis
target, is refused before anything is made; a run's vocabularies with indices out of range or
holding Python objects are one-line errors naming the file."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
from conftest import free_port, redis_server, small_dmqn_run, tiny_set_workspace
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.errors import DmqnError
from dmqn_core.runs.run import Run
from dmqn_core.serving.cache import export_states
from dmqn_core.serving.state_store import MAX_TTL, RedisStateStore
from dmqn_core.uris import scrub, uri_secrets
from dmqn_core.workspace import Workspace

# As typed in a URL: unescaped '@', '/', '?', '#', and an escape (%41 is 'A'), so the password is PASSWORD.
TYPED = "Kx7@Qz9/Wv4?Jy2#Hb%41"
PASSWORD = "Kx7@Qz9/Wv4?Jy2#HbA"
PIECES = re.split(r"[@/?#]", TYPED)  # what a parser cutting the password would show: Kx7, Qz9, ...


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> tuple[Workspace, str]:
    """A workspace of its own with a small DMQN run."""
    ws = tiny_set_workspace(tmp_path_factory.mktemp("served"))
    return ws, small_dmqn_run(ws)


@pytest.fixture(scope="module")
def odd_password_redis(tmp_path_factory) -> Iterator[int]:
    """A real redis-server asking for PASSWORD; yields its port."""
    with redis_server(tmp_path_factory.mktemp("redis-odd"), "--requirepass", PASSWORD) as port:
        yield port


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    return result.stderr.strip()


def two_users(ws: Workspace, run_id: str) -> Path:
    users_file = ws.root / "two-users.txt"
    users_file.write_text("\n".join(map(str, Run.open(ws, run_id).data.raw_user(np.arange(1, 3)).tolist())) + "\n")
    return users_file


# ---- 3: a password with '@', '/', '?' or '#' unescaped ----


@pytest.mark.parametrize("typed", [TYPED, "Kx7%40Qz9%2FWv4%3FJy2%23HbA"])  # unescaped, and escaped as RFC 3986 asks
def test_a_password_with_url_delimiters_reaches_the_host_given_whole(served, odd_password_redis, typed):
    ws, run_id = served
    port = odd_password_redis
    uri = f"redis://:{typed}@127.0.0.1:{port}/0"
    store = RedisStateStore(uri)
    try:
        connection = store.client.connection_pool.connection_kwargs
        assert (connection["host"], connection["port"], connection["db"]) == ("127.0.0.1", port, 0)
        assert connection["password"] == PASSWORD
        store.put("v", [(7, b"state")])
        assert store.get("v", [7]) == {7: b"state"}
        assert store.describe() == f"redis://:***@127.0.0.1:{port}/0"
    finally:
        store.clear("v")
        store.close()
    exported = invoke("export-cache", run_id, "--users", str(two_users(ws, run_id)), "--to", uri, "-w", str(ws.root))
    assert exported.exit_code == 0, exported.output
    assert "2 users written" in exported.stdout and f"redis://:***@127.0.0.1:{port}/0" in exported.stdout
    assert not any(piece in exported.output for piece in PIECES)


def test_an_unreachable_redis_is_named_by_the_host_given_and_no_piece_of_the_password(served):
    ws, run_id = served
    port = free_port()
    dead = f"redis://:{TYPED}@127.0.0.1:{port}/0"
    with pytest.raises(DmqnError) as raised:
        RedisStateStore(dead, timeout=1.0)
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "Error -2" not in message
    assert not any(piece in message for piece in PIECES), message
    for args in (
        ["export-cache", run_id, "--to", dead],
        ["score", run_id, "--user", "1", "--items", "1", "--from", dead],
    ):
        line = one_line_error(invoke(*args, "-w", str(ws.root)))
        assert f"cannot reach Redis at redis://:***@127.0.0.1:{port}/0: " in line
        assert f"connecting to 127.0.0.1:{port}" in line and not any(piece in line for piece in PIECES), line


def test_scrub_hides_whole_passwords_and_no_letters_of_ordinary_words():
    secrets = uri_secrets("redis://:p@ss/w?rd#X%41@127.0.0.1:6379/0")
    assert scrub("Error -2 connecting to ss:6379. Name or service not known.", secrets) == (
        "Error -2 connecting to ss:6379. Name or service not known."
    )
    for form in ("p@ss/w?rd#X%41", "p@ss/w?rd#XA", "p%40ss%2Fw%3Frd%23XA"):  # typed, decoded, re-quoted
        assert scrub(f"AUTH {form} failed", secrets) == "AUTH *** failed"
    assert scrub("?password=s3cret&db=1", uri_secrets("redis://cache/0?password=s3cret&db=1")) == "?password=***&db=1"


# ---- 6 and 8: --ttl ----


def test_a_ttl_beyond_what_redis_takes_is_refused_before_anything_is_written(served, odd_password_redis):
    ws, run_id = served
    uri = f"redis://:{TYPED}@127.0.0.1:{odd_password_redis}/1"
    users = str(two_users(ws, run_id))
    for ttl in ("9223372036854775807", str(MAX_TTL + 1), "0", "-5"):
        line = one_line_error(
            invoke("export-cache", run_id, "--users", users, "--to", uri, "--ttl", ttl, "-w", str(ws.root))
        )
        assert line == f"error: --ttl must be 1 to {MAX_TTL:,} seconds (what Redis can expire), got {ttl}"
    client = redis.Redis(port=odd_password_redis, password=PASSWORD, db=1)
    assert client.dbsize() == 0
    # The bound itself is taken, by SET ... EX and by EXPIRE of the manifest.
    result = export_states(ws, run_id, users=[int(u) for u in Path(users).read_text().split()], to=uri, ttl=MAX_TTL)
    assert result.users == 2
    assert all(client.ttl(key) > MAX_TTL - 60 for key in client.keys("dmqn:*"))
    client.flushdb()
    client.close()


@pytest.mark.parametrize(
    "extra",
    [[], ["--to", "states.sqlite"], ["--resume"], ["--users", "EMPTY"], ["--to", "sqlite:///x.db"]],
)
def test_a_ttl_without_a_redis_target_is_refused_before_the_workspace_is_made(tmp_path, extra):
    empty = tmp_path / "no-users.txt"
    empty.write_text("")
    extra = [str(empty) if a == "EMPTY" else a for a in extra]
    fresh = tmp_path / "not-yet"
    line = one_line_error(invoke("export-cache", "--ttl", "60", *extra, "-w", str(fresh)))
    assert line.startswith("error: --ttl needs a Redis target")
    assert not fresh.exists()


# ---- 6 and 10: a run's vocabularies ----


@pytest.fixture
def copied(served, tmp_path) -> tuple[Workspace, str, Path]:
    """A copy of the served workspace (its runs and run store; the prepared set stays shared), with the
    run's vocab/ folder, for a test to damage."""
    ws, run_id = served
    root = tmp_path / "ws"
    root.mkdir()
    shutil.copytree(ws.root / "runs", root / "runs")
    shutil.copy(ws.store_path, root / ws.store_path.name)
    copy = Workspace(root)
    vocab = copy.run_dir(run_id) / "vocab"
    assert vocab.is_dir()
    return copy, run_id, vocab


def _damage(vocab: Path, name: str, change) -> None:
    array = np.load(vocab / f"{name}.npy")
    np.save(vocab / f"{name}.npy", change(array.copy()))


def _set(i: int, value: int):
    def change(array: np.ndarray) -> np.ndarray:
        array[i] = value
        return array

    return change


@pytest.mark.parametrize(
    "name, change, message",
    [
        ("item_category", _set(5, 10**6), "holds category indices outside 0.."),
        ("item_category", _set(5, -1), "holds category indices outside 0.."),
        ("item_popularity", _set(3, -7), "holds negative counts"),
        ("item", lambda a: a[::-1].copy(), "is not sorted by raw id"),
        ("category", lambda a: np.append(a, a[-1] + 1), None),  # sorted and consistent, but one category too many
    ],
)
def test_vocabularies_out_of_range_are_one_line_errors_naming_the_file(copied, name, change, message):
    ws, run_id, vocab = copied
    item = str(int(np.load(vocab / "item.npy")[4]))  # the item whose category index is damaged above
    _damage(vocab, name, change)
    for args in (["score", run_id, "--user", "1", "--items", item], ["export-cache", run_id]):
        line = one_line_error(invoke(*args, "-w", str(ws.root)))
        if message is None:
            assert f"the vocabularies in {vocab} " in line and "do not match the run's model" in line
        else:
            assert line.startswith(f"error: {vocab / f'{name}.npy'} {message}"), line


def test_a_prepared_set_vocabulary_out_of_range_is_one_line_for_a_run_without_its_own_copy(copied):
    # Runs trained before the run folder kept the vocabularies read the prepared set's.
    ws, run_id, vocab = copied
    item = str(int(np.load(vocab / "item.npy")[4]))
    export_states(ws, run_id, users=[])
    shutil.rmtree(vocab)
    data_file = Path(Run.open(ws, run_id).record.dataset_path) / "vocab" / "item_category.npy"
    original = data_file.read_bytes()
    try:
        _damage(data_file.parent, "item_category", _set(5, 10**6))
        line = one_line_error(invoke("score", run_id, "--user", "1", "--items", item, "-w", str(ws.root)))
        assert line.startswith(f"error: {data_file} does not match run {run_id}'s model"), line
    finally:
        data_file.write_bytes(original)  # the prepared set is the module's


def test_a_vocabulary_holding_python_objects_is_refused_by_name(copied):
    ws, run_id, vocab = copied
    np.save(vocab / "item_category.npy", np.array([0, "not a number", None], dtype=object), allow_pickle=True)
    line = one_line_error(invoke("score", run_id, "--user", "1", "--items", "1", "-w", str(ws.root)))
    assert line == (
        f"error: {vocab / 'item_category.npy'} was refused: it holds Python objects (pickled data), "
        "which dmqn never loads; train the run again"
    )
