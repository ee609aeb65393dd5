import math

import numpy as np
import pytest
import torch

from model_export.embedding import ItemEmbedding, embed_each_item_once
from model_export.mind import MIND, b2i_routing, dynamic_interest_count, label_aware_attention, routing_regularization, squash
from model_export.sampled_softmax import NegativeSampler
from model_export.spec import ModelSpec
from model_export.youtube_dnn import YouTubeDNN


def _spec(**kw):
    base = dict(kind="mind", n_items=30, dim=8, n_interests=4, maxlen=10, n_side_tokens=3, profile_cardinalities=[3, 5])
    base.update(kw)
    return ModelSpec(**base)


def _side(n_items=30):
    side = torch.zeros(n_items + 1, 2, dtype=torch.long)
    side[1:, 0] = torch.arange(n_items) % 3 + 1
    return side


def _inputs(b=6, maxlen=10, n_items=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([1, 2, 3, 4, 8, 10][:b])
    items = torch.randint(1, n_items + 1, (b, maxlen), generator=g)
    items = torch.where(torch.arange(maxlen)[None, :] < lengths[:, None], items, torch.zeros_like(items))
    profile = torch.stack([torch.randint(0, 3, (b,), generator=g), torch.randint(0, 5, (b,), generator=g)], 1)
    return items, lengths, profile


def test_dynamic_interest_count_follows_log2_of_history_length():
    lengths = torch.tensor([0, 1, 2, 3, 4, 7, 8, 15, 16, 100])
    expected = [max(1, min(4, math.floor(math.log2(max(n, 1))))) for n in lengths.tolist()]
    assert dynamic_interest_count(lengths, 4).tolist() == expected == [1, 1, 1, 1, 2, 2, 3, 3, 4, 4]


def test_the_exported_interest_count_is_exact_at_every_power_of_two(tmp_path):
    """ONNX Runtime must give PyTorch's K_u for any length, at batch 1 and in a batch: a count through
    a float log2 gave 12 for 8,192 and 14 for 32,768 behaviours at batch 1 (Log's scalar path)."""
    import onnxruntime as ort

    class Count(torch.nn.Module):
        def forward(self, lengths):
            return dynamic_interest_count(lengths, 40)

    path = tmp_path / "count.onnx"
    torch.onnx.export(Count(), (torch.tensor([5, 9]),), str(path), input_names=["lengths"], output_names=["k"],
                      dynamic_axes={"lengths": {0: "batch"}}, opset_version=17, dynamo=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    lengths = [n for j in range(1, 31) for n in (2**j - 1, 2**j, 2**j + 1)]
    expected = [max(1, min(40, n.bit_length() - 1)) for n in lengths]  # floor(log2 n), exactly
    assert dynamic_interest_count(torch.tensor(lengths), 40).tolist() == expected
    assert [int(session.run(None, {"lengths": np.array([n])})[0][0]) for n in lengths] == expected
    assert session.run(None, {"lengths": np.array(lengths)})[0].tolist() == expected


def test_squash_keeps_direction_and_bounds_norm_below_one():
    # norms 1e-3 .. 1e2 (seeded): beyond ~1e3 the true value 1 - 1/(1 + |z|^2) rounds to 1.0 in float32
    z = torch.randn(100, 8, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 2, 100)[:, None]
    s = squash(z)
    norms = s.norm(dim=-1)
    assert torch.all(norms < 1.0)
    assert torch.allclose(norms, z.norm(dim=-1) ** 2 / (1 + z.norm(dim=-1) ** 2), rtol=1e-4)
    cos = torch.nn.functional.cosine_similarity(s, z, dim=-1)
    assert torch.allclose(cos, torch.ones(100), atol=1e-4)


def test_routing_shapes_norms_and_masks():
    b, length, k, d = 5, 7, 4, 6
    behaviours = torch.randn(b, length, d)
    behaviour_mask = torch.arange(length)[None, :] < torch.tensor([1, 2, 4, 7, 7])[:, None]
    interest_mask = torch.arange(k)[None, :] < torch.tensor([1, 1, 2, 2, 4])[:, None]
    capsules, weights = b2i_routing(behaviours, behaviour_mask, interest_mask, torch.randn(b, k, length), iterations=3)
    assert capsules.shape == (b, k, d) and weights.shape == (b, k, length)
    assert torch.all(capsules.norm(dim=-1) < 1.0)
    assert torch.all(capsules[~interest_mask] == 0)  # inactive interests are zero
    assert torch.all(weights.transpose(1, 2)[~behaviour_mask] == 0)  # padding routes nowhere
    valid_weight_sums = weights.sum(1)[behaviour_mask]  # each real behaviour distributes weight 1
    assert torch.allclose(valid_weight_sums, torch.ones_like(valid_weight_sums), atol=1e-5)
    assert torch.all(weights[~interest_mask] == 0)


def test_padding_content_does_not_change_the_interests():
    model = MIND(_spec(), _side()).eval()
    items, lengths, profile = _inputs()
    out, k = model(items, lengths, profile)
    noisy = torch.where(items == 0, torch.randint(1, 31, items.shape), items)
    out_noisy, _ = model(noisy, lengths, profile)
    assert torch.allclose(out, out_noisy, atol=1e-6)
    # a shorter padded window gives the same result as the full-width one
    out_short, _ = model(items[:, :5][:4], lengths[:4], profile[:4])
    assert torch.allclose(out[:4], out_short, atol=1e-5)


def test_user_tower_output_has_dynamic_k_and_is_deterministic_in_eval():
    model = MIND(_spec(), _side()).eval()
    items, lengths, profile = _inputs()
    out, k = model(items, lengths, profile)
    assert out.shape == (6, 4, 8)
    assert k.tolist() == [1, 1, 1, 2, 3, 3]
    for row, ku in enumerate(k.tolist()):
        assert torch.all(out[row, ku:] == 0) and torch.all(out[row, :ku].norm(dim=-1) > 0)
    out2, _ = model(items, lengths, profile)
    assert torch.equal(out, out2)  # fixed routing initialisation at inference
    model.train()
    torch.manual_seed(1)
    a, _, _ = model.interests(items, lengths, profile)
    torch.manual_seed(2)
    b, _, _ = model.interests(items, lengths, profile)
    assert not torch.allclose(a, b)  # random routing logits in training


def test_one_bilinear_map_shared_by_all_behaviours():
    model = MIND(_spec(), _side())
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.in_features == m.out_features == 8]
    assert len(linear) == 1 and linear[0].bias is None


@pytest.mark.parametrize("n_items", [30, 500])  # catalog smaller than the batch (embedded whole) / larger (distinct items only)
def test_embed_each_item_once_equals_embedding_every_behaviour(n_items):
    items, _, _ = _inputs(n_items=n_items)  # 60 behaviours
    embed = ItemEmbedding(n_items, 8, _side(n_items), 3).train()
    direct = embed(items)
    shared = embed_each_item_once(items, embed, n_items)
    assert torch.allclose(shared, direct, atol=1e-6)
    grad = torch.randn_like(direct)
    expected = torch.autograd.grad((direct * grad).sum(), embed.ids.weight)[0]
    got = torch.autograd.grad((shared * grad).sum(), embed.ids.weight)[0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_label_aware_attention_selects_the_matching_interest_with_large_power():
    interests = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    target = torch.tensor([[0.0, 2.0]])
    active = torch.tensor([[True, True, False]])  # the third (largest) interest is inactive
    hard = label_aware_attention(interests, target, active, power=50.0)
    assert torch.allclose(hard, interests[0, 1:2], atol=1e-4)
    soft = label_aware_attention(interests, target, active, power=1.0)  # p = 1: softmax of the scores
    w = torch.softmax(torch.tensor([0.0, 2.0]), 0)
    assert torch.allclose(soft, (w[:, None] * interests[0, :2]).sum(0, keepdim=True), atol=1e-6)


def test_the_largest_attention_power_is_still_hard_attention_and_a_larger_one_is_refused():
    """A p above MAX_ATTENTION_POWER capped |s| at 10^(300/p) before the power: scores above it tied,
    and p = 1000 split 0.5 / 0.5 between scores 5 and 10 (the mean, not hard attention)."""
    from model_export.spec import MAX_ATTENTION_POWER, ModelSpec, SpecError

    interests = torch.tensor([[[5.0, 0.0], [10.0, 0.0]], [[2000.0, 0.0], [4000.0, 0.0]]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = label_aware_attention(interests, target, torch.ones(2, 2, dtype=torch.bool), MAX_ATTENTION_POWER)
    assert torch.equal(out, interests[:, 1])  # all the weight on the larger score, even at 4,000
    with pytest.raises(SpecError, match="above 64"):
        ModelSpec(kind="mind", n_items=5, attention_power=MAX_ATTENTION_POWER * 2)


def test_label_aware_attention_never_prefers_an_opposed_interest():
    interests = torch.tensor([[[-3.0, 0.0], [1.0, 0.0]]])
    target = torch.tensor([[1.0, 0.0]])
    out = label_aware_attention(interests, target, torch.ones(1, 2, dtype=torch.bool), power=2.0)
    assert out[0, 0] > 0  # an even power of -3 would have picked the opposed interest


@pytest.mark.parametrize("power", [0.0, 0.5, 2.0, 64.0])
def test_label_aware_attention_is_finite_with_its_gradients_for_any_power(power):
    """p < 1 has an infinite slope at a zero score (an inactive interest's), a large p overflows."""
    interests = torch.tensor([[[4.0, 1.0], [0.5, 4.0], [0.0, 0.0]], [[3.0, 3.0], [-2.0, 1.0], [1.0, 1.0]]], requires_grad=True)
    target = torch.tensor([[4.0, 0.0], [3.0, 3.0]], requires_grad=True)
    active = torch.tensor([[True, True, False], [True, True, True]])
    out = label_aware_attention(interests, target, active, power)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(interests.grad).all()
    assert (target.grad is None) == (power == 0.0) and (power == 0.0 or torch.isfinite(target.grad).all())
    if power == 0.0:  # the paper's p = 0: the plain average of the active interests
        assert torch.allclose(out[0], interests[0, :2].mean(0)) and torch.allclose(out[1], interests[1].mean(0))
    if power == 64.0:  # hard attention: the interest nearest the target
        assert torch.allclose(out, torch.stack([interests[0, 0], interests[1, 0]]))


def test_an_unknown_profile_value_is_a_zero_vector_that_is_never_trained():
    from model_export.embedding import ProfileEmbedding

    profile = ProfileEmbedding([3, 5], dim_per_field=4)
    ids = torch.tensor([[0, 2], [1, 0]])
    out = profile(ids)
    assert torch.equal(out[0, :4], torch.zeros(4)) and torch.equal(out[1, 4:], torch.zeros(4))
    assert out[0, 4:].abs().sum() > 0 and out[1, :4].abs().sum() > 0
    out.sum().backward()
    assert all(torch.equal(field.weight.grad[0], torch.zeros(4)) for field in profile.fields)


def test_routing_regularization_is_zero_for_even_routing_and_grows_with_collapse():
    """Routing weights sum to 1 over the interests for each behaviour (2 interests, 6 behaviours, the
    last one padding): a clean split of the behaviours is healthy, an interest that holds one
    behaviour is REMI's collapse."""
    mask = torch.tensor([[True] * 5 + [False]])
    even = torch.tensor([[[0.5] * 5 + [0.0]] * 2])
    split = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]]])
    collapsed = torch.tensor([[[1.0, 0.0, 0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 1.0, 1.0, 0.0]]])
    assert routing_regularization(even, mask).item() == pytest.approx(0.0, abs=1e-12)
    assert routing_regularization(collapsed, mask).item() > 5 * routing_regularization(split, mask).item() > 0
    one_active = torch.tensor([[[1.0] * 5 + [0.0], [0.0] * 6]])  # K_u = 1: the inactive row adds nothing
    assert routing_regularization(one_active, mask).item() == pytest.approx(0.0, abs=1e-12)


def test_routing_regularization_reaches_the_behaviour_embeddings_only_when_enabled():
    """REMI's penalty on the routing weights must have a gradient; the default detached routing gives it none."""
    items, lengths, profile = _inputs()
    mask = torch.arange(items.shape[1])[None, :] < lengths[:, None]
    torch.manual_seed(0)
    plain = MIND(_spec(kind="mind"), _side()).train()
    assert not plain.interests(items, lengths, profile)[2].requires_grad
    model = MIND(_spec(kind="mind_remi", routing_regularization=1.0), _side()).train()
    _, _, weights = model.interests(items, lengths, profile)
    routing_regularization(weights, mask).backward()
    assert model.bilinear.weight.grad.abs().sum().item() > 0
    assert model.items.ids.weight.grad.abs().sum().item() > 0


@pytest.mark.parametrize("kind", ["mind", "mind_remi", "youtube_dnn"])
def test_training_step_reduces_loss_on_a_fixed_batch(kind):
    torch.manual_seed(0)
    spec = _spec(kind=kind, n_interests=1 if kind == "youtube_dnn" else 4, hard_negative_beta=1.0 if kind == "mind_remi" else 0.0, routing_regularization=1.0 if kind == "mind_remi" else 0.0)
    model = (YouTubeDNN if kind == "youtube_dnn" else MIND)(spec, _side())
    items, lengths, profile = _inputs()
    targets = torch.tensor([3, 5, 7, 9, 11, 13])
    sampler = NegativeSampler(torch.ones(31))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    first = None
    for _ in range(30):
        g.manual_seed(0)
        loss = model.loss(items, lengths, profile, targets, sampler, 20, g)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert np.isfinite(loss.item()) and loss.item() < first * 0.7


# ----------------------------------------------------------------------------- large catalogs


def test_side_tokens_are_pooled_from_their_sparse_tables_whatever_the_vocabulary():
    """e_i = ids[i] + mean of item i's side-token embeddings, the same through the dense pooling block
    (small vocabulary) and the per-slot gathers (large one), for any vocabulary size: no dense
    [items, vocabulary] table is kept."""
    n_items, vocabulary = 40, 5000
    side = torch.zeros(n_items + 1, 3, dtype=torch.long)
    side[1:, 0] = torch.arange(n_items) * 100 + 1  # tokens spread over the whole vocabulary
    side[1::2, 1] = 4999
    side[2::4, 2] = side[2::4, 0]  # listed twice: counts once, as in a dense pooling matrix
    torch.manual_seed(0)
    embed = ItemEmbedding(n_items, 8, side, vocabulary)
    assert embed.side_tokens.shape == (n_items + 1, 3)  # items x tokens per item, not items x vocabulary
    expected = torch.stack([embed.ids.weight[i] + (embed.side.weight[side[i][side[i] > 0].unique()].mean(0) if (side[i] > 0).any() else 0)
                            for i in range(n_items + 1)])
    items = torch.arange(n_items + 1)
    for block in (1 << 22, 0):  # dense pooling block / gathers per token slot
        embed.DENSE_POOLING_ELEMENTS = block
        assert torch.allclose(embed.train()(items), expected, atol=1e-6)
        assert torch.allclose(embed.eval()(items), expected, atol=1e-6)
    assert torch.equal(embed.all_items()[0], torch.zeros(8))  # padding


def test_weights_saved_with_the_dense_side_pooling_table_load_unchanged():
    """Runs and exports made before the side tokens were stored sparsely (a dense `side_pooling`
    [items, vocabulary], the token embeddings a plain parameter `side`) load into the current model
    with the same item vectors and interests."""
    side = torch.zeros(31, 3, dtype=torch.long)  # up to three tokens per item, in any order, some items none
    side[1:, 0] = torch.arange(30) % 3 + 1
    side[1::2, 2] = 3 - torch.arange(15) % 3
    side[25:] = 0
    torch.manual_seed(0)
    model = MIND(_spec(), side).eval()
    old = {k: v for k, v in model.state_dict().items() if k not in ("items.side_tokens", "items.side_weights")}
    old["items.side"] = old.pop("items.side.weight")  # then a plain parameter
    pooling = torch.zeros(31, 4).scatter_(1, side, 1.0)
    pooling[:, 0] = 0.0
    old["items.side_pooling"] = pooling / pooling.sum(1, keepdim=True).clamp(min=1.0)
    loaded = MIND(_spec(), torch.zeros(31, 1, dtype=torch.long))  # the placeholder model_from_weights builds
    loaded.load_state_dict(old)
    loaded.eval()
    assert loaded.items.side_tokens.shape == (31, 2)  # the most distinct tokens an item has
    doubled = MIND(_spec(), torch.zeros(31, 1, dtype=torch.long)).double()  # the loaded tables take the module's dtype
    doubled.load_state_dict(old)
    assert doubled.items.side_weights.dtype == torch.float64 and doubled.eval()(*_inputs())[0].dtype == torch.float64
    assert torch.allclose(loaded.item_vectors(), model.item_vectors(), atol=1e-6)
    items, lengths, profile = _inputs()
    assert torch.allclose(loaded(items, lengths, profile)[0], model(items, lengths, profile)[0], atol=1e-6)


def test_the_inference_table_follows_every_change_of_the_weights():
    """The item table kept for inference is recomputed after an optimizer step or a load, never stale."""
    torch.manual_seed(0)
    model = MIND(_spec(), _side())
    items, lengths, profile = _inputs()
    model.eval()
    before = model(items, lengths, profile)[0].clone()
    model.train()
    loss = model.loss(items, lengths, profile, torch.tensor([3, 5, 7, 9, 11, 13]), NegativeSampler(torch.ones(31)), 10)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    model.eval()
    stepped = model(items, lengths, profile)[0]
    assert not torch.allclose(stepped, before)
    fresh = MIND(_spec(), _side())
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert torch.allclose(fresh(items, lengths, profile)[0], stepped, atol=1e-6)
    model.load_state_dict(MIND(_spec(), _side()).state_dict())  # other weights loaded into the same module
    assert not torch.allclose(model(items, lengths, profile)[0], stepped)
    model.train()
    fused = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)  # updates without bumping version counters
    model.loss(items, lengths, profile, torch.tensor([3, 5, 7, 9, 11, 13]), NegativeSampler(torch.ones(31)), 10).backward()
    fused.step()
    model.eval()
    fresh = MIND(_spec(), _side())
    fresh.load_state_dict(model.state_dict())
    assert torch.allclose(model(items, lengths, profile)[0], fresh.eval()(items, lengths, profile)[0], atol=1e-6)
    assert model.double()(items, lengths, profile)[0].dtype == torch.float64  # moved weights: a new table


def _lazy_vs_dense(n_items: int, steps: int):
    from model_export.train import LazyItemAdam, TrainConfig, build_optimizer

    runs = []
    for sparse_rows in (0, 1):  # plain Adam / LazyItemAdam
        torch.manual_seed(0)
        model = MIND(_spec(n_items=n_items), _side(n_items)).train()
        optimizer = build_optimizer(model, TrainConfig(dataset="x", model="mind", lr=0.01, sparse_item_rows=sparse_rows))
        assert isinstance(optimizer, LazyItemAdam) == (sparse_rows == 1) == model.items.ids.sparse
        for step in range(steps):
            items, lengths, profile = _inputs(n_items=n_items, seed=step)
            loss = model.loss(items, lengths, profile, items[:, 0], NegativeSampler(torch.ones(n_items + 1)), 8,
                              torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        runs.append(model)
    return runs


def test_lazy_item_adam_is_adam_when_every_step_touches_every_item():
    # 30 items, 60 behaviours a step: the whole catalog is embedded every step (embed_each_item_once)
    dense, lazy = _lazy_vs_dense(n_items=30, steps=5)
    torch.manual_seed(0)
    start = MIND(_spec(), _side())
    assert (dense.items.ids.weight - start.items.ids.weight).abs().max() > 0.02  # 5 steps at lr 0.01 moved it
    # The same updates up to where SparseAdam puts Adam's epsilon (eps / sqrt(1 - beta2^t): 3e-7 on the first
    # step), which only moves rows whose gradients are ~1e-7 (observed: 1e-3 at most, a tenth of one step).
    for (name, a), b in zip(dense.state_dict().items(), lazy.state_dict().values()):
        assert torch.allclose(a, b, atol=2e-3), name


def test_lazy_item_adam_moves_only_the_item_rows_a_step_touched():
    """500 items, 60 behaviours a step: only the batch's distinct items, targets and negatives get gradient
    rows. Lazy Adam leaves every other row where it is; plain Adam's momentum keeps moving rows that an
    earlier step touched."""
    from model_export.train import TrainConfig, build_optimizer

    for sparse_rows in (1, 0):
        torch.manual_seed(0)
        model = MIND(_spec(n_items=500), _side(500)).train()
        optimizer = build_optimizer(model, TrainConfig(dataset="x", model="mind", lr=0.01, sparse_item_rows=sparse_rows))
        table = model.items.ids.weight
        for step in range(3):
            items, lengths, profile = _inputs(n_items=500, seed=step)
            loss = model.loss(items, lengths, profile, items[:, 0], NegativeSampler(torch.ones(501)), 8, torch.Generator().manual_seed(step))
            optimizer.zero_grad()
            loss.backward()
            grad = table.grad.coalesce().indices()[0] if table.grad.is_sparse else table.grad.abs().sum(1).nonzero()[:, 0]
            touched = torch.zeros(501, dtype=torch.bool)
            touched[grad] = True
            before, dense_before = table.detach().clone(), model.bilinear.weight.detach().clone()
            optimizer.step()
            moved = (table != before).any(1)
            assert moved[touched].any() and 0 < int(touched.sum()) < 100
            assert not torch.equal(model.bilinear.weight, dense_before)  # the other weights train with Adam
        if sparse_rows:
            assert not moved[~touched].any()  # lazy: nothing the last step did not touch
            assert model.items.side.sparse and model.items.side.weight.grad.is_sparse  # a table this large too
        else:
            assert moved[~touched].any()  # plain Adam: rows touched by the earlier steps move on


@pytest.mark.parametrize("block", [1, 4 * 4 * 301])  # one user per block / blocks of 4 users (4 + 2)
def test_evaluation_scores_a_large_catalog_in_blocks_with_the_same_result(monkeypatch, block):
    """recommend() holds at most SCORE_BLOCK_ELEMENTS scores at once (a million items x 512 users x K
    would be 8 GB); smaller blocks give the same recommendations as one block for all."""
    from types import SimpleNamespace

    import model_export.evaluate as evaluate
    from model_export.data import EvalCases

    torch.manual_seed(0)
    model = MIND(_spec(n_items=300), _side(300))
    items, lengths, profile = _inputs(n_items=300)
    cases = EvalCases.from_lists(list(range(6)), [row[:n].numpy() for row, n in zip(items, lengths)], [[1]] * 6)
    data = SimpleNamespace(user_profile=profile.numpy())
    whole = evaluate.recommend(model, data, cases, n=50)
    monkeypatch.setattr(evaluate, "SCORE_BLOCK_ELEMENTS", block)
    assert np.array_equal(evaluate.recommend(model, data, cases, n=50), whole) and whole.shape == (6, 50)


def test_workers_joined_over_nccl_keep_plain_adam(monkeypatch, capsys):
    """NCCL has no sparse all-reduce: a large catalog trained on GPU workers keeps dense gradients."""
    import model_export.distributed as distributed
    from model_export.train import TrainConfig, build_optimizer

    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
    model = MIND(_spec(), _side())
    optimizer = build_optimizer(model, TrainConfig(dataset="x", model="mind", sparse_item_rows=1))
    assert isinstance(optimizer, torch.optim.Adam) and not model.items.ids.sparse
    assert "NCCL cannot average sparse gradients" in capsys.readouterr().err
    monkeypatch.setattr(distributed.dist, "get_backend", lambda: "gloo")
    assert type(build_optimizer(MIND(_spec(), _side()), TrainConfig(dataset="x", model="mind", sparse_item_rows=1))).__name__ == "LazyItemAdam"


def test_each_torchrun_worker_trains_on_its_own_gpu_and_broadcasts_no_buffers(monkeypatch, tmp_path):
    """--device cuda:N under torchrun put every worker on GPU N (NCCL refuses it); the side-token table
    and the routing initialisation never change, so DDP need not broadcast them before every step."""
    import torch.distributed as dist

    import model_export.distributed as distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.worker_device("cuda:3") == "cuda:3" and distributed.worker_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.worker_device("cuda:0") == distributed.worker_device("cuda") == "cuda:1"
    assert distributed.worker_device("cpu") == "cpu"

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(distributed, "world", lambda: distributed.World(0, 2))
        wrapped = distributed.loss_function(MIND(_spec(), _side()))
        assert wrapped.broadcast_buffers is False
    finally:
        dist.destroy_process_group()


def _report_epoch_loss(rank: int, rendezvous: str, losses: list[float], results) -> None:
    import torch.distributed as dist

    import model_export.distributed as distributed

    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    try:
        results.put((rank, distributed.mean_over_workers(losses[rank])))
    finally:
        dist.destroy_process_group()


def test_epoch_loss_is_the_mean_over_all_torchrun_workers(tmp_path):
    """Under torchrun history.json kept rank 0's loss, the mean over its own slices only: two real Gloo
    workers whose slices lose 1.0 and 3.0 both report 2.0 (a single process reports its own)."""
    import torch.multiprocessing as mp

    import model_export.distributed as distributed

    assert distributed.mean_over_workers(1.5) == 1.5
    context = mp.get_context("spawn")
    results = context.Queue()
    workers = [context.Process(target=_report_epoch_loss, args=(rank, f"file://{tmp_path / 'rendezvous'}", [1.0, 3.0], results))
               for rank in (0, 1)]
    for worker in workers:
        worker.start()
    reported = dict(results.get(timeout=60) for _ in workers)
    for worker in workers:
        worker.join(timeout=30)
    assert reported == {0: 2.0, 1: 2.0}


def test_every_torchrun_worker_has_samples_at_every_step(monkeypatch):
    """A last batch with fewer samples than workers gave a worker none, and training failed on it in
    every epoch: under torchrun that batch is left out of the pass; a single process keeps it."""
    from types import SimpleNamespace

    import model_export.distributed as distributed
    from model_export.train import TrainConfig, build_optimizer, run_epoch, worker_batches

    order = np.random.default_rng(0).permutation(36)
    for n, kept in ((35, 34), (36, 36)):  # batches of 17: a last one of 1 sample is left out, one of 2 is not
        split = [worker_batches(order[:n], 17, 0, distributed.World(rank, 2)) for rank in (0, 1)]
        assert all(len(batch) for batches in split for batch in batches)
        assert sorted(np.concatenate(split[0] + split[1])) == sorted(order[:kept])
    assert len(worker_batches(order[:35], 17, 0, distributed.World())) == 3

    data = SimpleNamespace(seq_offsets=np.array([0, 10, 20]), seq_items=np.arange(20) + 1, user_profile=np.zeros((2, 2), dtype=np.int64))
    users, positions = np.repeat([0, 1], 9), np.tile(np.arange(1, 10), 2)  # 18 samples: batches of 17 and 1
    config = TrainConfig(dataset="x", model="mind", batch_size=17, n_negatives=8)
    for workers, steps in ((distributed.World(0, 1), 2), (distributed.World(0, 2), 1), (distributed.World(1, 2), 1)):
        monkeypatch.setattr(distributed, "world", lambda: workers)
        model = MIND(_spec(), _side())
        _, ran = run_epoch(model, build_optimizer(model, config), NegativeSampler(torch.ones(31)), data, users, positions, config,
                           np.random.default_rng(0), maxlen=10, progress=False)
        assert ran == steps


def test_sampling_by_user_weighs_every_user_alike_and_stays_within_their_pairs():
    """ComiRec's draw (--sample-by user): a user uniformly, then one of their target positions; the
    default visits every pair once, so a user with 90 pairs weighs 90 times one with a single pair."""
    from model_export.train import epoch_order

    users = np.repeat(np.array([7, 3, 5]), [90, 1, 9])  # as training_positions lays them out: each user's pairs contiguous
    rng = np.random.default_rng(0)
    shuffled = epoch_order(users, "position", rng)
    assert sorted(shuffled) == list(range(100))
    draws = np.concatenate([epoch_order(users, "user", rng) for _ in range(300)])
    assert draws.min() >= 0 and draws.max() < 100
    share = {u: np.mean(users[draws] == u) for u in (7, 3, 5)}
    assert all(abs(v - 1 / 3) < 0.01 for v in share.values()), share
    assert set(np.unique(draws[users[draws] == 5])) == set(range(91, 100))  # every pair of a user is drawn, evenly


def test_a_run_saved_before_sample_by_existed_reads_as_the_every_pair_draw_it_used():
    """So its quality result is reused and its resume with --sample-by user is refused (it trained by position)."""
    from model_export.train import with_default_settings

    assert with_default_settings({"dataset": "ml-1m", "seed": 1})["sample_by"] == "position"
    assert with_default_settings({"dataset": "ml-1m", "sample_by": "user"})["sample_by"] == "user"
