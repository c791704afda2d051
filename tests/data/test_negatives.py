"""``dmqn prep --negatives`` and ``--valid-targets`` (issue 19), and the prepared arrays of the default
protocol checked against digests of what dmqn prep wrote before either existed (issue 22: a change to
prep must not change a prepared set)."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from dmqn_cli.main import app
from dmqn_core.data.prep import TAOBAO_TIME_RANGE, prepare
from dmqn_core.data.prepared import PreparedSet
from dmqn_core.errors import DmqnError
from dmqn_core.workspace import Workspace

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
TAOBAO_HEAD = SHARED / "taobao_userbehavior_head.csv"
HAND = {"min_behaviors": 5, "train_targets": 5, "max_len": 50, "seed": 7}


def handmade_log(path: Path, skew: float = 1.0) -> Path:
    """60 users of 20-89 behaviors over 11 categories of 25 items each; ``skew`` > 1 makes the first items
    of each category the popular ones.

    random.Random's sequence is fixed across Python versions, so the log (and the digests below) is too.
    """
    rng = random.Random(20261206)
    t = TAOBAO_TIME_RANGE[0]
    lines = []
    for u in range(1, 61):
        t = TAOBAO_TIME_RANGE[0] + rng.randrange(3600)
        for _ in range(rng.randrange(20, 90)):
            t += rng.randrange(1, 7200)
            category = rng.randrange(1, 12)
            item = category * 100 + (rng.randrange(0, 25) if skew == 1.0 else int(25 * rng.random() ** skew))
            behavior = rng.choices(["pv", "cart", "fav", "buy"], [80, 8, 6, 6])[0]
            lines.append(f"{u},{item},{category},{behavior},{t}")
    path.write_text("\n".join(lines) + "\n")
    return path


def set_digest(path: Path) -> str:
    """SHA-256 over every file of a prepared set but meta.json (which holds its creation time)."""
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.is_file() and file.name != "meta.json":
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("negatives") / "ws").ensure()


@pytest.fixture(scope="module")
def log(ws: Workspace) -> Path:
    return handmade_log(ws.root / "hand.csv")


def negatives_with_positives(ps: PreparedSet, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the split's negatives, index of the positive each belongs to: same user and time)."""
    sp = ps.split(split)
    positive = {(int(sp.user[i]), int(sp.hist_end[i]), int(sp.timestamp[i])): i for i in np.flatnonzero(sp.label == 1)}
    negatives = np.flatnonzero(sp.label == 0)
    owners = np.array([positive[int(sp.user[i]), int(sp.hist_end[i]), int(sp.timestamp[i])] for i in negatives])
    return negatives, owners


def clicked_items(ps: PreparedSet) -> dict[int, set[int]]:
    clicks = [ps.behavior_names.index(name) + 1 for name in ("pv",)]
    users = np.repeat(np.arange(1, ps.n_users + 1), np.diff(ps.user_offsets))
    is_click = np.isin(ps.beh_behavior, clicks)
    out: dict[int, set[int]] = {}
    for user, item in zip(users[is_click].tolist(), np.asarray(ps.beh_item)[is_click].tolist()):
        out.setdefault(user, set()).add(item)
    return out


# Digests of the sets that dmqn prep wrote at commit 0996443, before --negatives and --valid-targets
# (the same logs and settings as below, prepared by that commit).
DEFAULT_PROTOCOL_DIGESTS = {
    "hand": "c5a815a307baec0899874622f31ff64878a0116e2e89a8a3b9366d571ecb93d4",
    "head": "528999a804c67088c1610ffa74e2c96ea844a62edc97ec2f9d1562f738d50bd5",
}


def test_the_protocol_of_before_writes_the_same_bytes_as_before(ws: Workspace, log: Path) -> None:
    """Popularity negatives and one validation target (the defaults until --valid-targets 5 became one)."""
    result = prepare(log, "taobao", "hand", workspace=ws, valid_targets=1, **HAND)
    assert set_digest(result.path) == DEFAULT_PROTOCOL_DIGESTS["hand"]
    assert result.meta["protocol"]["negatives"] == "popularity" and result.meta["protocol"]["valid_targets"] == 1
    assert prepare(log, "taobao", "five", workspace=ws, **HAND).meta["protocol"]["valid_targets"] == 5  # the default
    if TAOBAO_HEAD.is_file():
        head = prepare(TAOBAO_HEAD, "taobao", "head", workspace=ws, min_behaviors=5, seed=1, valid_targets=1)
        assert set_digest(head.path) == DEFAULT_PROTOCOL_DIGESTS["head"]


def test_same_category_negatives_share_the_positives_category_unless_it_is_too_small(ws: Workspace, log: Path) -> None:
    result = prepare(log, "taobao", "same", workspace=ws, negatives="same-category", neg_ratio=2, **HAND)
    ps = PreparedSet.open(result.path)
    clicked = clicked_items(ps)
    item_category = np.asarray(ps.item_category)
    fallbacks = 0
    for split in ("train", "valid", "test"):
        sp = ps.split(split)
        negatives, owners = negatives_with_positives(ps, split)
        for owner in np.unique(owners):
            user, category = int(sp.user[owner]), int(sp.category[owner])
            mine = negatives[owners == owner]
            items = sp.item[mine].tolist()
            assert len(set(items)) == len(items) == 2 and not set(items) & clicked[user]
            # Items of the positive's category that the user never clicked: enough -> all from there.
            pool = set(np.flatnonzero(item_category == category).tolist()) - clicked[user]
            if len(pool) >= 2:
                assert (sp.category[mine] == category).all()
            else:
                fallbacks += 1
    assert result.meta["counts"]["negatives_fallback"] == fallbacks
    assert result.meta["protocol"]["negatives"] == "same-category"


def test_uniform_negatives_ignore_popularity_and_each_protocol_is_reproducible(ws: Workspace) -> None:
    log = handmade_log(ws.root / "skewed.csv", skew=4.0)
    means = {}
    for protocol in ("popularity", "uniform"):
        first = prepare(log, "taobao", f"{protocol}-a", workspace=ws, negatives=protocol, neg_ratio=4, **HAND)
        again = prepare(log, "taobao", f"{protocol}-b", workspace=ws, negatives=protocol, neg_ratio=4, **HAND)
        assert set_digest(first.path) == set_digest(again.path)
        ps = PreparedSet.open(first.path)
        train = ps.split("train")
        means[protocol] = float(ps.item_popularity[train.item[train.label == 0]].mean())
    # Popularity in this log runs from 1 to about 30 behaviors per item: a draw by popularity favours
    # the popular ones, a uniform draw does not (deterministic for the seed; the gap is wide).
    assert means["uniform"] < 0.8 * means["popularity"]
    other_seed = prepare(
        log, "taobao", "uniform-c", workspace=ws, negatives="uniform", neg_ratio=4, **{**HAND, "seed": 8}
    )
    assert set_digest(other_seed.path) != set_digest(ws.data_dir / "uniform-a")


def test_valid_targets_takes_the_clicks_before_the_test_click(ws: Workspace, log: Path) -> None:
    one = PreparedSet.open(prepare(log, "taobao", "k1", workspace=ws, neg_ratio=0, valid_targets=1, **HAND).path)
    three = PreparedSet.open(prepare(log, "taobao", "k3", workspace=ws, neg_ratio=0, valid_targets=3, **HAND).path)
    assert three.meta["protocol"]["valid_targets"] == 3

    def times(ps: PreparedSet, split: str, user: int) -> list[int]:
        sp = ps.split(split)
        return sorted(sp.timestamp[sp.user == user].tolist())  # a user's clicks have distinct times here

    n_short = 0
    for user in range(1, one.n_users + 1):
        test = times(three, "test", user)
        valid, train = times(three, "valid", user), times(three, "train", user)
        targets_one = times(one, "train", user) + times(one, "valid", user) + times(one, "test", user)
        assert test == times(one, "test", user) and len(test) == 1
        # k1 takes all of a user's clicks when it takes fewer than its 1 + 1 + 5: then they are all known.
        n_clicks = len(targets_one) if len(targets_one) < 7 else None
        expected_valid = min(3, n_clicks - 2) if n_clicks is not None else 3
        n_short += expected_valid < 3
        assert len(valid) == expected_valid and 1 <= len(train) <= 5
        assert max(train) < min(valid) and max(valid) < test[0]
        # Both take the most recent clicks, k3 two more of them.
        assert set(targets_one) <= set(train + valid + test)
    assert n_short < one.n_users  # the log has users with plenty of clicks, the case of interest


def test_bad_protocol_settings_are_one_line_errors(ws: Workspace, log: Path) -> None:
    with pytest.raises(DmqnError, match="--negatives must be one of popularity, uniform, same-category"):
        prepare(log, "taobao", "bad", workspace=ws, negatives="hard", **HAND)
    with pytest.raises(DmqnError, match="--valid-targets must be >= 1"):
        prepare(log, "taobao", "bad", workspace=ws, valid_targets=0, **HAND)
    result = CliRunner().invoke(
        app, ["prep", str(log), "-f", "taobao", "-o", "bad", "--valid-targets", "0", "-w", str(ws.root)]
    )
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "error: --valid-targets must be >= 1, got 0"
    ]
    result = CliRunner().invoke(
        app, ["prep", str(log), "-f", "taobao", "-o", "bad", "--negatives", "hard", "-w", str(ws.root)]
    )
    assert result.exit_code == 2 and "same-category" in result.output
    assert not (ws.data_dir / "bad").exists()
