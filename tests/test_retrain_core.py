"""Retraining's pure steps, without servers: the event log, vocabulary growth, merging, warm start, the gate."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from infra.config import SPARSE_ITEM_ROWS
from model_export.data import load_dataset
from model_export.event_log import EventLog
from model_export.manifest import Manifest
from model_export.retrain import (
    HeldOut,
    Lineage,
    RetrainError,
    clip_history,
    evaluate_holdout,
    fine_tune,
    grow_vocabulary,
    grow_weights,
    judge,
    load_parent,
    new_item_rows,
    prepare,
    retrain_due,
    run_schedule,
)
from streaming.events import BehaviourEvent, encode_event

SETTINGS = SimpleNamespace(min_new_item_events=2, holdout_fraction=0.2, epochs=1, lr=1e-3, batch_size=64, replay_ratio=1.0,
                           sparse_item_rows=SPARSE_ITEM_ROWS)
NOW = 1_700_000_000_000


def event(user, item, t, event_id="", profile=None):
    return BehaviourEvent(user, item, "click", t, event_id=event_id, profile=profile or {})


def test_event_log_round_trips_and_ignores_redelivered_events(tmp_path):
    log = EventLog()
    assert log.append([event("u1", "a", 1, "e1", {"gender": "F"}), event("u2", "b", 2, "e2")], {0: 2}) == 2
    assert log.append([event("u1", "a", 1, "e1"), event("u3", "c", 3)], {0: 3, 1: 5}) == 1  # e1 again: a retry
    assert log.append([event("u3", "a", 4, "e1")], {0: 3, 1: 6}) == 1  # another user's e1: producers may number per user
    log.save(tmp_path)
    again = EventLog.load(tmp_path)
    assert again.users.tolist() == ["u1", "u2", "u3", "u3"] and again.items.tolist() == ["a", "b", "c", "a"]
    assert again.times_ms.tolist() == [1, 2, 3, 4] and again.offsets == {0: 3, 1: 6}
    assert again.profiles == {"u1": {"gender": "F"}}
    assert len(EventLog.load(tmp_path / "nothing")) == 0


def test_new_items_need_enough_events_and_keep_first_seen_order():
    log_items = np.array(["x", "known", "y", "x", "z", "y", "y"])
    assert grow_vocabulary(["known"], log_items, min_events=2) == ["x", "y"]
    assert grow_vocabulary(["known"], log_items, min_events=1) == ["x", "y", "z"]


@pytest.fixture
def base(synthetic_csv, tmp_path):
    return load_dataset(str(synthetic_csv), tmp_path / "data", tmp_path / "cache", tmp_path)


def stream_for(base, n_per_user=4, replays=20):
    """New events for every base user: known items; for users who like cluster 0 (items i0..i14)
    two cluster-0 items followed by a brand-new item "fresh"; a new user with a profile; and exact
    replays of base interactions (which must not count)."""
    rng = np.random.default_rng(1)
    cluster0 = {f"i{i}" for i in range(15)}
    events = []
    for u, user in enumerate(base.user_ids.tolist()):
        seq = base.sequence(u)
        likes_cluster0 = bool(cluster0 & set(base.item_ids[seq].tolist()))
        for j in range(n_per_user):
            t = NOW + 1000 * (j * len(base.user_ids) + u)
            if likes_cluster0 and j >= n_per_user - 3:
                item = "fresh" if j == n_per_user - 1 else f"i{rng.integers(15)}"
            else:
                item = str(base.item_ids[seq[rng.integers(len(seq))]])
            events.append(event(user, item, t, f"n{u}-{j}"))
    events += [event("newcomer", "i1", NOW + 10**9, "c1", {"gender": "F"}), event("newcomer", "i2", NOW + 10**9 + 1, "c2")]
    for u in range(replays):  # the same interactions as in the base dataset
        s = base.seq_offsets[u]
        events.append(event(str(base.user_ids[u]), str(base.item_ids[base.seq_items[s]]), int(base.seq_times[s]), f"r{u}"))
    log = EventLog()
    log.append(events, {0: len(events)})
    return log


def vocab_of(base):
    return {"items": base.item_ids[1:].tolist(), "item_side": [[str(t) for t in base.side_vocab[row] if t != "<pad>"] for row in base.item_side[1:]]}


def test_merge_keeps_ids_stable_counts_replays_once_and_holds_out_the_newest(base):
    log = stream_for(base)
    inc = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    data = inc.data
    assert data.item_ids[1 : base.n_items + 1].tolist() == base.item_ids[1:].tolist()  # old items keep their index
    assert inc.new_items == ["fresh"] and data.item_ids[base.n_items + 1] == "fresh" and inc.parent_items == base.n_items
    assert len(data.seq_items) == len(base.seq_items) + len(log) - 20  # the 20 replays were already there
    # every new event is a training sample or a held-out target, but the newcomer's first (it has no history)
    assert len(inc.new_samples[0]) + int(inc.holdout.target_offsets[-1]) == len(log) - 20 - 1
    held_times = [data.seq_times[data.seq_offsets[u]:data.seq_offsets[u + 1]].max() for u in inc.holdout.users]
    assert min(held_times) >= inc.cut_ms
    u_new = data.user_ids.tolist().index("newcomer")
    assert data.user_profile[u_new].tolist() == [base.profile_vocab_for_field(0).tolist().index("gender=F")]
    # the parent cannot read "fresh": its holdout histories leave it out, the candidate's keep it
    assert inc.holdout_parent.history.max() <= base.n_items
    assert data.item_side[base.n_items + 1].tolist() == [0] * data.item_side.shape[1]


def test_the_parents_held_out_events_are_new_samples_of_the_next_run(base):
    """A run is judged on its newest events and never trains on them; the next run must not take them for old."""
    users = base.user_ids.tolist()
    log = stream_for(base)
    first = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    held_by_first = int((log.times_ms >= first.cut_ms).sum())
    log.append([event(users[0], "i1", NOW + 2 * 10**9, "later-1"), event(users[1], "i2", NOW + 2 * 10**9 + 1, "later-2")], {0: len(log) + 2})

    def learned(held_out):
        run = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, first.log_events, held_out), SETTINGS)
        return len(run.new_samples[0]) + int(run.holdout.target_offsets[-1]), len(run.old_samples[0])

    without, old_without = learned(None)
    for held_out in (first.held_out, HeldOut(cut=(0, first.cut_ms, first.cut_log_event))):  # exact, and as versions before it kept it
        with_held, old_with = learned(held_out)
        assert 0 < with_held - without <= held_by_first and old_without - old_with == with_held - without
    # a retrained version's manifest names its holdout for the next run
    record = {"source": "x", "base_fingerprint": "f", "log_events": 7, "holdout_cut_ms": first.cut_ms, "holdout_cut_log_event": 5,
              "held_out_log_runs": [[3, 5], [6, 7]]}
    assert Lineage.of(SimpleNamespace(extra={"retrain": record})).held_out == HeldOut(runs=((3, 5), (6, 7)))
    del record["held_out_log_runs"]  # a version from before the exact holdout was kept: its cut
    record["new_from_log_event"] = 3
    assert Lineage.of(SimpleNamespace(extra={"retrain": record})).held_out == HeldOut(cut=(3, first.cut_ms, 5))
    del record["holdout_cut_log_event"]  # a version from before the tie-breaker: every event at the cut time was held out
    assert Lineage.of(SimpleNamespace(extra={"retrain": record})).held_out == HeldOut(cut=(3, first.cut_ms, 0))


def test_a_holdout_is_kept_as_runs_of_log_indices():
    held = HeldOut.of_indices(np.array([9, 3, 4, 5, 9, 12, 13]))
    assert held.runs == ((3, 6), (9, 10), (12, 14)) and HeldOut.of_indices(np.array([], dtype=np.int64)).runs == ()
    log_index = np.arange(-1, 16)
    assert log_index[held.covers(log_index, np.zeros_like(log_index), 16)].tolist() == [3, 4, 5, 9, 12, 13]


def test_events_sharing_one_time_are_split_by_the_cut(base):
    """A bulk import stamped with one time: cut by time alone, every new event was held out, the
    candidate trained on nothing and was published as a new version with its parent's weights."""
    users = base.user_ids.tolist()
    log = EventLog()
    bulk = [event(users[i % len(users)], f"i{1 + i % 7}", NOW, f"bulk-{i}") for i in range(600)]
    log.append(bulk, {0: len(bulk)})
    inc = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    held = int(inc.holdout.target_offsets[-1])
    new = len(inc.new_samples[0]) + int(held)
    assert inc.cut_ms == NOW and 0 < held <= 0.2 * new + len(users)  # the holdout's share, not every event
    assert len(inc.new_samples[0]) >= 0.75 * new
    # the next run rebuilds this holdout exactly: the same events held, the rest trained
    log.append([event(users[0], "i1", NOW + 10**6, "later")], {0: len(log) + 1})
    again = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, inc.log_events, inc.held_out), SETTINGS)
    assert len(again.old_samples[0]) - len(inc.old_samples[0]) == len(inc.new_samples[0])


def test_events_held_out_again_are_new_to_the_run_after_next(base):
    """A run's holdout can reach back past its parent's log (the parent's own held-out events, dated
    after this run's cut): the version records the lowest held-out index, so the run after it takes
    every one of them for new, not for trained."""
    log = stream_for(base)
    first = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    users = base.user_ids.tolist()
    # later-logged events dated before the first run's cut: the second run's cut falls among the first's holdout
    log.append([event(users[i % len(users)], "i1", first.cut_ms - 10 - i, f"back-{i}") for i in range(200)], {0: len(log) + 200})
    second = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, first.log_events, first.held_out), SETTINGS)
    held_of_second = [i for i in range(first.log_events) if log.times_ms[i] >= second.cut_ms and log.times_ms[i] >= first.cut_ms]
    assert held_of_second and second.held_out.runs[0][0] < first.log_events  # reaches back into the first run's log
    third = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, second.log_events, second.held_out), SETTINGS)
    users_, positions = third.old_samples
    old_log_times = set(third.data.seq_times[third.data.seq_offsets[users_] + positions].tolist())
    assert not {int(log.times_ms[i]) for i in held_of_second} & old_log_times  # none taken for trained


def test_events_a_version_trained_on_stay_old_two_runs_later(base):
    """Late-dated events can move a run's cut back before events its parent trained on; the run after
    it must still take those for trained. (Kept as a cut, the holdout covered every event from its
    lowest index on dated after the cut: those too, so they were fine-tuned on a second time and
    could be judged on.)"""
    users = base.user_ids.tolist()
    log = EventLog()
    # the first run's log: its first 20 events dated newest (its holdout), the 80 after them older (trained on)
    log.append([event(users[k % len(users)], f"i{k % 60}", NOW + 1_000 + k, f"a{k}") for k in range(20)]
               + [event(users[k % len(users)], f"i{(k * 7) % 60}", NOW + k, f"b{k}") for k in range(20, 100)], {0: 100})
    first = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    trained_by_first = sample_keys(first, first.new_samples)
    # the second run's events are dated before all of the first's: its cut falls before the first's training events
    log.append([event(users[k % len(users)], f"i{(k * 3) % 60}", NOW - 1_000 + k, f"c{k}") for k in range(100)], {0: 200})
    second = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, first.log_events, first.held_out), SETTINGS)
    assert second.cut_ms < NOW and trained_by_first and not trained_by_first & sample_keys(second, second.new_samples)
    log.append([event(users[k % len(users)], f"i{(k * 5) % 60}", NOW + 5_000 + k, f"d{k}") for k in range(10)], {0: 210})
    third = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, second.log_events, second.held_out), SETTINGS)
    assert not trained_by_first & sample_keys(third, third.new_samples)
    held_by_third = {(str(log.users[i]), int(log.times_ms[i])) for start, stop in third.held_out.runs for i in range(start, stop)}
    assert held_by_third and not trained_by_first & held_by_third  # nor judged on


def sample_keys(inc, samples) -> set[tuple[str, int]]:
    """(user, event time) of each sample's target."""
    users, positions = samples
    return {(str(inc.data.user_ids[u]), int(inc.data.seq_times[inc.data.seq_offsets[u] + p])) for u, p in zip(users.tolist(), positions.tolist())}


def test_a_new_item_with_no_training_sample_waits_for_the_next_run(base):
    """All of an item's events held out: no sample would move its row from the random initial vector,
    which would be published; the item waits, its events stay new for the next run."""
    log = stream_for(base)
    users = base.user_ids.tolist()
    late = max(log.times_ms.tolist()) + 1_000
    log.append([event(users[i], "launched-today", late + i, f"l{i}") for i in range(3)], {0: len(log) + 3})
    inc = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    assert "fresh" in inc.new_items and "launched-today" not in inc.new_items
    # logged later, dated before the holdout's cut: training samples of the next run
    log.append([event(users[i], "launched-today", inc.cut_ms - 5_000 + i, f"m{i}") for i in range(3)], {0: len(log) + 3})
    later = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, inc.log_events, inc.held_out), SETTINGS)
    assert "launched-today" in later.new_items


def test_a_log_that_is_not_the_one_a_version_counted_is_refused(tmp_path):
    """Lineage counts events by their place in the log; another state folder's log holds the same
    events in another order (partitions interleave differently), so counting there would skip some
    and train others twice."""
    from model_export.retrain import RetrainError, check_log, log_digest

    events = [event(f"u{i % 3}", f"i{i}", NOW + i, f"e{i}") for i in range(10)]
    mine, other = EventLog(), EventLog()
    mine.append(events, {0: 5, 1: 5})
    other.append(events[5:] + events[:5], {0: 5, 1: 5})
    lineage = Lineage("x", "f", 6, None, log_digest(mine, 6))
    check_log(lineage, mine, "v2", tmp_path)
    mine.append([event("a-much-longer-user-id", "an-item-id-longer-than-any", NOW + 99)], {0: 6})
    check_log(lineage, mine, "v2", tmp_path)  # grown since, by longer ids too: still the same first 6
    with pytest.raises(RetrainError, match="does not start with the 6 events v2 was trained on"):
        check_log(lineage, other, "v2", tmp_path)
    with pytest.raises(RetrainError, match="restore the retraining state folder"):
        check_log(lineage, EventLog(), "v2", tmp_path)
    check_log(Lineage("x", "f", 6), other, "v2", tmp_path)  # a version from before the digest: only the count


def test_events_of_an_item_that_waited_for_enough_events_count_as_new_when_it_gets_its_row(base):
    # Run 1 sees one event of "fresh" (below min_new_item_events): no row yet, but the run's
    # version records the whole log as trained. Run 2 sees the second: both are new samples of it.
    users = base.user_ids.tolist()
    log = stream_for(base)
    log.append([event(users[0], "brand-new", NOW + 10, "f1")], {0: len(log) + 1})  # dated early: a training sample, not held out
    first = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    assert "brand-new" not in first.new_items
    log.append([event(users[1], "brand-new", NOW + 20, "f2"), event(users[2], "i1", NOW + 10**9 + 30, "f3")], {0: len(log) + 2})
    second = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, first.log_events), SETTINGS)
    row = second.parent_items + second.new_items.index("brand-new") + 1
    data = second.data

    def targets(samples):
        users_, positions = samples
        return data.seq_items[data.seq_offsets[users_] + positions]

    learned = int((targets(second.new_samples) == row).sum()) + int((second.holdout.targets == row).sum())
    assert learned == 2 and int((targets(second.old_samples) == row).sum()) == 0


def test_the_gate_compares_both_models_on_the_same_users_and_the_sampler_never_sees_the_holdout(base):
    log = stream_for(base)
    late = NOW + 2 * 10**9  # after every other event: held out
    log.append([event("loner", "fresh", NOW + 10**9 + 5, "l1"), event("loner", "fresh", NOW + 10**9 + 6, "l2"),
                event("loner", "i3", late, "l3")], {0: len(log) + 3})
    inc = prepare(base, log, vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    data = inc.data
    loner = data.user_ids.tolist().index("loner")
    # the loner's history before its held-out event is only an item the parent has no row for
    assert loner not in inc.holdout_parent.users and loner not in inc.holdout.users
    assert inc.holdout.users.tolist() == inc.holdout_parent.users.tolist()
    assert np.array_equal(inc.holdout.targets, inc.holdout_parent.targets)
    assert data.seq_times.max() == late and base.seq_times.max() < inc.cut_ms
    first = np.zeros(len(data.seq_items), dtype=bool)
    first[data.seq_offsets[:-1][np.diff(data.seq_offsets) > 0]] = True  # a user's first event is nobody's target
    held = np.bincount(data.seq_items[(data.seq_times >= inc.cut_ms) & ~first], minlength=data.n_items + 1)
    assert np.array_equal(inc.training_counts + held, np.bincount(data.seq_items, minlength=data.n_items + 1))


def test_timesplit_cases_keep_readable_history_and_count_each_unknown_target_as_its_own_miss():
    from model_export.metrics import user_metrics
    from model_export.timesplit import model_cases
    from recall_service.merge import MISSING_ITEM

    weeks = [(0, ["a", "new1", "b"], ["new1", "new2", "a", "new1"])]
    cases = model_cases(weeks, {"a": 1, "b": 2})
    assert cases.history.tolist() == [[1, 2]] and cases.lengths.tolist() == [2]
    targets = cases.targets_of(0)
    assert targets[2] == 1 and (targets[[0, 1, 3]] < 0).all() and targets[0] == targets[3] != targets[1]
    assert user_metrics(np.array([1, 2]), targets, 2)[0] == pytest.approx(1 / 3)  # "a" found, new1 and new2 missed
    padded = np.array([1, MISSING_ITEM])  # a top list shorter than n ends with MISSING_ITEM: no unknown target is it
    assert MISSING_ITEM not in targets and user_metrics(padded, targets, 2)[0] == pytest.approx(1 / 3)
    grown = model_cases(weeks, {"a": 1, "b": 2, "new1": 3, "new2": 4})
    assert grown.history.tolist() == [[1, 3, 2]] and grown.targets.tolist() == [3, 4, 1, 3]


def test_grown_tables_keep_old_rows_and_start_new_items_from_their_context():
    state = {"items.ids.weight": torch.arange(12.0).reshape(4, 3), "items.side_tokens": torch.ones(4, 2, dtype=torch.int64),
             "items.side_weights": torch.full((4, 2), 0.5), "bilinear.weight": torch.eye(3)}
    grown = grow_weights(state, new_rows=torch.full((2, 3), 7.0))
    assert grown["items.ids.weight"].shape == (6, 3) and torch.equal(grown["items.ids.weight"][:4], state["items.ids.weight"])
    assert torch.equal(grown["items.ids.weight"][4:], torch.full((2, 3), 7.0))
    assert torch.equal(grown["items.side_tokens"][:4], state["items.side_tokens"]) and torch.equal(grown["bilinear.weight"], torch.eye(3))
    assert grown["items.side_tokens"][4:].eq(0).all() and grown["items.side_weights"][4:].eq(0).all()  # no side tokens
    # a side-token table with as many rows as there are items (one brand per item) is not an item table
    same_rows = {**state, "items.side.weight": torch.ones(4, 3)}
    assert torch.equal(grow_weights(same_rows, new_rows=torch.zeros(2, 3))["items.side.weight"], torch.ones(4, 3))

    # item 4 (new) follows items 1 and 2 once, and item 1 once: its start = mean of those three vectors
    data = SimpleNamespace(seq_offsets=np.array([0, 3, 5]), seq_items=np.array([1, 2, 4, 1, 4]))
    vectors = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [5.0, 5.0]])
    rows = new_item_rows(vectors, data, (np.array([0, 1]), np.array([2, 1])), parent_items=3, n_new=2, maxlen=5, seed=0)
    assert torch.allclose(rows[0], torch.tensor([2 / 3, 1.0]))
    assert rows[1].abs().max() < 1.0  # never preceded by a known item: a small random start


def test_the_gate_refuses_a_worse_candidate_and_says_why():
    assert judge({"recall@50": 0.195}, {"recall@50": 0.2}, tolerance=0.05).accepted
    refused = judge({"recall@50": 0.15}, {"recall@50": 0.2}, tolerance=0.05)
    assert not refused.accepted and "0.1500 is below 0.1900" in refused.reason and "current version stays" in refused.reason


def test_schedule_is_due_by_event_count_or_by_time_with_enough_events():
    by_events = SimpleNamespace(every_events=500, every_minutes=0.0, min_new_events=100)
    assert retrain_due(by_events, 499, 10_000) is None
    assert "500 new events" in retrain_due(by_events, 500, 0)
    assert retrain_due(by_events, 900, 0, since_attempt=400) is None  # the last attempt published nothing: 500 more
    assert "500 new events" in retrain_due(by_events, 1400, 0, since_attempt=500)
    by_time = SimpleNamespace(every_events=0, every_minutes=30.0, min_new_events=100)
    assert retrain_due(by_time, 10_000, 29 * 60) is None
    assert retrain_due(by_time, 99, 31 * 60) is None  # time is up but too little to learn from
    assert "31.0 min" in retrain_due(by_time, 100, 31 * 60)


def scheduler_config(tmp_path, export, start_offsets="earliest", **retrain):
    """A schedule's configuration over a registry whose current version is `export` (trained on no logged event)."""
    from model_export.registry import ModelRegistry

    registry = ModelRegistry(tmp_path / "models")
    registry.set_current(registry.install(export).model_version)
    settings = {"every_events": 500, "every_minutes": 0.0, "min_new_events": 100, "state_dir": tmp_path / "retrain",
                "consumer_group": "g", "start_offsets": start_offsets, **retrain}
    return SimpleNamespace(kafka=SimpleNamespace(events_topic="events"), paths=SimpleNamespace(models_dir=registry.root),
                           retrain=SimpleNamespace(**settings))


def test_the_schedule_outlives_a_broker_hiccup_and_a_failed_retraining(monkeypatch, two_exports, tmp_path, capsys):
    import model_export.event_log
    import model_export.retrain

    looks = iter([ConnectionError("broker restarting"), 10, 600, 700, 1100])

    def pending(*args):
        look = next(looks)
        if isinstance(look, Exception):
            raise look
        return look, {0: 0}

    outcomes = iter([RuntimeError("Milvus unreachable"), {"status": "published", "model_version": "v2"}])

    def retrain(config, publish_model, progress):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(model_export.event_log, "pending_events", pending)
    monkeypatch.setattr(model_export.retrain, "retrain_once", retrain)
    run_schedule(scheduler_config(tmp_path, two_exports[0]), poll_s=0, runs=2)
    out = capsys.readouterr()
    assert [json.loads(line)["status"] for line in out.out.splitlines()] == ["failed", "published"]
    assert "broker restarting" in out.err and "Milvus unreachable" in out.err
    # 10 waiting was not due; 600 was; after the failed attempt at 600, 700 was not (the same events
    # again, at every poll), 1100 was (every_events = 500 more)
    assert next(looks, None) is None


def test_after_a_publish_elsewhere_the_schedule_counts_from_that_version_again(monkeypatch, two_exports, tmp_path, capsys):
    """A scheduled attempt fails (a manual retraining holds the state folder), and that manual run
    publishes a version trained on every logged event: the count of events since the failed attempt
    was taken against the old version, so the next retraining came 1,100 new events later, not 500."""
    import model_export.event_log
    import model_export.retrain

    config = scheduler_config(tmp_path, two_exports[0])
    log = EventLog()
    log.append([event(f"u{i}", "a", i, f"e{i}") for i in range(600)], {0: 600})
    log.save(config.retrain.state_dir)
    trained = {"events": 0}
    monkeypatch.setattr(model_export.retrain.Lineage, "of", classmethod(lambda cls, manifest: Lineage("x", "f", trained["events"])))
    looks = iter([0] + [100 * k for k in range(1, 20)])  # new events on the topic at each look
    seen = []

    def pending(*args):
        seen.append(next(looks))
        return seen[-1], {0: 600}

    fired_at = []

    def retrain(config, publish_model, progress):
        fired_at.append(seen[-1])
        if len(fired_at) == 1:
            trained["events"] = 600  # the manual run that held the lock published, trained on all 600
            raise RetrainError("another retraining runs (it holds .retrain.lock)")
        return {"status": "published"}

    monkeypatch.setattr(model_export.event_log, "pending_events", pending)
    monkeypatch.setattr(model_export.retrain, "retrain_once", retrain)
    assert run_schedule(config, poll_s=0, runs=2)["status"] == "published"
    assert fired_at == [0, 500]  # 500 new events after the manual publish: every_events


class OnePartitionTopic:
    """The consumer calls the schedule makes, on one partition whose end grows by `grow` records per look."""

    def __init__(self, end, grow):
        self.end, self.grow = end, grow

    def partitions_for_topic(self, topic):
        return {0}

    def beginning_offsets(self, partitions):
        return {tp: 0 for tp in partitions}

    def end_offsets(self, partitions):
        return {tp: self.end for tp in partitions}

    def committed(self, tp):
        return None

    def close(self):
        self.end += self.grow


@pytest.mark.parametrize("start_offsets, logged, due_at_end", [
    ("latest", 0, 5_000 + 540),  # counted from the first look's end: due once 500 have arrived since
    ("earliest", 450, 450 + 60),  # 450 logged by a run that failed count: due 50 records later, not 500
])
def test_the_schedule_counts_every_event_the_current_version_was_not_trained_on(monkeypatch, two_exports, tmp_path, start_offsets, logged, due_at_end):
    import model_export.event_log
    import model_export.retrain

    config = scheduler_config(tmp_path, two_exports[0], start_offsets)
    log = EventLog()
    log.append([event(f"u{i}", "a", i, f"e{i}") for i in range(logged)], {0: logged} if logged else {})
    log.save(config.retrain.state_dir)
    topic = OnePartitionTopic(end=5_000 if start_offsets == "latest" else logged, grow=60)
    monkeypatch.setattr(model_export.event_log, "group_consumer", lambda kafka, group: topic)
    fired_at = []  # the topic's end as the look that found a retraining due saw it
    monkeypatch.setattr(model_export.retrain, "retrain_once", lambda config, publish_model, progress: fired_at.append(topic.end - topic.grow) or {"status": "published"})
    run_schedule(config, poll_s=0, runs=1, progress=False)
    assert fired_at == [due_at_end]


def test_the_schedule_leaves_the_log_to_a_retraining_that_holds_the_state_folder(monkeypatch, two_exports, tmp_path):
    """The scheduler's first look records where the log starts; while a retraining holds the lock
    (it appends events and saves the log) that write waits, or it would replace the retraining's log."""
    import fcntl

    import model_export.event_log
    import model_export.retrain

    config = scheduler_config(tmp_path, two_exports[0], "latest")
    topic = OnePartitionTopic(end=5_000, grow=600)
    monkeypatch.setattr(model_export.event_log, "group_consumer", lambda kafka, group: topic)
    monkeypatch.setattr(model_export.retrain, "retrain_once", lambda config, publish_model, progress: {"status": "published"})
    config.retrain.state_dir.mkdir(parents=True)
    other = open(config.retrain.state_dir / ".retrain.lock", "w")
    fcntl.flock(other, fcntl.LOCK_EX)
    logged_while_held = []

    def poll_wait(seconds):  # the retraining holding the lock ends after the first poll
        if not other.closed:
            logged_while_held.append(EventLog.load(config.retrain.state_dir).offsets)
            other.close()

    monkeypatch.setattr(model_export.retrain.time, "sleep", poll_wait)
    run_schedule(config, poll_s=0, runs=1, progress=False)
    assert logged_while_held == [{}]  # not written beside the holder
    assert EventLog.load(config.retrain.state_dir).offsets == {0: 5_600}  # recorded at the next look


def test_a_publish_that_fails_keeps_the_current_version_and_says_how_to_publish_the_candidate(monkeypatch, tmp_path):
    import model_export.publish
    from model_export.retrain import RetrainError, Stages, refresh

    def milvus_down(*args, **kwargs):
        raise ConnectionError("Milvus at http://milvus:19530 refused the connection")

    monkeypatch.setattr(model_export.publish, "connect", lambda uri, token="": None)
    monkeypatch.setattr(model_export.publish, "publish_version", milvus_down)
    config = SimpleNamespace(paths=SimpleNamespace(models_dir=tmp_path), milvus=SimpleNamespace(uri="", token="", tls_cafile="", tls_server_name="", collection_prefix="p"))
    with pytest.raises(RetrainError, match=f"the version before stays current: `python -m model_export publish --export-dir {tmp_path / 'export'}`"):
        refresh(config, tmp_path / "export", lambda m: None, Stages())


def test_a_runs_train_json_holds_the_fine_tunings_settings(base, tmp_path):
    from model_export.retrain import save_run
    from model_export.spec import ModelSpec
    from model_export.train import build_model

    inc = prepare(base, stream_for(base), vocab_of(base), Lineage("x", base.fingerprint, 0), SETTINGS)
    spec = ModelSpec(kind="mind", n_items=inc.data.n_items, n_side_tokens=len(base.side_vocab))
    settings = SimpleNamespace(**{**vars(SETTINGS), "epochs": 3, "lr": 2.5e-4, "batch_size": 128})
    save_run(tmp_path, spec, build_model(spec, torch.as_tensor(inc.data.item_side)), inc, "x", {}, settings)
    saved = json.loads((tmp_path / "train.json").read_text())
    assert (saved["epochs"], saved["lr"], saved["batch_size"]) == (3, 2.5e-4, 128)


def test_offsets_without_records_end_the_read_and_a_slow_read_keeps_what_it_read(monkeypatch):
    from conftest import FakeTopicConsumer

    import model_export.event_log as event_log

    def records(n, empty=()):  # offsets in `empty` hold no record (transaction markers)
        return [None if t in empty else (f"u{t}".encode(), encode_event(event(f"u{t}", "i1", NOW + t)), NOW + t) for t in range(n)]

    class CountingConsumer(FakeTopicConsumer):
        polls = 0

        def poll(self, timeout_ms, max_records):
            self.polls += 1
            return super().poll(timeout_ms, max_records)

    kafka = SimpleNamespace(bootstrap_servers="127.0.0.1:1")
    markers = CountingConsumer(records(10, empty={4, 9}), per_poll=3)  # a marker at the end too
    monkeypatch.setattr(event_log, "group_consumer", lambda kafka, group: markers)
    read = event_log.read_new_events(kafka, "events", "g", {}, timeout_s=30, progress=False)
    assert len(read.events) == 8 and read.offsets == {0: 9}
    assert markers.polls == 3  # the polls that hand out the 8 records (offsets 0-2, 3-6, 7-9): none waiting for offset 9
    monkeypatch.setattr(event_log, "group_consumer", lambda kafka, group: FakeTopicConsumer(records(100), per_poll=5, poll_s=0.05))
    partial = event_log.read_new_events(kafka, "events", "g", {}, timeout_s=0.3, progress=False)
    assert 0 < len(partial.events) < 100 and partial.offsets == {0: len(partial.events)}  # the next run reads on from there


def test_records_the_log_can_no_longer_read_are_named_and_a_recreated_topic_is_read_from_its_start():
    from kafka import TopicPartition

    from model_export.event_log import _start_offsets

    class Topic:  # partition 0 lost 0-99 to retention; partition 1 was recreated and holds 300 records
        def beginning_offsets(self, partitions):
            return {tp: (100 if tp.partition == 0 else 0) for tp in partitions}

        def end_offsets(self, partitions):
            return {tp: (500 if tp.partition == 0 else 300) for tp in partitions}

    partitions = [TopicPartition("events", 0), TopicPartition("events", 1)]
    starts, gaps = _start_offsets(Topic(), partitions, {0: 40, 1: 5_000}, "earliest")
    assert {tp.partition: o for tp, o in starts.items()} == {0: 100, 1: 0}
    assert "partition 0: records 40-99 were deleted by retention" in gaps[0] and "partition 1: the topic ends at 300" in gaps[1]
    assert _start_offsets(Topic(), partitions, {0: 120, 1: 300}, "earliest")[1] == []


def test_clip_history_keeps_the_newest_items():
    cases = SimpleNamespace(users=np.array([0, 1]), history=np.array([[1, 2, 3, 4], [5, 6, 0, 0]]), lengths=np.array([4, 2]),
                            target_offsets=np.array([0, 1, 2]), targets=np.array([9, 9]))
    import dataclasses

    from model_export.data import EvalCases

    clipped = clip_history(EvalCases(**vars(cases)), maxlen=3)
    assert clipped.history.tolist() == [[2, 3, 4], [5, 6, 0]] and clipped.lengths.tolist() == [3, 2]
    assert dataclasses.is_dataclass(clipped)


@pytest.mark.parametrize("sparse_item_rows", [SPARSE_ITEM_ROWS, 1])  # plain Adam / LazyItemAdam on the grown table
def test_fine_tuning_grows_the_model_and_learns_the_new_item(two_exports, synthetic_csv, tmp_path, sparse_item_rows):
    """Warm start from a real export: the candidate has a trained vector for "fresh", its loss falls and it
    recalls some of its holdout."""
    export = two_exports[0]
    manifest = Manifest.load(export)
    base = load_dataset(str(synthetic_csv), tmp_path / "data", tmp_path / "cache", tmp_path)
    assert manifest.dataset["fingerprint"] == base.fingerprint and manifest.dataset["source"].endswith("interactions.csv")
    spec, parent = load_parent(export, manifest)
    log = stream_for(base, n_per_user=6)  # "fresh" is each user's 6th event: the newest 1/6, so hold out less than that
    inc = prepare(base, log, json.loads(manifest.file(export, "vocab").read_text()), Lineage.of(manifest),
                  SimpleNamespace(**{**vars(SETTINGS), "holdout_fraction": 0.1}))
    grown, model, epochs = fine_tune(spec, parent, inc, SimpleNamespace(**{**vars(SETTINGS), "epochs": 2, "sparse_item_rows": sparse_item_rows}),
                                     progress=False)
    assert model.items.ids.sparse == (sparse_item_rows == 1)
    assert grown.n_items == base.n_items + 1 and model.item_vectors().shape[0] == base.n_items + 2 and len(epochs) == 2
    assert epochs[-1]["loss"] < epochs[0]["loss"]  # it learns from the new samples
    metrics = evaluate_holdout(model, inc, spec.maxlen)
    assert 0.0 < metrics["recall@50"] <= 1.0
    fresh = base.n_items + 1
    start = new_item_rows(parent.item_vectors(), inc.data, inc.new_samples, inc.parent_items, 1, spec.maxlen, seed=2019)[0]
    learned = model.items.ids.weight[fresh].detach()
    assert torch.isfinite(learned).all() and not torch.allclose(learned, start)  # started from its context, then trained


def test_old_run_folders_are_pruned(tmp_path):
    from model_export.retrain import KEPT_RUNS, run_dir_for

    names = [f"20261101T0000{i:02d}000000Z" for i in range(KEPT_RUNS + 3)]
    for name in names:
        (tmp_path / "runs" / name / "export").mkdir(parents=True)
    new = run_dir_for(tmp_path)
    new.mkdir()
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [*names[-(KEPT_RUNS - 1):], new.name]


def test_one_retraining_at_a_time_per_state_folder(monkeypatch, two_exports, tmp_path):
    import fcntl

    import model_export.retrain
    from model_export.retrain import RetrainError, retrain_once

    config = scheduler_config(tmp_path, two_exports[0])
    ran = []
    monkeypatch.setattr(model_export.retrain, "_retrain_once", lambda *args: ran.append(args) or {"status": "skipped"})
    config.retrain.state_dir.mkdir(parents=True)
    with open(config.retrain.state_dir / ".retrain.lock", "w") as other:  # another retraining holds it
        fcntl.flock(other, fcntl.LOCK_EX)
        with pytest.raises(RetrainError, match="another retraining runs on"):
            retrain_once(config)
    assert ran == [] and retrain_once(config) == {"status": "skipped"} and len(ran) == 1


def test_a_refresh_that_stops_after_its_publish_says_the_version_is_live_and_how_to_finish(monkeypatch, tmp_path, capsys):
    import model_export.publish
    import model_export.retrain
    from model_export.__main__ import main
    from model_export.publish import Published
    from model_export.retrain import RefreshIncomplete, Stages, refresh
    from streaming.feature_store import RedisFeatureStore

    monkeypatch.setattr(model_export.publish, "connect", lambda uri, token="": None)
    monkeypatch.setattr(model_export.publish, "publish_version", lambda *a, **kw: Published("c", "a", "v2", 10, "FLAT", 1.0))

    def redis_down(*args, **kwargs):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(RedisFeatureStore, "from_config", redis_down)
    config = SimpleNamespace(paths=SimpleNamespace(models_dir=tmp_path), milvus=SimpleNamespace(uri="", token="", tls_cafile="", tls_server_name="", collection_prefix="p"),
                             redis=None, streaming=SimpleNamespace(record_ttl_s=0))
    with pytest.raises(RefreshIncomplete, match="v2 is published and current, but the refresh stopped at its backfill .*redis is down"):
        refresh(config, tmp_path, lambda m: None, Stages())
    # the command: not a failure (the version serves), not a success either
    incomplete = {"status": "published", "model_version": "v2", "incomplete": "v2 is published and current, but ..."}
    monkeypatch.setattr(model_export.retrain, "retrain_once", lambda config, publish_model, progress: incomplete)
    monkeypatch.setenv("MINDSTREAM_CONFIG", "")
    assert main(["retrain", "--quiet"]) == 1 and "warning: v2 is published and current" in capsys.readouterr().err


def test_a_refused_candidate_exits_3_with_the_gates_reason(monkeypatch, capsys):
    import model_export.retrain
    from model_export.__main__ import main

    refused = {"status": "refused", "parent": "v1", "reason": "holdout recall@50 0.1155 is below 0.1275: the current model scores 0.1302"}
    monkeypatch.setattr(model_export.retrain, "retrain_once", lambda config, publish_model, progress: refused)
    monkeypatch.setenv("MINDSTREAM_CONFIG", "")
    assert main(["retrain", "--quiet"]) == 3  # operators' schedulers tell "the gate said no" from a failure (1, 2)
    out = capsys.readouterr()
    assert json.loads(out.out)["status"] == "refused" and "refused: holdout recall@50 0.1155 is below 0.1275" in out.err



@pytest.mark.parametrize("candidate_recall, status", [(0.1, "refused"), (0.5, "trained")])
def test_a_retraining_is_gated_end_to_end_and_an_unmirrored_offset_does_not_stop_it(monkeypatch, two_exports, synthetic_csv, tmp_path,
                                                                                    candidate_recall, status):
    """_retrain_once as the command runs it (only the topic faked): the gate's verdict, on the candidate's
    and the current model's holdout scores in that order, decides whether anything is exported or
    published; a consumer group that cannot be moved (a coordinator moving) leaves only the lag unmirrored."""
    from collections import Counter
    from pathlib import Path

    import model_export.event_log
    import model_export.retrain
    from model_export.event_log import ReadReport
    from model_export.registry import ModelRegistry

    config = scheduler_config(tmp_path, two_exports[0], tolerance=0.0, holdout_fraction=0.1, min_new_item_events=2, epochs=1, lr=1e-3,
                              batch_size=64, replay_ratio=1.0, sparse_item_rows=SPARSE_ITEM_ROWS, min_new_events=10)
    config.paths = SimpleNamespace(models_dir=config.paths.models_dir, data_dir=tmp_path / "data", cache_dir=tmp_path / "cache", shared_data_dir=tmp_path)
    config.streaming = SimpleNamespace(max_event_bytes=65536)
    log = stream_for(load_dataset(str(synthetic_csv), tmp_path / "data", tmp_path / "cache", tmp_path), n_per_user=6, replays=0)
    batch = [event(u, i, int(t), e) for u, i, t, e in zip(log.users, log.items, log.times_ms, log.event_ids)]
    monkeypatch.setattr(model_export.event_log, "read_new_events", lambda *a, **kw: ReadReport(batch, {0: len(batch)}, Counter(), 0.1))

    def fails(*args, **kwargs):
        raise ConnectionError("NotCoordinatorForGroup")

    monkeypatch.setattr(model_export.event_log, "commit_offsets", fails)
    monkeypatch.setattr(model_export.retrain, "refresh", fails)  # a refused candidate never reaches the publication
    scores = lambda model, inc, maxlen, parent=False: {"recall@50": 0.5 if parent else candidate_recall, "hitrate@50": 0.5}
    monkeypatch.setattr(model_export.retrain, "evaluate_holdout", scores)
    registry = ModelRegistry(config.paths.models_dir)
    current = registry.current_version()
    report = model_export.retrain._retrain_once(config, publish_model=status == "refused", progress=False)
    assert report["status"] == status and report["offsets_mirrored"] is False and report["events_added"] == len(batch)
    assert report["holdout"] == {"candidate": scores(None, None, 0), "current": scores(None, None, 0, parent=True)}
    assert (Path(report["run_dir"]) / "export" / "manifest.json").is_file() == (status == "trained")
    assert registry.current_version() == current and registry.versions() == [current]


@pytest.mark.parametrize("schedule, outcome, status", [
    (False, ValueError("event_log.npz is not a valid NPZ file"), 2),  # exited 1, "published", with a traceback
    (True, {"status": "failed", "reason": "ValueError: ..."}, 2),  # --schedule --runs N exited 0 whatever its runs did
    (True, {"status": "refused", "reason": "holdout recall@50 below the current model's"}, 3),
    (True, {"status": "published"}, 0),
])
def test_retrain_exit_status_says_whether_a_version_was_published(monkeypatch, capsys, schedule, outcome, status):
    import model_export.retrain
    from model_export.__main__ import main

    def run(*args, **kwargs):
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(model_export.retrain, "run_schedule" if schedule else "retrain_once", run)
    assert main(["retrain", "--quiet", *(["--schedule", "--runs", "1"] if schedule else [])]) == status
    if isinstance(outcome, Exception):
        assert "failed before publishing anything (ValueError" in capsys.readouterr().err

