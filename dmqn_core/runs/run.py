"""The Run handle: a trained run read back, for evaluation, serving, inspection and resuming.

A run lives in two places: its row of the run store (the record: model, data set, every setting)
and its folder ``runs/RUN_ID/``. ``Run.open`` reads the record once; the run's prepared set and its
model are opened only when first asked for. Run is the only reader that knows the folder's files::

    runs/RUN_ID/best.pt                     the best validation epoch's weights (checkpoint.BEST)
    runs/RUN_ID/checkpoint.pt               everything needed to resume (checkpoint.CHECKPOINT)
    runs/RUN_ID/vocab/{user,item,category}.npy  int64 raw ids of the run's data set: index i <-> row i - 1
    runs/RUN_ID/vocab/item_category.npy     int32 [n_items + 1]: item index -> category index
    runs/RUN_ID/vocab/item_popularity.npy   int64 [n_items + 1]: behaviors per item in the set
    runs/RUN_ID/.lock                       held by the process training the run (store.RUN_LOCK)

The ``vocab/`` files are copies of the prepared set's (dmqn_core.data.prepared), written when the
run starts training: with them and ``best.pt`` a run builds its model and maps raw ids, so that
``dmqn score`` works where the run folder and the state cache are, without the prepared set.
Runs trained before the copy was kept read their vocabularies from the prepared set.
"""

from __future__ import annotations

import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmqn_core.config import ModelConfig
from dmqn_core.data.prepared import VOCAB_ARRAYS, PreparedSet, VocabularyLookups
from dmqn_core.errors import DmqnError
from dmqn_core.models.registry import build_model, has_codebooks
from dmqn_core.nn.interest_model import InterestModel
from dmqn_core.runs.checkpoint import BEST, CHECKPOINT, load_checkpoint, restore_weights
from dmqn_core.runs.store import RunRecord, RunStore
from dmqn_core.workspace import Workspace, new_temporary_directory, remove_stale_temporaries

VOCABULARY = "vocab"  # the run folder's copy of its data set's vocabularies


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


class Vocabulary(VocabularyLookups):
    """A run folder's copy of its data set's vocabularies, memory-mapped read-only.

    Answers as PreparedSet does (the same lookups, on the same arrays), so that either serves a Run's
    ``vocabulary``: raw ids <-> indices (0 = padding or unknown), each item's category and popularity.
    """

    def __init__(self, path: Path, arrays: dict[str, np.ndarray]) -> None:
        self.path = path
        self._user = arrays["user"]
        self._item = arrays["item"]
        self._category = arrays["category"]
        self.item_category = arrays["item_category"]
        self.item_popularity = arrays["item_popularity"]
        self.n_users = int(self._user.shape[0])
        self.n_items = int(self._item.shape[0])
        self.n_categories = int(self._category.shape[0])

    @classmethod
    def read(cls, path: Path) -> Vocabulary:
        """The vocabularies in directory ``path``; a missing, unreadable or inconsistent file is a DmqnError."""
        arrays: dict[str, np.ndarray] = {}
        for name, dtype in VOCAB_ARRAYS.items():
            file = path / f"{name}.npy"
            try:
                array = np.load(file, mmap_mode="r")  # allow_pickle=False: a pickle could run any code
            except (OSError, ValueError) as exc:
                if _holds_objects(file):
                    raise DmqnError(
                        f"{file} was refused: it holds Python objects (pickled data), which dmqn never loads; "
                        "train the run again"
                    ) from None
                raise DmqnError(f"{file} is missing or damaged ({type(exc).__name__}); train the run again") from None
            if array.dtype != np.dtype(dtype) or array.ndim != 1:
                raise DmqnError(f"{file} has dtype {array.dtype}, expected {np.dtype(dtype)}; train the run again")
            arrays[name] = array
        n_items = arrays["item"].shape[0]
        if arrays["item_category"].shape[0] != n_items + 1 or arrays["item_popularity"].shape[0] != n_items + 1:
            raise DmqnError(f"the vocabularies in {path} do not match one another; train the run again")
        _check_values(path, arrays)
        return cls(path, arrays)

    def check_model(self, config: ModelConfig) -> None:
        """Refuse vocabularies of other sizes than the model's embeddings: an index past them would
        fail inside the model."""
        if (config.n_items, config.n_categories) != (self.n_items + 1, self.n_categories + 1):
            raise DmqnError(
                f"the vocabularies in {self.path} ({self.n_items:,} items, {self.n_categories:,} categories) do not "
                f"match the run's model ({config.n_items - 1:,} items, {config.n_categories - 1:,} categories); "
                "train the run again"
            )


def _holds_objects(file: Path) -> bool:
    """Whether the .npy header of ``file`` declares Python objects, which np.load refuses to unpickle."""
    try:
        with open(file, "rb") as fh:
            fmt = np.lib.format
            read_header = fmt.read_array_header_1_0 if fmt.read_magic(fh) == (1, 0) else fmt.read_array_header_2_0
            _, _, dtype = read_header(fh)
    except (OSError, ValueError):
        return False
    return dtype.hasobject


def _check_values(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """What the lookups and the model take for granted: raw ids sorted without repeats (they are
    searched by bisection), category indices within the categories, no negative count."""
    for name in ("user", "item", "category"):
        ids = arrays[name]
        if ids.shape[0] > 1 and not bool(np.all(ids[1:] > ids[:-1])):
            raise DmqnError(f"{path / f'{name}.npy'} is not sorted by raw id; train the run again")
    n_categories = arrays["category"].shape[0]
    item_category = arrays["item_category"]
    if item_category.shape[0] and not 0 <= int(item_category.min()) <= int(item_category.max()) <= n_categories:
        raise DmqnError(
            f"{path / 'item_category.npy'} holds category indices outside 0..{n_categories}; train the run again"
        )
    if arrays["item_popularity"].shape[0] and int(arrays["item_popularity"].min()) < 0:
        raise DmqnError(f"{path / 'item_popularity.npy'} holds negative counts; train the run again")


def write_vocabulary(run_dir: Path, data: PreparedSet) -> None:
    """Copy the set's vocabularies into the run folder, unless it holds them already.

    They are copied into a hidden folder that is renamed into place, so a reader finds all of
    them or none (and then falls back to the prepared set). A resumed run keeps the copy it has:
    its set was checked to be the one it trained on.
    """
    final = run_dir / VOCABULARY
    if final.is_dir():
        return
    remove_stale_temporaries(run_dir, VOCABULARY, temporary=_is_vocabulary_copy)
    tmp = new_temporary_directory(final, "tmp")
    try:
        for name in VOCAB_ARRAYS:
            shutil.copyfile(data.path / "vocab" / f"{name}.npy", tmp / f"{name}.npy")
            # On disk before the rename, so that a crash cannot publish empty files.
            with open(tmp / f"{name}.npy", "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_vocabulary_copy(path: Path) -> bool:
    """Whether ``path`` holds nothing but what write_vocabulary copies: a killed copy's leftover."""
    names = {f"{name}.npy" for name in VOCAB_ARRAYS}
    return path.is_dir() and all(entry.name in names and entry.is_file() for entry in path.iterdir())


class Run:
    """One run of the run store: its record, read once, and what it left in its folder.

    >>> run = Run.open(Workspace("dmqn-workspace"))       # the latest finished run
    >>> run.model_name, run.max_len, run.has_codebooks
    >>> model = run.model()                               # the best weights, in eval mode
    >>> run.vocabulary.item_index([5, 17], strict=True)   # raw item ids -> the model's indices

    The prepared set (``data``), the vocabularies and the model are opened on first use and kept.
    """

    def __init__(self, workspace: Workspace, store: RunStore, record: RunRecord) -> None:
        self.workspace = workspace
        self.store = store
        self.record = record
        self.run_id = record.run_id
        self.model_name = record.model
        self.directory = workspace.run_dir(record.run_id)
        self._data: PreparedSet | None = None
        self._vocabulary: Vocabulary | PreparedSet | None = None
        self._models: dict[str, InterestModel[Any]] = {}

    @classmethod
    def open(cls, workspace: Workspace, run_id: str | None = None, finished_only: bool = True) -> Run:
        """The run ``run_id``, or without one the latest finished run (the latest of any status with
        ``finished_only=False``); an unknown run is a DmqnError."""
        store = RunStore(workspace.store_path)
        record = store.get_run(run_id or store.resolve_run_id(None, finished_only))
        return cls(workspace, store, record)

    # -- the record ------------------------------------------------------------------------
    # Parsed on first use, so that a record whose settings this version cannot read still opens
    # (`dmqn runs show` shows any run).
    @cached_property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.record.params["model"])

    @property
    def train_settings(self) -> dict[str, Any]:
        """The training settings the run used (TrainConfig's fields)."""
        return self.record.params["train"]

    @property
    def max_len(self) -> int:
        """The most recent behaviors of a history the model sees."""
        return int(self.train_settings["max_len"])

    @property
    def has_codebooks(self) -> bool:
        """Whether the model clusters histories with codebooks (dmqn, dmqn-simple): what export-cache,
        inspect and report work on."""
        return has_codebooks(self.model_name)

    # -- the folder ------------------------------------------------------------------------
    @property
    def best_path(self) -> Path:
        return self.directory / BEST

    @property
    def checkpoint_path(self) -> Path:
        return self.directory / CHECKPOINT

    @property
    def has_weights(self) -> bool:
        """Whether a best epoch was saved (a run that failed or died before its first epoch has none)."""
        return self.best_path.exists()

    # -- opened on first use -----------------------------------------------------------------
    @property
    def data(self) -> PreparedSet:
        """The prepared set the run trained on; a DmqnError when it is gone or was prepared again differently."""
        if self._data is None:
            data = PreparedSet.open(self.record.dataset_path)
            check_run_data(self.record, data)
            self._data = data
        return self._data

    @property
    def vocabulary(self) -> Vocabulary | PreparedSet:
        """Raw ids <-> indices, item categories and popularity: the run folder's copy, or the prepared
        set for a run trained before the copy was kept."""
        if self._vocabulary is None:
            folder = self.directory / VOCABULARY
            if folder.is_dir():
                vocabulary = Vocabulary.read(folder)
                vocabulary.check_model(self.config)
                self._vocabulary = vocabulary
            else:
                # The set the model trained on (check_run_data); CachedScorer checks the indices it uses.
                self._vocabulary = self.data
        return self._vocabulary

    def model(self, device: str | torch.device = "cpu") -> InterestModel[Any]:
        """The model with the best-validation weights, in eval mode, on ``device`` (built once per device)."""
        key = str(torch.device(device))
        if key not in self._models:
            if not self.has_weights:
                raise DmqnError(f"run {self.run_id} has no trained weights yet (status: {self.record.status})")
            checkpoint = load_checkpoint(self.best_path)
            model = build_model(self.model_name, self.config, item_popularity=self.vocabulary.item_popularity)
            restore_weights(model, checkpoint, self.best_path)
            self._models[key] = model.to(device).eval()
        return self._models[key]
