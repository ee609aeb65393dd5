import math

import pytest
import torch
import torch.nn.functional as F

from model_export.sampled_softmax import NegativeSampler, sampled_softmax_loss


def _setup(b=4, n_items=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = torch.randn(n_items + 1, d, generator=g)
    user = torch.randn(b, d, generator=g)
    targets = torch.tensor([1, 4, 7, 9][:b])
    return items, user, targets


def test_equals_full_softmax_when_negatives_are_all_items_with_uniform_q():
    items, user, targets = _setup()
    n_items = items.shape[0] - 1
    negatives = torch.arange(1, n_items + 1)  # every item once; the target among them is an accidental hit
    log_q = torch.full((n_items + 1,), -math.log(n_items))  # uniform: log(N q) = 0, no correction
    loss = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, log_q)
    full = F.cross_entropy(user @ items[1:].T, targets - 1)
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)


def test_log_q_correction_removes_the_sampling_bias():
    items, user, targets = _setup()
    negatives = torch.tensor([2, 3, 5])
    uniform = torch.full((10,), -math.log(9))
    skewed = uniform.clone()
    skewed[2] += math.log(4.0)  # item 2 is drawn 4x as often: its logit is lowered by log 4
    base = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, uniform)
    corrected = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, skewed)
    assert corrected.item() < base.item()


@pytest.mark.parametrize("beta", [0.0, 2.0])  # with REMI's weights too: a hit is neither a negative nor counted in their mean
def test_accidental_hits_are_removed(beta):
    items, user, targets = _setup(b=1)
    negatives = torch.tensor([targets[0].item(), 2, 3])
    log_q = torch.full((10,), -math.log(9))
    with_hit = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, log_q, beta)
    without = sampled_softmax_loss(user, items[targets], targets, items[negatives[1:]], negatives[1:], log_q + math.log(3 / 2), beta)
    assert with_hit.item() == pytest.approx(without.item(), rel=1e-5)


def test_remi_hard_negative_weighting():
    items, user, targets = _setup()
    negatives = torch.tensor([2, 3, 5, 6, 8])
    log_q = torch.full((10,), -math.log(9))
    plain = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, log_q, 0.0)
    hard = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, log_q, 2.0)
    # importance weights emphasise high-scoring negatives: the loss grows (Jensen: weighted mean of exp >= mean)
    assert hard.item() > plain.item()
    # with identical negative scores the weights are all 1 and IHN changes nothing
    same = items[2:3].expand(5, -1)
    a = sampled_softmax_loss(user, items[targets], targets, same, negatives, log_q, 0.0)
    b = sampled_softmax_loss(user, items[targets], targets, same, negatives, log_q, 2.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_remi_weighting_estimates_the_hard_negative_mass_under_a_popularity_sampler():
    """With negatives drawn from q, not uniformly, the weighted negatives must still estimate
    M * E_p[exp(s)] with p(i) ∝ exp(beta s_i) over the catalogue (the plain corrected sum at beta 0).
    Popular items score low here: leaving 1/q out of the weights' normaliser made it 8x too large."""
    g = torch.Generator().manual_seed(0)
    n_items, d, beta = 50, 4, 2.0
    items = torch.randn(n_items + 1, d, generator=g)
    user = torch.randn(1, d, generator=g)
    scores = (user @ items[1:].T)[0]
    counts = torch.zeros(n_items + 1)
    counts[1:] = torch.exp(-2 * scores)  # popularity against the score: the user's hard negatives are rarely drawn
    sampler = NegativeSampler(counts, alpha=1.0)
    target = torch.tensor([int(scores.argmin()) + 1])  # the lowest-scoring item, so it is hardly a hard negative itself
    negatives = sampler.sample(200_000, g)
    loss = sampled_softmax_loss(user, items[target], target, items[negatives], negatives, sampler.log_q, beta)
    pos_logit = (user[0] @ items[target[0]]) - math.log(len(negatives)) - sampler.log_q[target[0]]
    negative_mass = torch.exp(pos_logit) * torch.expm1(loss)  # loss = log(1 + Z_neg / exp(pos_logit))
    others = torch.ones(n_items, dtype=torch.bool)
    others[target[0] - 1] = False  # the target is an accidental hit wherever drawn
    p = torch.softmax(beta * scores[others], 0)
    expected = n_items * (p * torch.exp(scores[others])).sum()
    assert negative_mass.item() == pytest.approx(expected.item(), rel=0.03)


@pytest.mark.parametrize("beta", [0.0, 2.0])
def test_a_row_whose_every_negative_is_its_target_has_a_finite_loss(beta):
    items, user, targets = _setup(b=2)
    negatives = torch.tensor([targets[0].item()] * 3)  # row 0: only accidental hits
    loss = sampled_softmax_loss(user, items[targets], targets, items[negatives], negatives, torch.full((10,), -math.log(9)), beta)
    assert torch.isfinite(loss)


def test_sampler_follows_popularity_power_and_never_draws_padding():
    counts = torch.tensor([100.0, 1.0, 9.0, 99.0])
    sampler = NegativeSampler(counts, alpha=1.0)
    assert sampler.q[0] == 0
    assert torch.allclose(sampler.q[1:], torch.tensor([2.0, 10.0, 100.0]) / 112.0)
    draws = sampler.sample(20000, torch.Generator().manual_seed(0))
    assert draws.min() >= 1
    assert abs((draws == 3).float().mean().item() - 100 / 112) < 0.02
    uniform = NegativeSampler(counts, alpha=0.0)
    assert torch.allclose(uniform.q[1:], torch.full((3,), 1 / 3))


def test_remi_importance_weights_are_constants_of_the_step():
    """IHN's weights w_j = N softmax_j(beta s_j) belong to the sampling distribution, so no gradient flows
    through them (left in the graph, as in the REMI authors' code, ML-1M validation Recall@50 fell from
    0.230 to 0.147 at beta 16): the loss's gradient is that of the sampled softmax with w_j held fixed."""
    items, user, targets = _setup()
    negatives = torch.tensor([2, 3, 5, 6, 8])  # no target among them (accidental hits: the test above)
    log_q = torch.full((10,), -math.log(9))  # uniform: log(N q) = log(5 / 9)
    beta = 2.0
    u, table = user.clone().requires_grad_(True), items.clone().requires_grad_(True)
    sampled_softmax_loss(u, table[targets], targets, table[negatives], negatives, log_q, beta).backward()

    reference_user, reference_table = user.clone().requires_grad_(True), items.clone().requires_grad_(True)
    shift = math.log(len(negatives)) + log_q[0]
    pos = (reference_user * reference_table[targets]).sum(-1) - shift
    scores = reference_user @ reference_table[negatives].T
    weights = len(negatives) * torch.softmax(beta * scores.detach(), dim=-1)
    denominator = pos.exp() + (weights * (scores - shift).exp()).sum(-1)
    (denominator.log() - pos).mean().backward()
    torch.testing.assert_close(u.grad, reference_user.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(table.grad, reference_table.grad, rtol=1e-5, atol=1e-6)  # nor into the item vectors
