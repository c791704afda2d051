"""The other processes of a study (`dmqn tune --workers`): started, given their share of the trials, joined."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna

from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace


@contextmanager
def other_workers(workers: int, shares: list[int], arguments: dict[str, Any]) -> Iterator[list[tuple[Any, Any]]]:
    """Processes 1 .. workers-1 of a study, each running its share of the trials: yields (process, its error
    pipe) of each; on leaving, the ones still running are stopped as SIGTERM stops a trial, and waited for.

    Spawned, not forked: a fork would copy torch's thread pools and this process's open store
    connections. Meanwhile each process, this one included, keeps 1/workers of torch's intra-op threads.
    """
    if workers == 1:
        yield []
        return
    import multiprocessing

    import torch

    previous = torch.get_num_threads()
    threads = max(1, previous // workers)
    torch.set_num_threads(threads)
    context = multiprocessing.get_context("spawn")
    helpers: list[tuple[Any, Any]] = []
    try:
        for index in range(1, workers):
            if not shares[index]:
                continue
            receive, send = context.Pipe(duplex=False)
            process = context.Process(
                target=_worker_main,
                args=({**arguments, "seed": arguments["seed"] + 7919 * index}, shares[index], threads, send),
                name=f"dmqn-tune-worker-{index}",
            )
            process.start()
            send.close()
            helpers.append((process, receive))
        yield helpers
    finally:
        for process, _ in helpers:
            if process.is_alive():
                process.terminate()
        for process, receive in helpers:
            process.join()
            receive.close()
        torch.set_num_threads(previous)


def _worker_main(arguments: dict[str, Any], share: int, threads: int, errors: Any) -> None:
    """Entry of a worker process: ``share`` trials of the study, its first error sent back in one line."""
    import signal

    import torch

    # Here, not above: the search imports this module to start its workers.
    from dmqn_core.training.tune.search import tune

    # SIGTERM (the parent stopping, a scheduler's limit) ends the trial as Ctrl-C would: its run is
    # marked interrupted and the trial failed, never left running.
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        tune(**{**arguments, "workspace": Workspace(arguments["workspace"])}, max_new_trials=share)
    except KeyboardInterrupt:
        errors.send("interrupted")
    except DmqnError as exc:
        errors.send(str(exc))
    finally:
        errors.close()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def join_workers(helpers: list[tuple[Any, Any]]) -> None:
    """Wait for the other workers; the first one's error as a DmqnError."""
    problems = []
    for process, receive in helpers:
        process.join()
        try:
            message = receive.recv() if receive.poll() else None
        except EOFError:  # closed without a message: the worker ran its share
            message = None
        if message is not None or process.exitcode:
            problems.append(f"{process.name}: {message or f'exited with code {process.exitcode}'}")
    if problems:
        raise DmqnError(f"{len(problems)} worker(s) of the study failed; first: {problems[0]}")
