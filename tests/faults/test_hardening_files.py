"""Issue 23, items 1 and 2: dmqn deletes or replaces only files it made.

`dmqn report --out docs/r.html` deleted a user's `docs/.r.html.old-20240101` (any plain file named
like a temporary of a dead pid was taken for a killed report's), replaced a `thesis.txt` that was
no report and wrote over a symbolic link. Temporaries are now random names created with O_EXCL and
removed by their writer; a killed writer's leftover is only ever recognised by its content; an
existing file is replaced only when it is a dmqn report, a symbolic link only with --overwrite.

The reports are built with a stand-in for UMAP (the projection is not what these tests are about).
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.prep import prepare
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.data.synth import write_log
from dmqn_core.errors import DmqnError
from dmqn_core.runs.run import write_vocabulary
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace, atomic_write_bytes, publish_directory
from dmqn_inspect import report as report_module
from dmqn_inspect.report import GENERATOR_META, build_report

MODEL = {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8, "mlp_hidden": [16]}
TRAIN = {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, "inspect_users": 12}
DEAD_PIDS = (99_999_999, 999_999_999)  # above the usual and the largest pid_max: never a live process
USER_TEXT = "my own notes, not dmqn's"


@pytest.fixture(scope="module")
def ws(tiny_workspace, tmp_path_factory) -> Workspace:
    """A workspace of its own (the session's tiny set, copied), so that its runs change no other test's."""
    ws = Workspace(tmp_path_factory.mktemp("hardening") / "ws").ensure()
    shutil.copytree(tiny_workspace.dataset_path("tiny"), ws.dataset_path("tiny"))
    return ws


@pytest.fixture(scope="module")
def run_id(ws) -> str:
    return train(ws, "tiny", "dmqn", MODEL, TRAIN).run_id


@pytest.fixture
def fast_umap(monkeypatch) -> None:
    monkeypatch.setattr(report_module, "_umap", lambda points: points[:, :2].copy())


@pytest.fixture
def work_must_not_start(monkeypatch) -> None:
    """A refusal must come before the report's work, not after minutes of it."""

    def started(*args, **kwargs):
        raise AssertionError("the report's work started before the refusal")

    monkeypatch.setattr(report_module, "_Page", started)


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1, result.output
    assert result.stderr.startswith("error: ") and "Traceback" not in result.output
    return result.stderr.strip()


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def a_report(path: Path) -> None:
    """A file as an earlier `dmqn report` left it: the mark in its head."""
    path.write_text(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR_META}<title>old</title>')


# ---- 1: nothing is deleted by its name ----


def test_a_report_leaves_files_named_like_temporaries_alone(ws, run_id, tmp_path, fast_umap):
    docs = tmp_path / "docs"
    docs.mkdir()
    mine = [".r.html.old-20240101", ".r.html.tmp-1"]  # pid 1 is alive; 20240101 is above pid_max
    mine += [f".r.html.{kind}-{pid}" for kind in ("tmp", "old") for pid in DEAD_PIDS]
    for name in mine:
        (docs / name).write_text(USER_TEXT)
    (docs / f".r.html.tmp-{DEAD_PIDS[0]}-abc").mkdir()  # a folder named like a directory writer's temporary

    result = invoke("report", run_id, "--out", str(docs / "r.html"), "--users", "1", "-w", str(ws.root))
    assert result.exit_code == 0, result.output
    assert listing(docs) == sorted([*mine, f".r.html.tmp-{DEAD_PIDS[0]}-abc", "r.html"])  # no temporary left
    assert all((docs / name).read_text() == USER_TEXT for name in mine)
    with open(docs / "r.html", "rb") as fh:
        assert GENERATOR_META.encode() in fh.read(4096)  # the mark by which the next report may replace it


def test_prep_recognises_its_leftovers_by_content_only(tmp_path):
    """prep still recovers what a killed prep left (by content), outside the workspace too, and
    leaves folders of the same names that hold anything else."""
    ws = Workspace(tmp_path / "ws").ensure()
    log = tmp_path / "log.csv"
    write_log(log, "tiny", seed=5)
    outside, scratch = tmp_path / "sets", tmp_path / "scratch"
    outside.mkdir()
    scratch.mkdir()
    dead = DEAD_PIDS[1]
    kept = {
        # DuckDB's work folder holds DuckDB's files only: a photo in its place is a user's.
        outside / f".k.tmp-{dead}" / ".work" / "spill" / "holiday.jpg",
        scratch / f".dmqn-prep-k.tmp-{dead}" / "spill" / "notes.txt",
        outside / ".k.old-20240101",
        outside / ".k.tmp-1",
    }
    for path in kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(USER_TEXT)
    # Only a whole prepared set is ever moved aside (and put back as NAME): a set's parts are not one.
    not_a_set = outside / f".k.old-{dead}" / "behaviors"
    not_a_set.mkdir(parents=True)
    own = scratch / f".dmqn-prep-k.tmp-{dead - 1}" / "spill" / "duckdb_temp_1_0_storage_DEFAULT-0.tmp"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"\0" * 64)  # what a killed prep's DuckDB leaves: removed

    out = outside / "k"
    prepare(log, "taobao", str(out), workspace=ws, min_behaviors=5, train_targets=3, temp_dir=scratch)
    assert PreparedSet.open(out).n_users > 0
    assert all(path.read_text() == USER_TEXT for path in kept) and not_a_set.is_dir()
    assert not own.parent.exists() and listing(scratch) == [f".dmqn-prep-k.tmp-{dead}"]

    # A set moved aside by an overwrite that was killed (.NAME.old-PID-RANDOM) is put back.
    moved = outside / f".m.old-{dead}-k2x9q7"
    out.rename(moved)
    with pytest.raises(DmqnError, match="already exists"):
        prepare(log, "taobao", str(outside / "m"), workspace=ws, min_behaviors=5, train_targets=3)
    assert PreparedSet.open(outside / "m").n_users > 0 and not moved.exists()


def test_the_run_folders_vocabulary_copy_recovers_only_its_own_leftovers(ws, tmp_path):
    run_dir = tmp_path / "run"
    foreign = run_dir / f".vocab.tmp-{DEAD_PIDS[0]}"
    (foreign / "notes.txt").parent.mkdir(parents=True)
    (foreign / "notes.txt").write_text(USER_TEXT)
    own = run_dir / f".vocab.tmp-{DEAD_PIDS[1]}-a1b2c3d4"  # a killed copy
    own.mkdir()
    np.save(own / "user.npy", np.arange(3))
    write_vocabulary(run_dir, PreparedSet.open(ws.dataset_path("tiny")))
    assert listing(run_dir) == [foreign.name, "vocab"]
    assert (foreign / "notes.txt").read_text() == USER_TEXT
    assert sorted(p.name for p in (run_dir / "vocab").iterdir()) == sorted(
        f"{name}.npy" for name in ("user", "item", "category", "item_category", "item_popularity")
    )


# ---- temporaries are new random names, created with O_EXCL and removed by their writer ----


def test_an_atomic_write_never_opens_a_file_it_did_not_create(tmp_path, monkeypatch):
    target = tmp_path / "best.pt"
    target.write_bytes(b"old")
    pid_named = tmp_path / f".best.pt.tmp-{os.getpid()}"  # the old temporary's name, held by a user's file
    pid_named.write_text(USER_TEXT)
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text(USER_TEXT)
    planted = tmp_path / ".best.pt.dmqn-tmp-00000000"  # a link where a guessed temporary name would go
    planted.symlink_to(elsewhere)

    tokens = iter(["00000000", "11111111"])
    with monkeypatch.context() as patched:
        patched.setattr("dmqn_core.workspace.secrets.token_hex", lambda n: next(tokens))
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and not target.is_symlink()
    assert elsewhere.read_text() == USER_TEXT and planted.is_symlink() and pid_named.read_text() == USER_TEXT
    assert listing(tmp_path) == sorted([planted.name, pid_named.name, "best.pt", "elsewhere.txt"])

    # A failure mid-write (a full disk, Ctrl-C) removes the writer's own temporary and nothing else.
    for failure in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):

        def fail(fd, failure=failure):
            raise failure

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(type(failure)):
            atomic_write_bytes(target, b"newer")
        assert target.read_bytes() == b"new" and pid_named.read_text() == USER_TEXT
        assert listing(tmp_path) == sorted([planted.name, pid_named.name, "best.pt", "elsewhere.txt"])


def test_synth_writes_through_a_temporary_of_its_own(tmp_path):
    pid_named = tmp_path / f".log.csv.tmp-{os.getpid()}"
    pid_named.write_text(USER_TEXT)
    write_log(tmp_path / "log.csv", "tiny", seed=1)
    assert pid_named.read_text() == USER_TEXT
    assert listing(tmp_path) == sorted([pid_named.name, "log.csv"])


def test_an_overwrite_moves_the_old_folder_aside_under_a_new_name(tmp_path):
    new, final = tmp_path / ".x.tmp-1", tmp_path / "x"
    new.mkdir()
    (final / "old").mkdir(parents=True)
    pid_named = tmp_path / f".x.old-{os.getpid()}"  # the old backup name: an (empty) folder of the user's
    pid_named.mkdir()
    publish_directory(new, final, True, replaceable=lambda path: True, what="ours")
    assert listing(tmp_path) == sorted([pid_named.name, "x"]) and listing(final) == []


# ---- 2: report --out replaces only a dmqn report, a symbolic link only with --overwrite ----


def test_an_existing_file_that_is_not_a_report_is_refused(ws, run_id, tmp_path, work_must_not_start):
    thesis = tmp_path / "thesis.txt"
    for content in (USER_TEXT, "", "<!DOCTYPE html><title>DMQN report · mine</title>"):
        thesis.write_text(content)
        line = one_line_error(invoke("report", run_id, "--out", str(thesis), "-w", str(ws.root)))
        assert line == f"error: {thesis} exists and is not a dmqn report; pass --overwrite to replace it"
        assert thesis.read_text() == content and listing(tmp_path) == ["thesis.txt"]

    # The default path is held to the same rule.
    default = ws.root / "reports" / f"{run_id}.html"
    default.parent.mkdir(exist_ok=True)
    default.write_text(USER_TEXT)
    try:
        line = one_line_error(invoke("report", run_id, "-w", str(ws.root)))
        assert line.endswith("exists and is not a dmqn report; pass --overwrite to replace it")
        assert default.read_text() == USER_TEXT
    finally:
        default.unlink()


def test_a_symbolic_link_is_refused(ws, run_id, tmp_path, work_must_not_start):
    target = tmp_path / "target.html"
    a_report(target)  # even a link to a report: the link is the user's
    before = target.read_bytes()
    for link, points_to in ((tmp_path / "link.html", target), (tmp_path / "dangling.html", tmp_path / "nowhere")):
        link.symlink_to(points_to)
        line = one_line_error(invoke("report", run_id, "--out", str(link), "-w", str(ws.root)))
        assert line == (
            f"error: {link} is a symbolic link; pass --overwrite to replace the link (not what it points to)"
        )
        assert link.is_symlink() and os.readlink(link) == str(points_to)
    assert target.read_bytes() == before and not (tmp_path / "nowhere").exists()


def test_overwrite_replaces_a_file_and_a_link_never_its_target(ws, run_id, tmp_path, fast_umap):
    thesis, target, link = tmp_path / "thesis.txt", tmp_path / "target.txt", tmp_path / "link.html"
    thesis.write_text(USER_TEXT)
    target.write_text(USER_TEXT)
    link.symlink_to(target)
    for out in (thesis, link):
        result = invoke("report", run_id, "--out", str(out), "--users", "0", "--overwrite", "-w", str(ws.root))
        assert result.exit_code == 0, result.output
        assert not out.is_symlink() and GENERATOR_META in out.read_text(encoding="utf-8")
    assert target.read_text() == USER_TEXT
    assert listing(tmp_path) == ["link.html", "target.txt", "thesis.txt"]


def test_an_existing_report_is_replaced_without_overwrite(ws, run_id, tmp_path, fast_umap):
    marked, unmarked = tmp_path / "marked.html", tmp_path / "unmarked.html"
    a_report(marked)
    # As reports began before they carried the mark.
    unmarked.write_text(
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1"><title>DMQN report · old</title>'
    )
    for out in (marked, unmarked):
        build_report(ws, run_id, out, users=0)
        text = out.read_text(encoding="utf-8")
        assert f"DMQN report · {run_id}" in text and GENERATOR_META in text[:4096]
    assert listing(tmp_path) == ["marked.html", "unmarked.html"]


def test_a_file_that_appears_while_the_report_is_built_is_not_replaced(ws, run_id, tmp_path, monkeypatch):
    out = tmp_path / "r.html"

    def user_saves_a_file_meanwhile(points):
        out.write_text(USER_TEXT)
        return points[:, :2].copy()

    monkeypatch.setattr(report_module, "_umap", user_saves_a_file_meanwhile)
    with pytest.raises(DmqnError, match="exists and is not a dmqn report; pass --overwrite to replace it"):
        build_report(ws, run_id, out, users=0)
    assert out.read_text() == USER_TEXT and listing(tmp_path) == ["r.html"]  # and no temporary left


def test_a_report_that_fails_while_writing_leaves_the_old_one_and_no_temporary(ws, run_id, tmp_path, monkeypatch):
    monkeypatch.setattr(report_module, "_umap", lambda points: points[:, :2].copy())
    out = tmp_path / "r.html"
    a_report(out)
    before = out.read_bytes()
    pid_named = tmp_path / f".r.html.tmp-{os.getpid()}"  # the old temporary's name, held by a user's file
    pid_named.write_text(USER_TEXT)

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left on device"):
        build_report(ws, run_id, out, users=0)
    assert out.read_bytes() == before and pid_named.read_text() == USER_TEXT
    assert listing(tmp_path) == [pid_named.name, "r.html"]
