"""Merging the per-interest candidate lists of a multi-interest user into one list (pure logic).

The papers' merge (MIND 3.5, ComiRec 4.3): every interest vector retrieves its top items; the
union is ranked by score, an item found by several interests keeping its best score, duplicates
removed. Kept free of I/O: the offline evaluator and the recall service call the same function.
"""

from __future__ import annotations

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
