import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from dmqn_core.training.metrics import auc, ctr_metrics, gauc, logloss, paired_bootstrap


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


def test_identical_predictions_differ_by_exactly_zero() -> None:
    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(200), 3)
    labels = np.tile([1, 0, 0], 200)
    scores = rng.integers(0, 8, 600).astype(float)  # ties everywhere
    for metric, diff in paired_bootstrap(users, labels, [scores, scores], [scores], n_boot=300).items():
        assert (diff.delta, diff.low, diff.high) == (0.0, 0.0, 0.0), metric


def test_the_point_difference_is_the_seed_mean_of_plain_metrics() -> None:
    rng = np.random.default_rng(3)
    users = rng.integers(0, 80, 700)
    labels = rng.integers(0, 2, 700)
    a = [rng.normal(size=700) + labels * 0.9, rng.normal(size=700) + labels * 0.7]
    b = [rng.normal(size=700) + labels * 0.2]
    diff = paired_bootstrap(users, labels, a, b, n_boot=200)
    assert diff["auc"].delta == pytest.approx(np.mean([auc(labels, s) for s in a]) - auc(labels, b[0]), abs=1e-12)
    expected_gauc = np.mean([gauc(users, labels, s) for s in a]) - gauc(users, labels, b[0])
    assert diff["gauc"].delta == pytest.approx(expected_gauc, abs=1e-12)
    assert diff["auc"].low < diff["auc"].delta < diff["auc"].high


def test_a_known_difference_is_covered_by_its_interval() -> None:
    """Test sets of 150 users drawn from one population whose Δ AUC is known: the 95 % interval of each
    covers it nearly always (a fixed seed, so the count is fixed too; 95 % of 40 is 38)."""
    rng = np.random.default_rng(4)
    n_population = 200_000
    labels_pop = np.tile([1, 0, 0], n_population // 3)
    quality = rng.normal(size=labels_pop.shape)
    scores_a = quality + labels_pop * 1.0
    scores_b = quality * 0.5 + rng.normal(size=labels_pop.shape) + labels_pop * 0.8
    true_delta = auc(labels_pop, scores_a) - auc(labels_pop, scores_b)
    covered = 0
    for _ in range(40):
        users = rng.choice(n_population // 3, size=150, replace=False)
        rows = (users[:, None] * 3 + np.arange(3)).ravel()
        diff = paired_bootstrap(np.repeat(users, 3), labels_pop[rows], [scores_a[rows]], [scores_b[rows]], n_boot=400)[
            "auc"
        ]
        covered += diff.low <= true_delta <= diff.high
    assert covered >= 35
