"""Where a prep writes: the set's hidden temporary directory, published whole at the end, and DuckDB's
work folder; what a killed prep left there is recognised (and only that is removed)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from dmqn_core.data import prepared as fmt_out
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace, remove_stale_temporaries


def output_path(ws: Workspace, out: str | os.PathLike) -> Path:
    """Where ``--out`` puts the set; never a folder that holds the workspace or its data."""
    final = ws.dataset_path(out)
    if final == ws.root:
        raise DmqnError(f"--out {str(out)!r} is the workspace {final} itself; name a set inside it")
    if final in ws.root.parents:
        raise DmqnError(f"--out {str(out)!r} is {final}, a folder holding the workspace {ws.root}; name a set instead")
    if final == ws.data_dir:
        raise DmqnError(f"--out {str(out)!r} is the workspace's data folder {final}; name a set inside it")
    return final


@contextmanager
def write_errors() -> Iterator[None]:
    """OSError (a read-only workspace, a full disk, a name too long) as one line naming the path."""
    try:
        yield
    except OSError as exc:
        names = [os.fsdecode(name) for name in (exc.filename, exc.filename2) if name is not None]
        where = " -> ".join(names) or "the prepared set"
        raise DmqnError(f"cannot write {where}: {exc.strerror or exc}") from None


def new_directory(path: Path, owned: Callable[[Path], bool]) -> None:
    """Create ``path`` empty; a leftover there (from a killed process whose pid was ours) is
    removed only when ``owned`` recognises it, else mkdir's error stops the run."""
    if path.is_dir() and not path.is_symlink() and owned(path):
        shutil.rmtree(path)
    path.mkdir()


_WORK_FILES = frozenset({"prep.duckdb", "prep.duckdb.wal"})
_SPILL = "spill"  # DuckDB's temp_directory in the work folder (see dmqn_core.data.prep.context)


def is_work_directory(path: Path) -> bool:
    """Whether ``path`` holds nothing but DuckDB's working files of a prep (see work_directory): its
    database and a spill folder of DuckDB's own ``duckdb_temp*`` files."""
    if not path.is_dir() or path.is_symlink():
        return False
    for entry in path.iterdir():
        if entry.name == _SPILL:
            ok = (
                entry.is_dir()
                and not entry.is_symlink()
                and all(
                    f.name.startswith("duckdb_temp") and f.is_file() and not f.is_symlink() for f in entry.iterdir()
                )
            )
        else:
            ok = entry.name in _WORK_FILES and entry.is_file() and not entry.is_symlink()
        if not ok:
            return False
    return True


def is_own_set(path: Path) -> bool:
    """Whether ``path`` is a set, or a set's temporary directory holding nothing but what prepare
    writes there: only such a leftover of a killed prep may be deleted or put back."""
    if fmt_out.is_prepared_set(path):
        return True
    if not path.is_dir() or path.is_symlink():
        return False
    files = fmt_out.set_files()
    folders = {name.partition("/")[0] for name in files if "/" in name}
    for entry in path.iterdir():
        if entry.name == ".work":
            ok = is_work_directory(entry)
        elif entry.name in folders:
            ok = (
                entry.is_dir()
                and not entry.is_symlink()
                and all(sub.is_file() and f"{entry.name}/{sub.name}" in files for sub in entry.iterdir())
            )
        else:
            ok = entry.name in files and entry.is_file()
        if not ok:
            return False
    return True


def work_directory(tmp: Path, final: Path, scratch: Path | None) -> Path:
    """DuckDB's work folder for the set ``final`` being written into ``tmp``: inside it, or in ``scratch``
    (``--temp-dir``) where a killed prep's leftover of the same set is removed first."""
    if scratch is None:
        return tmp / ".work"
    # Named like a set's temporary directory, so the next run removes it after a kill.
    remove_stale_temporaries(scratch, f"dmqn-prep-{final.name}", temporary=is_work_directory)
    return scratch / f".dmqn-prep-{final.name}.tmp-{os.getpid()}"
