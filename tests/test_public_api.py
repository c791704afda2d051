"""The library API of dmqn_core: every exported name resolves, and docs/architecture.md's example (Python API) runs."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

import dmqn_core


def test_every_exported_name_resolves():
    assert set(dmqn_core.__all__) == {"__version__", *dmqn_core._EXPORTS}
    for name in dmqn_core.__all__:
        assert getattr(dmqn_core, name) is not None, name
    assert dmqn_core.evaluate is dmqn_core.training.evaluate.evaluate_run


def test_importing_the_package_loads_no_stage():
    # A fresh interpreter: the stages (and torch) load on first use of an exported name only.
    code = "import sys, dmqn_core; print(any(m.startswith(('dmqn_core.', 'torch')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == (
        "False"
    )


def test_the_api_example_trains_evaluates_and_scores(tmp_path):
    from dmqn_core import CachedScorer, Run, Workspace, evaluate, export_states, prepare, train, write_log

    ws = Workspace(tmp_path / "ws").ensure()
    write_log(tmp_path / "log.csv", "tiny", seed=3)
    prepare(tmp_path / "log.csv", "taobao", "tiny", workspace=ws, max_len=200, train_targets=5, seed=3)
    result = train(
        ws,
        "tiny",
        "dmqn",
        {"embed_dim": 8, "n_codebooks": 2, "codebook_size": 8},
        {"epochs": 1, "max_len": 100, "inspect_users": 0},
    )
    run_id, metrics = evaluate(ws, result.run_id, split="test")
    assert run_id == result.run_id and metrics["auc"] == result.test["auc"]  # the same weights, the same split
    assert Run.open(ws, run_id).run_id == run_id
    export_states(ws, run_id)
    data = dmqn_core.PreparedSet.open(ws.dataset_path("tiny"))
    with CachedScorer(ws, run_id) as scorer:
        probabilities = scorer.score(int(data.raw_user(1)), data.raw_item(np.arange(1, 4)))
    assert probabilities.shape == (3,) and np.all((probabilities > 0) & (probabilities < 1))
