"""YouTube-DNN-style single-vector baseline (Covington et al. 2016), the comparison of the MIND paper.

    v_u = W2 ReLU(W1 [mean_i e_i ; embed(P_u)])       one vector per user, K = 1

Same item embedding, sampled softmax and evaluator as MIND, so the only difference is one
vector against several.
"""

from __future__ import annotations

import torch
from torch import nn

from model_export.embedding import ItemEmbedding, ProfileEmbedding, embed_each_item_once
from model_export.sampled_softmax import NegativeSampler, sampled_softmax_loss
from model_export.spec import ModelSpec


class YouTubeDNN(nn.Module):
    def __init__(self, spec: ModelSpec, item_side: torch.Tensor):
        super().__init__()
        self.spec = spec
        d = spec.dim
        self.items = ItemEmbedding(spec.n_items, d, item_side, spec.n_side_tokens)
        self.profile = ProfileEmbedding(spec.profile_cardinalities, spec.profile_dim_per_field) if spec.profile_cardinalities else None
        in_dim = d + (self.profile.out_dim if self.profile is not None else 0)
        self.mlp = nn.Sequential(nn.Linear(in_dim, spec.hidden_multiplier * d), nn.ReLU(), nn.Linear(spec.hidden_multiplier * d, d))

    def user_vector(self, items, lengths, profile=None) -> torch.Tensor:
        mask = (torch.arange(items.shape[1], device=items.device)[None, :] < lengths[:, None]).to(torch.float32)  # [B, L]
        behaviours = embed_each_item_once(items, self.items, self.spec.n_items) if self.training else self.items(items)  # [B, L, D]
        pooled = (behaviours * mask[:, :, None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)  # [B, D]
        if self.profile is not None:
            pooled = torch.cat([pooled, self.profile(profile)], dim=-1)
        return self.mlp(pooled)  # [B, D]

    def forward(self, items, lengths, profile=None):
        """Serving signature shared with MIND: (interests [B, 1, D], K_u [B] = 1)."""
        return self.user_vector(items, lengths, profile)[:, None, :], torch.ones_like(lengths)

    def loss(self, items, lengths, profile, targets, sampler: NegativeSampler, n_negatives: int, generator=None) -> torch.Tensor:
        user = self.user_vector(items, lengths, profile)
        negatives = sampler.sample(n_negatives, generator)
        return sampled_softmax_loss(user, self.items(targets), targets, self.items(negatives), negatives, sampler.log_q)

    def item_vectors(self) -> torch.Tensor:
        return self.items.all_items()
