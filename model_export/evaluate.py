"""Offline evaluation: retrieve the top-N of every held-out user and score it with metrics.py.

Multi-interest models retrieve the top-N items of each of the K_u interest vectors by inner product
over the whole catalog (exact search) and merge them by score with duplicates removed, as the
papers do; single-vector models are the case K = 1; MostPop recommends the training popularity.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from model_export.data import EvalCases, SequenceDataset
from model_export.metrics import CUTOFFS, retrieval_metrics
from recall_service.merge import MISSING_ITEM, merge_by_score

EVAL_BATCH = 512
SCORE_BLOCK_ELEMENTS = 1 << 26  # the most user x interest x item scores held at once (256 MB)


@torch.no_grad()
def user_towers(model: torch.nn.Module, data: SequenceDataset, cases: EvalCases, device: str = "cpu"):
    """Runs the user tower over the evaluation users in batches: yields (interests [b, K, D], K_u [b])."""
    model.eval()
    for start in range(0, len(cases.users), EVAL_BATCH):
        sl = slice(start, start + EVAL_BATCH)
        hist = torch.as_tensor(cases.history[sl], device=device)
        lengths = torch.as_tensor(cases.lengths[sl], device=device)
        profile = torch.as_tensor(data.user_profile[cases.users[sl]], device=device)
        yield model(hist, lengths, profile)


@torch.no_grad()
def recommend(model: torch.nn.Module, data: SequenceDataset, cases: EvalCases, n: int, device: str = "cpu",
              progress: bool = False) -> np.ndarray:
    """[U, n] item indices recommended to each evaluation user, best first (`progress`: a bar per user batch,
    for catalogs where scoring every item takes minutes)."""
    model.eval()
    items = model.item_vectors()  # [n_items + 1, D]
    out = []
    batches = tqdm(user_towers(model, data, cases, device), total=-(-len(cases.users) // EVAL_BATCH), desc="evaluating",
                   unit="batch", disable=not progress, leave=False, mininterval=2)
    for interests, k_user in batches:
        active = (torch.arange(interests.shape[1], device=device)[None, :] < k_user[:, None]).cpu().numpy()
        # users per block of scores, so that a catalog of millions of items stays within SCORE_BLOCK_ELEMENTS
        rows = max(1, SCORE_BLOCK_ELEMENTS // (interests.shape[1] * items.shape[0]))
        for start in range(0, interests.shape[0], rows):
            scores = interests[start : start + rows] @ items.T  # [b, K, n_items + 1]
            scores[..., 0] = float("-inf")  # padding is not an item
            top_scores, top_ids = scores.topk(min(n, items.shape[0] - 1), dim=-1)  # [b, K, n]; a smaller catalog is padded by the merge
            ids, _, _ = merge_by_score(top_ids.cpu().numpy(), top_scores.cpu().numpy(), n, active[start : start + rows])
            out.append(ids)
    return np.concatenate(out)


def interest_diversity(model: torch.nn.Module, data: SequenceDataset, cases: EvalCases, device: str = "cpu") -> float | None:
    """Mean cosine similarity between the active interests of users with K_u >= 2 (1.0 = collapsed
    onto one direction). None for single-vector models or when no user has two interests."""
    sims = []
    for interests, k_user in user_towers(model, data, cases, device):
        unit = torch.nn.functional.normalize(interests, dim=-1)
        cos = unit @ unit.transpose(1, 2)  # [b, K, K]
        for row, k in enumerate(k_user.tolist()):
            if k >= 2:
                block = cos[row, :k, :k]
                sims.append(((block.sum() - k) / (k * (k - 1))).item())
    return float(np.mean(sims)) if sims else None


def most_popular(popularity: np.ndarray, n_users: int, n: int) -> np.ndarray:
    top = np.full(n, MISSING_ITEM, dtype=np.int64)  # a catalog of fewer than n items ends with MISSING_ITEM
    ranked = np.argsort(-popularity[1:], kind="stable")[:n] + 1
    top[: len(ranked)] = ranked
    return np.broadcast_to(top, (n_users, n))


def evaluate_model(model, data: SequenceDataset, cases: EvalCases, device: str = "cpu", cutoffs=CUTOFFS, progress: bool = False) -> dict[str, float]:
    recommended = recommend(model, data, cases, max(cutoffs), device, progress)
    return retrieval_metrics(recommended, [cases.targets_of(i) for i in range(len(cases.users))], cutoffs)


def evaluate_popularity(popularity: np.ndarray, cases: EvalCases, cutoffs=CUTOFFS) -> dict[str, float]:
    recommended = most_popular(popularity, len(cases.users), max(cutoffs))
    return retrieval_metrics(recommended, [cases.targets_of(i) for i in range(len(cases.users))], cutoffs)
