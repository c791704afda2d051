"""Shared fixtures: a tiny synthetic log prepared once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from dmqn_core.prep import prepare
from dmqn_core.synth import write_log
from dmqn_core.workspace import Workspace

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_workspace(tmp_path_factory) -> Workspace:
    """A workspace holding the prepared set 'tiny' (synthetic, 200 users, histories up to 200)."""
    ws = Workspace(tmp_path_factory.mktemp("ws")).ensure()
    log = ws.root / "tiny.csv"
    write_log(log, "tiny", seed=3)
    prepare(log, "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=3)
    return ws
