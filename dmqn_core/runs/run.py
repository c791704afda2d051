"""Reading a trained run back: its record, its prepared set (checked to be the one it trained on)
and its best weights."""

from __future__ import annotations

import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import build_model
from dmqn_core.runs.checkpoint import BEST, load_checkpoint, restore_weights
from dmqn_core.runs.store import RunRecord, RunStore
from dmqn_core.workspace import Workspace


def check_run_data(record: RunRecord, data: PreparedSet) -> None:
    """Refuse a prepared set other than the one the run trained on (the set was prepared again
    under the same name since, from another log or with other settings).

    Runs recorded before fingerprints were kept are compared by protocol and vocabulary sizes.
    """
    recorded = record.params.get("data", {})
    if "fingerprint" in recorded:
        same = recorded["fingerprint"] == data.fingerprint
    else:
        model = record.params.get("model", {})
        sizes = (model.get("n_items"), model.get("n_categories"), model.get("n_behavior_types"))
        same = recorded.get("protocol") == data.meta.get("protocol") and sizes == (
            data.n_items + 1,
            data.n_categories + 1,
            data.n_behavior_types + 1,
        )
    if not same:
        raise DmqnError(
            f"the prepared set at {data.path} is not the one run {record.run_id} was trained on "
            "(it was prepared again since); prepare it again as it was, or train a new run"
        )


def load_run_model(
    workspace: Workspace, run_id: str | None = None, device: str = "cpu"
) -> tuple[torch.nn.Module, RunRecord, PreparedSet]:
    """The best-validation weights of a run (the latest finished run when ``run_id`` is None), in eval mode."""
    store = RunStore(workspace.store_path)
    record = store.get_run(store.resolve_run_id(run_id))
    best = workspace.run_dir(record.run_id) / BEST
    if not best.exists():
        raise DmqnError(f"run {record.run_id} has no trained weights yet (status: {record.status})")
    data = PreparedSet.open(record.dataset_path)
    check_run_data(record, data)
    config = ModelConfig.from_dict(record.params["model"])
    model = build_model(record.model, config, item_popularity=data.item_popularity)
    restore_weights(model, load_checkpoint(best), best)
    return model.to(device).eval(), record, data
