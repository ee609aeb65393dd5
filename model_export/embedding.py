"""The embedding & pooling layer shared by the user towers (MIND paper, section 3.2).

An item is embedded from its id and its side features (e.g. MovieLens genres): the id embedding
plus the mean of the side-token embeddings. The same function gives the behaviour embeddings of
the user tower and the label / candidate item vectors e_i, so items are scored with exactly the
vectors the model was trained against. Side features are a lookup table baked into the model
(item index -> tokens), so callers pass only item ids.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ItemEmbedding(nn.Module):
    # Side tokens are pooled through a dense [items, tokens] weight matrix: one small matmul instead of
    # a [B, L, tokens-per-item, D] gather, and the ONNX exporter folds it into the item table.
    MAX_SIDE_TOKENS = 4096

    def __init__(self, n_items: int, dim: int, item_side: torch.Tensor, n_side_tokens: int):
        super().__init__()
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=0)  # index 0 = padding
        nn.init.normal_(self.ids.weight, std=0.1)
        with torch.no_grad():
            self.ids.weight[0].zero_()
        self.side = None
        if n_side_tokens > 0:
            if n_side_tokens > self.MAX_SIDE_TOKENS:
                raise ValueError(f"{n_side_tokens} item side tokens; at most {self.MAX_SIDE_TOKENS} are supported")
            self.side = nn.Parameter(torch.randn(n_side_tokens + 1, dim) * 0.1)
            # pooling[i, t] = 1 / (number of tokens of item i) if item i has token t; token 0 = none
            pooling = torch.zeros(n_items + 1, n_side_tokens + 1)
            pooling.scatter_(1, item_side.long(), 1.0)
            pooling[:, 0] = 0.0
            pooling = pooling / pooling.sum(1, keepdim=True).clamp(min=1.0)
            self.register_buffer("side_pooling", pooling, persistent=True)  # [n_items + 1, n_side + 1]

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """items [...] int64 -> [..., D]; padding (0) maps to the zero vector."""
        if not self.training and self.side is not None:
            # At inference the item table is a constant: computed once per call here, and folded into
            # a single initializer by the ONNX exporter, so the exported tower only gathers.
            return F.embedding(items, self.all_items())
        e = self.ids(items)
        if self.side is not None:
            e = e + self.side_pooling[items] @ self.side  # mean of the item's side-token embeddings
        return e

    def all_items(self) -> torch.Tensor:
        """[n_items + 1, D]: every item's vector (row 0 = padding)."""
        if self.side is None:
            return self.ids.weight
        return self.ids.weight + self.side_pooling @ self.side


def embed_each_item_once(items: torch.Tensor, embed, n_items: int) -> torch.Tensor:
    """embed(items) computed once per item and gathered back: a training batch of B x L behaviours
    repeats popular items many times, and any per-item map (side pooling, MIND's S) is then paid per
    item instead of per behaviour. Same result as embed(items).

    When the batch holds at least as many behaviours as the catalog has items, every item is embedded
    (no search for the distinct ones: the sort behind torch.unique costs more than embedding a small
    catalog whole); otherwise only the batch's distinct items are."""
    if items.numel() >= n_items:
        ids = torch.arange(n_items + 1, device=items.device)  # row i = item i, padding (0) included
        flat = items.reshape(-1)
    else:
        ids, flat = torch.unique(items, return_inverse=True)
        flat = flat.reshape(-1)
    # index_select, not F.embedding or indexing: its backward (index_add) is ~3x faster on CPU than
    # embedding's dense backward, and indexing's backward (index_put) is slower still.
    return embed(ids).index_select(0, flat).view(*items.shape, -1)


class ProfileEmbedding(nn.Module):
    """User profile (gender, age, occupation, ...): one embedding per categorical field, concatenated."""

    def __init__(self, cardinalities: list[int], dim_per_field: int):
        super().__init__()
        self.fields = nn.ModuleList(nn.Embedding(c, dim_per_field) for c in cardinalities)
        for field in self.fields:  # on the scale of the item embeddings, so neither dominates the ReLU layers
            nn.init.normal_(field.weight, std=0.1)
        self.out_dim = dim_per_field * len(cardinalities)

    def forward(self, profile: torch.Tensor) -> torch.Tensor:
        """profile [B, F] int64 category ids (0 = unknown) -> [B, F * dim_per_field]."""
        return torch.cat([emb(profile[:, f]) for f, emb in enumerate(self.fields)], dim=-1)
