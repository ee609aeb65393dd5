"""Merging the per-interest candidate lists of a multi-interest user into one list (pure logic).

The papers' merge (MIND 3.5, ComiRec 4.3): every interest vector retrieves its top items; the
union is ranked by score, an item found by several interests keeping its best score, duplicates
removed. Kept free of I/O: the offline evaluator and the recall service call the same function.
"""

from __future__ import annotations

import math
from typing import Container, Sequence

import numpy as np

MISSING_ITEM = -1  # fills rows that have fewer than n distinct candidates


def merge_by_score(
    item_ids: np.ndarray,  # [B, K, N] candidates of each interest
    scores: np.ndarray,  # [B, K, N]
    n: int,
    active_interests: np.ndarray | None = None,  # [B, K] bool: K_u active interests per user
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n distinct items per user by their best score over the interests.

    Returns (ids [B, n], scores [B, n], interest index [B, n]) best first; rows with fewer than n
    distinct candidates end with MISSING_ITEM, -inf and -1.
    """
    b, k, per_interest = item_ids.shape
    scores = scores.astype(np.float32, copy=True)
    if active_interests is not None:
        scores[~active_interests] = -np.inf
    ids = item_ids.reshape(b, k * per_interest)
    flat = scores.reshape(b, k * per_interest)
    interest = np.repeat(np.arange(k), per_interest)[None, :].repeat(b, axis=0)
    rows = np.arange(b)[:, None]

    by_score = np.argsort(-flat, axis=1, kind="stable")  # best first
    ids, flat, interest = ids[rows, by_score], flat[rows, by_score], interest[rows, by_score]
    # Within each id, the stable sort keeps the best-scored occurrence first; later ones are duplicates.
    by_id = np.argsort(ids, axis=1, kind="stable")
    grouped = ids[rows, by_id]
    repeat_in_group = np.zeros_like(grouped, dtype=bool)
    repeat_in_group[:, 1:] = grouped[:, 1:] == grouped[:, :-1]
    duplicate = np.zeros_like(repeat_in_group)
    duplicate[rows, by_id] = repeat_in_group
    duplicate |= ~np.isfinite(flat)

    keep_order = np.argsort(duplicate, axis=1, kind="stable")[:, :n]  # unique candidates first, still by score
    out_ids, out_scores, out_interest = ids[rows, keep_order], flat[rows, keep_order], interest[rows, keep_order]
    dropped = duplicate[rows, keep_order]
    out_ids = np.where(dropped, MISSING_ITEM, out_ids)
    out_scores = np.where(dropped, -np.inf, out_scores)
    out_interest = np.where(dropped, -1, out_interest)
    if out_ids.shape[1] < n:  # fewer candidates than asked for in total
        pad = n - out_ids.shape[1]
        out_ids = np.pad(out_ids, ((0, 0), (0, pad)), constant_values=MISSING_ITEM)
        out_scores = np.pad(out_scores, ((0, 0), (0, pad)), constant_values=-np.inf)
        out_interest = np.pad(out_interest, ((0, 0), (0, pad)), constant_values=-1)
    return out_ids, out_scores, out_interest


def merge_one_by_score(item_ids: np.ndarray, scores: np.ndarray, n: int, excluded: Sequence[Container] = ()) -> list[tuple[object, float, int]]:
    """merge_by_score for one user ([K, N] -> at most n (item, score, interest), best first),
    skipping the items in any of the `excluded` containers: the serving path, where merge_by_score's
    batch machinery costs more than the merge itself. The same result (tested). Ids may be of any
    hashable type (the service merges the raw ids Milvus returns); -inf scores are padding. It stops
    at the n-th distinct item, so a typical call looks at few more than n candidates."""
    per_interest = item_ids.shape[1]
    flat = scores.ravel()
    order = np.argsort(-flat, kind="stable")  # best first; ties keep interest-major order
    ids, ranked = item_ids.ravel().tolist(), flat[order].tolist()
    out, seen = [], set()
    for rank, position in enumerate(order.tolist()):
        item = ids[position]
        if item in seen or not math.isfinite(ranked[rank]):
            continue
        for container in excluded:
            if item in container:
                break
        else:
            seen.add(item)
            out.append((item, ranked[rank], position // per_interest))
            if len(out) == n:
                break
    return out


def merge_by_quota(
    item_ids: np.ndarray,  # [B, K, N] candidates of each interest, best first
    scores: np.ndarray,  # [B, K, N]; -inf marks a dropped candidate (excluded, padding)
    n: int,
    active_interests: np.ndarray | None = None,  # [B, K] bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n per user where every interest contributes (diversity), same shapes as merge_by_score.

    Each of the K_u active interests gets a quota of n // K_u slots (the first n % K_u one more).
    Slots are filled round-robin by rank: rank 0 of every interest, then rank 1, ...; an item
    already taken is skipped and the interest offers its next candidate. Slots an interest cannot
    fill (too few candidates) go to the best remaining candidates by score, each item once. Items
    come in selection order, so any prefix of a row stays spread over the interests.
    """
    b, k, per_interest = item_ids.shape
    out_ids = np.full((b, n), MISSING_ITEM, dtype=item_ids.dtype)
    out_scores = np.full((b, n), -np.inf, dtype=np.float32)
    out_interest = np.full((b, n), -1, dtype=np.int64)
    for row in range(b):
        interests = [j for j in range(k) if active_interests is None or active_interests[row, j]]
        if not interests:
            continue
        usable = np.isfinite(scores[row]) & (item_ids[row] != MISSING_ITEM)  # [K, N], one array pass, not one per candidate
        candidates = {j: list(zip(item_ids[row, j][usable[j]].tolist(), scores[row, j][usable[j]].tolist())) for j in interests}
        quota = {j: n // len(interests) + (1 if rank < n % len(interests) else 0) for rank, j in enumerate(interests)}
        taken: dict[int, tuple[float, int]] = {}  # item -> (score, interest), insertion = selection order
        cursor = dict.fromkeys(interests, 0)
        progress = True
        while progress and len(taken) < n:
            progress = False
            for j in interests:
                if quota[j] == 0 or len(taken) == n:
                    continue
                while cursor[j] < len(candidates[j]) and candidates[j][cursor[j]][0] in taken:
                    cursor[j] += 1
                if cursor[j] < len(candidates[j]):
                    item, score = candidates[j][cursor[j]]
                    taken[item] = (score, j)
                    quota[j] -= 1
                    cursor[j] += 1
                    progress = True
        if len(taken) < n:  # unfilled quotas: the best remaining candidates by score
            rest = sorted(((s, j, i) for j in interests for i, s in candidates[j] if i not in taken), key=lambda t: -t[0])
            for score, j, item in rest:
                if len(taken) == n:
                    break
                taken.setdefault(item, (score, j))
        for col, (item, (score, j)) in enumerate(taken.items()):
            out_ids[row, col], out_scores[row, col], out_interest[row, col] = item, score, j
    return out_ids, out_scores, out_interest
