"""MIND: Multi-Interest Network with Dynamic Routing (Li et al., CIKM 2019), with REMI's training knobs.

User tower, for a user with behaviours I_u (item ids, oldest first) and profile P_u:

    e_i        = ItemEmbedding(i)                                  embedding & pooling layer (3.2)
    ê_i        = S e_i                                             ONE bilinear map S shared by all behaviours
    K_u        = max(1, min(K, floor(log2 |I_u|)))                 dynamic number of interests (eq. 9)
    b_ij       ~ N(0, sigma^2)                                     routing logits: random, not zero
    repeat r = 3 times:                                            B2I dynamic routing (algorithm 1)
        w_ij   = softmax_j(b_ij)      over the K_u active interests; padded behaviours weigh 0
        z_j    = sum_i w_ij ê_i
        u_j    = squash(z_j) = |z_j|^2 / (1 + |z_j|^2) * z_j / |z_j|
        b_ij  += u_j^T ê_i
    v_j        = W2 ReLU(W1 [u_j ; embed(P_u)])                    profile concatenated to each capsule (3.3)

Training (3.4): label-aware attention picks the interests that explain the target item t,
    v_u = sum_j softmax_j(pow(v_j^T e_t, p)) v_j,
then sampled softmax of v_u against e_t and sampled negatives. Serving uses all K_u vectors.

REMI (Xie et al., RecSys 2023) adds, switchable through the spec:
  * interest-aware hard negatives (IHN): see sampled_softmax.py;
  * routing regularisation (RR): the variance of each interest's routing weights across the
    behaviours is penalised, which stops an interest from collapsing onto a single behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model_export.embedding import InferenceTableModule, ItemEmbedding, ProfileEmbedding, embed_each_item_once
from model_export.sampled_softmax import NegativeSampler, sampled_softmax_loss
from model_export.spec import ModelSpec


def squash(z: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """Capsule non-linearity: keeps the direction, maps the norm into [0, 1)."""
    sq = (z * z).sum(-1, keepdim=True)  # |z|^2, [..., 1]
    return z * (sq / ((1.0 + sq) * torch.sqrt(sq + eps)))  # the scale is per capsule: one full-size multiply


def interest_softmax(logits: torch.Tensor, weight_mask: torch.Tensor) -> torch.Tensor:
    """w_ij = softmax_j(b_ij) over the interests (dim 1 of [B, K, L]), zeroed on padding (weight_mask [B, 1, L]).

    Spelled out (max, exp, sum) rather than torch.softmax: ONNX Runtime runs a Softmax on a middle axis
    through two transposes (~150 us each of the three at batch 256, window 50), and this form lets the
    mask ride on the [B, 1, L] normaliser instead of a masked_fill of [B, K, L] per iteration. Eager
    PyTorch and training run as fast either way.
    """
    e = torch.exp(logits - logits.amax(1, keepdim=True))  # inactive interests (-inf) give exactly 0
    return e * (weight_mask / e.sum(1, keepdim=True))


def dynamic_interest_count(lengths: torch.Tensor, max_interests: int) -> torch.Tensor:
    """K_u = max(1, min(K, floor(log2 |I_u|))), [B] int64.

    Counted in integers: floor(log2 n) >= j exactly when n >= 2^j. A float log2 rounds below an
    exact power of two in some kernels (ONNX Runtime's Log gave log2(8192) < 13 for a lone value),
    so the exported tower could give another K_u than PyTorch, varying with the batch."""
    powers = 2 ** torch.arange(1, min(max_interests, 62) + 1, device=lengths.device)  # [K] 2, 4, ..., 2^K (int64)
    return (lengths[:, None] >= powers).sum(1).clamp(min=1)


def b2i_routing(
    behaviours: torch.Tensor,  # [B, L, D]  S e_i, the bilinear-mapped behaviour embeddings
    behaviour_mask: torch.Tensor,  # [B, L] bool, False on padding
    interest_mask: torch.Tensor,  # [B, K] bool, True for the K_u active interests
    initial_logits: torch.Tensor,  # [B, K, L] (or broadcastable)
    iterations: int,
    differentiable_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Behaviour-to-Interest dynamic routing. Returns (capsules [B, K, D], routing weights [B, K, L]).

    Logits are laid out [B, K, L] so that every step is a plain batched matmul and the softmax over
    the K interests runs on a middle axis (a softmax over a last axis of size 4 is ~10x slower on CPU).

    Only the last iteration passes gradients through the behaviours: earlier ones merely decide the
    coupling (as in the reference implementations), which keeps training stable and cheaper. With
    `differentiable_weights` the last logit update b_ij += u_j^T S e_i also keeps the gradient through
    S e_i, so the final routing weights depend differentiably on the behaviours: a penalty on them
    (REMI's routing regularisation) then has something to act on; without it the penalty's gradient
    is zero.
    """
    # Inactive interests get logit -inf once: their weights are exactly 0 in every iteration, so their
    # capsules are squash(0) = 0 with no further masking.
    logits = initial_logits.masked_fill(~interest_mask[:, :, None], float("-inf"))  # [B, K, L]
    detached = behaviours.detach()
    weight_mask = behaviour_mask[:, None, :].to(behaviours.dtype)  # [B, 1, L]
    for r in range(iterations):
        last = r == iterations - 1
        w = interest_softmax(logits, weight_mask)  # w_ij, [B, K, L]
        z = torch.bmm(w, behaviours if last else detached)  # z_j = sum_i w_ij S e_i, [B, K, D]
        capsules = squash(z)
        if not last:
            into_last = differentiable_weights and r == iterations - 2
            logits = logits + torch.bmm(capsules, (behaviours if into_last else detached).transpose(1, 2))  # b_ij += u_j^T S e_i
    return capsules, w


def label_aware_attention(interests: torch.Tensor, target: torch.Tensor, interest_mask: torch.Tensor, power: float) -> torch.Tensor:
    """v_u = sum_j softmax_j(pow(v_j^T e_t, p)) v_j over the active interests. [B, K, D], [B, D] -> [B, D].

    pow keeps the sign of the score (sign(s)|s|^p): for a positive score it is the paper's pow, and an
    interest that points away from the target is never up-weighted by an even power. p = 0 is the
    paper's plain average of the interests.
    """
    if power == 0:
        scores = torch.zeros(interest_mask.shape, dtype=torch.float64, device=interests.device)
    else:
        # Broadcast products, not einsum: with K this small, batched matrix-vector products are ~2x slower on CPU.
        scores = (interests * target[:, None, :]).sum(-1).double()  # v_j^T e_t, [B, K]; float64: |s|^p overflows float32 at p ~ 32
        # |s| kept off 0 (|s|^p has an infinite slope there for p < 1: an inactive interest's zero
        # score would give NaN gradients) and |s|^p, and its slope, below overflow (a large p is hard attention).
        scores = torch.sign(scores) * scores.abs().clamp(1e-12, 1e300 ** (1.0 / max(power, 1.0))).pow(power)
    attention = torch.softmax(scores.masked_fill(~interest_mask, float("-inf")), dim=-1).to(interests.dtype)
    return (attention[:, :, None] * interests).sum(1)


def routing_regularization(weights: torch.Tensor, behaviour_mask: torch.Tensor) -> torch.Tensor:
    """REMI's RR: mean over users of ||diag(C)||^2, C = the covariance of the routing matrix A [K, L]
    across the user's (unpadded) behaviours. A large diagonal means an interest draws its weight
    from very few behaviours: the routing collapse REMI guards against.

    REMI's A has rows that are distributions over the behaviours (self-attention's softmax over L);
    B2I routing's w_ij sums to 1 over the interests instead, and its raw rows would score a clean
    split of the behaviours between interests as the collapse and identical interests (every w_ij
    = 1/K) as ideal. So A's row i is interest i's weights normalised over the behaviours,
    a_ij = w_ij / sum_j w_ij (an inactive interest's row stays 0)."""
    m = behaviour_mask[:, None, :].to(weights.dtype)  # [B, 1, L]
    a = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)  # [B, K, L]
    n = m.sum(-1, keepdim=True).clamp(min=1.0)  # [B, 1, 1]
    centred = (a - (a * m).sum(-1, keepdim=True) / n) * m
    variance = (centred * centred).sum(-1) / n[..., 0]  # [B, K] = diag(C)
    return (variance * variance).sum(-1).mean()


class MIND(InferenceTableModule):
    def __init__(self, spec: ModelSpec, item_side: torch.Tensor):
        super().__init__()
        self.spec = spec
        d, k = spec.dim, spec.n_interests
        self.items = ItemEmbedding(spec.n_items, d, item_side, spec.n_side_tokens)
        self.bilinear = nn.Linear(d, d, bias=False)  # S, shared by all behaviours and interests
        self.profile = ProfileEmbedding(spec.profile_cardinalities, spec.profile_dim_per_field) if spec.profile_cardinalities else None
        in_dim = d + (self.profile.out_dim if self.profile is not None else 0)
        self.mlp = nn.Sequential(nn.Linear(in_dim, spec.hidden_multiplier * d), nn.ReLU(), nn.Linear(spec.hidden_multiplier * d, d))
        # Fixed initial routing logits for inference, so a user's interests do not change between calls.
        g = torch.Generator().manual_seed(spec.routing_seed)
        initial = torch.randn(k, spec.maxlen, generator=g) * spec.routing_init_std
        self.register_buffer("routing_init", initial, persistent=True)  # [K, maxlen]

    def interests(self, items: torch.Tensor, lengths: torch.Tensor, profile: torch.Tensor | None = None):
        """The user tower. items [B, L<=maxlen] int64 (right-padded with 0), lengths [B], profile [B, F].

        Returns (interests [B, K, D] with rows >= K_u zeroed, K_u [B], routing weights [B, K, L])."""
        b, length = items.shape
        k = self.spec.n_interests
        behaviour_mask = torch.arange(length, device=items.device)[None, :] < lengths[:, None]  # [B, L]
        k_user = dynamic_interest_count(lengths, k)  # [B]
        interest_mask = torch.arange(k, device=items.device)[None, :] < k_user[:, None]  # [B, K]
        if self.training:
            initial = torch.randn(b, k, length, device=items.device) * self.spec.routing_init_std
        else:
            initial = self.routing_init[:, :length].unsqueeze(0)  # [1, K, L]
        if self.training:
            mapped = embed_each_item_once(items, self.mapped_item, self.spec.n_items)  # [B, L, D]
        else:  # S e_i of every item is a constant at inference: one table (a constant in ONNX)
            mapped = F.embedding(items, self.inference_table(lambda: self.bilinear(self.items.all_items())))
        regularised = self.training and self.spec.routing_regularization > 0
        capsules, weights = b2i_routing(mapped, behaviour_mask, interest_mask, initial, self.spec.routing_iterations, regularised)
        # v_j = W2 ReLU(W1 [u_j ; p] + b1), with W1 [u_j ; p] + b1 = W1_u u_j + (W1_p p + b1): the profile
        # half and the bias are the same for every capsule of a user, so they are added once per user.
        first, _, second = self.mlp
        d = self.spec.dim
        if self.profile is not None:
            per_user = F.linear(self.profile(profile), first.weight[:, d:], first.bias)  # [B, H]
            hidden = torch.matmul(capsules, first.weight[:, :d].t()) + per_user[:, None, :]  # [B, K, H]
        else:
            hidden = F.linear(capsules, first.weight, first.bias)  # [B, K, H]
        vectors = second(F.relu(hidden)) * interest_mask[:, :, None].to(capsules.dtype)  # [B, K, D]
        return vectors, k_user, weights

    def mapped_item(self, items: torch.Tensor) -> torch.Tensor:
        """S e_i: the behaviour embedding through the shared bilinear map."""
        return self.bilinear(self.items(items))

    def forward(self, items: torch.Tensor, lengths: torch.Tensor, profile: torch.Tensor | None = None):
        """Serving signature (exported to ONNX): (interests [B, K, D], K_u [B])."""
        vectors, k_user, _ = self.interests(items, lengths, profile)
        return vectors, k_user

    def loss(self, items, lengths, profile, targets, sampler: NegativeSampler, n_negatives: int, generator=None) -> torch.Tensor:
        vectors, k_user, weights = self.interests(items, lengths, profile)
        interest_mask = torch.arange(self.spec.n_interests, device=items.device)[None, :] < k_user[:, None]
        target_vectors = self.items(targets)  # [B, D]
        user = label_aware_attention(vectors, target_vectors, interest_mask, self.spec.attention_power)
        negatives = sampler.sample(n_negatives, generator)
        loss = sampled_softmax_loss(
            user, target_vectors, targets, self.items(negatives), negatives, sampler.log_q, self.spec.hard_negative_beta
        )
        if self.spec.routing_regularization > 0:
            behaviour_mask = torch.arange(items.shape[1], device=items.device)[None, :] < lengths[:, None]
            loss = loss + self.spec.routing_regularization * routing_regularization(weights, behaviour_mask)
        return loss

    def item_vectors(self) -> torch.Tensor:
        return self.items.all_items()
