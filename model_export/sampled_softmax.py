"""Sampled softmax with a frequency-aware sampler, log-Q correction and REMI's hard-negative weighting.

The full softmax over millions of items is approximated by the target plus N sampled negatives
(Jean et al. 2015), shared by the whole batch. Negatives are drawn from the training popularity
raised to `alpha` (0 = uniform, 1 = unigram); every logit is corrected by subtracting
log(N * q(item)), the expected number of times it was drawn, so the estimate stays consistent with
the full softmax whatever the sampler. Accidental hits (a negative equal to the target) are removed.

REMI's interest-aware hard negative mining (IHN, Xie et al. 2023, section 4.1) wants negatives from
p(j | u) ∝ exp(beta * s(u, j)), with s scored against the interest selected for the target. It is
approximated by Monte-Carlo importance weighting of the sampled negatives:
    w_j = N * exp(beta * s_j) / sum_k exp(beta * s_k)     (detached)
    denominator = exp(s_pos) + sum_j w_j * exp(s_j)
so harder negatives (higher score) weigh more; beta = 0 is the plain sampled softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class NegativeSampler:
    """Draws negatives from q(i) ∝ count(i)^alpha over items 1..n (index 0, padding, never)."""

    def __init__(self, item_counts: torch.Tensor, alpha: float = 0.75, device: str | torch.device = "cpu"):
        weights = (item_counts.double() + 1.0).pow(alpha)  # +1: items unseen in training stay sampleable
        weights[0] = 0.0
        self.q = (weights / weights.sum()).float().to(device)
        self.log_q = torch.log(self.q.clamp(min=1e-30))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.multinomial(self.q, n, replacement=True, generator=generator)


def sampled_softmax_loss(
    user: torch.Tensor,  # [B, D] the user vector the target is scored against
    target_vectors: torch.Tensor,  # [B, D]
    targets: torch.Tensor,  # [B] item indices
    negative_vectors: torch.Tensor,  # [N, D]
    negatives: torch.Tensor,  # [N] item indices
    log_q: torch.Tensor,  # [n_items + 1] log sampling probability
    hard_negative_beta: float = 0.0,
) -> torch.Tensor:
    n = negatives.shape[0]
    log_expected = math.log(n)
    pos_score = (user * target_vectors).sum(-1)  # [B]
    neg_score = user @ negative_vectors.T  # [B, N]
    pos_logit = pos_score - (log_expected + log_q[targets])
    neg_logit = neg_score - (log_expected + log_q[negatives])[None, :]
    accidental = negatives[None, :] == targets[:, None]  # [B, N]
    neg_logit = neg_logit.masked_fill(accidental, float("-inf"))
    if hard_negative_beta > 0:
        hardness = (hard_negative_beta * neg_score.detach()).masked_fill(accidental, float("-inf"))
        n_valid = (~accidental).sum(-1, keepdim=True).clamp(min=1).float()
        # log w_j = log N + beta s_j - logsumexp_k(beta s_k)
        neg_logit = neg_logit + hardness - torch.logsumexp(hardness, dim=-1, keepdim=True) + torch.log(n_valid)
    logits = torch.cat([pos_logit[:, None], neg_logit], dim=1)  # [B, 1 + N]; the target is class 0
    return F.cross_entropy(logits, torch.zeros_like(targets))
