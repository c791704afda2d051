"""Issue 23, items 5, 6, 8 and 9: the run store and the study storage as someone may hand them over, and
the command line under signals.

A crafted ``runs.duckdb`` must not make DuckDB read another file (external access is off), and any store
whose schema is not the one dmqn writes is one line in every command; so is a crafted ``studies.db`` in
``bench --tuned`` and ``tune --show``. A new run whose process was killed between taking its lock and
writing its row leaves a directory that the next listing removes, and nothing else is removed. SIGTERM
during ``dmqn tune`` and while the command line imports ends with ``error: interrupted`` and 130 alone.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import optuna
import pytest
from conftest import tiny_set_workspace
from optuna.distributions import FloatDistribution
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.runs.store import RUN_LOCK, RunStore
from dmqn_core.training import tune as tune_module
from dmqn_core.training.train import train
from dmqn_core.training.tune import search as tune_search
from dmqn_core.training.tune import study as tune_study
from dmqn_core.training.tune import tuned_settings
from dmqn_core.workspace import Workspace, exclusive_lock

NOT_A_STORE = "is not a dmqn run store"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Workspace:
    """A workspace with the synthetic set 'tiny' (as tests/conftest.py's); tests copy its data/ into their own."""
    return tiny_set_workspace(tmp_path_factory.mktemp("prepared"))


def workspace_with_data(prepared: Workspace, root: Path) -> Workspace:
    ws = Workspace(root).ensure()
    shutil.rmtree(ws.data_dir)
    shutil.copytree(prepared.data_dir, ws.data_dir)
    return ws


def cli(ws: Workspace, *args: str):
    return CliRunner().invoke(app, [*args, "-w", str(ws.root)], terminal_width=200)


def assert_one_line_error(result, message: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and message in result.output, result.output


def make_run(store: RunStore) -> str:
    return store.create_run(model="pop", dataset="d", dataset_path="/x/d", params={}, seed=0, n_parameters=0)


def run_entries(ws: Workspace) -> list[str]:
    return sorted(p.name for p in ws.runs_dir.iterdir())


# -- item 5: a run store is opened with DuckDB's external access off ---------------------------
def runs_view_over(store_path: Path, source: Path) -> None:
    """A store whose runs is a view that reads ``source``: each line a run id, the other columns made up."""
    con = duckdb.connect(str(store_path))
    con.execute("CREATE TABLE schema_info (version INTEGER NOT NULL)")
    con.execute("INSERT INTO schema_info VALUES (4)")
    con.execute(
        "CREATE VIEW runs AS SELECT column0 AS run_id, 'pop' AS model, 'tiny' AS dataset, 'x' AS dataset_path, "
        "'finished' AS status, now() AS created_at, now() AS finished_at, 0 AS seed, '{}' AS params, "
        "0 AS n_parameters, 1 AS epochs_done, 1 AS best_epoch, 0.5 AS best_valid_auc, 0.5 AS test_auc, "
        "0.5 AS test_gauc, 0.5 AS test_logloss, 1.0 AS train_seconds, NULL AS checkpoint, NULL AS error "
        f"FROM read_csv('{source}', header = false, columns = {{'column0': 'VARCHAR'}})"
    )
    con.close()


def test_a_runs_view_over_a_local_file_is_refused_without_reading_it(prepared, tmp_path):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-7e1a\n")
    runs_view_over(ws.store_path, secret)
    for args in (["runs"], ["runs", "--json"], ["eval"], ["runs", "show", "s3cr3t-7e1a"]):
        result = cli(ws, *args)
        assert_one_line_error(result, f"{ws.store_path} {NOT_A_STORE} (runs is a view, not a table)")
        assert "s3cr3t" not in result.output
    # item 6: train refused it with a CatalogException; no run is left behind either.
    result = cli(ws, "train", "tiny", "--model", "pop", "--epochs", "1")
    assert_one_line_error(result, NOT_A_STORE)
    assert run_entries(ws) == []


def test_the_run_store_connection_reads_no_other_file(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    make_run(store)
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t")
    # What any statement of a crafted file could do, tried on the connection the store reads through.
    con = store._connect(read_only=True)
    try:
        with pytest.raises(duckdb.PermissionException):
            con.execute("SELECT content FROM read_text(?)", [str(secret)]).fetchall()
        with pytest.raises(duckdb.PermissionException):
            con.execute(f"COPY (SELECT 1) TO '{tmp_path / 'out.csv'}'")
    finally:
        con.close()
    assert not (tmp_path / "out.csv").exists()


def test_a_view_of_another_name_is_left_alone_and_never_read(tmp_path):
    store = RunStore(tmp_path / "runs.duckdb")
    run = make_run(store)
    con = duckdb.connect(str(store.path))
    con.execute(f"CREATE VIEW mine AS SELECT * FROM read_text('{tmp_path / 'absent.txt'}')")
    con.close()
    assert [r.run_id for r in store.list_runs()] == [run]
    store.finish_run(run, "finished")
    assert store.get_run(run).status == "finished"


# -- item 6: a run store whose schema is not what dmqn made is one line ------------------------
CRAFTED_SCHEMAS = {
    "runs is a view": ["DROP TABLE runs", "CREATE VIEW runs AS SELECT 'r' AS run_id"],
    "metrics is a view": ["DROP TABLE metrics", "CREATE VIEW metrics AS SELECT 1 AS run_id"],
    "no runs table": ["DROP TABLE runs"],
    "no schema_info": ["DROP TABLE schema_info"],
    "a column missing": ["ALTER TABLE runs DROP COLUMN error"],
    "a column more": ["ALTER TABLE runs ADD COLUMN extra INTEGER"],
    "a column of another type": ["ALTER TABLE metrics ALTER COLUMN value TYPE VARCHAR"],
    "a check that refuses rows": [
        "DROP TABLE metrics",
        "CREATE TABLE metrics (run_id VARCHAR NOT NULL, epoch INTEGER, split VARCHAR NOT NULL, "
        "name VARCHAR NOT NULL, value DOUBLE, recorded_at TIMESTAMPTZ NOT NULL, CHECK (value < 0))",
    ],
    "two schema versions": ["INSERT INTO schema_info VALUES (4)"],
    "schema version 0": ["UPDATE schema_info SET version = 0"],
    "a macro shadowing a function": ["CREATE MACRO lower(x) AS x"],
    "a table macro shadowing the catalog": ["CREATE MACRO duckdb_tables() AS TABLE SELECT 'runs' AS table_name"],
    "an index": ["CREATE UNIQUE INDEX one_metric ON metrics (run_id)"],
    "a type": ["CREATE TYPE mood AS ENUM ('a', 'b')"],
}


@pytest.mark.parametrize("statements", CRAFTED_SCHEMAS.values(), ids=CRAFTED_SCHEMAS.keys())
def test_a_store_with_another_schema_is_one_line_everywhere(prepared, tmp_path, statements):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    store = RunStore(ws.store_path)
    run = make_run(store)
    con = duckdb.connect(str(ws.store_path))
    for sql in statements:
        con.execute(sql)
    con.close()
    store = RunStore(ws.store_path)
    for call in (
        store.list_runs,
        lambda: store.get_run(run),
        lambda: store.resolve_run_id(None),
        lambda: store.log_metrics(run, "valid", {"auc": 0.5}, epoch=1),
        lambda: make_run(store),
    ):
        with pytest.raises(DmqnError, match=NOT_A_STORE):
            call()
    assert_one_line_error(cli(ws, "runs"), NOT_A_STORE)
    assert_one_line_error(cli(ws, "train", "tiny", "--model", "pop", "--epochs", "1"), NOT_A_STORE)
    assert run_entries(ws) == []


def test_a_database_of_another_program_is_not_a_run_store(tmp_path):
    path = tmp_path / "runs.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE customers (id INTEGER)")
    con.close()
    with pytest.raises(DmqnError, match=NOT_A_STORE):
        RunStore(path).list_runs()
    with pytest.raises(DmqnError, match=NOT_A_STORE):
        make_run(RunStore(path))


def test_an_empty_duckdb_file_becomes_a_run_store(tmp_path):
    path = tmp_path / "runs.duckdb"
    duckdb.connect(str(path)).close()
    store = RunStore(path)
    assert store.list_runs() == []
    run = make_run(store)
    assert [r.run_id for r in RunStore(path).list_runs()] == [run]


# -- item 6: a crafted studies.db is one line in bench --tuned and tune --show ------------------
def crafted_study(ws: Workspace, study_attrs: dict, trial_attrs: dict, params: dict | None = None) -> Path:
    """studies.db with one study 'S' holding one complete trial, made through Optuna."""
    path = ws.root / "tune" / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(storage=f"sqlite:///{path}", study_name="S", direction="maximize")
    for key, value in study_attrs.items():
        study.set_user_attr(key, value)
    params = {"lr": 0.001} if params is None else params
    study.add_trial(
        optuna.trial.create_trial(
            params=params,
            distributions={name: FloatDistribution(1e-5, 1.0, log=True) for name in params},
            value=0.6,
            user_attrs=trial_attrs,
        )
    )
    return path


def sql_on(path: Path, sql: str) -> None:
    con = sqlite3.connect(path)
    con.execute(sql)
    con.commit()
    con.close()


# What `dmqn tune` records ("FINGERPRINT": the prepared set's), and crafted variants of it.
STUDY = {"dataset": "tiny", "fingerprint": "FINGERPRINT", "model": "din-short"}
TRIAL = {"run_id": "r", "model_settings": {}, "train_settings": {"lr": 0.001}}
CRAFTED_STUDIES = {
    "no user attributes": ({}, TRIAL, None, None),
    "no fingerprint": ({"dataset": "tiny", "model": "din-short"}, TRIAL, None, None),
    "a model that is not a text": ({**STUDY, "model": 3}, TRIAL, None, None),
    "a trial without its settings": (STUDY, {"run_id": "r"}, None, None),
    "settings that are not a table": (STUDY, {**TRIAL, "model_settings": [1, 2]}, None, None),
    "a run id that is not a text": (STUDY, {**TRIAL, "run_id": 7}, None, None),
    "a searched setting the model has not": (
        STUDY,
        {**TRIAL, "train_settings": {"lr": 0.001, "zzz": 0.5}},
        {"lr": 0.001, "zzz": 0.5},
        None,
    ),
    "an attribute that is not JSON": (STUDY, TRIAL, None, "UPDATE study_user_attributes SET value_json = '{bad'"),
    "a distribution that is not JSON": (STUDY, TRIAL, None, "UPDATE trial_params SET distribution_json = '{bad'"),
    "an unknown trial state": (STUDY, TRIAL, None, "UPDATE trials SET state = 'BOGUS'"),
    "a study that minimises": (STUDY, TRIAL, None, "UPDATE study_directions SET direction = 'MINIMIZE'"),
}


@pytest.mark.parametrize("case", CRAFTED_STUDIES.values(), ids=CRAFTED_STUDIES.keys())
def test_a_crafted_study_is_one_line_in_bench_tuned_and_tune_show(prepared, tmp_path, case):
    attrs, trial_attrs, params, sql = case
    ws = workspace_with_data(prepared, tmp_path / "ws")
    fingerprint = PreparedSet.open(ws.dataset_path("tiny")).fingerprint
    attrs = {key: fingerprint if value == "FINGERPRINT" else value for key, value in attrs.items()}
    path = crafted_study(ws, attrs, trial_attrs, params)
    if sql:
        sql_on(path, sql)
    result = cli(ws, "bench", "tiny", "--models", "din-short", "--seeds", "1", "--epochs", "1", "--tuned", "S")
    assert_one_line_error(result, "")
    assert "study" in result.output
    assert run_entries(ws) == []  # refused before any training
    result = cli(ws, "tune", "--show", "S")
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None), result.output
    with pytest.raises(DmqnError):
        tuned_settings(ws, "S")


@pytest.mark.parametrize("content", [b"", b"this is not a database\n" * 50], ids=["empty", "not sqlite"])
def test_a_studies_db_that_is_empty_or_not_sqlite_is_one_line(prepared, tmp_path, content):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    (ws.root / "tune").mkdir()
    (ws.root / "tune" / "studies.db").write_bytes(content)
    result = cli(ws, "bench", "tiny", "--models", "din-short", "--seeds", "1", "--epochs", "1", "--tuned", "S")
    assert_one_line_error(result, "studies.db")
    assert_one_line_error(cli(ws, "tune", "--show", "S"), "studies.db")


def test_a_table_of_another_program_in_studies_db_is_one_line(prepared, tmp_path):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    (ws.root / "tune").mkdir()
    sql_on(ws.root / "tune" / "studies.db", "CREATE TABLE studies (x INTEGER)")
    result = cli(ws, "bench", "tiny", "--models", "din-short", "--seeds", "1", "--epochs", "1", "--tuned", "S")
    assert_one_line_error(result, "is damaged or not Optuna's")
    assert_one_line_error(cli(ws, "tune", "--show", "S"), "is damaged or not Optuna's")


# -- item 8: a new run killed between its lock and its row leaves nothing for long --------------
def test_a_tune_trial_killed_between_its_lock_and_its_row_leaves_no_directory(prepared, tmp_path):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    # The trial's process dies right where it would write the run's row, its lock taken (SIGKILL there).
    script = (
        "import os, signal, sys\n"
        "from dmqn_core.runs.store import RunStore\n"
        "RunStore.create_run = lambda self, **fields: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from dmqn_cli.main import app\n"
        f"app(['tune', 'tiny', '--model', 'din-short', '--trials', '1', '--epochs', '1', '-w', {str(ws.root)!r}])\n"
    )
    process = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert process.returncode == -signal.SIGKILL, process.stderr
    (left,) = ws.runs_dir.iterdir()
    assert sorted(p.name for p in left.iterdir()) == [RUN_LOCK]
    result = cli(ws, "runs")
    assert result.exit_code == 0 and run_entries(ws) == []


def test_only_abandoned_run_directories_are_removed(tmp_path):
    ws = Workspace(tmp_path / "ws").ensure()
    store = RunStore(ws.store_path)

    def run_dir(name: str, lock: bytes | None = b"4242") -> Path:
        path = ws.run_dir(name)
        path.mkdir()
        if lock is not None:
            (path / RUN_LOCK).write_bytes(lock)
        return path

    recorded = make_run(store)
    run_dir(recorded)  # a run with a row (one that failed before its first epoch holds only its lock too)
    abandoned = run_dir("20240101-000000-dead")  # its process was killed: pid written, lock free
    unwritten = run_dir("20240101-000000-0000", lock=b"")  # killed before it wrote its pid, long ago
    os.utime(unwritten / RUN_LOCK, (time.time() - 3600, time.time() - 3600))
    young = run_dir("20240101-000000-young", lock=b"")  # a trainer that is taking its lock right now
    more = run_dir("20240101-000000-more")
    (more / "notes.txt").write_text("mine")
    words = run_dir("20240101-000000-words", lock=b"not a pid")
    empty = run_dir("20240101-000000-empty", lock=None)
    linked = run_dir("20240101-000000-link", lock=None)
    (linked / RUN_LOCK).symlink_to(abandoned / RUN_LOCK)
    (ws.runs_dir / "20240101-000000-alias").symlink_to(abandoned, target_is_directory=True)
    held = ws.run_dir("20240101-000000-held")
    with exclusive_lock(held / RUN_LOCK, "run held"):  # a trainer between its lock and its row
        store.list_runs()
    remaining = set(run_entries(ws))
    assert abandoned.name not in remaining and unwritten.name not in remaining
    kept = {recorded, young.name, more.name, words.name, empty.name, linked.name, held.name, "20240101-000000-alias"}
    assert remaining == kept
    assert (ws.runs_dir / "20240101-000000-alias").is_symlink() and (more / "notes.txt").read_text() == "mine"
    # A new run cleans up as well.
    again = run_dir("20240101-000001-dead")
    make_run(store)
    assert not again.exists()


# -- item 8: SIGTERM during `dmqn tune` is "error: interrupted" alone ----------------------------
class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_an_interrupted_trial_is_not_logged_by_optuna_and_its_run_is_interrupted(prepared, tmp_path, monkeypatch):
    ws = workspace_with_data(prepared, tmp_path / "ws")

    def interrupted_after_an_epoch(*args, on_epoch, **kwargs):
        def interrupt(epoch: int, valid: dict[str, float]) -> bool:
            raise KeyboardInterrupt  # as Ctrl-C, or SIGTERM under the command line, raises it

        return train(*args, on_epoch=interrupt, **kwargs)

    monkeypatch.setattr(tune_search, "train", interrupted_after_an_epoch)
    records = Records()
    optuna_logger = logging.getLogger("optuna")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as the command sets it
    optuna_logger.addHandler(records)
    try:
        with pytest.raises(KeyboardInterrupt):
            tune_module.tune(ws, "tiny", "din-short", 2, epochs=2, model_settings={"embed_dim": 8})
        assert optuna.logging.get_verbosity() == optuna.logging.WARNING  # put back
    finally:
        optuna_logger.removeHandler(records)
        optuna.logging.set_verbosity(verbosity)
    assert not [message for message in records.messages if "failed" in message], records.messages
    (run,) = RunStore(ws.store_path).list_runs()
    assert run.status == "interrupted"
    assert [row.state for row in tune_module.show_study(ws, "tiny-din-short").trials] == ["failed"]


def test_sigterm_during_tune_prints_only_interrupted_and_marks_the_run_interrupted(prepared, tmp_path):
    ws = workspace_with_data(prepared, tmp_path / "ws")
    command = [
        sys.executable,
        "-m",
        "dmqn_cli",
        "tune",
        "tiny",
        "--model",
        "din-short",
        "--trials",
        "2",
        "--epochs",
        "200",
        "-w",
        str(ws.root),
    ]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    store = RunStore(ws.store_path)
    try:
        deadline = time.monotonic() + 120
        runs = []
        while not runs and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
            runs = store.list_runs()  # the trial's run, recorded: training has started
        assert runs, process.stderr.read() if process.poll() is not None else "no run in time"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "failed" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    (run,) = store.list_runs()
    assert run.status == "interrupted" and run.error == "interrupted by the user"
    result = cli(ws, "tune", "--show", "tiny-din-short", "--json")
    assert result.exit_code == 0 and '"state": "failed"' in result.output  # not counted: the study resumes


# -- item 9: SIGTERM while the command line starts exits 130 --------------------------------------
def test_sigterm_while_the_command_line_imports_exits_130():
    # The signal comes right after the package's first lines, while torch, DuckDB and Optuna import.
    script = (
        "import os, signal\n"
        "import dmqn_cli\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "from dmqn_cli.main import app\n"
        "app(['runs'])\n"
    )
    process = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert process.returncode == 130 and process.stderr == "error: interrupted\n", process.stderr


def test_an_interrupt_during_a_store_statement_stays_a_keyboard_interrupt(tmp_path):
    # DuckDB stops a statement that a KeyboardInterrupt (Ctrl-C; SIGTERM under the command line) comes in,
    # and raises RuntimeError("Query interrupted") instead: a training would record its run as failed.
    store = RunStore(tmp_path / "runs.duckdb")
    make_run(store)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            store._read("SELECT count(*) FROM range(20000000000) t(a) WHERE a % 7 = 3")  # many seconds uninterrupted
    finally:
        timer.cancel()


def sigterm_is_caught(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM now (Linux: the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
def test_sigterm_as_soon_as_the_command_can_take_it_exits_130(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "dmqn_cli", "runs", "-w", str(tmp_path / "ws")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while process.poll() is None and not sigterm_is_caught(process.pid) and time.monotonic() < deadline:
            time.sleep(0.002)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
    assert stderr.strip() == "error: interrupted"


def test_a_study_database_password_with_url_delimiters_reaches_the_driver_whole(tmp_path: Path, monkeypatch) -> None:
    """Issue 23 item 3 for `dmqn tune --storage`: SQLAlchemy, like redis-py, would end the password at
    its first '@' and connect to the rest as the host; a SQLite path holding '@' stays a path."""
    from sqlalchemy.engine import make_url

    given: list[str] = []

    def fake_storage(url: str, **kwargs) -> None:
        given.append(url)
        raise RuntimeError(f"could not connect to {make_url(url).host}")

    monkeypatch.setattr(optuna.storages, "RDBStorage", fake_storage)
    ws = Workspace(tmp_path / "ws")
    password = "Kx7@Qz9/Wv4?Jy2#Hb"
    with pytest.raises(DmqnError) as caught:
        tune_study.open_storage(ws, f"postgresql://tuner:{password}@127.0.0.1:5432/studies")
    url = make_url(given[-1])
    assert (url.host, url.port, url.username, url.password) == ("127.0.0.1", 5432, "tuner", password)
    message = str(caught.value)
    assert "127.0.0.1" in message and not any(piece in message for piece in ("Kx7", "Qz9", "Wv4", "Jy2"))
    sqlite_url = f"sqlite:///{tmp_path}/me@home/studies.db"
    with pytest.raises(DmqnError):
        tune_study.open_storage(ws, sqlite_url)
    assert given[-1] == sqlite_url
