"""Evaluation of trained runs: AUC, GAUC (user-weighted AUC) and logloss of a split."""

from __future__ import annotations

import pickle
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmqn_core.batches import BatchLoader
from dmqn_core.config import ModelConfig
from dmqn_core.errors import DmqnError
from dmqn_core.metrics import ctr_metrics
from dmqn_core.models import build_model
from dmqn_core.prepared import PreparedSet
from dmqn_core.progress import NullProgress, Progress
from dmqn_core.runstore import RunRecord, RunStore
from dmqn_core.workspace import Workspace

SPLITS = ("train", "valid", "test")

# The two files of a run's directory (dmqn_core.train writes them, atomically).
CHECKPOINT = "checkpoint.pt"  # everything needed to resume: model, optimiser, step, RNG, configs
BEST = "best.pt"  # the weights of the best validation epoch, used for test and eval


def load_checkpoint(path: Path, keys: tuple[str, ...] = ("model_state",)) -> dict[str, Any]:
    """A checkpoint written by dmqn_core.train, which must hold ``keys``.

    Checkpoints hold only tensors and plain Python values (dicts, lists, numbers, strings), so
    they are read with torch's weights-only unpickler: a file that names any other Python object
    (whose unpickling could run code, e.g. os.system) is refused before anything of it runs.
    Unreadable files become one DmqnError instead of an unpickler's or a zip reader's traceback.
    """
    if not path.exists():
        raise DmqnError(f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():
            # Foreign pickles make torch warn about their protocol before it refuses them below.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            value = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message names the first object it refused as "GLOBAL module.name".
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if refused:
            raise DmqnError(
                f"checkpoint {path} is not a safe checkpoint: it would load the Python object "
                f"{refused.group(1)}, and dmqn loads only tensors and plain values"
            ) from None
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (it does not unpickle)") from None
    except EOFError:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (it ends too early)") from None
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint ({one_line(exc)})") from None
    missing = [key for key in keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise DmqnError(f"checkpoint {path} is damaged or not a checkpoint (no {', '.join(missing)})")
    return value


def restore_weights(model: torch.nn.Module, checkpoint: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model_state into ``model``; weights of another model are a DmqnError."""
    try:
        model.load_state_dict(checkpoint["model_state"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise DmqnError(f"checkpoint {path} does not fit the run's {type(model).__name__} ({one_line(exc)})") from None


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception as the short one-line detail of a DmqnError: its type and its words."""
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:limit]


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


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    loader: BatchLoader,
    device: torch.device,
    progress: Progress | None = None,
    description: str = "predict",
) -> dict[str, Any]:
    """Logits of every sample of the loader, with the codeword counts of DMQN-like models.

    Returns users, labels, logits, seconds and ``codeword_counts`` (N, W) summed over the
    distinct histories (None for models without codebooks).
    """
    progress = progress or NullProgress()
    model.eval()
    users, labels, logits = [], [], []
    counts = None
    encode = getattr(model, "encode_user", None)
    progress.start(description, len(loader))
    started = time.perf_counter()
    for batch in loader:
        batch = batch.to(device)
        if encode is not None:
            state = encode(batch.hist_item, batch.hist_category, batch.hist_behavior, batch.hist_mask)
            out = model.score(state, batch.cand_item, batch.cand_category, batch.hist_index)
            batch_counts = state.cluster_size.sum(dim=0).double().cpu()  # (N, W)
            counts = batch_counts if counts is None else counts + batch_counts
        else:
            out = model(**batch.model_inputs())
        users.append(batch.user)
        labels.append(batch.label.cpu().numpy())
        logits.append(out.float().cpu().numpy())
        progress.advance(1)
    seconds = time.perf_counter() - started
    progress.stop()
    empty = np.zeros(0)
    return {
        "users": np.concatenate(users) if users else empty,
        "labels": np.concatenate(labels) if labels else empty,
        "logits": np.concatenate(logits) if logits else empty,
        "seconds": seconds,
        "codeword_counts": None if counts is None else counts.numpy(),
    }


def evaluate_split(
    model: torch.nn.Module,
    data: PreparedSet,
    split: str,
    batch_size: int,
    max_len: int,
    device: torch.device,
    progress: Progress | None = None,
) -> tuple[dict[str, float], np.ndarray | None]:
    """AUC, GAUC, logloss and samples/s of one split; plus codeword counts when the model has codebooks."""
    loader = BatchLoader(data, split, batch_size, max_len)
    out = predict(model, loader, device, progress, description=f"{split} ")
    metrics = ctr_metrics(out["users"], out["labels"], out["logits"])
    metrics["samples_per_s"] = len(out["labels"]) / max(out["seconds"], 1e-9)
    return metrics, out["codeword_counts"]


def evaluate_run(
    workspace: Workspace,
    run_id: str | None = None,
    split: str = "test",
    batch_size: int | None = None,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[str, dict[str, float]]:
    """Evaluate a run's best weights on a split, store the metrics (epoch NULL) and return them."""
    if split not in SPLITS:
        raise DmqnError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    model, record, data = load_run_model(workspace, run_id, device)
    train_params = record.params["train"]
    metrics, _ = evaluate_split(
        model,
        data,
        split,
        batch_size or int(train_params["eval_batch_size"]),
        int(train_params["max_len"]),
        torch.device(device),
        progress,
    )
    RunStore(workspace.store_path).log_metrics(record.run_id, split, metrics, epoch=None)
    return record.run_id, metrics
