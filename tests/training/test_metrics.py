import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from dmqn_core.training.metrics import auc, ctr_metrics, gauc, logloss


def test_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 500)
    scores = rng.integers(0, 20, 500).astype(float)  # many ties
    assert auc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_perfect_and_reversed():
    labels = np.array([0, 0, 1, 1])
    assert auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert np.isnan(auc(np.ones(3), np.arange(3.0)))


def test_gauc_is_sample_weighted_mean_of_user_aucs():
    rng = np.random.default_rng(1)
    users = rng.integers(0, 30, 600)
    labels = rng.integers(0, 2, 600)
    scores = rng.normal(size=600) + labels * 0.5
    expected_num, expected_den = 0.0, 0
    for u in np.unique(users):
        sel = users == u
        if labels[sel].min() != labels[sel].max():
            expected_num += roc_auc_score(labels[sel], scores[sel]) * sel.sum()
            expected_den += sel.sum()
    assert gauc(users, labels, scores) == pytest.approx(expected_num / expected_den, abs=1e-12)


def test_gauc_skips_single_class_users():
    users = np.array([1, 1, 2, 2, 2])
    labels = np.array([1, 0, 1, 1, 1])
    scores = np.array([0.9, 0.1, 0.3, 0.2, 0.1])
    assert gauc(users, labels, scores) == 1.0


def test_logloss_matches_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    p = rng.uniform(0.01, 0.99, 200)
    assert logloss(labels, p) == pytest.approx(log_loss(labels, p), abs=1e-12)


def test_ctr_metrics_from_logits():
    labels = np.array([1, 0, 1, 0])
    logits = np.array([2.0, -1.0, 0.5, 0.0])
    out = ctr_metrics(np.array([1, 1, 2, 2]), labels, logits)
    assert out["auc"] == 1.0 and out["gauc"] == 1.0 and out["samples"] == 4
    assert out["logloss"] == pytest.approx(log_loss(labels, 1 / (1 + np.exp(-logits))))
