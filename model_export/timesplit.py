"""python -m model_export timesplit: does incremental retraining pay? MovieLens-1M split by time.

    earlier weeks  [start, --train-until)           the base model's training data (papers' protocol:
                                                     5-core, users split 80/10/10, early stopping)
    later weeks    [--train-until, --later-until)    the event stream: the incremental model is the
                                                     base model retrained on it by retrain.py's own
                                                     code (vocabulary growth, warm start, replay)
    last weeks     [--later-until, --test-until)     both models are evaluated here: each user with
                                                     events in these weeks and some history before
                                                     them; history = the newest maxlen items before
                                                     --later-until that the model has a vector for
                                                     (what the streaming job holds, less what the
                                                     earlier-weeks model cannot read), targets = all of
                                                     the user's items in the last weeks

Both models face the same users and the same targets: items a model has no vector for are misses
for it. Prints
Recall@50 and HitRate@50 (and @20, NDCG) of both and their ratio; writes timesplit.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from model_export.data import EvalCases, load_raw
from model_export.evaluate import evaluate_model
from model_export.event_log import EventLog
from model_export.retrain import Lineage, clip_history, evaluate_holdout, fine_tune, judge, prepare
from model_export.train import DATASET_DEFAULTS, TrainConfig, default_spec, load_model, train
from recall_service.merge import MISSING_ITEM
from streaming.producer import ReplayEvents


def _ms(date: str) -> int:
    return int(pd.Timestamp(date, tz="UTC").value // 1_000_000)


def write_period(raw, start_ms: int, stop_ms: int, path: Path) -> int:
    """The interactions of [start, stop) as a CSV load_dataset reads (user/item/timestamp + side columns)."""
    frame = raw.frame[(raw.frame.ts >= start_ms) & (raw.frame.ts < stop_ms)]
    table = pd.DataFrame({"user": frame.user, "item": frame.item, "timestamp": frame.ts,
                          "item_genre": ["|".join(raw.item_side.get(i, [])) for i in frame.item]})
    for col in raw.user_profile.columns:
        table[f"user_{col}"] = frame.user.map(raw.user_profile[col]).fillna("").to_numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return len(table)


def last_weeks(inc_data, raw, later_until_ms: int, test_until_ms: int) -> list[tuple[int, list[str], list[str]]]:
    """(user row of inc_data, raw items before --later-until, raw items in the last weeks) of every user
    of inc_data (base + later weeks) with events in the last weeks."""
    last = raw.frame[(raw.frame.ts >= later_until_ms) & (raw.frame.ts < test_until_ms)].sort_values("ts", kind="stable")
    row_of = {u: i for i, u in enumerate(inc_data.user_ids.tolist())}
    out = []
    for user, group in last.groupby("user", sort=True):
        if user in row_of:
            u = row_of[user]
            before = inc_data.seq_items[inc_data.seq_offsets[u] : inc_data.seq_offsets[u + 1]]
            out.append((u, inc_data.item_ids[before].tolist(), group.item.tolist()))
    return out


def model_cases(weeks: list[tuple[int, list[str], list[str]]], item_index: dict[str, int]) -> EvalCases:
    """One model's cases: histories keep the items it has a vector for; a target it has no vector for
    is a miss, under an id no item has (one per raw item, so distinct unknown targets stay distinct),
    below MISSING_ITEM too (the padding of a list shorter than n must not hit an unknown target)."""
    unknown: dict[str, int] = {}
    histories = [np.array([item_index[r] for r in before if r in item_index], dtype=np.int64) for _, before, _ in weeks]
    targets = [[item_index[r] if r in item_index else MISSING_ITEM - 1 - unknown.setdefault(r, len(unknown)) for r in items]
               for _, _, items in weeks]
    return EvalCases.from_lists([u for u, _, _ in weeks], histories, targets)


def timesplit_benchmark(model_kind: str, train_until: str, later_until: str, test_until: str, out: Path, epochs: int = 0, settings=None) -> dict:
    from infra.config import load_config

    config = load_config()
    settings = settings or config.retrain
    paths = config.paths
    raw = load_raw("ml-1m", paths.data_dir, paths.shared_data_dir)
    t1, t2, t3 = _ms(train_until), _ms(later_until), _ms(test_until)
    early_csv = out / "ml-1m-earlier.csv"
    n_early = write_period(raw, 0, t1, early_csv)
    later = raw.frame[(raw.frame.ts >= t1) & (raw.frame.ts < t2)].sort_values("ts", kind="stable")
    print(f"earlier weeks: {n_early:,} interactions before {train_until}; later weeks: {len(later):,} until {later_until}; "
          f"last weeks: {int(((raw.frame.ts >= t2) & (raw.frame.ts < t3)).sum()):,} until {test_until}", file=sys.stderr, flush=True)

    # The base model: trained on the earlier weeks only, the offline way.
    from model_export.data import load_dataset

    base = load_dataset(str(early_csv), paths.data_dir, paths.cache_dir, paths.shared_data_dir)
    base_dir = out / f"base-{model_kind}"
    defaults = DATASET_DEFAULTS["ml-1m"]
    spec = default_spec(model_kind, base, "ml-1m")  # ML-1M's earlier weeks: ML-1M's defaults (maxlen, REMI's beta), not a file's
    train(TrainConfig(dataset=str(early_csv), model=model_kind, epochs=epochs or defaults["epochs"], batch_size=defaults["batch_size"]),
          spec, base, base_dir, resume=True)
    spec, base_model = load_model(base_dir)

    # The incremental model: the later weeks as the event log, through retraining's own steps.
    log = EventLog()
    profiles = {str(u): {str(k): str(v) for k, v in row.items()} for u, row in raw.user_profile.to_dict("index").items()}
    stream = ReplayEvents(later.user.to_numpy(str), later.item.to_numpy(str), later.ts.to_numpy(np.int64), profiles)
    log.append(list(stream.events()), {0: len(later)})
    vocab = {"items": base.item_ids[1:].tolist(), "item_side": [[str(t) for t in base.side_vocab[row] if t != "<pad>"] for row in base.item_side[1:]]}
    lineage = Lineage(str(early_csv), base.fingerprint, 0)
    inc = prepare(base, log, vocab, lineage, settings)
    _, incremental, epochs_run = fine_tune(spec, base_model, inc, settings)
    verdict = judge(evaluate_holdout(incremental, inc, spec.maxlen), evaluate_holdout(base_model, inc, spec.maxlen, parent=True), settings.tolerance)

    # Both on the last weeks: the same users (those the base model can read some history of; every item it
    # knows, the retrained model knows too) and the same targets.
    base_index = {r: i + 1 for i, r in enumerate(vocab["items"])}
    grown_index = {r: i + 1 for i, r in enumerate(inc.data.item_ids[1:].tolist())}
    weeks = [w for w in last_weeks(inc.data, raw, t2, t3) if any(r in base_index for r in w[1])]
    results = {}
    for name, model, index in (("earlier_weeks_only", base_model, base_index), ("retrained_on_later_weeks", incremental, grown_index)):
        cases = clip_history(model_cases(weeks, index), spec.maxlen)
        results[name] = evaluate_model(model, inc.data, cases)
    report = {
        "model": model_kind, "periods": {"train_until": train_until, "later_until": later_until, "test_until": test_until},
        "interactions": {"earlier": n_early, "later": len(later)}, "evaluated_users": int(len(cases.users)),
        "new_items_from_stream": len(inc.new_items), "fine_tune_epochs": epochs_run, "retrain_gate": verdict.reason,
        "retrain_settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else dict(settings),
        "last_weeks": results,
        "ratio": {m: results["retrained_on_later_weeks"][m] / max(results["earlier_weeks_only"][m], 1e-12) for m in ("recall@50", "hitrate@50")},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "timesplit.json").write_text(json.dumps(report, indent=2, default=str))
    print(f"\nlast weeks ({later_until} .. {test_until}), {len(cases.users):,} users:")
    print(f"{'model':<28} {'Recall@50':>10} {'HitRate@50':>11} {'Recall@20':>10} {'NDCG@50':>9}")
    for name, m in results.items():
        print(f"{name:<28} {m['recall@50']:>10.4f} {m['hitrate@50']:>11.4f} {m['recall@20']:>10.4f} {m['ndcg@50']:>9.4f}")
    print(f"ratio retrained / earlier-only: Recall@50 {report['ratio']['recall@50']:.3f}, HitRate@50 {report['ratio']['hitrate@50']:.3f}")
    return report
