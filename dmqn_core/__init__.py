"""dmqn_core: the DMQN model, data preparation, training, evaluation, the run store and serving.

The names a library user needs, importable from here::

    from dmqn_core import Workspace, prepare, train, evaluate, Run, CachedScorer

    ws = Workspace("dmqn-workspace").ensure()
    prepare("UserBehavior.csv", "taobao", "taobao", workspace=ws)
    result = train(ws, "taobao", "dmqn", train_settings={"epochs": 4})
    run_id, metrics = evaluate(ws, result.run_id, split="test")

They are loaded on first use (PEP 562), so ``import dmqn_core`` stays cheap and the stages below
never import each other through this file. This package never imports ``dmqn_cli`` or
``dmqn_inspect``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> (module, attribute).
_EXPORTS: dict[str, tuple[str, str]] = {
    "DmqnError": ("dmqn_core.errors", "DmqnError"),
    "ModelConfig": ("dmqn_core.config", "ModelConfig"),
    "Workspace": ("dmqn_core.workspace", "Workspace"),
    "write_log": ("dmqn_core.data.synth", "write_log"),
    "prepare": ("dmqn_core.data.prep", "prepare"),
    "PreparedSet": ("dmqn_core.data.prepared", "PreparedSet"),
    "DMQN": ("dmqn_core.models.dmqn.model", "DMQN"),
    "UserState": ("dmqn_core.models.dmqn.model", "UserState"),
    "build_model": ("dmqn_core.models.registry", "build_model"),
    "model_names": ("dmqn_core.models.registry", "model_names"),
    "RunStore": ("dmqn_core.runs.store", "RunStore"),
    "Run": ("dmqn_core.runs.run", "Run"),
    "RunInspector": ("dmqn_core.runs.inspection", "RunInspector"),
    "TrainConfig": ("dmqn_core.training.train", "TrainConfig"),
    "train": ("dmqn_core.training.train", "train"),
    "evaluate": ("dmqn_core.training.evaluate", "evaluate_run"),
    "run_bench": ("dmqn_core.training.bench", "run_bench"),
    "tune": ("dmqn_core.training.tune", "tune"),
    "export_states": ("dmqn_core.serving.cache", "export_states"),
    "CachedScorer": ("dmqn_core.serving.cache", "CachedScorer"),
}

# Spelled out, not derived from _EXPORTS, so that linters and IDEs read it.
__all__ = [
    "__version__",
    "DmqnError",
    "ModelConfig",
    "Workspace",
    "write_log",
    "prepare",
    "PreparedSet",
    "DMQN",
    "UserState",
    "build_model",
    "model_names",
    "RunStore",
    "Run",
    "RunInspector",
    "TrainConfig",
    "train",
    "evaluate",
    "run_bench",
    "tune",
    "export_states",
    "CachedScorer",
]

if TYPE_CHECKING:  # static checkers and IDEs see the real objects
    from dmqn_core.config import ModelConfig
    from dmqn_core.data.prep import prepare
    from dmqn_core.data.prepared import PreparedSet
    from dmqn_core.data.synth import write_log
    from dmqn_core.errors import DmqnError
    from dmqn_core.models.dmqn.model import DMQN, UserState
    from dmqn_core.models.registry import build_model, model_names
    from dmqn_core.runs.inspection import RunInspector
    from dmqn_core.runs.run import Run
    from dmqn_core.runs.store import RunStore
    from dmqn_core.serving.cache import CachedScorer, export_states
    from dmqn_core.training.bench import run_bench
    from dmqn_core.training.evaluate import evaluate_run as evaluate
    from dmqn_core.training.train import TrainConfig, train
    from dmqn_core.training.tune import tune
    from dmqn_core.workspace import Workspace


def __getattr__(name: str) -> Any:
    try:
        module, attribute = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'dmqn_core' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
