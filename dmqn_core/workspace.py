"""The workspace: one directory holding the run store, prepared data sets and checkpoints.

Layout::

    <workspace>/runs.duckdb          the run store (see dmqn_core.runs.store)
    <workspace>/data/<NAME>/         prepared data sets (see dmqn_core.data.prepared)
    <workspace>/runs/<RUN_ID>/       checkpoints of one run
    <workspace>/benches/<NAME>/      Tables 2 and 3 of one `dmqn bench` (Markdown, CSV, JSON)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from dmqn_core.errors import DmqnError, has_unsafe_characters

WORKSPACE_ENV = "DMQN_WORKSPACE"
DEFAULT_WORKSPACE = "dmqn-workspace"

_T = TypeVar("_T")


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

    def ensure(self) -> Workspace:
        if self.root.exists() and not self.root.is_dir():
            raise DmqnError(f"workspace {self.root} exists and is not a directory")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        return self

    def dataset_path(self, name: str | os.PathLike) -> Path:
        """Where the prepared set NAME lives: a bare name is inside ``data/``, a path is taken as given."""
        text = str(name)
        if not text.strip():
            # "" would name data/ itself, and a blank name is a quoting mistake, never a set.
            raise DmqnError(f"a prepared set's name must not be empty or blank, got {text!r}")
        if has_unsafe_characters(text):
            # It would become a folder name that every later listing prints to a terminal.
            raise DmqnError(f"a prepared set's name must not hold control characters, got {text!r}")
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


def new_temporary_file(target: Path) -> tuple[int, Path]:
    """Create an empty hidden file ``.NAME.dmqn-tmp-RANDOM`` beside ``target``; its descriptor (open for
    writing) and path.

    O_EXCL: the name is new, never a user's file or a symbolic link that happened to be there, so the
    caller may remove it on failure. Nothing ever deletes such a file by its name: a writer killed by
    SIGKILL leaves it behind.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC

    def create(path: Path) -> tuple[int, Path]:
        return os.open(path, flags, 0o666), path  # 0o666 less the umask, as open() makes files

    return _create_unique(target.parent, f".{target.name}.dmqn-tmp-", create)


def new_temporary_directory(final: Path, kind: str) -> Path:
    """Create an empty hidden directory ``.NAME.KIND-PID-RANDOM`` beside ``final`` (KIND: ``tmp`` for a
    directory being written, ``old`` for one moved aside), new like new_temporary_file's files.

    The pid lets remove_stale_temporaries tell a killed writer's leftover from a live writer's.
    """

    def create(path: Path) -> Path:
        path.mkdir(0o777)
        return path

    return _create_unique(final.parent, f".{final.name}.{kind}-{os.getpid()}-", create)


def _create_unique(parent: Path, prefix: str, create: Callable[[Path], _T]) -> _T:
    """``create(parent / (prefix + RANDOM))`` for the first random name that is free (``create`` raises
    FileExistsError on a taken one)."""
    for _ in range(100):
        try:
            return create(parent / f"{prefix}{secrets.token_hex(4)}")
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent / prefix))


def atomic_write_bytes(path: Path, data: bytes, *, check: Callable[[], None] | None = None) -> None:
    """Write a file so that readers see the old content or the new one, never a part.

    ``check`` is called once the data is on disk, right before the rename: whatever it raises
    leaves ``path`` as it was (a caller re-checks there what it may replace).
    """
    fd, tmp = new_temporary_file(path)
    try:
        with open(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check()
        os.replace(tmp, path)
    except BaseException:
        # A full disk or a kill signal mid-write: the partial file is ours to remove, never the target.
        tmp.unlink(missing_ok=True)
        raise


def publish_directory(
    tmp_dir: Path, final_dir: Path, overwrite: bool, *, replaceable: Callable[[Path], bool], what: str
) -> None:
    """Move a fully written directory into place with renames only.

    A reader sees either the previous directory or the new one. When overwriting, the old
    directory is first renamed aside (onto an empty ``.NAME.old-PID-RANDOM`` made for it), so a kill
    between the two renames leaves the new set unpublished but the old one recoverable under its
    hidden name (put back by remove_stale_temporaries). Only an old entry that ``replaceable``
    accepts (one this tool wrote, ``what`` in the error) is ever replaced: ``--overwrite`` with a
    mistyped name must not delete a user's folder.
    """
    if check_can_publish(final_dir, overwrite, replaceable=replaceable, what=what):
        trash = new_temporary_directory(final_dir, "old")
        try:
            os.replace(final_dir, trash)  # a directory replaces the empty one made for it
        except BaseException:
            # Still the empty directory made for it, unless a signal came right after the rename:
            # then it holds the old set, for remove_stale_temporaries to put back.
            with contextlib.suppress(OSError):
                trash.rmdir()
            raise
        os.replace(tmp_dir, final_dir)
        _delete(trash)
    else:
        os.replace(tmp_dir, final_dir)


def check_can_publish(final_dir: Path, overwrite: bool, *, replaceable: Callable[[Path], bool], what: str) -> bool:
    """Whether publishing at ``final_dir`` replaces something; the DmqnError of publish_directory
    when it may not (called early too, so that a long job fails before its work, not after)."""
    if not (final_dir.exists() or final_dir.is_symlink()):
        return False
    if not overwrite:
        raise DmqnError(f"{final_dir} already exists (pass --overwrite to replace it)")
    if not replaceable(final_dir):
        raise DmqnError(f"{final_dir} exists and is not {what}; refusing to replace it")
    return True


def remove_stale_temporaries(
    parent: Path,
    name: str,
    *,
    temporary: Callable[[Path], bool],
    backup: Callable[[Path], bool] | None = None,
) -> None:
    """Clean up after killed writers of the directory ``name``.

    ``.NAME.tmp-PID`` or ``.NAME.tmp-PID-RANDOM`` (a directory that was never published) is
    deleted when ``temporary`` recognises it by its content as what the writer makes there;
    ``.NAME.old-PID-RANDOM`` (a previous directory moved aside by publish_directory for an overwrite
    that did not finish) is put back when no ``NAME`` replaced it, and deleted otherwise, when
    ``backup`` recognises it (None: the writer never moves anything aside). A name alone is never
    enough: these names may be outside the workspace (``--out``), and an entry the recognisers do
    not accept, of a live pid, or a symbolic link is left alone.
    """
    if not parent.is_dir():
        return
    final = parent / name
    for entry in sorted(parent.iterdir()):
        for kind, owned in (("tmp", temporary), ("old", backup)):
            marker = f".{name}.{kind}-"
            if owned is None or not entry.name.startswith(marker):
                continue
            pid = entry.name[len(marker) :].split("-", 1)[0]
            if not (pid.isascii() and pid.isdigit()) or _pid_alive(int(pid)) or entry.is_symlink() or not owned(entry):
                continue
            if kind == "old" and not (final.exists() or final.is_symlink()):
                os.replace(entry, final)
            else:
                _delete(entry)


def _delete(path: Path) -> None:
    """Remove a file, a symbolic link (not what it points to) or a directory tree."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: beyond any pid
        return False
    except PermissionError:
        return True
    return True


def lock_is_held(path: Path) -> bool:
    """Whether some process holds ``exclusive_lock(path)`` now; a missing file is not created.

    The probe takes a shared lock for an instant: probes never exclude one another, and the holder
    of the exclusive lock, in this process or another, makes it fail at once. An exclusive_lock
    tried in that same instant fails as if the path were in use. A lock file that cannot be read
    counts as held: without proof that its holder is gone, nothing is presumed dead.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases the probe's lock
    return False


_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def check_plain_name(name: str, what: str) -> str:
    """``name`` if it can become one directory name under the workspace, else a DmqnError.

    Letters, digits, '-', '_' and '.', not starting with '.' (no '..', no hidden or temporary
    entries), at most 100 characters: a user-given name never reaches outside its parent folder.
    """
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= 100
        or name.startswith(".")
        or not set(name) <= _NAME_CHARACTERS
    ):
        raise DmqnError(
            f"{what} {name!r} is not a plain name: use letters, digits, '-', '_' and '.', "
            "not starting with '.', at most 100 characters"
        )
    return name
