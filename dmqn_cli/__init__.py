"""dmqn_cli: the ``dmqn`` command line. Commands parse, call dmqn_core, and print."""

# Installed before anything heavy is imported (torch, DuckDB, Optuna take a second or more): a SIGTERM
# in that time, a `kill` or a scheduler's limit, ends the command as documented, exit code 130 and one
# line, where Python's default would end it with 143. The time between the interpreter's start and this
# module cannot be covered: no code of dmqn runs then. Once a command runs, dmqn_cli.common.handle_errors
# turns SIGTERM into KeyboardInterrupt instead, so that a run is recorded as interrupted, and puts this
# handler back when the command returns.
import contextlib
import os
import signal
import sys
import threading


def _exit_interrupted(signum: int, frame: object) -> None:
    # No command is running, so no file is half written: exiting at once is safe. What a command printed
    # before it returned is flushed (unless the signal came in the middle of that print: then the flush
    # refuses). os.write and os._exit, not print and sys.exit: the signal may come in the middle of any
    # Python code, an import, a print, an atexit handler.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os.write(2, b"error: interrupted\n")
    os._exit(130)


# Only in the main thread (the only one that may set handlers), and only where no one set a handler before:
# a program that imports the command line keeps its own.
if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
    signal.signal(signal.SIGTERM, _exit_interrupted)
