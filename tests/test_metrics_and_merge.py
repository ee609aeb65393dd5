import math

import numpy as np
import pytest

from model_export.metrics import retrieval_metrics, user_metrics
from recall_service.merge import MISSING_ITEM, merge_by_score


def test_user_metrics_hand_computed():
    recommended = np.array([5, 1, 7, 2, 9])
    targets = np.array([2, 5, 42])  # hits at ranks 0 and 3
    recall, hit, ndcg = user_metrics(recommended, targets, n=5)
    assert recall == pytest.approx(2 / 3)
    assert hit == 1.0
    dcg = 1 / math.log2(2) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg == pytest.approx(dcg / idcg)
    # cutoff 2 keeps only the first hit; ideal DCG is capped at N
    recall, hit, ndcg = user_metrics(recommended, targets, n=2)
    assert recall == pytest.approx(1 / 3)
    assert ndcg == pytest.approx(1.0 / (1 + 1 / math.log2(3)))


def test_duplicate_targets_count_once_and_misses_score_zero():
    recall, hit, ndcg = user_metrics(np.array([1, 2]), np.array([3, 3]), n=2)
    assert (recall, hit, ndcg) == (0.0, 0.0, 0.0)
    recall, _, ndcg = user_metrics(np.array([3, 2]), np.array([3, 3]), n=2)
    assert recall == 1.0 and ndcg == 1.0


def test_retrieval_metrics_average_over_users():
    recommended = np.array([[1, 2], [3, 4]])
    metrics = retrieval_metrics(recommended, [np.array([1]), np.array([9])], cutoffs=(2,))
    assert metrics == {"recall@2": 0.5, "hitrate@2": 0.5, "ndcg@2": 0.5}


def test_merge_by_score_keeps_best_score_per_item_and_removes_duplicates():
    ids = np.array([[[10, 11, 12], [11, 13, 10]]])
    scores = np.array([[[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]]])
    out_ids, out_scores, interest = merge_by_score(ids, scores, n=4)
    assert out_ids.tolist() == [[10, 11, 13, 12]]
    assert out_scores[0].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.1])
    assert interest.tolist() == [[0, 1, 1, 0]]


def test_merge_ignores_inactive_interests_and_pads_short_results():
    ids = np.array([[[1, 2], [3, 4]], [[5, 6], [5, 6]]])
    scores = np.array([[[0.1, 0.0], [9.0, 8.0]], [[0.3, 0.2], [0.5, 0.1]]])
    active = np.array([[True, False], [True, True]])
    out_ids, out_scores, interest = merge_by_score(ids, scores, n=3, active_interests=active)
    assert out_ids[0].tolist() == [1, 2, MISSING_ITEM]  # interest 1 is inactive for user 0
    assert np.isneginf(out_scores[0, 2]) and interest[0, 2] == -1
    assert out_ids[1].tolist() == [5, 6, MISSING_ITEM]  # 5 and 6 found twice each
    assert interest[1].tolist() == [1, 0, -1]
    wide_ids, _, _ = merge_by_score(ids, scores, n=10)
    assert wide_ids.shape == (2, 10)


def test_quality_summary_means_spreads_ratios_and_best_epochs():
    from model_export.quality import markdown, ratios, summarise

    def run(model, seed, recall50, hitrate50, best, ran):
        test = {"recall@20": recall50 / 2, "recall@50": recall50, "hitrate@20": hitrate50 / 2, "hitrate@50": hitrate50, "ndcg@50": recall50 / 4}
        return {"dataset": "d", "model": model, "seed": seed, "test": test, "best_epoch": best, "epochs_run": ran, "seconds_per_epoch": 10.0 * seed}

    summary = summarise([run("youtube_dnn", 1, 0.20, 0.80, 9, 10), run("youtube_dnn", 2, 0.22, 0.80, 10, 10),
                         run("mind", 1, 0.24, 0.90, 4, 7), run("mind", 2, 0.20, 0.70, 6, 9), run("mostpop", 1, 0.10, 0.50, 0, 0)])
    mind = summary["d"]["mind"]
    # the sample standard deviation: sqrt(((0.24 - 0.22)^2 + (0.20 - 0.22)^2) / (2 - 1))
    assert mind["recall@50"] == pytest.approx((0.22, 0.02 * 2**0.5)) and mind["hitrate@50"] == pytest.approx((0.80, 0.10 * 2**0.5))
    assert summary["d"]["mostpop"]["recall@50"] == (0.10, 0.0)  # one run: no spread
    assert mind["seeds"] == 2 and mind["seconds_per_epoch"][0] == pytest.approx(15.0)
    assert (mind["best_epochs"], mind["epochs_run"]) == ([4, 6], [7, 9])
    r = ratios(summary)["d"]
    assert r["mind/youtube_dnn recall@50"] == pytest.approx(0.22 / 0.21, abs=5e-4) and r["mind/mostpop hitrate@50"] == pytest.approx(1.6)
    assert not any(k.startswith("mind_remi") for k in r)  # a model not run has no ratio
    row = next(line for line in markdown(summary).splitlines() if line.startswith("| d | mind |"))
    assert "0.2200 ± 0.0283" in row and row.endswith("| 15.0 | 4 (7), 6 (9) |")
    popularity = next(line for line in markdown(summary).splitlines() if line.startswith("| d | mostpop |"))
    assert popularity.endswith("| - | - |")  # no epochs: no time per epoch, no best epoch
