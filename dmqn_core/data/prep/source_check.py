"""The check of a prep's source beside DuckDB's work: its SHA-256 (meta.json's source.sha256) and, for a
gzip file, a full decompression, since DuckDB reads a damaged one up to the damage without an error."""

from __future__ import annotations

import gzip
import hashlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from dmqn_core.data.formats import GZIP_ERRORS, damaged_gzip, is_gzip
from dmqn_core.errors import DmqnError

READ_CHUNK = 8 << 20


class _Stopped(Exception):
    """The job ended before the source check finished."""


class _DigestingReader:
    """A binary file's ``read`` that feeds every byte read to a hash, and stops when told to."""

    def __init__(self, fh: BinaryIO, digest: Any, stop: threading.Event) -> None:
        self.fh, self.digest, self.stop = fh, digest, stop

    def read(self, size: int = -1) -> bytes:
        if self.stop.is_set():
            raise _Stopped
        data = self.fh.read(size)
        self.digest.update(data)
        return data


class SourceCheck(threading.Thread):
    """SHA-256 of the source files and, for a gzip one, a full decompression that checks each
    member's CRC-32 and length: DuckDB reads a damaged gzip file up to the damage and stops
    without an error. Runs beside DuckDB's work (hashlib and zlib release the GIL); the file is
    read once for both."""

    def __init__(self, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.files = files
        self.reads_gzip = any(is_gzip(path) for path in files)
        self.digests: dict[str, str] = {}
        self.error: DmqnError | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            for path in self.files:
                self.digests[path.name] = self._check(path)
        except _Stopped:
            pass
        except DmqnError as exc:
            self.error = exc
        except OSError as exc:
            self.error = DmqnError(f"cannot read {exc.filename or self.files[0]}: {exc.strerror or exc}")

    def _check(self, path: Path) -> str:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            reader = _DigestingReader(fh, digest, self._stop_event)
            if is_gzip(path):
                try:
                    # typeshed asks the file for seek too; reading forward, as here, never calls it.
                    with gzip.GzipFile(fileobj=reader) as unzipped:  # pyright: ignore[reportArgumentType]
                        while unzipped.read(READ_CHUNK):
                            pass
                except GZIP_ERRORS as exc:
                    raise damaged_gzip(path, exc) from None
            while reader.read(READ_CHUNK):  # all of a plain file; for gzip, any bytes after the end
                pass
        return digest.hexdigest()

    def raise_error(self) -> None:
        """Raise the check's error if it has found one by now (does not wait)."""
        if self.error is not None:
            raise self.error

    def combined(self) -> str:
        """The source's SHA-256, once the check is done; its error if it failed."""
        self.join()
        self.raise_error()
        if len(self.digests) == 1:
            return next(iter(self.digests.values()))
        # A folder: the hash of "name  sha256" lines of the files read, in the order read.
        text = "".join(f"{name}  {self.digests[name]}\n" for name in (p.name for p in self.files))
        return hashlib.sha256(text.encode()).hexdigest()

    def stop(self) -> None:
        """Make the check end at its next read (after the job failed); does not wait."""
        self._stop_event.set()


@contextmanager
def source_checked(files: list[Path]) -> Iterator[SourceCheck]:
    """The check of ``files``, running while the block runs and stopped after it."""
    check = SourceCheck(files)
    check.start()
    try:
        yield check
    except DmqnError:
        # What DuckDB reads from a damaged gzip file (up to a truncation, or garbage past a
        # flipped bit) fails the run in other words: "ends early", "mostly bad_columns".
        if check.reads_gzip:
            check.combined()
        raise
    finally:
        check.stop()
