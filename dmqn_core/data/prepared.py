"""The on-disk format of a prepared long-sequence CTR set, its writer helpers and its reader.

A prepared set is a directory of NumPy ``.npy`` arrays plus ``meta.json``::

    <NAME>/meta.json                     format ("dmqn-prepared"), format_version, name, source,
                                         protocol, counts, fingerprint
    <NAME>/behaviors/user_offsets.npy    int64 [n_users + 1]: user u owns rows [offsets[u-1], offsets[u])
    <NAME>/behaviors/item.npy            int32 item index, one row per behavior
    <NAME>/behaviors/category.npy        int32 category index
    <NAME>/behaviors/behavior.npy        int8  behavior-type index
    <NAME>/behaviors/timestamp.npy       int64 unix seconds
    <NAME>/samples/{split}_{field}.npy   split in train/valid/test; field in user (int32), item (int32),
                                         category (int32), label (int8), hist_end (int64), timestamp (int64)
    <NAME>/vocab/{user,item,category}.npy  int64 raw ids: index i <-> array[i - 1] (0 is padding)
    <NAME>/vocab/behavior.json           behavior-type names: index i <-> list[i - 1]
    <NAME>/vocab/item_category.npy       int32 [n_items + 1]: item index -> category index
    <NAME>/vocab/item_popularity.npy     int64 [n_items + 1]: behaviors per item in the set

Behavior rows are sorted by user index, then timestamp, then file order. A sample's history is
rows ``[max(user_start, hist_end - max_len), hist_end)``: every behavior of the user strictly
before the sample's timestamp, cut to the most recent ``max_len``.

The fingerprint names what the set was made from: the SHA-256 of the source's SHA-256 and the
canonical JSON of the protocol (see fingerprint_of). Preparation is deterministic, so two sets
with equal fingerprints hold the same arrays, and a run can tell whether the set it was trained
on has been prepared again differently since.

Why memory-mapped arrays: histories are variable-length slices of one per-user behavior array,
so a sample stores a single end offset instead of a copy of its history (a 100M-row log with
1000-long histories would otherwise need terabytes), and ``np.load(mmap_mode="r")`` lets
training gather those slices with zero copies, paging in only what a batch touches instead
of loading the set into memory.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace

FORMAT_VERSION = 1
# meta.json's "format": what tells a set that dmqn prep made from any other folder (only such a
# folder may be replaced by --overwrite). Sets made before it existed are known by META_KEYS.
FORMAT_MARKER = "dmqn-prepared"
META_KEYS = ("format_version", "name", "source", "protocol", "counts")
SPLITS = ("train", "valid", "test")
# Raw ids are int64 in the prepared arrays, the run store and the state cache: one outside names nothing.
RAW_ID_RANGE = range(-(2**63), 2**63)

BEHAVIOR_ARRAYS = {
    "item": np.int32,
    "category": np.int32,
    "behavior": np.int8,
    "timestamp": np.int64,
}
SAMPLE_ARRAYS = {
    "user": np.int32,
    "item": np.int32,
    "category": np.int32,
    "label": np.int8,
    "hist_end": np.int64,
    "timestamp": np.int64,
}
VOCAB_ARRAYS = {
    "user": np.int64,
    "item": np.int64,
    "category": np.int64,
    "item_category": np.int32,
    "item_popularity": np.int64,
}


def expected_arrays() -> dict[str, type]:
    """Every array file of a complete set (path relative to the set) with its dtype."""
    files: dict[str, type] = {"behaviors/user_offsets.npy": np.int64}
    files.update({f"behaviors/{name}.npy": dtype for name, dtype in BEHAVIOR_ARRAYS.items()})
    for split in SPLITS:
        files.update({f"samples/{split}_{name}.npy": dtype for name, dtype in SAMPLE_ARRAYS.items()})
    files.update({f"vocab/{name}.npy": dtype for name, dtype in VOCAB_ARRAYS.items()})
    return files


def set_files() -> set[str]:
    """Every file of a complete set, as paths relative to the set."""
    return {"meta.json", "vocab/behavior.json", *expected_arrays()}


def fingerprint_of(meta: dict) -> str:
    """SHA-256 (hex) of the source's SHA-256 and the protocol's canonical JSON; for a meta.json
    lacking those (not written by dmqn prep), of the whole meta's canonical JSON."""
    source, protocol = meta.get("source"), meta.get("protocol")
    if isinstance(source, dict) and isinstance(source.get("sha256"), str) and isinstance(protocol, dict):
        text = f"{source['sha256']}\n{_canonical_json(protocol)}"
    else:
        text = _canonical_json(meta)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def is_prepared_set(path: Path) -> bool:
    """Whether ``path`` is a set that dmqn prep made: its meta.json has the FORMAT_MARKER, or (a set
    made before the marker) every key of META_KEYS, with every array of the set present."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(meta, dict):
        return False
    if meta.get("format") == FORMAT_MARKER:
        return True
    return all(key in meta for key in META_KEYS) and all((path / rel).is_file() for rel in expected_arrays())


def save_array(root: Path, relative: str, values: np.ndarray, dtype: npt.DTypeLike) -> None:
    """Write one array of the set, converting to the contract's dtype (range-checked)."""
    target = np.dtype(dtype)
    values = np.asarray(values)
    if values.size and values.dtype != target and np.issubdtype(target, np.integer):
        # An integer dtype, as issubdtype just said; numpy's stubs cannot narrow a dtype on it.
        info = np.iinfo(cast("np.dtype[np.integer]", target))
        if values.min() < info.min or values.max() > info.max:
            raise DmqnError(f"{relative}: values do not fit {target.name}")
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, values.astype(target, copy=False))


def open_array_writer(root: Path, relative: str, dtype: type, length: int) -> np.memmap:
    """A writable memory-mapped ``.npy`` of ``length`` rows, filled in chunks by the caller."""
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(dtype), shape=(length,))


def write_json(root: Path, relative: str, value: Any) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class SampleSplit:
    """One split's samples: parallel arrays, one entry per (user, target item, label)."""

    user: np.ndarray
    item: np.ndarray
    category: np.ndarray
    label: np.ndarray
    hist_end: np.ndarray
    timestamp: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])


class VocabularyLookups:
    """Raw ids <-> vocabulary indices (1-based, 0 = padding or unknown), over three sorted raw-id arrays.

    Shared by PreparedSet and a run folder's copy of the vocabularies (dmqn_core.runs.run.Vocabulary),
    so that both answer a lookup the same way.
    """

    _user: np.ndarray
    _item: np.ndarray
    _category: np.ndarray

    def user_index(self, raw_ids: Iterable[int] | np.ndarray, strict: bool = False) -> np.ndarray:
        """Raw user ids -> indices (unknown ids -> 0, or a DmqnError when ``strict``)."""
        return _vocab_index(self._user, raw_ids, "user", strict)

    def item_index(self, raw_ids: Iterable[int] | np.ndarray, strict: bool = False) -> np.ndarray:
        """Raw item ids -> indices (unknown ids -> 0, or a DmqnError when ``strict``)."""
        return _vocab_index(self._item, raw_ids, "item", strict)

    def raw_user(self, index: int | np.ndarray) -> np.ndarray:
        """Indices (1..n_users) -> raw user ids."""
        return _vocab_raw(self._user, index, "user")

    def raw_item(self, index: int | np.ndarray) -> np.ndarray:
        """Indices (1..n_items) -> raw item ids."""
        return _vocab_raw(self._item, index, "item")

    def raw_category(self, index: int | np.ndarray) -> np.ndarray:
        """Indices (1..n_categories) -> raw category ids."""
        return _vocab_raw(self._category, index, "category")


class PreparedSet(VocabularyLookups):
    """Read access to a prepared set; every array is memory-mapped read-only."""

    def __init__(self, path: Path, meta: dict, arrays: dict[str, np.ndarray], behavior_names: list[str]):
        self.path = path
        self.meta = meta
        self._arrays = arrays
        self.behavior_names = behavior_names
        self.user_offsets = arrays["behaviors/user_offsets.npy"]
        self.beh_item = arrays["behaviors/item.npy"]
        self.beh_category = arrays["behaviors/category.npy"]
        self.beh_behavior = arrays["behaviors/behavior.npy"]
        self.beh_timestamp = arrays["behaviors/timestamp.npy"]
        self.item_category = arrays["vocab/item_category.npy"]
        self.item_popularity = arrays["vocab/item_popularity.npy"]
        self._user = arrays["vocab/user.npy"]
        self._item = arrays["vocab/item.npy"]
        self._category = arrays["vocab/category.npy"]
        self.n_users = int(self._user.shape[0])
        self.n_items = int(self._item.shape[0])
        self.n_categories = int(self._category.shape[0])
        self.n_behavior_types = len(behavior_names)
        self._popularity_index: tuple[np.ndarray, int, np.ndarray] | None = None

    @classmethod
    def open(cls, path: str | Path) -> PreparedSet:
        """Open a prepared set directory; a missing, partial or foreign directory is a DmqnError."""
        path = Path(path).expanduser().resolve()
        meta_path = path / "meta.json"
        if not path.is_dir():
            raise DmqnError(f"no prepared set at {path} (create one with `dmqn prep`)")
        if not meta_path.is_file():
            raise DmqnError(f"{path} is not a prepared set (no meta.json)")
        meta = _read_meta(path)
        arrays: dict[str, np.ndarray] = {}
        for relative, dtype in expected_arrays().items():
            file = path / relative
            if not file.is_file():
                raise DmqnError(f"prepared set {path} is incomplete: {relative} is missing")
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DmqnError(f"prepared set {path}: {relative} is unreadable: {exc}") from None
            if array.dtype != np.dtype(dtype) or array.ndim != 1:
                raise DmqnError(f"prepared set {path}: {relative} has dtype {array.dtype}, expected {np.dtype(dtype)}")
            arrays[relative] = array
        try:
            behavior_names = json.loads((path / "vocab/behavior.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DmqnError(f"prepared set {path}: vocab/behavior.json is unreadable: {exc}") from None
        prepared = cls(path, meta, arrays, behavior_names)
        prepared._check_shapes()
        return prepared

    def _check_shapes(self) -> None:
        n_rows = self.beh_item.shape[0]
        problems = []
        if self.user_offsets.shape[0] != self.n_users + 1 or (n_rows and self.user_offsets[-1] != n_rows):
            problems.append("behaviors/user_offsets.npy does not match the behavior rows")
        for name in BEHAVIOR_ARRAYS:
            if self._arrays[f"behaviors/{name}.npy"].shape[0] != n_rows:
                problems.append(f"behaviors/{name}.npy has a different length")
        for name in ("item_category", "item_popularity"):
            if self._arrays[f"vocab/{name}.npy"].shape[0] != self.n_items + 1:
                problems.append(f"vocab/{name}.npy does not have n_items + 1 entries")
        for split in SPLITS:
            lengths = {self._arrays[f"samples/{split}_{name}.npy"].shape[0] for name in SAMPLE_ARRAYS}
            if len(lengths) != 1:
                problems.append(f"the {split} sample arrays differ in length")
        if problems:
            raise DmqnError(f"prepared set {self.path} is inconsistent: {problems[0]}")

    def split(self, name: str) -> SampleSplit:
        """The samples of ``train``, ``valid`` or ``test``."""
        if name not in SPLITS:
            raise DmqnError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return SampleSplit(**{field: self._arrays[f"samples/{name}_{field}.npy"] for field in SAMPLE_ARRAYS})

    @property
    def fingerprint(self) -> str:
        """What the set was made from (see fingerprint_of), as recorded when it was prepared."""
        recorded = self.meta.get("fingerprint")
        return recorded if isinstance(recorded, str) else fingerprint_of(self.meta)

    @property
    def max_len(self) -> int:
        return int(self.meta["protocol"]["max_len"])

    def popularity_before(self, item: np.ndarray, timestamp: np.ndarray) -> np.ndarray:
        """The behaviors of each item in the set strictly before each time: (B,) item indices and (B,) unix
        seconds -> (B,) int64. Match features read it as the candidate's popularity at the sample's time,
        so that no sample counts the future; with no time limit it is ``item_popularity``.

        The first call sorts every behavior by (item, time) once (about 16 bytes per behavior, kept).
        """
        if self._popularity_index is None:
            times = np.unique(np.asarray(self.beh_timestamp))  # (T,) ascending
            stride = len(times) + 1
            keys = np.asarray(self.beh_item, dtype=np.int64) * stride + np.searchsorted(times, self.beh_timestamp)
            keys.sort()
            self._popularity_index = (times, stride, keys)
        times, stride, keys = self._popularity_index
        item = np.asarray(item, dtype=np.int64)
        # A behavior's time rank is below the query's exactly when its time is earlier.
        rank = np.searchsorted(times, np.asarray(timestamp, dtype=np.int64), side="left")
        return np.searchsorted(keys, item * stride + rank, side="left") - np.searchsorted(
            keys, item * stride, side="left"
        )

    def history(self, user: int, hist_end: int, max_len: int | None = None) -> slice:
        """Rows of the behavior arrays that form a sample's history (most recent ``max_len``)."""
        limit = self.max_len if max_len is None else max_len
        start = int(self.user_offsets[user - 1])
        return slice(max(start, int(hist_end) - limit), int(hist_end))


def _read_meta(path: Path) -> dict:
    """meta.json of the set at ``path``, checked to hold what readers of a set use."""
    incomplete = f"{path} is not a complete prepared set: meta.json"
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise DmqnError(f"{path / 'meta.json'} is unreadable: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise DmqnError(f"{incomplete} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict):
        raise DmqnError(f"{incomplete} is not a JSON object")
    if "format_version" not in meta:
        raise DmqnError(f"{incomplete} lacks format_version")
    # The version first: another version may name its keys differently.
    if meta["format_version"] != FORMAT_VERSION:
        raise DmqnError(
            f"{path} has format_version {meta['format_version']!r}; this dmqn reads version {FORMAT_VERSION} "
            "(prepare it again with `dmqn prep --overwrite`)"
        )
    for key in META_KEYS:
        if key not in meta:
            raise DmqnError(f"{incomplete} lacks {key}")
    if not isinstance(meta["protocol"], dict) or "max_len" not in meta["protocol"]:
        raise DmqnError(f"{incomplete} lacks protocol.max_len")
    max_len = meta["protocol"]["max_len"]
    # Readers slice histories with it: a string, a float or a huge number would fail deep inside them.
    if not isinstance(max_len, int) or isinstance(max_len, bool) or not 1 <= max_len < 2**63:
        raise DmqnError(f"{path / 'meta.json'}: protocol.max_len must be a positive integer, got {json.dumps(max_len)}")
    return meta


def _vocab_index(vocab: np.ndarray, raw_ids: Iterable[int] | np.ndarray, what: str, strict: bool) -> np.ndarray:
    """Indices (1-based, 0 = unknown) of raw ids in a sorted vocabulary; strict: an unknown id is an error."""
    # Vocabularies are ordered by raw id, so a binary search maps raw ids without a hash table.
    raw = np.asarray(raw_ids if isinstance(raw_ids, np.ndarray) else list(raw_ids), dtype=np.int64)
    pos = np.searchsorted(vocab, raw)
    found = pos < vocab.shape[0]
    found[found] = vocab[pos[found]] == raw[found]
    if strict and not found.all():
        raise DmqnError(f"unknown {what} id {int(raw[~found][0])}")
    return np.where(found, pos + 1, 0).astype(np.int64)


def _vocab_raw(vocab: np.ndarray, index: int | np.ndarray, what: str) -> np.ndarray:
    """Raw ids of 1-based vocabulary indices."""
    idx = np.asarray(index, dtype=np.int64)
    if idx.size and (idx.min() < 1 or idx.max() > vocab.shape[0]):
        raise DmqnError(f"{what} index out of range 1..{vocab.shape[0]}")
    return np.asarray(vocab[idx - 1])


def list_prepared(workspace: Workspace) -> list[tuple[str, dict]]:
    """Prepared sets in the workspace's ``data/`` directory as (name, meta), by name.

    Hidden entries (unfinished ``.NAME.tmp-PID`` writers) and directories without a readable
    ``meta.json`` are not sets and are left out.
    """
    found: list[tuple[str, dict]] = []
    if not workspace.data_dir.is_dir():
        return found
    for entry in sorted(workspace.data_dir.iterdir()):
        if entry.name.startswith(".") or not (entry / "meta.json").is_file():
            continue
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict):
            found.append((entry.name, meta))
    return found
