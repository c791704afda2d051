"""Ranking and calibration metrics of CTR models: AUC, GAUC and logloss, and the paired bootstrap
interval of a difference between two models."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties sharing their average rank (as in the Mann-Whitney U statistic)."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Boundaries of runs of equal values.
    boundary = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundary))
    ends = np.concatenate((boundary, [len(values)]))
    run_rank = (starts + ends + 1) / 2.0  # average of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve; NaN when only one class is present."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def gauc(users: np.ndarray, labels: np.ndarray, scores: np.ndarray) -> float:
    """Group AUC: the per-user AUC averaged with each user weighted by its number of samples.

    Users whose samples are all of one class have no AUC and are left out, as in DIN's definition.
    """
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(users, kind="mergesort")
    users, labels, scores = users[order], labels[order], scores[order]
    boundary = np.flatnonzero(np.diff(users)) + 1
    total, weight = 0.0, 0
    for lab, sco in zip(np.split(labels, boundary), np.split(scores, boundary)):
        value = auc(lab, sco)
        if not np.isnan(value):
            total += value * len(lab)
            weight += len(lab)
    return total / weight if weight else float("nan")


def logloss(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy (eq. 2) of predicted probabilities."""
    labels = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), eps, 1.0 - eps)
    return float(-np.mean(labels * np.log(p) + (1.0 - labels) * np.log(1.0 - p)))


def ctr_metrics(users: np.ndarray, labels: np.ndarray, logits: np.ndarray) -> dict[str, float]:
    """AUC, GAUC and logloss of one split from the model's logits."""
    logits = np.asarray(logits, dtype=np.float64)
    probabilities = 1.0 / (1.0 + np.exp(-logits))
    return {
        "auc": auc(labels, logits),
        "gauc": gauc(users, labels, logits),
        "logloss": logloss(labels, probabilities),
        "samples": float(len(labels)),
    }


@dataclass(frozen=True)
class PairedDifference:
    """A - B of one metric, with the percentile interval of its paired bootstrap over users."""

    delta: float
    low: float
    high: float


def paired_bootstrap(
    users: np.ndarray,
    labels: np.ndarray,
    scores_a: Sequence[np.ndarray],
    scores_b: Sequence[np.ndarray],
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, PairedDifference]:
    """Δ AUC and Δ GAUC of model A over model B on one test set, with a paired bootstrap interval.

    ``scores_a`` and ``scores_b`` hold one score array per seed (aligned with ``labels``); a model's
    metric is the mean over its seeds. Each bootstrap replicate draws the test users with
    replacement and scores both models on the same draw (a user drawn twice counts twice), so the
    interval reflects which users happen to be in the test set, the variance both models share
    being taken out by the pairing. Δ is measured on the full test set.
    """
    users = np.asarray(users)
    labels = np.asarray(labels).astype(bool)
    user_ids, user_of_sample = np.unique(users, return_inverse=True)
    rng = np.random.default_rng(seed)
    a_runs = [_RankedScores(labels, user_of_sample, s) for s in scores_a]
    b_runs = [_RankedScores(labels, user_of_sample, s) for s in scores_b]
    if not a_runs or not b_runs:
        raise ValueError("each model needs the scores of at least one run")

    def delta(weights: np.ndarray) -> dict[str, np.ndarray]:
        # weights: (R, n_users) multiplicities of the users in R replicates
        return {
            metric: np.mean([getattr(run, metric)(weights) for run in a_runs], axis=0)
            - np.mean([getattr(run, metric)(weights) for run in b_runs], axis=0)
            for metric in ("auc", "gauc")
        }

    full = delta(np.ones((1, len(user_ids))))
    replicates: dict[str, list[np.ndarray]] = {"auc": [], "gauc": []}
    for start in range(0, n_boot, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_boot - start)
        drawn = rng.integers(0, len(user_ids), size=(size, len(user_ids)))
        weights = np.stack([np.bincount(row, minlength=len(user_ids)) for row in drawn]).astype(np.float64)
        for metric, values in delta(weights).items():
            replicates[metric].append(values)
    tail = (1.0 - level) / 2.0
    out = {}
    for metric, values in replicates.items():
        low, high = np.nanquantile(np.concatenate(values), [tail, 1.0 - tail])
        out[metric] = PairedDifference(float(full[metric][0]), float(low), float(high))
    return out


# Replicates evaluated at once: (chunk, samples) float64 weights stay a few MB on a 10^5-sample test set.
_BOOTSTRAP_CHUNK = 32


class _RankedScores:
    """One run's scores, sorted once, so that the AUC and GAUC of any user weighting are cumulative sums."""

    def __init__(self, labels: np.ndarray, user_of_sample: np.ndarray, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != labels.shape:
            raise ValueError(f"scores of shape {scores.shape} for {labels.shape[0]} samples")
        order = np.argsort(scores, kind="mergesort")
        self.labels = labels[order]
        self.user = user_of_sample[order]
        sorted_scores = scores[order]
        # First and one-past-last index of each sample's run of equal scores (ties share a rank).
        starts = np.concatenate(([0], np.flatnonzero(np.diff(sorted_scores)) + 1))
        ends = np.concatenate((starts[1:], [len(scores)]))
        self.tie_start = np.repeat(starts, ends - starts)
        self.tie_end = np.repeat(ends, ends - starts)
        # Per-user AUCs do not depend on the weighting: computed once, then weighted.
        n_users = int(user_of_sample.max()) + 1 if len(user_of_sample) else 0
        self.n_user_samples = np.bincount(user_of_sample, minlength=n_users).astype(np.float64)
        self.user_auc = np.full(n_users, np.nan)
        by_user = np.argsort(user_of_sample, kind="stable")
        bounds = np.flatnonzero(np.diff(user_of_sample[by_user])) + 1
        for rows in np.split(by_user, bounds) if len(by_user) else []:
            self.user_auc[user_of_sample[rows[0]]] = auc(labels[rows], scores[rows])

    def auc(self, weights: np.ndarray) -> np.ndarray:
        """(R,) AUCs under R user weightings (R, n_users): sum over positives of the weighted negatives
        below them, ties counted half, over the weighted positive-negative pairs."""
        w = weights[:, self.user]  # (R, n) in score order
        neg = np.where(self.labels, 0.0, w)
        pos = np.where(self.labels, w, 0.0)
        below = np.concatenate((np.zeros((len(w), 1)), np.cumsum(neg, axis=1)), axis=1)  # (R, n + 1)
        neg_below = below[:, self.tie_start]
        neg_tied = below[:, self.tie_end] - neg_below
        pairs = pos.sum(axis=1) * neg.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (pos * (neg_below + 0.5 * neg_tied)).sum(axis=1) / pairs

    def gauc(self, weights: np.ndarray) -> np.ndarray:
        """(R,) GAUCs: per-user AUCs averaged with weight (multiplicity x samples), users of one class left out."""
        has_auc = ~np.isnan(self.user_auc)
        w = weights[:, has_auc] * self.n_user_samples[has_auc]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w * self.user_auc[has_auc]).sum(axis=1) / w.sum(axis=1)
