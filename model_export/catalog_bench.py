"""Training and evaluation on large catalogs: what a million items costs a step and an evaluation.

For each catalog size, a MIND model with side features (`--tokens-per-item` tokens per item drawn
from a `--side-vocabulary`) is trained on synthetic batches whose behaviours, targets and
popularity follow a Zipf law, as real catalogs' do: batch 1,024, window 50, 1,280 sampled
negatives (ML-1M's training settings; a user-brought dataset trains with batch 256, window 20).
The same batches run through plain Adam over every row (the baseline: what the item table cost
before LazyItemAdam) and through the optimizer `train` picks for that size with the given
`--sparse-item-rows`, alternating, from the same weights. Then the top 50 of `--users` users are
retrieved over the whole catalog, as validation does each epoch. Prints median ms per step, the
ratio, the evaluation's seconds and the process's peak RSS so far (both models held at once).
"""

from __future__ import annotations

import json
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

from model_export.data import EvalCases
from model_export.evaluate import recommend
from model_export.mind import MIND
from model_export.sampled_softmax import NegativeSampler
from model_export.spec import ModelSpec
from model_export.train import TrainConfig, build_optimizer

BATCH, WINDOW, PROFILE = 1024, 50, [3, 8, 22]


def _zipf(n_items: int, exponent: float = 0.8) -> np.ndarray:
    p = 1.0 / np.arange(1, n_items + 1) ** exponent
    return p / p.sum()


def _batches(n_items: int, steps: int, rng: np.random.Generator) -> list[tuple[torch.Tensor, ...]]:
    p = _zipf(n_items)
    out = []
    for _ in range(steps):
        items = torch.as_tensor(rng.choice(n_items, size=(BATCH, WINDOW), p=p) + 1)
        profile = torch.as_tensor(np.stack([rng.integers(0, c, BATCH) for c in PROFILE], 1))
        out.append((items, torch.full((BATCH,), WINDOW), profile, torch.as_tensor(rng.choice(n_items, size=BATCH, p=p) + 1)))
    return out


def _step_ms(model, optimizer, sampler, batch, seed: int) -> float:
    started = time.perf_counter()
    loss = model.loss(*batch, sampler, 1280, torch.Generator().manual_seed(seed))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return (time.perf_counter() - started) * 1e3


def bench_catalog(n_items: int, side_vocabulary: int, tokens_per_item: int, steps: int, users: int, sparse_item_rows: int,
                  seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    side = torch.as_tensor(rng.integers(1, side_vocabulary + 1, size=(n_items + 1, tokens_per_item)))
    side[0] = 0
    spec = ModelSpec(kind="mind", n_items=n_items, maxlen=WINDOW, n_side_tokens=side_vocabulary, profile_cardinalities=PROFILE)
    sampler = NegativeSampler(torch.as_tensor(np.r_[0.0, _zipf(n_items)] * 1e6))
    runs = {}
    for name, sparse_rows in (("adam_every_row", 0), ("train_default", sparse_item_rows)):
        torch.manual_seed(seed)
        model = MIND(spec, side).train()
        runs[name] = (model, build_optimizer(model, TrainConfig(dataset="synthetic", model="mind", sparse_item_rows=sparse_rows)))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for step, batch in enumerate(_batches(n_items, steps, rng)):
        for name, (model, optimizer) in runs.items():  # alternating: load that comes and goes falls on both
            times[name].append(_step_ms(model, optimizer, sampler, batch, step))
        print(f"  {n_items:,} items: step {step + 1}/{steps}", end="\r", file=sys.stderr, flush=True)
    warm = max(1, steps // 5)  # the first steps allocate the optimizer state
    ms = {name: float(np.median(t[warm:])) for name, t in times.items()}

    model = runs["train_default"][0]
    p = _zipf(n_items)
    histories = [rng.choice(n_items, size=WINDOW, p=p) + 1 for _ in range(users)]
    cases = EvalCases.from_lists(list(range(users)), histories, [[1]] * users)
    profiles = SimpleNamespace(user_profile=np.stack([rng.integers(0, c, users) for c in PROFILE], 1))  # what recommend reads of a dataset
    started = time.perf_counter()
    recommend(model, profiles, cases, n=50)
    evaluation_s = time.perf_counter() - started
    return {
        "items": n_items,
        "side_vocabulary": side_vocabulary,
        "optimizer": type(runs["train_default"][1]).__name__,
        "ms_per_step": {**{k: round(v, 1) for k, v in ms.items()}, "ratio": round(ms["train_default"] / ms["adam_every_row"], 3)},
        "top50_seconds": round(evaluation_s, 3),
        "top50_users": users,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def run(sizes: list[int], side_vocabulary: int, tokens_per_item: int, steps: int, users: int, sparse_item_rows: int) -> list[dict]:
    reports = []
    for n_items in sizes:
        r = bench_catalog(n_items, side_vocabulary, tokens_per_item, steps, users, sparse_item_rows)
        reports.append(r)
        ms = r["ms_per_step"]
        print(f"{n_items:>10,} items, {side_vocabulary:,} side tokens: {r['optimizer']} {ms['train_default']:.1f} ms/step vs Adam over "
              f"every row {ms['adam_every_row']:.1f} ms/step -> {ms['ratio']:.3f}; top-50 of {users:,} users over the catalog "
              f"{r['top50_seconds']:.2f} s; peak RSS {r['peak_rss_mb']:,} MB")
    print(json.dumps(reports))
    return reports
