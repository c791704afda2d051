"""The workspace: one directory holding the run store, prepared data sets and checkpoints.

Layout::

    <workspace>/runs.duckdb          the run store (see dmqn_core.runstore)
    <workspace>/data/<NAME>/         prepared data sets (see dmqn_core.prepared)
    <workspace>/runs/<RUN_ID>/       checkpoints of one run
    <workspace>/benches/<NAME>/      Tables 2 and 3 of one `dmqn bench` (Markdown, CSV, JSON)
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from dmqn_core.errors import DmqnError

WORKSPACE_ENV = "DMQN_WORKSPACE"
DEFAULT_WORKSPACE = "dmqn-workspace"


class Workspace:
    """Paths inside one workspace directory; creates directories lazily."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        if root is None:
            root = os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE
        self.root = Path(root).expanduser().resolve()

    @property
    def store_path(self) -> Path:
        return self.root / "runs.duckdb"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    def ensure(self) -> "Workspace":
        if self.root.exists() and not self.root.is_dir():
            raise DmqnError(f"workspace {self.root} exists and is not a directory")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        return self

    def dataset_path(self, name: str | os.PathLike) -> Path:
        """Where the prepared set NAME lives: a bare name is inside ``data/``, a path is taken as given."""
        text = str(name)
        if os.sep in text or (os.altsep and os.altsep in text) or text.startswith("."):
            return Path(text).expanduser().resolve()
        return self.data_dir / text

    def run_dir(self, run_id: str) -> Path:
        return self.runs_dir / run_id


@contextmanager
def exclusive_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed) or fail at once if another process does.

    flock is released by the kernel when its holder dies, even by SIGKILL, so a crashed process
    never leaves a stale lock behind. The file records the holder's pid for the error message.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            raise DmqnError(f"{what} is in use by another process{f' (pid {holder})' if holder else ''}") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()  # closing the descriptor releases the lock


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def publish_directory(tmp_dir: Path, final_dir: Path, overwrite: bool) -> None:
    """Move a fully written directory into place with renames only.

    A reader sees either the previous directory or the new one. When overwriting, the old
    directory is first renamed aside, so a kill between the two renames leaves the new set
    unpublished but the old one recoverable under its hidden name (removed on the next call).
    """
    if final_dir.exists():
        if not overwrite:
            raise DmqnError(f"{final_dir} already exists (pass --overwrite to replace it)")
        trash = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, trash)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)


def remove_stale_temporaries(parent: Path, name: str) -> None:
    """Clean up after killed writers of ``name``.

    ``.NAME.tmp-PID`` (a set that was never published) is deleted; ``.NAME.old-PID`` (a
    previous set moved aside for an overwrite that did not finish) is put back when no
    ``NAME`` replaced it, and deleted otherwise.
    """
    if not parent.is_dir():
        return
    final = parent / name
    for entry in sorted(parent.iterdir()):
        for marker in (f".{name}.tmp-", f".{name}.old-"):
            if not entry.name.startswith(marker):
                continue
            pid = entry.name[len(marker):]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if marker.endswith(".old-") and not final.exists():
                os.replace(entry, final)
            elif entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
