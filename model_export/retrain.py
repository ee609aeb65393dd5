"""Incremental retraining: new events from the stream -> a fine-tuned, judged, published model version.

    python -m model_export retrain [--schedule]

  1. read    the events that arrived since the recorded offsets, with retraining's own consumer
             group, into the event log (event_log.py); the offsets go into the new manifest
  2. grow    the item vocabulary: an item first seen in the stream with >= min_new_item_events
             events gets the next free index. Existing items keep theirs, so ids are stable
             across versions (the Milvus primary key, the feature store windows' raw ids)
  3. merge   the base dataset's sequences and the log, per user by event time; an interaction the
             base already holds (same user, item and time, e.g. a replay) is not counted twice
  4. split   the newest `holdout_fraction` of the new events (by event time) is held out
  5. tune    warm start from the current version's weights. A new item starts at the mean vector
             of the items that preceded it in the stream (where it came from), then every weight
             is fine-tuned on the new samples plus as many replayed older ones (against forgetting)
  6. judge   Recall@50 on the holdout: the candidate against the current version (which cannot
             retrieve the new items); refused when below current x (1 - tolerance), saying so
  7. ship    export -> publish (new Milvus collection, alias swap, registry CURRENT: the streaming
             job hot-reloads the tower) -> backfill every stored user's interests -> retire the
             versions no stored interest refers to any more (their collection and registry copy)

The samples, histories and evaluation are the ones of offline training (data.py, train.py,
evaluate.py): the merged data is a SequenceDataset like any other.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import fcntl
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from infra.cli import UserError
from model_export.data import EvalCases, SequenceDataset, ragged_arange, gather_histories, load_dataset
from model_export.evaluate import evaluate_model
from model_export.event_log import EventLog
from model_export.export import export_model, exported_model
from model_export.manifest import Manifest
from model_export.sampled_softmax import NegativeSampler
from model_export.spec import ModelSpec
from model_export.train import SELECTION_METRIC, TrainConfig, build_model, build_optimizer, run_epoch

NEW_ITEM_INIT_STD = 0.1  # a new item never preceded by a known item starts like a fresh embedding


class RetrainError(UserError, RuntimeError):
    """Retraining cannot start or continue; the message says what to do."""


class RefreshIncomplete(Exception):
    """A refresh published its version (now current) but stopped before its backfill or retire ended."""

    def __init__(self, message: str, model_version: str):
        super().__init__(message)
        self.model_version = model_version


# ----------------------------------------------------------------------------- lineage


@dataclass(frozen=True)
class HeldOut:
    """A version's holdout: the events of the log it was judged on and never trained on, which the
    next run counts as new. Kept exactly, as runs of log indices. Versions retrained before that kept
    only a cut (the lowest held-out index, the cut's event time in ms and log index: the events from
    that index on, at or after the cut), which also takes for held out the events an earlier version
    trained on once a run's cut moved back before them (late-dated events): read as before."""

    runs: tuple[tuple[int, int], ...] | None = None  # [start, stop) log indices, ascending, disjoint
    cut: tuple[int, int, int] | None = None

    @classmethod
    def of_indices(cls, log_indices: np.ndarray) -> "HeldOut":
        """The runs of a set of log indices (a holdout is mostly the log's newest stretch: a few runs)."""
        indices = np.unique(log_indices)
        if len(indices) == 0:
            return cls(runs=())
        breaks = np.flatnonzero(np.diff(indices) != 1) + 1
        starts, stops = indices[np.r_[0, breaks]], indices[np.r_[breaks - 1, len(indices) - 1]] + 1
        return cls(runs=tuple(zip(starts.tolist(), stops.tolist())))

    def covers(self, log_index: np.ndarray, times: np.ndarray, trained_log_events: int) -> np.ndarray:
        """Which of these events (log index, event time; -1: a base dataset event) the holdout holds."""
        if self.runs is not None:
            runs = np.asarray(self.runs, dtype=np.int64).reshape(-1, 2)
            at = np.searchsorted(runs[:, 0], log_index, side="right") - 1
            return (at >= 0) & (log_index < runs[np.maximum(at, 0), 1])  # a base event (-1) precedes every run
        first, cut_ms, cut_log_event = self.cut
        return (log_index >= first) & (log_index < trained_log_events) & held_out_at(times, log_index, cut_ms, cut_log_event)


@dataclass(frozen=True)
class Lineage:
    """What a version was trained on: the base dataset and how much of the event log."""

    source: str  # load_dataset argument of the base dataset (ml-1m, beauty, a path)
    base_fingerprint: str
    log_events: int  # the first `log_events` events of the log are in this version's training data ...
    held_out: HeldOut | None = None  # ... but for its holdout. None: a version not retrained
    log_digest: str = ""  # of those first `log_events` events (log_digest()): "" for versions before it was kept

    @classmethod
    def of(cls, manifest: Manifest) -> "Lineage":
        retrained = manifest.extra.get("retrain")
        if retrained:
            held_out = None
            if "held_out_log_runs" in retrained:
                held_out = HeldOut(runs=tuple((int(start), int(stop)) for start, stop in retrained["held_out_log_runs"]))
            elif "holdout_cut_ms" in retrained:  # cut log event 0: every tie at the cut time held, as before it was kept
                held_out = HeldOut(cut=(int(retrained.get("new_from_log_event", 0)), int(retrained["holdout_cut_ms"]),
                                        int(retrained.get("holdout_cut_log_event", 0))))
            return cls(retrained["source"], retrained["base_fingerprint"], int(retrained["log_events"]), held_out, retrained.get("log_digest", ""))
        return cls(manifest.dataset.get("source", manifest.dataset["name"]), manifest.dataset["fingerprint"], 0)


def log_digest(log: EventLog, n: int) -> str:
    """What the first n events of the log are (user, item, time, in order): lineage counts events by
    their place in the log, so a version's place must be read against the same log, not another
    state folder's, whose events may interleave the partitions in another order."""
    key = hashlib.sha256()
    for column in (log.users[:n], log.items[:n]):  # each id, not the array's bytes: its width grows with the longest id logged
        key.update("\0".join(column.tolist()).encode())
        key.update(b"|")
    key.update(np.ascontiguousarray(log.times_ms[:n], dtype="<i8").tobytes())
    return key.hexdigest()[:16]


def check_log(lineage: Lineage, log: EventLog, version: str, state_dir: Path) -> None:
    """RetrainError unless `log` starts with the events `version` was trained on."""
    if lineage.log_events > len(log):
        raise RetrainError(f"{version} was trained on {lineage.log_events:,} logged events but {state_dir} holds "
                           f"{len(log):,}: restore the retraining state folder ([retrain].state_dir) it was trained with")
    if lineage.log_digest and log_digest(log, lineage.log_events) != lineage.log_digest:
        raise RetrainError(f"the event log in {state_dir} does not start with the {lineage.log_events:,} events {version} was trained on "
                           "(another state folder's log, or one rebuilt since): point [retrain].state_dir at the folder that "
                           "version's retraining used, or publish a model trained offline and retrain from it")


# ----------------------------------------------------------------------------- pure data preparation


def grow_vocabulary(vocabulary: list[str], log_items: np.ndarray, min_events: int) -> list[str]:
    """Items of the log not in the vocabulary with >= min_events events, in order of first appearance."""
    known = set(vocabulary)
    counts: dict[str, int] = {}
    order: list[str] = []
    for item in log_items.tolist():
        if item in known:
            continue
        if item not in counts:
            order.append(item)
            counts[item] = 0
        counts[item] += 1
    return [item for item in order if counts[item] >= min_events]


@dataclass
class IncrementalData:
    data: SequenceDataset  # base + log over the grown vocabulary; train_users = everyone, test_users = holdout users
    parent_items: int  # n_items of the version being fine-tuned
    new_items: list[str]  # raw ids that got indices parent_items + 1 ...
    new_samples: tuple[np.ndarray, np.ndarray]  # (users, positions) whose target is a new event before the cut
    old_samples: tuple[np.ndarray, np.ndarray]  # older targets: base training users and earlier log events
    holdout: EvalCases  # history before the cut, targets = held-out new events
    holdout_parent: EvalCases  # the same users and targets, histories without the items the parent does not know
    training_counts: np.ndarray  # [n_items + 1] interactions per item outside the holdout: the negative sampler's popularity
    cut_ms: int  # holdout = new events at or after (cut_ms, cut_log_event) in (event time, log index) order
    cut_log_event: int
    held_out: HeldOut  # the holdout's log events, exactly: the next run's Lineage.held_out
    log_events: int  # events of the log this data includes


def held_out_at(times: np.ndarray, log_index: np.ndarray, cut_ms: int, cut_log_event: int) -> np.ndarray:
    """Which events lie at or after the cut in (event time, log index) order."""
    return (times > cut_ms) | ((times == cut_ms) & (log_index >= cut_log_event))


def merge_with_log(base: SequenceDataset, log: EventLog, vocabulary: list[str], item_side: list[list[str]], parent_items: int,
                   trained_log_events: int, holdout_fraction: float, fingerprint: str,
                   parent_held_out: HeldOut | None = None) -> IncrementalData:
    """vocabulary / item_side: the grown item list (raw ids, side tokens), the parent's `parent_items` first;
    parent_held_out: Lineage.held_out of the parent."""
    index = {raw: i + 1 for i, raw in enumerate(vocabulary)}
    base_to_vocab = np.array([0] + [index[raw] for raw in base.item_ids[1:].tolist()], dtype=np.int64)
    lengths = np.diff(base.seq_offsets)
    base_frame = pd.DataFrame({
        "user": np.repeat(base.user_ids, lengths),
        "item": base_to_vocab[base.seq_items],
        "ts": base.seq_times,
        "log_index": -1,
        "base_train": np.repeat(np.isin(np.arange(base.n_users), base.train_users), lengths),
    })
    log_items = np.array([index.get(raw, 0) for raw in log.items.tolist()], dtype=np.int64)
    log_frame = pd.DataFrame({"user": log.users, "item": log_items, "ts": log.times_ms, "log_index": np.arange(len(log)), "base_train": False})
    log_frame = log_frame[log_frame["item"] > 0]  # items still below min_new_item_events wait for the next run
    frame = pd.concat([base_frame, log_frame], ignore_index=True)
    frame["order"] = np.arange(len(frame))
    frame = frame.drop_duplicates(["user", "item", "ts"], keep="first")  # a replayed interaction counts once
    user_ids = np.array(sorted(frame["user"].unique()), dtype=str)
    frame = frame.assign(user_idx=pd.Categorical(frame["user"], categories=user_ids).codes.astype(np.int64))
    frame = frame.sort_values(["user_idx", "ts", "order"], kind="stable")
    counts = np.bincount(frame["user_idx"].to_numpy(), minlength=len(user_ids))
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    seq_items = frame["item"].to_numpy(np.int64)
    seq_times = frame["ts"].to_numpy(np.int64)
    log_index = frame["log_index"].to_numpy(np.int64)
    base_train = frame["base_train"].to_numpy(bool)

    # Every position p >= 1 of every sequence is a sample (target = item p, history = the items before).
    users = np.repeat(np.arange(len(user_ids)), np.maximum(counts - 1, 0))
    positions = ragged_arange(np.maximum(counts - 1, 0)) + 1
    flat = offsets[users] + positions
    # New: past the events the parent was trained on, or of an item the parent has no row for (its
    # earlier events waited, below min_new_item_events, while the parent's runs moved past them).
    is_new = (log_index[flat] >= trained_log_events) | ((log_index[flat] >= 0) & (seq_items[flat] > parent_items))
    if parent_held_out is not None:  # the parent's holdout: judged on, never trained on
        is_new |= parent_held_out.covers(log_index[flat], seq_times[flat], trained_log_events)
    new_flat = flat[is_new]
    if len(new_flat) == 0:
        raise RetrainError("no new interaction to learn from: every new event repeats one the model was trained on")
    # The cut is the (1 - holdout_fraction) quantile in (event time, log index) order: by time alone,
    # events sharing a time (a bulk import, clocks in whole seconds) could all fall in the holdout.
    by_time = new_flat[np.lexsort((log_index[new_flat], seq_times[new_flat]))]
    cut_at = by_time[int(np.ceil((len(by_time) - 1) * (1.0 - holdout_fraction)))]
    cut_ms, cut_log_event = int(seq_times[cut_at]), int(log_index[cut_at])
    held = is_new & held_out_at(seq_times[flat], log_index[flat], cut_ms, cut_log_event)
    fresh = is_new & ~held
    old = ~is_new & ((log_index[flat] >= 0) | base_train[flat])

    # Holdout: per user, history = everything before the first held-out position, targets = the held-out items.
    first_held: dict[int, int] = {}
    targets: dict[int, list[int]] = {}
    for u, p in zip(users[held].tolist(), positions[held].tolist()):
        first_held.setdefault(u, p)
        targets.setdefault(u, []).append(int(seq_items[offsets[u] + p]))
    holdout_users = np.array(sorted(first_held), dtype=np.int64)
    in_holdout = np.zeros(len(seq_items), dtype=bool)
    in_holdout[flat[held]] = True

    data = SequenceDataset(
        name=base.name, fingerprint=fingerprint,
        item_ids=np.array(["<pad>", *vocabulary], dtype=str), user_ids=user_ids,
        seq_offsets=offsets, seq_items=seq_items, seq_times=seq_times,
        train_users=np.arange(len(user_ids), dtype=np.int64), valid_users=np.array([], dtype=np.int64), test_users=holdout_users,
        item_side=_side_matrix(item_side, base.side_vocab), side_vocab=base.side_vocab,
        user_profile=_profiles(base, user_ids, log.profiles), profile_fields=base.profile_fields,
        profile_cardinalities=base.profile_cardinalities, profile_vocab=base.profile_vocab,
    )
    # The gate compares both models on the same users: those the parent can read some history of
    # (every item the parent knows, the candidate knows too).
    parent_cases = _holdout_cases(data, holdout_users, first_held, targets, max_item=parent_items)
    return IncrementalData(
        data=data, parent_items=parent_items, new_items=vocabulary[parent_items:],
        new_samples=(users[fresh], positions[fresh]), old_samples=(users[old], positions[old]),
        holdout=_holdout_cases(data, parent_cases.users, first_held, targets, max_item=len(vocabulary)),
        holdout_parent=parent_cases,
        training_counts=np.bincount(seq_items[~in_holdout], minlength=len(vocabulary) + 1),
        cut_ms=cut_ms, cut_log_event=cut_log_event, held_out=HeldOut.of_indices(log_index[flat[held]]), log_events=len(log),
    )


def _holdout_cases(data: SequenceDataset, users: np.ndarray, first_held: dict[int, int], targets: dict[int, list[int]], max_item: int) -> EvalCases:
    """Histories use only items <= max_item (a model cannot read items it has no row for); users left
    with an empty history are not evaluated."""
    kept, histories, target_lists = [], [], []
    for u in users.tolist():
        before = data.seq_items[data.seq_offsets[u] : data.seq_offsets[u] + first_held[u]]
        before = before[before <= max_item]
        if len(before):
            kept.append(u)
            histories.append(before)
            target_lists.append(targets[u])
    return EvalCases.from_lists(kept, histories, target_lists)


def clip_history(cases: EvalCases, maxlen: int) -> EvalCases:
    """The newest maxlen items of each history, right-padded: what the user tower reads."""
    if len(cases.users) == 0:
        return dataclasses.replace(cases, history=np.zeros((0, maxlen), dtype=np.int64))
    keep = np.minimum(cases.lengths, maxlen)
    cols = np.arange(maxlen)
    src = (cases.lengths - keep)[:, None] + cols[None, :]
    valid = cols[None, :] < keep[:, None]
    history = np.where(valid, np.take_along_axis(cases.history, np.minimum(src, cases.history.shape[1] - 1), axis=1), 0)
    return dataclasses.replace(cases, history=history.astype(np.int64), lengths=keep.astype(np.int64))


def _side_matrix(item_side: list[list[str]], side_vocab: np.ndarray) -> np.ndarray:
    lookup = {str(t): i for i, t in enumerate(side_vocab.tolist())}
    width = max([len(tokens) for tokens in item_side] + [1])
    out = np.zeros((len(item_side) + 1, width), dtype=np.int64)
    for i, tokens in enumerate(item_side, start=1):
        for j, token in enumerate(tokens):
            out[i, j] = lookup.get(token, 0)
    return out


def _profiles(base: SequenceDataset, user_ids: np.ndarray, log_profiles: dict[str, dict[str, str]]) -> np.ndarray:
    """Base users keep their dataset profile; users first seen in the stream get the profile of their events."""
    base_rows = {u: i for i, u in enumerate(base.user_ids.tolist())}
    fields = base.profile_fields.tolist()
    lookups = [{tok.split("=", 1)[1]: i for i, tok in enumerate(base.profile_vocab_for_field(f).tolist())} for f in range(len(fields))]
    out = np.zeros((len(user_ids), len(fields)), dtype=np.int64)
    for row, user in enumerate(user_ids.tolist()):
        if user in base_rows:
            out[row] = base.user_profile[base_rows[user]]
        elif user in log_profiles:
            out[row] = [lookups[f].get(log_profiles[user].get(name, ""), 0) for f, name in enumerate(fields)]
    return out


# ----------------------------------------------------------------------------- warm start


def grow_weights(state: dict[str, torch.Tensor], new_rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Appends rows for new items to the per-item tables of the item embedding.

    new_rows [n_new, D]: the id-embedding rows of the new items; the per-item side-token tables get
    empty rows: a new item has no side tokens."""
    grown = dict(state)
    grown["items.ids.weight"] = torch.cat([state["items.ids.weight"], new_rows.to(state["items.ids.weight"].dtype)], dim=0)
    for name in ("items.side_tokens", "items.side_weights"):  # by name: the side-token table may have as many rows as there are items
        if name in state:
            table = state[name]
            grown[name] = torch.cat([table, table.new_zeros((len(new_rows), table.shape[1]))], dim=0)
    return grown


def new_item_rows(item_vectors: torch.Tensor, data: SequenceDataset, samples: tuple[np.ndarray, np.ndarray], parent_items: int,
                  n_new: int, maxlen: int, seed: int) -> torch.Tensor:
    """[n_new, D]: each new item's mean of the (parent) item vectors in the windows that preceded it."""
    dim = item_vectors.shape[1]
    sums = np.zeros((n_new, dim), dtype=np.float64)
    counts = np.zeros(n_new, dtype=np.int64)
    users, positions = samples
    targets = data.seq_items[data.seq_offsets[users] + positions]
    is_new = targets > parent_items
    if is_new.any():
        hist, _ = gather_histories(data, users[is_new], positions[is_new], maxlen)
        known = (hist > 0) & (hist <= parent_items)
        vectors = item_vectors.detach().numpy()
        context = (vectors[np.where(known, hist, 0)] * known[..., None]).sum(1)  # [S, D]
        n = known.sum(1)
        rows = targets[is_new] - parent_items - 1
        np.add.at(sums, rows, context)
        np.add.at(counts, rows, n)
    rng = np.random.default_rng(seed)
    out = rng.normal(0.0, NEW_ITEM_INIT_STD, size=(n_new, dim))
    seen = counts > 0
    out[seen] = sums[seen] / counts[seen, None]
    return torch.as_tensor(out, dtype=torch.float32)


# ----------------------------------------------------------------------------- fine-tuning and judging


@dataclass
class Verdict:
    accepted: bool
    candidate: dict[str, float]
    current: dict[str, float]
    reason: str


def judge(candidate: dict[str, float], current: dict[str, float], tolerance: float, metric: str = SELECTION_METRIC) -> Verdict:
    floor = current[metric] * (1.0 - tolerance)
    if candidate[metric] >= floor:
        return Verdict(True, candidate, current, f"holdout {metric} {candidate[metric]:.4f} >= {floor:.4f} (current {current[metric]:.4f} - {tolerance:.0%})")
    return Verdict(False, candidate, current, f"holdout {metric} {candidate[metric]:.4f} is below {floor:.4f}: the current model scores "
                                              f"{current[metric]:.4f} and the tolerance is {tolerance:.0%}; the current version stays")


def fine_tune(parent_spec: ModelSpec, parent: torch.nn.Module, inc: IncrementalData, settings, seed: int = 2019,
              device: str = "cpu", progress: bool = True) -> tuple[ModelSpec, torch.nn.Module, list[dict]]:
    """parent: the current version's model (left unchanged). settings: the [retrain] configuration
    (epochs, lr, batch_size, replay_ratio, sparse_item_rows). Returns the grown spec, the fine-tuned model and per-epoch records."""
    data = inc.data
    spec = dataclasses.replace(parent_spec, n_items=data.n_items)
    rows = new_item_rows(parent.item_vectors(), data, inc.new_samples, inc.parent_items, len(inc.new_items), spec.maxlen, seed)
    torch.manual_seed(seed)
    model = build_model(spec, torch.as_tensor(data.item_side)).to(device)
    model.load_state_dict(grow_weights(parent.state_dict(), rows))
    config = TrainConfig(dataset=data.name, model=spec.kind, seed=seed, epochs=settings.epochs, batch_size=settings.batch_size,
                         lr=settings.lr, sparse_item_rows=settings.sparse_item_rows, device=device, dataset_fingerprint=data.fingerprint)
    optimizer = build_optimizer(model, config)
    sampler = NegativeSampler(torch.as_tensor(inc.training_counts), config.sampler_alpha, device)  # the holdout stays unseen
    rng = np.random.default_rng(seed)
    new_users, new_positions = inc.new_samples
    old_users, old_positions = inc.old_samples
    n_replay = min(len(old_users), int(round(settings.replay_ratio * len(new_users))))
    records = []
    for epoch in range(1, settings.epochs + 1):
        replay = rng.choice(len(old_users), size=n_replay, replace=False) if n_replay else np.zeros(0, dtype=np.int64)
        users = np.concatenate([new_users, old_users[replay]])
        positions = np.concatenate([new_positions, old_positions[replay]])
        started = time.perf_counter()
        loss, steps = run_epoch(model, optimizer, sampler, data, users, positions, config, rng, spec.maxlen,
                                desc=f"fine-tune epoch {epoch}", progress=progress)
        records.append({"epoch": epoch, "loss": loss, "steps": steps, "samples": len(users), "seconds": time.perf_counter() - started})
        if progress:
            print(f"fine-tune epoch {epoch}: {len(users):,} samples ({len(new_users):,} new), loss {loss:.4f}, "
                  f"{records[-1]['seconds']:.1f}s", file=sys.stderr, flush=True)
    model.eval()
    return spec, model, records


def evaluate_holdout(model: torch.nn.Module, inc: IncrementalData, maxlen: int, parent: bool = False) -> dict[str, float]:
    cases = clip_history(inc.holdout_parent if parent else inc.holdout, maxlen)
    return evaluate_model(model, inc.data, cases)


def load_parent(export_dir: Path, manifest: Manifest) -> tuple[ModelSpec, torch.nn.Module]:
    """The published version's model, from the weights its export carries (eval mode)."""
    if "weights" not in manifest.files:
        raise RetrainError(f"{export_dir} has no weights.pt (exported by an older version): re-export the run with "
                           f"`python -m model_export export` and publish it, then retrain")
    return exported_model(export_dir, manifest)


def dataset_fingerprint(base_fingerprint: str, log: EventLog, vocabulary_size: int) -> str:
    key = hashlib.sha256(f"{base_fingerprint}:{len(log)}:{vocabulary_size}:{log.offsets}".encode())
    return key.hexdigest()[:16]


def prepare(base: SequenceDataset, log: EventLog, parent_vocab: dict, lineage: Lineage, settings) -> IncrementalData:
    """The merged data over the parent's vocabulary grown by the log's new items. A new item none of
    whose events is a training target (all held out, or first in their users' sequences) waits for
    the next run: it would be published with its random initial vector."""
    parent_items = len(parent_vocab["items"])
    new_items = grow_vocabulary(parent_vocab["items"], log.items, settings.min_new_item_events)
    while True:
        vocabulary = [*parent_vocab["items"], *new_items]
        item_side = [*parent_vocab["item_side"], *([[]] * len(new_items))]
        inc = merge_with_log(base, log, vocabulary, item_side, parent_items, lineage.log_events, settings.holdout_fraction,
                             dataset_fingerprint(lineage.base_fingerprint, log, len(vocabulary)), lineage.held_out)
        users, positions = inc.new_samples
        learned = np.bincount(inc.data.seq_items[inc.data.seq_offsets[users] + positions], minlength=len(vocabulary) + 1)[parent_items + 1:]
        if learned.all():
            return inc
        new_items = [item for item, n in zip(new_items, learned.tolist()) if n]  # another cut may leave another item unlearned


KEPT_RUNS = 5  # run folders kept in [retrain].state_dir/runs (a published run's export is copied into the registry)


def run_dir_for(state_dir: Path) -> Path:
    """A new run's folder; the oldest beyond the newest KEPT_RUNS - 1 go (each holds a model and its export)."""
    runs = state_dir / "runs"
    if runs.is_dir():
        for old in sorted(p for p in runs.iterdir() if p.is_dir())[: -(KEPT_RUNS - 1) or None]:
            shutil.rmtree(old, ignore_errors=True)
    return runs / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def save_run(run_dir: Path, spec: ModelSpec, model: torch.nn.Module, inc: IncrementalData, source: str, report: dict, settings) -> None:
    """A run directory like offline training's, so export_model reads it the same way; train.json
    holds the fine-tuning's own settings ([retrain])."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec.save(run_dir / "spec.json")
    torch.save(model.state_dict(), run_dir / "model.pt")
    config = TrainConfig(dataset=source, model=spec.kind, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                         sparse_item_rows=settings.sparse_item_rows, dataset_fingerprint=inc.data.fingerprint)
    (run_dir / "train.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    (run_dir / "history.json").write_text(json.dumps(report, indent=2, default=str))


def base_dataset(lineage: Lineage, paths) -> SequenceDataset:
    base = load_dataset(lineage.source, paths.data_dir, paths.cache_dir, paths.shared_data_dir)
    if base.fingerprint != lineage.base_fingerprint:
        raise RetrainError(f"the base dataset {lineage.source!r} changed since the current model was trained "
                           f"(fingerprint {base.fingerprint}, expected {lineage.base_fingerprint}): restore it, or train a new base model "
                           "(an unchanged file reads differently after a change of the preprocessing: PREPROCESS_VERSION in model_export/data.py)")
    return base


# ----------------------------------------------------------------------------- one retraining, end to end


class Stages:
    """Seconds per stage of a refresh: each lap closes the stage that ran since the previous one."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._since = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._since, 2)
        self._since = now


def retrain_once(config, publish_model: bool = True, progress: bool = True) -> dict:
    """read -> grow -> merge -> tune -> judge -> export -> publish -> backfill -> retire.

    Returns the report printed by `python -m model_export retrain`: status is "published",
    "refused" (the gate said no, or CURRENT moved away from the parent meanwhile; the reason is in
    it), "trained" (publish_model=False) or "skipped" (too few new events). One retraining at a time
    per state folder: two would append the same events to one log, and the last save would win."""
    state_dir = config.retrain.state_dir
    with state_lock(state_dir) as held:
        if not held:
            raise RetrainError(f"another retraining runs on {state_dir} (it holds {state_dir / '.retrain.lock'}): wait for it to finish "
                               "(a second state folder would keep a log of its own, which the versions of this one cannot be retrained from)")
        return _retrain_once(config, publish_model, progress)


@contextlib.contextmanager
def state_lock(state_dir: Path):
    """Holds the state folder's lock while the block runs; yields False (nothing held) when another
    process holds it. Whatever writes the event log takes it: a write beside a retraining's would
    replace the events that retraining appended."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".retrain.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held = False
        else:
            held = True
        yield held


def _retrain_once(config, publish_model: bool, progress: bool) -> dict:
    from model_export.event_log import commit_offsets, read_new_events
    from model_export.registry import CurrentMovedError, ModelRegistry

    say = (lambda m: print(m, file=sys.stderr, flush=True)) if progress else (lambda m: None)
    settings, paths = config.retrain, config.paths
    stages = Stages()
    registry = ModelRegistry(paths.models_dir)
    parent_dir = registry.current()
    parent = Manifest.load(parent_dir)
    lineage = Lineage.of(parent)
    log = EventLog.load(settings.state_dir)
    check_log(lineage, log, parent.model_version, settings.state_dir)
    say(f"==> reading new events from {config.kafka.events_topic} (group {settings.consumer_group})")
    read = read_new_events(config.kafka, config.kafka.events_topic, settings.consumer_group, log.offsets, settings.start_offsets,
                           progress=progress, max_event_bytes=config.streaming.max_event_bytes)
    added = log.append(read.events, read.offsets)
    log.save(settings.state_dir)
    try:  # the log, saved, is what the next read starts from; the group's offsets only show the lag
        commit_offsets(config.kafka, config.kafka.events_topic, settings.consumer_group, log.offsets)
        mirrored = True
    except Exception as exc:  # noqa: BLE001 - a coordinator moving, a broker restarting: the run goes on
        print(f"warning: the consumer group {settings.consumer_group} was not moved to the log's offsets ({type(exc).__name__}: {exc}); "
              "lag dashboards lag until the next retraining", file=sys.stderr, flush=True)
        mirrored = False
    stages.lap("read")
    report = {"parent": parent.model_version, "events_read": len(read.events) + sum(read.rejected.values()), "events_added": added,
              "rejected": dict(read.rejected), "log_events": len(log), "new_events": len(log) - lineage.log_events, "offsets": log.offsets,
              "offsets_mirrored": mirrored, "gaps": read.gaps}
    for gap in read.gaps:
        print(f"warning: {config.kafka.events_topic} {gap}", file=sys.stderr, flush=True)
    say(f"    {added:,} events added ({report['new_events']:,} new since {parent.model_version}; {sum(read.rejected.values())} invalid skipped)")
    if report["new_events"] < settings.min_new_events:
        return {**report, "status": "skipped", "reason": f"{report['new_events']:,} new events, fewer than [retrain].min_new_events = {settings.min_new_events:,}", "seconds": stages.seconds}

    say("==> merging the base dataset and the event log")
    base = base_dataset(lineage, paths)
    parent_vocab = json.loads(parent.file(parent_dir, "vocab").read_text())
    inc = prepare(base, log, parent_vocab, lineage, settings)
    if len(inc.holdout.users) == 0:
        return {**report, "status": "skipped", "reason": "no user has a held-out new event after some history: wait for more events", "seconds": stages.seconds}
    if len(inc.new_samples[0]) == 0:  # a candidate would be the parent's weights under a new version
        return {**report, "status": "skipped", "reason": "no new event to train on outside the holdout: wait for more events", "seconds": stages.seconds}
    report.update(new_items=len(inc.new_items), new_samples=len(inc.new_samples[0]), holdout_users=len(inc.holdout.users),
                  holdout_cut=dt.datetime.fromtimestamp(inc.cut_ms / 1000, dt.timezone.utc).isoformat())
    say(f"    {len(inc.new_samples[0]):,} new samples, {len(inc.new_items):,} new items, holdout: {len(inc.holdout.users):,} users from {report['holdout_cut']}")
    stages.lap("prepare")

    parent_spec, current_model = load_parent(parent_dir, parent)
    spec, model, epochs = fine_tune(parent_spec, current_model, inc, settings, progress=progress)
    stages.lap("train")
    verdict = judge(evaluate_holdout(model, inc, spec.maxlen), evaluate_holdout(current_model, inc, spec.maxlen, parent=True), settings.tolerance)
    stages.lap("judge")
    report.update(epochs=epochs, holdout={"candidate": verdict.candidate, "current": verdict.current}, verdict=verdict.reason)
    say(f"    {verdict.reason}")
    run_dir = run_dir_for(settings.state_dir)
    save_run(run_dir, spec, model, inc, lineage.source, report, settings)
    report["run_dir"] = str(run_dir)
    if not verdict.accepted:
        return {**report, "status": "refused", "reason": verdict.reason, "seconds": stages.seconds}

    say("==> exporting the candidate")
    lineage_record = {"parent": parent.model_version, "source": lineage.source, "base_fingerprint": lineage.base_fingerprint,
                      "log_events": len(log), "log_digest": log_digest(log, len(log)), "offsets": {str(p): o for p, o in log.offsets.items()},
                      "topic": config.kafka.events_topic, "consumer_group": settings.consumer_group, "new_items": len(inc.new_items),
                      "holdout_cut_ms": inc.cut_ms, "holdout_cut_log_event": inc.cut_log_event, "held_out_log_runs": inc.held_out.runs,
                      "holdout": {"candidate": verdict.candidate, "current": verdict.current}}
    export_dir, manifest = export_model(run_dir, inc.data, run_dir / "export", source=lineage.source,
                                        metrics_cases=("holdout", clip_history(inc.holdout, spec.maxlen)), extra={"retrain": lineage_record})
    report["model_version"] = manifest.model_version
    stages.lap("export")
    if not publish_model:
        return {**report, "status": "trained", "export_dir": str(export_dir), "seconds": stages.seconds}
    try:
        return {**report, **refresh(config, export_dir, say, stages, expect_current=parent.model_version), "status": "published"}
    except CurrentMovedError as exc:  # an operator published or rolled back meanwhile: theirs stands
        return {**report, "status": "refused", "reason": str(exc), "seconds": stages.seconds}
    except RefreshIncomplete as exc:  # not "failed": the new version serves
        return {**report, "status": "published", "incomplete": str(exc), "model_version": exc.model_version, "seconds": stages.seconds}


def refresh(config, export_dir: Path, say, stages: "Stages", expect_current: str | None = None) -> dict:
    """Publish an export and bring the feature store over to it; old versions go once unreferenced.
    With `expect_current`, CurrentMovedError (nothing published) unless that version is still current."""
    from model_export.artifact import UserTower
    from model_export.publish import client_options, connect, publish_version, retire_unreferenced
    from model_export.registry import CurrentMovedError, ModelRegistry
    from streaming.backfill import backfill, current_moved_on, job_settle_s, stored_versions
    from streaming.feature_store import RedisFeatureStore

    registry = ModelRegistry(config.paths.models_dir)
    client = connect(config.milvus.uri, **client_options(config.milvus))
    say("==> publishing: new collection, alias swap, registry CURRENT (the streaming job hot-reloads)")
    try:
        published = publish_version(export_dir, registry, client, config.milvus.collection_prefix, progress=say, expect_current=expect_current)
    except CurrentMovedError:
        raise
    except Exception as exc:  # Milvus down, a full disk: nothing is current yet, and the export is kept
        raise RetrainError(f"publishing {export_dir} failed ({type(exc).__name__}: {exc}); the version before stays current: "
                           f"`python -m model_export publish --export-dir {export_dir}` publishes this candidate once the cause is fixed "
                           f"(the folder is deleted after {KEPT_RUNS - 1} more retrainings: [retrain].state_dir keeps {KEPT_RUNS} runs)") from exc
    stages.lap("publish")
    say("==> backfilling stored interests with the new user tower")
    try:
        store = RedisFeatureStore.from_config(config.redis, ttl_seconds=config.streaming.record_ttl_s, timeout_s=10.0)
        tower = UserTower.load(registry.path(published.model_version), prefer_gpu=True)
        # Until the streaming job's next look at CURRENT it still writes with the old tower: keep
        # passing that long, or the old version stays referenced and cannot be retired.
        filled = backfill(store, tower, batch=config.retrain.backfill_batch, settle_s=job_settle_s(config.streaming.model_poll_s),
                          superseded=current_moved_on(registry, published.model_version))  # a later publish takes over
        stages.lap("backfill")
        versions = stored_versions(store)
        retired = retire_unreferenced(registry, client, config.milvus.collection_prefix, set(versions), config.retrain.keep_previous)
        stages.lap("retire")
    except Exception as exc:  # noqa: BLE001 - the new version is live: say so, and what finishes the refresh
        stopped_at = "retire" if "backfill" in stages.seconds else "backfill"
        raise RefreshIncomplete(f"{published.model_version} is published and current, but the refresh stopped at its {stopped_at} "
                                f"({type(exc).__name__}: {exc}): `python -m streaming backfill` re-extracts the stored users, "
                                "and the next refresh retires the old versions", published.model_version) from exc
    if filled.superseded:
        say("    backfill stopped: another version was published meanwhile; a retraining's publish backfills the users itself, "
            "after a `model_export publish` run `python -m streaming backfill`")
    left = (f" (the last pass still found {filled.stale_in_last_pass:,} of another version: is the job's reload failing?)"
            if filled.stale_in_last_pass and not filled.superseded else "")
    say(f"    {filled.rewritten:,} records re-extracted{left}; retired {retired or 'nothing'}; stored versions now {dict(versions)}")
    return {"collection": published.collection, "items": published.items, "index": published.index_type,
            "backfill": dataclasses.asdict(filled), "stored_versions": dict(versions), "retired": retired,
            "seconds": {**stages.seconds, "total": round(sum(stages.seconds.values()), 2)}}


def retrain_due(settings, waiting: int, idle_s: float, since_attempt: int | None = None) -> str | None:
    """Why the scheduled mode should retrain now (None: not yet). `waiting` is the number of events
    the current version was not trained on (in the log, or still on the topic), `idle_s` the time
    since the last retraining (or the scheduler's start), `since_attempt` how many of them came after
    a last attempt that published nothing (refused, skipped, failed): the count trigger then waits
    for `every_events` more, or it would retrain again at every poll with the same events."""
    counted = waiting if since_attempt is None else since_attempt
    if settings.every_events > 0 and counted >= settings.every_events:
        return f"{counted:,} new events waiting (every_events = {settings.every_events:,})"
    if settings.every_minutes > 0 and idle_s >= settings.every_minutes * 60 and waiting >= settings.min_new_events:
        return f"{idle_s / 60:.1f} min since the last retraining, {waiting:,} new events waiting"
    return None


def run_schedule(config, publish_model: bool = True, poll_s: float = 10.0, runs: int = 0, progress: bool = True) -> dict:
    """Retrains whenever retrain_due says so; prints one JSON report per line. A failed look at the
    topic or a failed retraining is reported and the schedule goes on (a scheduler that dies with
    the first broker hiccup refreshes nothing). runs > 0 stops after that many retrainings and
    returns the last one's report."""
    from model_export.event_log import pending_events
    from model_export.registry import ModelRegistry

    settings = config.retrain
    registry = ModelRegistry(config.paths.models_dir)
    if settings.every_events <= 0 and settings.every_minutes <= 0:
        raise RetrainError("scheduled mode needs [retrain].every_events or [retrain].every_minutes "
                           "(e.g. MINDSTREAM_RETRAIN__EVERY_MINUTES=30)")
    last = time.monotonic()
    # (the current version's logged events trained on, every event logged or on the topic) when the last
    # attempt published nothing: counted from there while that version stays current, not after a publish
    unpublished_at: tuple[int, int] | None = None
    report: dict = {}
    done = 0
    while runs == 0 or done < runs:
        try:
            log = EventLog.load(settings.state_dir)
            on_topic, counted_from = pending_events(config.kafka, config.kafka.events_topic, settings.consumer_group, log.offsets, settings.start_offsets)
            unrecorded = {p: o for p, o in counted_from.items() if p not in log.offsets}
            if unrecorded:  # the first look fixes where the log starts: "latest" would move with the topic's end
                with state_lock(settings.state_dir) as held:
                    if held:  # else a retraining runs and records where it read from
                        log = EventLog.load(settings.state_dir)
                        log.append([], {p: o for p, o in unrecorded.items() if p not in log.offsets})
                        log.save(settings.state_dir)
            # Logged but untrained events count too: those of a run that was skipped, refused or failed.
            trained = Lineage.of(Manifest.load(registry.current(), verify=False)).log_events
            seen = len(log) + on_topic  # grows with the topic only: a retraining moves events from the topic into the log
            waiting = seen - trained
        except Exception as exc:  # noqa: BLE001 - the broker may be restarting; look again next poll
            print(f"warning: could not count the new events ({type(exc).__name__}: {exc}); looking again in {poll_s:g} s", file=sys.stderr, flush=True)
            time.sleep(poll_s)
            continue
        since_attempt = seen - unpublished_at[1] if unpublished_at is not None and unpublished_at[0] == trained else None
        reason = retrain_due(settings, waiting, time.monotonic() - last, since_attempt)
        if reason is None:
            time.sleep(poll_s)
            continue
        print(f"==> retraining: {reason}", file=sys.stderr, flush=True)
        try:
            report = retrain_once(config, publish_model, progress)
        except Exception as exc:  # noqa: BLE001 - reported; the next due time tries again
            report = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
            print(f"error: retraining failed ({report['reason']}); the schedule goes on", file=sys.stderr, flush=True)
        print(json.dumps(report, default=str), flush=True)
        unpublished_at = None if report.get("status") == "published" else (trained, seen)
        last = time.monotonic()
        done += 1
    return report
