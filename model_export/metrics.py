"""Top-N retrieval metrics of the papers (ComiRec / REMI protocol), per user then averaged.

For a user with target set T (the held-out 20% of the sequence, duplicates removed) and the
ranked list R of N recommended items:
    Recall@N  = |R ∩ T| / |T|
    HitRate@N = 1 if |R ∩ T| > 0 else 0
    NDCG@N    = DCG / IDCG,  DCG = sum over ranks r (0-based) with R[r] in T of 1 / log2(r + 2),
                IDCG = sum_{r < min(|T|, N)} 1 / log2(r + 2)   (the standard ideal ranking)

ComiRec's published evaluation code (THUDM/ComiRec, src/train.py, evaluate_full) computes two of
these differently, so its tables are not comparable digit for digit: its recall divides the hits by
the target list with repeated items counted again, and its NDCG discounts a hit by the target's
position in the held-out list (not its rank among the recommendations) over the ideal DCG of the
hits alone (a user whose one hit was its first target scores 1 however many were missed). Here
both follow the usual definitions above, the same for every model.
"""

from __future__ import annotations

import numpy as np

CUTOFFS = (20, 50)


def user_metrics(recommended: np.ndarray, targets: np.ndarray, n: int) -> tuple[float, float, float]:
    """(recall, hit, ndcg) of one user: recommended [>= n] item ids, best first; targets [T]."""
    target_set = set(int(t) for t in targets)
    if not target_set:
        raise ValueError("a user without targets cannot be evaluated")
    top = recommended[:n]
    hits = np.fromiter((int(i) in target_set for i in top), dtype=bool, count=len(top))
    n_hits = int(hits.sum())
    discounts = 1.0 / np.log2(np.arange(n) + 2.0)
    dcg = float(discounts[: len(top)][hits].sum())
    idcg = float(discounts[: min(len(target_set), n)].sum())
    return n_hits / len(target_set), float(n_hits > 0), dcg / idcg


def retrieval_metrics(recommended: np.ndarray, target_lists: list[np.ndarray], cutoffs=CUTOFFS) -> dict[str, float]:
    """Mean Recall / HitRate / NDCG at each cutoff. recommended [U, >= max(cutoffs)]."""
    out: dict[str, float] = {}
    for n in cutoffs:
        per_user = np.array([user_metrics(recommended[u], target_lists[u], n) for u in range(len(target_lists))])
        out[f"recall@{n}"] = float(per_user[:, 0].mean())
        out[f"hitrate@{n}"] = float(per_user[:, 1].mean())
        out[f"ndcg@{n}"] = float(per_user[:, 2].mean())
    return out
