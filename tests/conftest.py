"""Shared fixtures: a tiny synthetic log prepared once per test session; a real Redis server; CPU tests kept
on the CPU and tests marked ``cuda`` skipped where torch sees no GPU (docs/gpu.md)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from dmqn_core.data.prep import prepare
from dmqn_core.data.synth import write_log
from dmqn_core.training.train import train
from dmqn_core.workspace import Workspace

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Whether this machine has a GPU, read before the fixture below hides it from the CPU tests.
CUDA = torch.cuda.is_available()
_is_available = torch.cuda.is_available
_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
if CUDA:
    # Initialised now, this process keeps its GPUs when CUDA_VISIBLE_DEVICES hides them from the processes
    # the CPU tests start.
    torch.cuda.init()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device and torch sees none (on a GPU machine: pytest -m cuda)")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def _cpu_tests_on_the_cpu() -> Iterator[None]:
    """--device auto resolves to cpu in every test not marked cuda, also on a GPU machine, in this process and
    in the processes the tests start: the CPU tests check the CPU path, and their exact comparisons hold there."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "is_available", lambda: False)
        patch.setenv("CUDA_VISIBLE_DEVICES", "")
        yield


@pytest.fixture(autouse=True)
def _gpu_for_cuda_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if request.node.get_closest_marker("cuda"):
        monkeypatch.setattr(torch.cuda, "is_available", _is_available)
        if _visible_devices is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", _visible_devices)


def tiny_set_workspace(root: Path) -> Workspace:
    """A workspace at ``root`` holding the prepared set 'tiny' (synthetic, 200 users, histories up to 200),
    from the log ``root/tiny.csv``: for tests that change their workspace, each gets its own."""
    ws = Workspace(root).ensure()
    log = ws.root / "tiny.csv"
    write_log(log, "tiny", seed=3)
    prepare(log, "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=3)
    return ws


def small_dmqn_run(ws: Workspace, **train_settings: Any) -> str:
    """A one-epoch DMQN run (D = 8, 2 codebooks of 8) on the workspace's 'tiny' set, seed 4: what the
    serving tests serve; ``train_settings`` add to its [train] table."""
    settings = {"epochs": 1, "max_len": 60, "batch_size": 256, "seed": 4, **train_settings}
    return train(ws, "tiny", "dmqn", {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8}, settings).run_id


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Workspace:
    """A workspace holding the prepared set 'tiny', shared by the session's tests that only add runs to it."""
    return tiny_set_workspace(tmp_path_factory.mktemp("ws"))


@contextmanager
def redis_server(directory: Path, *options: str, port: int | None = None) -> Iterator[int]:
    """A real redis-server on a free loopback port (or ``port``: a restart where a killed one listened)
    with its own directory (and extra ``options``, e.g. ``--requirepass``), stopped on exit; yields the port.

    Skipped where redis-server is not installed, except under CI (CI=true), where .ci/run installs it
    and a missing server must fail the run instead of hiding the Redis tests.
    """
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed; .ci/run should have installed Debian's redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    port = port or free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "yes",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"redis-server did not start on port {port}")
            time.sleep(0.05)
    try:
        yield port
    finally:
        if process.poll() is None:  # a test may have killed it
            process.terminate()
            process.wait(timeout=10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """redis://127.0.0.1:PORT/0 of a redis-server of its own for the session (see redis_server)."""
    with redis_server(tmp_path_factory.mktemp("redis")) as port:
        yield f"redis://127.0.0.1:{port}/0"


def free_port() -> int:
    """A loopback TCP port nothing listens on (the kernel's choice, released before returning)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
