"""The byte layout of one user's cached DMQN state (section 2.5), simple enough to read in any language.

DMQN's MCQM + ICIM output depends on the user only; a cache keeps it per user and serving runs
only CTAM + MLP per candidate. Only the non-empty clusters are stored, with their codeword ids:
CTAM has no per-codeword parameter, so scoring needs the tokens, their sizes and the recent
mean only (UserState.compact), and the ids let inspection tools name the clusters.

Layout, little-endian, no alignment padding::

    magic     4 bytes   b"DMQS"
    version   uint8     1; 2 for a model with short_term = "din"; 3 for one with match_features
    dtype     uint8     0 = float32, 1 = float16 (every float below but the match features)
    N         uint16    codebooks
    D         uint16    dimension
    version 3 only:
      flags   uint8     bit 0: the short-term behaviors follow recent; bit 1: the match table follows them;
                        bit 2: every cluster carries its top categories (cluster_categories)
      T       uint8     with flag bit 2 only: categories kept per cluster
    recent    D floats  mean embedding of the most recent behaviors
    version 2, and version 3 with flag bit 0:
      S       uint16    number of recent behaviors DIN reads (at most short_len)
      short   S x D floats  their embeddings, oldest first
    version 3 with flag bit 1 (nn/match_features.py), for the categories, then the items:
      U        uint32        distinct keys in the history
      keys     U x int32     their indices, ascending
      features U x 3 float32 log1p count, log1p recent count, log1p gap / 10 (always float32, so that
                             scoring from the cache equals evaluation bit for bit)
    then for each codebook n = 0 .. N-1:
      K         uint16       number of non-empty clusters
      codeword  K x uint16   their codeword ids, ascending
      size      K x uint32   behaviors assigned to each
      tokens    K x D floats ICIM output of each cluster, row by row
      with flag bit 2 only:
      category  K x T int32  each cluster's most frequent categories, 0 where it has fewer
      share     K x T float32  their shares of the cluster (always float32)

A user with C non-empty clusters in all takes 10 + (D + C D) f + 2 N + 6 C bytes, f = 4 or 2
(version 2: 2 + S D f more; version 3: 1 byte of flags, and 8 + 16 (U + V) with U categories and V items).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from dmqn_core.models.dmqn.model import UserState
from dmqn_core.nn.match_features import MatchTable

MAGIC = b"DMQS"
VERSION = 1  # the layout of a state without DIN short-term behaviors
VERSION_WITH_SHORT = 2
VERSION_WITH_FLAGS = 3  # the layout of a state with match features
FLAG_SHORT, FLAG_MATCH, FLAG_CATEGORIES = 1, 2, 4
DTYPES = {"float32": (0, np.dtype("<f4")), "float16": (1, np.dtype("<f2"))}
_HEADER = struct.Struct("<4sBBHH")


@dataclass
class DecodedState:
    """One user's state as stored: per codebook the non-empty clusters only."""

    recent: np.ndarray  # (D,) float32
    short: np.ndarray | None  # (S, D) float32, oldest first; None for a version-1 state
    codewords: list[np.ndarray]  # N arrays (K_n,) int
    sizes: list[np.ndarray]  # N arrays (K_n,) int
    tokens: list[np.ndarray]  # N arrays (K_n, D) float32
    # match_features: (category keys (U,), their features (U, 3), item keys (V,), their features (V, 3)); else None
    match: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None
    # cluster_categories: N arrays (K_n, T) int of the clusters' top categories, and N (K_n, T) float32 shares
    categories: list[np.ndarray] | None = None
    shares: list[np.ndarray] | None = None


def encode_states(state: UserState, dtype: str = "float32") -> list[bytes]:
    """The value of each of the H users of ``state`` (uncompacted, codeword-indexed), in order."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    code, np_dtype = DTYPES[dtype]
    clusters = state.clusters.detach().float().cpu().numpy()  # (H, N, W, D)
    mask = state.cluster_mask.cpu().numpy()  # (H, N, W)
    size = np.rint(state.cluster_size.detach().float().cpu().numpy()).astype("<u4")  # (H, N, W)
    recent = state.recent.detach().float().cpu().numpy()  # (H, D)
    H, N, W, D = clusters.shape
    # The optional parts, each None where the state lacks it.
    short = None
    if state.short is not None:
        assert state.short_mask is not None  # UserState holds both or neither
        # (H, S, D) and its mask (H, S), left-aligned
        short = (state.short.detach().float().cpu().numpy(), state.short_mask.cpu().numpy())
    tables = None
    if state.match is not None:
        tables = [
            (state.match.category.cpu().numpy(), state.match.category_features.detach().float().cpu().numpy()),
            (state.match.item.cpu().numpy(), state.match.item_features.detach().float().cpu().numpy()),
        ]
    categories = None
    if state.category is not None and state.category_share is not None:
        categories = (
            state.category.cpu().numpy().astype("<i4"),  # (H, N, W, T)
            state.category_share.detach().float().cpu().numpy().astype("<f4"),  # (H, N, W, T)
        )
    flags = (
        (FLAG_SHORT if short is not None else 0)
        | (FLAG_MATCH if tables is not None else 0)
        | (FLAG_CATEGORIES if categories is not None else 0)
    )
    values = []
    for h in range(H):
        if flags & (FLAG_MATCH | FLAG_CATEGORIES):
            parts = [_HEADER.pack(MAGIC, VERSION_WITH_FLAGS, code, N, D), struct.pack("<B", flags)]
            if categories is not None:
                parts.append(struct.pack("<B", categories[0].shape[-1]))
        else:
            parts = [_HEADER.pack(MAGIC, VERSION if short is None else VERSION_WITH_SHORT, code, N, D)]
        parts.append(recent[h].astype(np_dtype).tobytes())
        if short is not None:
            kept = short[0][h, short[1][h]]  # (S, D)
            parts += [struct.pack("<H", len(kept)), kept.astype(np_dtype).tobytes()]
        if tables is not None:
            for keys, features in tables:
                real = keys[h] >= 0  # (U,) the row's distinct keys come first
                parts += [
                    struct.pack("<I", int(real.sum())),
                    keys[h, real].astype("<i4").tobytes(),
                    features[h, real].astype("<f4").tobytes(),
                ]
        for n in range(N):
            ids = np.flatnonzero(mask[h, n])  # ascending codeword ids
            parts += [
                struct.pack("<H", len(ids)),
                ids.astype("<u2").tobytes(),
                size[h, n, ids].tobytes(),
                clusters[h, n, ids].astype(np_dtype).tobytes(),
            ]
            if categories is not None:
                top, share = categories
                parts += [top[h, n, ids].tobytes(), share[h, n, ids].tobytes()]
        values.append(b"".join(parts))
    return values


def decode_state(value: bytes) -> DecodedState:
    """Parse one value; ValueError if it is not a complete state of a known version."""
    if len(value) < _HEADER.size:
        raise ValueError("not a DMQN state: shorter than its header")
    magic, version, code, N, D = _HEADER.unpack_from(value, 0)
    if magic != MAGIC or version not in (VERSION, VERSION_WITH_SHORT, VERSION_WITH_FLAGS):
        raise ValueError(
            f"not a version-{VERSION}, -{VERSION_WITH_SHORT} or -{VERSION_WITH_FLAGS} DMQN state "
            f"(magic {magic!r}, version {version})"
        )
    np_dtype = next((t for c, t in DTYPES.values() if c == code), None)
    if np_dtype is None:
        raise ValueError(f"unknown float type code {code} in a DMQN state")
    f = np_dtype.itemsize
    offset = _HEADER.size
    flags = FLAG_SHORT if version == VERSION_WITH_SHORT else 0
    if version == VERSION_WITH_FLAGS:
        if len(value) <= offset:
            raise ValueError("truncated DMQN state")
        flags = value[offset]
        offset += 1
        if flags & ~(FLAG_SHORT | FLAG_MATCH | FLAG_CATEGORIES):
            raise ValueError(f"unknown flags {flags:#x} in a DMQN state")
    top = 0
    if flags & FLAG_CATEGORIES:
        if len(value) <= offset:
            raise ValueError("truncated DMQN state")
        top = value[offset]
        offset += 1
    try:
        recent = np.frombuffer(value, np_dtype, D, offset).astype(np.float32)
        offset += D * f
        short = None
        if flags & FLAG_SHORT:
            (S,) = struct.unpack_from("<H", value, offset)
            offset += 2
            short = np.frombuffer(value, np_dtype, S * D, offset).astype(np.float32).reshape(S, D)
            offset += S * D * f
        match = None
        if flags & FLAG_MATCH:
            parts = []
            for _ in range(2):
                (U,) = struct.unpack_from("<I", value, offset)
                offset += 4
                parts.append(np.frombuffer(value, "<i4", U, offset).astype(np.int64))
                offset += 4 * U
                parts.append(np.frombuffer(value, "<f4", U * 3, offset).reshape(U, 3).astype(np.float32))
                offset += 12 * U
            match = (parts[0], parts[1], parts[2], parts[3])
        codewords, sizes, tokens = [], [], []
        categories: list[np.ndarray] | None = [] if flags & FLAG_CATEGORIES else None
        shares: list[np.ndarray] | None = [] if flags & FLAG_CATEGORIES else None
        for _ in range(N):
            (K,) = struct.unpack_from("<H", value, offset)
            offset += 2
            codewords.append(np.frombuffer(value, "<u2", K, offset).astype(np.int64))
            offset += 2 * K
            sizes.append(np.frombuffer(value, "<u4", K, offset).astype(np.int64))
            offset += 4 * K
            tokens.append(np.frombuffer(value, np_dtype, K * D, offset).astype(np.float32).reshape(K, D))
            offset += K * D * f
            if categories is not None and shares is not None:
                categories.append(np.frombuffer(value, "<i4", K * top, offset).astype(np.int64).reshape(K, top))
                offset += 4 * K * top
                shares.append(np.frombuffer(value, "<f4", K * top, offset).astype(np.float32).reshape(K, top))
                offset += 4 * K * top
    except (ValueError, struct.error):
        raise ValueError("truncated DMQN state") from None
    if offset != len(value):
        raise ValueError(f"DMQN state has {len(value) - offset} trailing bytes")
    return DecodedState(recent, short, codewords, sizes, tokens, match, categories, shares)


def stack_states(states: Sequence[DecodedState], device: torch.device | str = "cpu") -> UserState:
    """Decoded states of H users -> one compact UserState (H, N, K_max, D) that DMQN.score accepts."""
    H, N, D = len(states), len(states[0].codewords), states[0].recent.shape[0]
    K = max([1] + [len(c) for s in states for c in s.codewords])
    clusters = np.zeros((H, N, K, D), np.float32)
    mask = np.zeros((H, N, K), bool)
    size = np.zeros((H, N, K), np.float32)
    for h, s in enumerate(states):
        for n in range(N):
            k = len(s.codewords[n])
            clusters[h, n, :k], mask[h, n, :k], size[h, n, :k] = s.tokens[n], True, s.sizes[n]
    recent = np.stack([s.recent for s in states])
    short = short_mask = None
    shorts = [s.short for s in states if s.short is not None]
    if shorts:
        if len(shorts) != H:
            raise ValueError("states of one model version mix layouts with and without short-term behaviors")
        S = max([1] + [len(s) for s in shorts])
        short = np.zeros((H, S, D), np.float32)
        short_mask = np.zeros((H, S), bool)
        for h, s in enumerate(shorts):  # all H states have one: shorts[h] is state h's
            short[h, : len(s)], short_mask[h, : len(s)] = s, True
    return UserState(
        torch.from_numpy(clusters).to(device),
        torch.from_numpy(mask).to(device),
        torch.from_numpy(size).to(device),
        torch.from_numpy(recent).to(device),
        None if short is None else torch.from_numpy(short).to(device),
        None if short_mask is None else torch.from_numpy(short_mask).to(device),
        _stack_match(states, device),
        *_stack_categories(states, K, device),
    )


def _stack_categories(
    states: Sequence[DecodedState], width: int, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The clusters' top categories and shares of the states, (H, N, width, T) each, as stack_states lays out
    the clusters (None, None when the states have none)."""
    tables = [(s.categories, s.shares) for s in states if s.categories is not None and s.shares is not None]
    if not tables:
        return None, None
    if len(tables) != len(states):
        raise ValueError("states of one model version mix layouts with and without cluster categories")
    N = len(states[0].codewords)
    T = max(c.shape[1] for categories, _ in tables for c in categories)
    category = np.zeros((len(states), N, width, T), np.int64)
    share = np.zeros((len(states), N, width, T), np.float32)
    for h, (categories, shares) in enumerate(tables):
        for n in range(N):
            k = len(categories[n])
            category[h, n, :k], share[h, n, :k] = categories[n], shares[n]
    return torch.from_numpy(category).to(device), torch.from_numpy(share).to(device)


def _stack_match(states: Sequence[DecodedState], device: torch.device | str) -> MatchTable | None:
    """The states' match tables as one MatchTable, keys padded with -1 (None when the states have none)."""
    matches = [s.match for s in states if s.match is not None]
    if not matches:
        return None
    if len(matches) != len(states):
        raise ValueError("states of one model version mix layouts with and without match tables")
    padded = []
    for part in (0, 2):  # categories, items
        width = max([1] + [len(m[part]) for m in matches])
        keys = np.full((len(matches), width), -1, np.int64)
        features = np.zeros((len(matches), width, 3), np.float32)
        for h, m in enumerate(matches):
            keys[h, : len(m[part])], features[h, : len(m[part])] = m[part], m[part + 1]
        padded += [torch.from_numpy(keys).to(device), torch.from_numpy(features).to(device)]
    return MatchTable(*padded)
