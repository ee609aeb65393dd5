"""The online hit rate: the served-log record (recall_service/served_log.py), the judge's rule and
loop on fakes (recall_service/online_quality.py), the writer on a real Redis, and the exporter's
judge end to end on a real broker and Redis. The recall service's own writes are checked against
its answers in tests/test_recall_service.py."""

import threading
import time
import urllib.request
from collections import Counter
from types import SimpleNamespace

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.broker import EmbeddedBroker, ensure_topics
from infra.config import load_config
from infra.process import free_port
from infra.redis_server import EmbeddedRedis
from recall_service.online_quality import (HIT, IDLE_S, JOIN_POLL_MS, LIVENESS_S, MISS, UNJUDGED, OnlineQualityJudge, ServedLogUnavailable,
                                           judge_events)
from recall_service.served_log import LAG_ANSWERS, LAG_S, RedisServedLog, ServedRecord, ServedRecordError, decode_served, encode_served
from streaming.events import REDRIVEN_HEADER, BehaviourEvent, encode_event
from streaming.feature_store import redis_client

from conftest import wait_for

TTL_S = 600
SERVED_MS = 1_000_000


def served(user="u1", version="v2", path="stored_interests", items=("a", "b", "c"), served_ms=SERVED_MS) -> ServedRecord:
    return ServedRecord(user, version, path, served_ms, tuple(items))


def event(user="u1", item="a", event_type="click") -> BehaviourEvent:
    return BehaviourEvent(user, item, event_type, 5)  # event_time_ms plays no part: Kafka's timestamp decides


def test_served_record_round_trips_and_a_bad_one_says_what_is_wrong():
    record = served(items=("Toy Story (1995)", "ü", ""))
    assert decode_served("u1", encode_served(record)) == record
    bad = [b"{not json", orjson.dumps([1]), orjson.dumps({"schema": 2}),
           orjson.dumps({"schema": 1, "model_version": "v", "path": "p", "served_ms": "1", "items": []}),
           orjson.dumps({"schema": 1, "model_version": "v", "path": "p", "served_ms": True, "items": []}),
           orjson.dumps({"schema": 1, "model_version": "v", "path": "p", "served_ms": 1, "items": ["a", 2]})]
    for raw in bad:
        with pytest.raises(ServedRecordError, match="served record of user 'u1'"):
            decode_served("u1", raw)


def test_an_event_is_judged_against_the_answer_in_force_when_it_entered_kafka():
    records = {"u1": (served(),), "u2": (served("u2", version="v1", path="popular_fallback", items=("x",)),), "u3": ()}
    events = [
        (event("u1", "a"), SERVED_MS),  # at the moment of serving: in force
        (event("u1", "c", "buy"), SERVED_MS + TTL_S * 1000),  # at the ttl's end: still in force
        (event("u1", "z"), SERVED_MS + 1),  # not in the answer
        (event("u1", "a"), SERVED_MS - 1),  # entered before the answer was served
        (event("u1", "a"), SERVED_MS + TTL_S * 1000 + 1),  # after the answer expired
        (event("u2", "x", "view"), SERVED_MS + 10),
        (event("u3", "a"), SERVED_MS),  # never served
        (event("u4", "a"), SERVED_MS),  # not looked up at all
    ]
    assert judge_events(events, records, TTL_S * 1000, answers=3) == Counter({
        ("v2", "stored_interests", "click", HIT): 1, ("v2", "stored_interests", "buy", HIT): 1,
        ("v2", "stored_interests", "click", MISS): 1, ("", "", "click", UNJUDGED): 4,
        ("v1", "popular_fallback", "view", HIT): 1,
    })


def test_an_item_of_an_earlier_answer_in_force_is_a_hit_counted_under_the_newest_answer():
    """Two answers kept, newest first: an event is a hit if any answer in force lists its item, and
    counted, hit or miss, under the newest answer in force (so an old version never collects the
    hits of events a newer one missed); an answer is not in force before it was served."""
    later = served(version="v3", path="computed_on_the_fly", items=("b", "d"), served_ms=SERVED_MS + 100)
    records = {"u1": (later, served())}  # the earlier: v2, a, b, c at SERVED_MS
    events = [
        (event("u1", "a"), SERVED_MS + 200),  # only the earlier answer lists it: a hit, under the later
        (event("u1", "b"), SERVED_MS + 200),  # both list it
        (event("u1", "d"), SERVED_MS + 50),  # before the later answer was served: a miss of the earlier
        (event("u1", "z"), SERVED_MS + 200),  # neither lists it
        (event("u1", "a"), SERVED_MS + TTL_S * 1000 + 50),  # the earlier has expired: a miss of the later
    ]
    assert judge_events(events, records, TTL_S * 1000, answers=3) == Counter({
        ("v3", "computed_on_the_fly", "click", HIT): 2, ("v3", "computed_on_the_fly", "click", MISS): 2,
        ("v2", "stored_interests", "click", MISS): 1,
    })


def test_answers_served_after_an_event_do_not_push_out_those_in_force_for_it():
    """A judge that reads the log late (after an outage, a restart) finds newer answers on top: the
    event is judged against the newest `answers` served before it, not the newest kept."""
    a1 = served(version="v1", items=("x",), served_ms=SERVED_MS)
    later = [served(version="v9", items=(f"n{i}",), served_ms=SERVED_MS + 100 * i) for i in range(4, 0, -1)]
    records = {"u1": (*later, a1)}  # newest first: four answers after the event, then the one in force
    events = [(event("u1", "x"), SERVED_MS + 50)]
    assert judge_events(events, records, TTL_S * 1000, answers=3) == Counter({("v1", "stored_interests", "click", HIT): 1})
    # and only the newest `answers` served before an event count: a fourth-newest is no longer in force
    before = [served(version="v2", items=(f"o{i}",), served_ms=SERVED_MS + 10 * i) for i in range(3, 0, -1)]
    records = {"u1": (*before, a1)}
    assert judge_events([(event("u1", "x"), SERVED_MS + 40)], records, TTL_S * 1000, answers=3) == Counter(
        {("v2", "stored_interests", "click", MISS): 1})


def test_an_event_whose_answers_in_force_may_have_been_trimmed_from_the_log_is_unjudged():
    """A judge that reads the log after more than LAG_ANSWERS later answers finds a full log whose
    oldest kept answers are fewer than those in force: the trimmed one listed the clicked item, and
    judging against the rest counted a miss. Fewer later answers, or a full log whose older answers
    had expired by the event, are judged as before."""
    shown = [served(version="v1", items=("a",), served_ms=SERVED_MS + i) for i in range(3)]  # a trimmed one listed the item too
    later = [served(version="v2", items=("z",), served_ms=SERVED_MS + 60_000 + i) for i in range(LAG_ANSWERS + 1)]
    at_ms = SERVED_MS + 30_000

    def judged(kept, at=at_ms):
        return judge_events([(event("u1", "a"), at)], {"u1": sorted(kept, key=lambda r: -r.served_ms)}, TTL_S * 1000, answers=3)

    full = [*later, *shown[1:]]  # answers + LAG_ANSWERS kept: the oldest of the 3 in force was trimmed
    assert len(full) == 3 + LAG_ANSWERS
    assert judged(full) == Counter({("", "", "click", UNJUDGED): 1})
    assert judged([*later[:-1], *shown[1:]]) == Counter({("v1", "stored_interests", "click", HIT): 1})  # not full: nothing trimmed
    expired = served(version="v0", items=("y",), served_ms=SERVED_MS - TTL_S * 1000 - 1)  # kept, and expired at the event
    assert judged([*later, shown[2], expired]) == Counter({("v1", "stored_interests", "click", HIT): 1})  # what was trimmed is older


def test_an_item_shown_when_a_late_delivered_event_happened_is_a_hit():
    """Click x, the application refreshes (an answer without x, served before the click reached
    Kafka): the click is a hit of what was shown when it happened, not a miss of the refresh. A
    skewed device clock, though, never turns a hit at the Kafka time into a miss."""
    shown = served(version="v1", items=("x", "y"), served_ms=SERVED_MS)
    refreshed = served(version="v1", items=("y", "z"), served_ms=SERVED_MS + 100)
    click = BehaviourEvent("u1", "x", "click", SERVED_MS + 50)
    assert judge_events([(click, SERVED_MS + 300)], {"u1": (refreshed, shown)}, TTL_S * 1000, answers=1) == Counter(
        {("v1", "stored_interests", "click", HIT): 1})
    replayed = BehaviourEvent("u1", "x", "click", 5)  # years before it entered Kafka (a replay): the Kafka time decides
    assert judge_events([(replayed, SERVED_MS + 300)], {"u1": (refreshed, shown)}, TTL_S * 1000, answers=1) == Counter(
        {("v1", "stored_interests", "click", MISS): 1})
    # a phone 5 s slow: x clicked 2 s after it was shown, dated 3 s before; it entered Kafka 1 s later
    older = served(version="v0", items=("q",), served_ms=SERVED_MS - 60_000)
    skewed = BehaviourEvent("u1", "x", "click", SERVED_MS - 3_000)
    assert judge_events([(skewed, SERVED_MS + 3_000)], {"u1": (shown, older)}, TTL_S * 1000, answers=3) == Counter(
        {("v1", "stored_interests", "click", HIT): 1})


class FakeConsumer:
    """One partition of (key, value, timestamp[, headers]) records with a position: poll() hands out what lies
    after it (up to `per_poll` records), seek() moves it, commit() records it as committed.
    `on_empty`: called by a poll that finds nothing after the position (e.g. to stop a judge's run)."""

    def __init__(self, records, per_poll=100, fail_first_poll=False, fail_first_commit=False, on_empty=lambda: None, joins_after=0):
        self.records = [SimpleNamespace(key=key, value=value, timestamp=ts, offset=i, headers=headers[0] if headers else [])
                        for i, (key, value, ts, *headers) in enumerate(records)]
        self.per_poll, self.fail_first_poll, self.fail_first_commit = per_poll, fail_first_poll, fail_first_commit
        self.on_empty = on_empty
        self.joins_after = joins_after  # polls before the group hands out the partition
        self.position_known = True  # False: the lookup of the starting position has not answered yet
        self.position = 0
        self.commits: list[int] = []
        self.poll_timeouts: list[int] = []
        self.closed = False
        self.broker_down = False  # poll() returns nothing, as kafka-python's does; end_offsets() times out
        self.end_offset_reads = 0

    def assignment(self):
        return {("events", 0)} if len(self.poll_timeouts) >= self.joins_after else set()

    def poll(self, timeout_ms, max_records):
        joined = bool(self.assignment())
        self.poll_timeouts.append(timeout_ms)
        if not joined or self.broker_down:
            return {}
        if self.fail_first_poll:
            self.fail_first_poll = False
            raise ConnectionError("broker gone")
        batch = self.records[self.position:self.position + self.per_poll]
        self.position += len(batch)
        if not batch:
            self.on_empty()
        return {("events", 0): batch} if batch else {}

    def seek(self, partition, offset):
        self.position = offset

    def end_offsets(self, partitions, timeout_ms):
        self.end_offset_reads += 1
        if self.broker_down:
            raise TimeoutError(f"Failed to get offsets by timestamps in {timeout_ms} ms")
        return {partition: len(self.records) for partition in partitions}

    def commit(self):
        if self.fail_first_commit:
            self.fail_first_commit = False
            self.position = self.commits[-1] if self.commits else 0  # a rebalance: read again from the committed offset
            raise RuntimeError("CommitFailedError: the group rebalanced")
        if self.position_known:  # a consumer commits only the positions its offset lookups have set
            self.commits.append(self.position)

    def committed(self, partition):
        return self.commits[-1] if self.commits else None

    def close(self):
        self.closed = True


class FakeServed:
    def __init__(self, records, failures=0):
        self.records, self.failures = records, failures
        self.asked: list[list[str]] = []

    def get_many(self, user_ids):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("Redis gone")
        self.asked.append(user_ids)
        return [self.records.get(u, ()) for u in user_ids]


def counting_judge(consumer_or_factory, served, **kwargs):
    counts, errors = Counter(), Counter()
    make = consumer_or_factory if callable(consumer_or_factory) else (lambda: consumer_or_factory)
    judge = OnlineQualityJudge(make, served, lambda labels, n: counts.update({labels: n}), lambda reason, n: errors.update({reason: n}),
                               ttl_s=TTL_S, max_event_bytes=4096, **kwargs)
    return judge, counts, errors


def test_the_judge_counts_each_polled_event_after_committing_it():
    batch = [(b"u1", encode_event(event("u1", "b")), SERVED_MS + 5),
             (b"u1", encode_event(event("u1", "q")), SERVED_MS + 6),
             (b"u2", encode_event(event("u2", "a")), SERVED_MS + 7),  # its record does not decode: unjudged, counted
             (b"u9", encode_event(event("u1", "a")), SERVED_MS + 8),  # keyed by another user: the job dead-letters it
             (b"u1", b"{not an event", SERVED_MS + 9)]
    consumer = FakeConsumer(batch)
    reader = FakeServed({"u1": (served(),), "u2": ServedRecordError("served record of user 'u2': not JSON")})
    judge, counts, errors = counting_judge(consumer, reader)
    assert judge.step() == 3
    assert counts == Counter({("v2", "stored_interests", "click", HIT): 1, ("v2", "stored_interests", "click", MISS): 1,
                              ("", "", "click", UNJUDGED): 1})
    assert errors == Counter({"invalid_event": 2, "unreadable_record": 1})
    assert reader.asked == [["u1", "u2"]] and consumer.commits == [5]  # one round trip for the batch's users
    assert judge.step() == 0 and consumer.commits == [5]  # nothing new: the positions were committed already


def test_each_event_is_judged_once_a_redriven_copy_or_a_retried_send_is_skipped():
    """A redriven dead letter (REDRIVEN_HEADER: the original was judged when it entered) and a retried
    send of an event (its event_id again, in the same batch or a later one) were judged again, the
    redriven one under the answer in force when it was sent again. A batch read again after a failed
    read of the served log is still judged: its ids are remembered only once it is counted."""
    clicked = BehaviourEvent("u1", "a", "click", 5, event_id="e1")
    batch = [(b"u1", encode_event(clicked), SERVED_MS + 5),
             (b"u1", encode_event(clicked), SERVED_MS + 6),  # a producer's retry
             (b"u1", encode_event(event("u1", "b")), SERVED_MS + 7, [(REDRIVEN_HEADER, b"1")]),
             (b"u1", encode_event(BehaviourEvent("u1", "a", "click", 5, event_id="e2")), SERVED_MS + 8),
             (b"u2", encode_event(BehaviourEvent("u2", "a", "click", 5, event_id="e1")), SERVED_MS + 9)]  # another user's e1
    consumer = FakeConsumer(batch, per_poll=4)
    judge, counts, errors = counting_judge(consumer, FakeServed({"u1": (served(),), "u2": (served("u2"),)}, failures=1))
    with pytest.raises(ServedLogUnavailable):
        judge.step()
    assert judge.step() == 2 and judge.step() == 1
    assert counts == Counter({("v2", "stored_interests", "click", HIT): 3}) and not errors
    consumer.records.append(SimpleNamespace(key=b"u1", value=encode_event(clicked), timestamp=SERVED_MS + 10, offset=5, headers=[]))
    assert judge.step() == 0 and sum(counts.values()) == 3 and consumer.commits[-1] == 6  # a later retry: committed, not judged


def test_an_event_is_judged_only_once_its_users_earlier_answers_are_surely_in_redis():
    """The service queues its answers for Redis (~50 ms, seconds when Redis is slow) and a judgement
    is committed for good: an event younger than RIPE_S waits, with the records after it."""
    now_ms = SERVED_MS + 60_000
    batch = [(b"u1", encode_event(event("u1", "a")), now_ms - 6_000),  # ripe
             (b"u1", encode_event(event("u1", "b")), now_ms - 1_000),  # too young: it and what follows wait
             (b"u1", encode_event(event("u1", "c")), now_ms - 7_000)]
    consumer = FakeConsumer(batch)
    clock = [now_ms / 1000]
    slept = []
    judge, counts, _ = counting_judge(consumer, FakeServed({"u1": (served(),)}), clock=lambda: clock[0], sleep=slept.append)
    assert judge.step() == 1 and consumer.commits == [1] and sum(counts.values()) == 1
    assert judge.step() == 0 and consumer.commits == [1, 1] and slept == [1.0]  # waits (up to 1 s at a time) rather than polling again at once
    clock[0] += 4
    assert judge.step() == 2 and consumer.commits[-1] == 3 and sum(counts.values()) == 3


def test_a_record_stamped_far_ahead_is_judged_at_once_not_waited_for():
    """A producer's clock an hour fast: waiting for its record to ripen would hold its partition, and
    every record behind it, for that hour."""
    now_ms = SERVED_MS + 60_000
    batch = [(b"u1", encode_event(event("u1", "a")), now_ms + 3_600_000), (b"u1", encode_event(event("u1", "b")), now_ms - 7_000)]
    consumer = FakeConsumer(batch)
    judge, counts, _ = counting_judge(consumer, FakeServed({"u1": (served(),)}), clock=lambda: now_ms / 1000, sleep=lambda s: None)
    assert judge.step() == 2 and consumer.commits == [2]


def test_a_new_group_commits_its_starting_positions_before_any_event():
    consumer = FakeConsumer([], joins_after=1)
    judge, _, _ = counting_judge(consumer, FakeServed({}), sleep=lambda s: None)
    assert judge.step() == 0 and consumer.commits == []  # still joining: no positions yet
    assert judge.step() == 0 and consumer.commits == [0]  # its lag reads 0 from the start, not the whole topic
    judge.step()
    assert consumer.commits == [0]


def test_a_new_group_retries_the_commit_of_its_positions_until_their_lookups_have_answered():
    """A poll only starts the offset lookups that set a new group's positions; a commit before they
    answer commits nothing, so the judge keeps polling with a wait and commits again."""
    consumer = FakeConsumer([])
    consumer.position_known = False
    judge, _, _ = counting_judge(consumer, FakeServed({}), sleep=lambda s: None)
    assert judge.step() == 0 and consumer.commits == []
    consumer.position_known = True
    assert judge.step() == 0 and consumer.commits == [0]
    judge.step()
    assert consumer.poll_timeouts == [JOIN_POLL_MS, JOIN_POLL_MS, 0]


def test_an_idle_judge_sleeps_between_polls_that_do_not_wait():
    """The embedded broker answers an empty fetch at once: a poll with a timeout would send fetches
    back to back for all of it (a core while the topic is idle). Joining needs a poll that waits."""
    consumer = FakeConsumer([(b"u1", encode_event(event("u1", "a")), SERVED_MS)], joins_after=2)
    slept = []
    judge, counts, _ = counting_judge(consumer, FakeServed({"u1": (served(),)}), clock=lambda: SERVED_MS / 1000 + 60, sleep=slept.append)
    assert [judge.step() for _ in range(5)] == [0, 0, 1, 0, 0]
    assert consumer.poll_timeouts == [JOIN_POLL_MS, JOIN_POLL_MS, JOIN_POLL_MS, 0, 0]  # waits until its positions are committed
    assert slept == [IDLE_S, IDLE_S] and sum(counts.values()) == 1  # only the empty polls of a joined group sleep


def test_an_idle_judge_checks_the_broker_so_that_an_outage_is_counted():
    """kafka-python's poll() returns nothing while the broker is down, as for a quiet topic: an idle
    judge reads its partitions' end offsets every LIVENESS_S, and a read that fails is counted
    "unavailable" (OnlineHitRateNotJudged), the consumer made again."""
    clock = [SERVED_MS / 1000 + 60]
    consumers = []

    def make():
        consumers.append(FakeConsumer([] if consumers else [(b"u1", encode_event(event("u1", "a")), SERVED_MS)]))
        return consumers[-1]

    def sleep(seconds):
        clock[0] += seconds

    judge, counts, errors = counting_judge(make, FakeServed({"u1": (served(),)}), clock=lambda: clock[0], sleep=sleep, retry_s=0.01)
    assert [judge.step() for _ in range(3)] == [1, 0, 0]  # judged, idle
    steps = int(LIVENESS_S / IDLE_S)
    for _ in range(steps):
        judge.step()
    assert consumers[0].end_offset_reads == 1  # one read per LIVENESS_S of idling, not one per poll
    consumers[0].broker_down = True
    stop = threading.Event()
    runner = threading.Thread(target=judge.run, args=(stop,))
    runner.start()
    deadline = time.monotonic() + 10
    while len(consumers) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    runner.join(10)
    assert errors["unavailable"] >= 1 and consumers[0].closed and len(consumers) >= 2 and sum(counts.values()) == 1


@pytest.mark.parametrize("failure", ["redis", "commit"])
def test_a_batch_whose_read_or_commit_failed_is_counted_once_when_read_again(failure):
    records = [(b"u1", encode_event(event("u1", item)), SERVED_MS + i) for i, item in enumerate("abz")]
    stop = threading.Event()
    # the run ends at the first poll that finds nothing left: after every batch was read (again) and counted
    consumer = FakeConsumer(records, per_poll=2, fail_first_commit=failure == "commit", on_empty=stop.set)
    judge, counts, errors = counting_judge(consumer, FakeServed({"u1": (served(),)}, failures=int(failure == "redis")), retry_s=0.01)
    judge.run(stop)  # in this thread: it returns with every count it will ever make
    assert counts == Counter({("v2", "stored_interests", "click", HIT): 2, ("v2", "stored_interests", "click", MISS): 1})
    assert errors == Counter({"unavailable": 1}) and consumer.commits[-1] == 3


def test_the_judge_outlives_a_broker_failure_and_reads_on_with_a_new_consumer():
    consumers = [FakeConsumer([], fail_first_poll=True), FakeConsumer([(b"u1", encode_event(event("u1", "a")), SERVED_MS)])]
    made = []

    def make():
        made.append(consumers[len(made)])
        return made[-1]

    judge, counts, errors = counting_judge(make, FakeServed({"u1": (served(),)}), retry_s=0.01)
    stop = threading.Event()
    runner = threading.Thread(target=judge.run, args=(stop,))
    runner.start()
    deadline = time.monotonic() + 10
    while not counts and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    runner.join(10)
    assert not runner.is_alive()
    assert counts == Counter({("v2", "stored_interests", "click", HIT): 1}) and errors == Counter({"unavailable": 1})
    assert len(made) == 2 and all(c.closed for c in made)  # the broken consumer closed and replaced; the last closed at stop


def test_the_exporters_consumer_is_closed_when_its_set_up_fails(monkeypatch):
    """The judge makes a new consumer every retry_s while the broker fails: one whose metadata or
    offset lookups raised was left open, an I/O thread and its connections per attempt."""
    import kafka

    from infra.exporter import StackCollector

    made = []

    class Unanswered:
        def __init__(self, **options):
            self.closed = False
            made.append(self)

        def partitions_for_topic(self, topic):
            raise kafka.errors.KafkaTimeoutError("Failed to update metadata after 60.0 secs.")

        def close(self):
            self.closed = True

    monkeypatch.setattr(kafka, "KafkaConsumer", Unanswered)
    collector = StackCollector(load_config(environ={"MINDSTREAM_CONFIG": ""}))
    for _ in range(3):
        with pytest.raises(kafka.errors.KafkaTimeoutError):
            collector._online_consumer()
    assert len(made) == 3 and all(consumer.closed for consumer in made)


def test_the_writer_keeps_the_newest_answers_per_user_with_their_ttl_in_real_redis(tmp_path):
    with EmbeddedRedis(tmp_path / "redis") as server:
        client = redis_client(SimpleNamespace(uri=server.uri, password="", ssl_cafile="", cluster=False))
        dropped = Counter()
        log = RedisServedLog(client, ttl_s=TTL_S, prefix="t", dropped=lambda reason, n: dropped.update({reason: n}), answers=2)
        log.record([served("u1", items=("a",)), served("u2", items=())])
        log.record([served("u1", version="v3", items=("b", "c"), served_ms=SERVED_MS + 1)])
        log.record([served("u1", version="v4", items=("d",), served_ms=SERVED_MS + 2)])
        later = [served("u1", version=f"later{i}", items=(), served_ms=SERVED_MS + 3 + i) for i in range(LAG_ANSWERS)]
        log.record(later)
        assert log.flush(timeout_s=10)
        # the newest 2 + LAG_ANSWERS of u1's, newest first: a judge reading late still finds the 2 served before an event
        v4, v3 = served("u1", version="v4", items=("d",), served_ms=SERVED_MS + 2), served("u1", version="v3", items=("b", "c"), served_ms=SERVED_MS + 1)
        assert log.get_many(["u1", "u2", "nobody"]) == [(*reversed(later), v4, v3), (served("u2", items=()),), ()]
        assert TTL_S < client.ttl("t:answers:u1") <= TTL_S + LAG_S
        client.rpush("t:answers:u3", b"garbage")
        client.set("t:answers:u4", b"a string: another Redis type")
        unreadable = log.get_many(["u3", "u4"])
        assert all(isinstance(r, ServedRecordError) for r in unreadable) and "another Redis type" in str(unreadable[1])
        # the stray key fails its own user's commands only, and the log's next write replaces it, keeping
        # every answer of that write (a DEL before each of u4's kept only the last)
        u4_later = served("u4", version="v3", served_ms=SERVED_MS + 1)
        log.record([served("u4"), served("u5"), u4_later])
        assert log.flush(timeout_s=10)
        assert log.get_many(["u4", "u5"]) == [(u4_later, served("u4")), (served("u5"),)] and TTL_S < client.ttl("t:answers:u4") <= TTL_S + LAG_S
        assert not dropped
    log.record([served("u1")])  # Redis is gone: dropped and counted, the caller not held up
    assert log.flush(timeout_s=15) and dropped == Counter({"unavailable": 1})


def test_a_full_queue_drops_and_counts_instead_of_blocking_a_recall():
    taken, gate = threading.Event(), threading.Event()

    released = threading.Event()

    class SlowPipeline:
        def lpush(self, *args, **kwargs):
            taken.set()

        def ltrim(self, *args, **kwargs):
            pass

        def expire(self, *args, **kwargs):
            pass

        def execute(self, raise_on_error=True):
            gate.wait(60)
            released.set()
            return [1, True, True]

    dropped = Counter()
    log = RedisServedLog(SimpleNamespace(pipeline=lambda transaction: SlowPipeline()), ttl_s=60,
                         dropped=lambda reason, n: dropped.update({reason: n}), max_pending=3)
    log.record([served()])  # taken by the writer, which then waits on the gate
    assert taken.wait(5)
    recording = threading.Thread(target=log.record, args=([served(f"u{i}") for i in range(5)],))
    recording.start()
    recording.join(60)  # bounds a call that hangs; what is asserted is the order
    assert not recording.is_alive() and not released.is_set()  # it returned while the writer was still held
    assert dropped == Counter({"queue_full": 2})
    gate.set()
    assert log.flush(timeout_s=10)


def test_an_answer_recorded_while_the_log_closes_is_sent_or_counted_never_lost():
    sent = []

    class Pipeline:
        def lpush(self, key, *values):
            sent.append(key)

        def ltrim(self, *args, **kwargs):
            pass

        def expire(self, *args, **kwargs):
            pass

        def execute(self, raise_on_error=True):
            return [1, True, True] * len(sent)  # as Redis answers: LPUSH's length, LTRIM's and EXPIRE's

    dropped = Counter()
    log = RedisServedLog(SimpleNamespace(pipeline=lambda transaction: Pipeline(), close=lambda: None), ttl_s=60,
                         dropped=lambda reason, n: dropped.update({reason: n}))

    def answers_while_the_service_stops():  # record() has passed its closed check when close() runs
        yield served("u1")
        log.close(timeout_s=5)
        yield served("u2")

    log.record(answers_while_the_service_stops())
    assert [key.rsplit(":", 1)[-1] for key in sent] == ["u1"] and dropped == Counter({"closed": 1})


def test_answers_queued_behind_a_write_that_outlasts_close_are_counted():
    """close() gives up waiting for a slow write (a stop with a short grace): what is queued behind
    that write is counted `closed`, not left in the queue when the writer's last pass ends."""
    sending, release, sent = threading.Event(), threading.Event(), []

    class Pipeline:
        def __init__(self):
            self.keys = []

        def lpush(self, key, *values):
            self.keys.append(key)

        def ltrim(self, *args, **kwargs):
            pass

        def expire(self, *args, **kwargs):
            pass

        def execute(self, raise_on_error=True):
            sending.set()
            release.wait(30)
            sent.extend(self.keys)
            return [1, True, True] * len(self.keys)

    dropped = Counter()
    log = RedisServedLog(SimpleNamespace(pipeline=lambda transaction: Pipeline(), close=lambda: None), ttl_s=60,
                         dropped=lambda reason, n: dropped.update({reason: n}))
    log.record([served("u0")])
    assert sending.wait(30)  # the writer is held in u0's write
    log.record([served(f"u{i}") for i in range(1, 10)])
    log.close(timeout_s=0.1)
    release.set()
    log._writer.join(30)
    assert not log._writer.is_alive()
    assert len(sent) + sum(dropped.values()) == 10 and dropped == Counter({"closed": 9}) and not log._pending


def scrape(port: int) -> Counter:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    out = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("mindstream_online_recall_events_total", "mindstream_online_recall_errors_total"):
                out[(sample.name.removeprefix("mindstream_online_recall_").removesuffix("_total"), *sorted(sample.labels.items()))] = sample.value
    return out


def test_the_exporter_judges_events_from_a_real_broker_against_a_real_redis(tmp_path):
    from kafka import KafkaProducer

    from infra.exporter import serve

    with EmbeddedBroker(tmp_path / "broker") as broker, EmbeddedRedis(tmp_path / "redis") as redis_server:
        port = free_port()
        config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                                      "MINDSTREAM_REDIS__URI": redis_server.uri, "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models")})
        ensure_topics(config.kafka, partitions=2, retention_ms=3_600_000)
        log = RedisServedLog.for_config(config)
        log.record([served("alice", items=("i1", "i2"), served_ms=int(time.time() * 1000))])
        assert log.flush(timeout_s=10)
        server, collector = serve(config, port)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)

        def send(user, item, event_type="click"):
            producer.send(config.kafka.events_topic, key=user.encode(), value=encode_event(BehaviourEvent(user, item, event_type, 1)))
            producer.flush()

        unjudged = ("events", ("event_type", "view"), ("model_version", ""), ("outcome", UNJUDGED), ("path", ""))
        try:
            # The group starts at the latest offsets once it has joined: send an unserved user's view until one is counted
            deadline = time.monotonic() + 60
            while not scrape(port)[unjudged] and time.monotonic() < deadline:
                send("bob", "i1", "view")
                time.sleep(0.5)
            before = scrape(port)
            assert before[unjudged] >= 1, before
            send("alice", "i2", "buy")
            send("alice", "i9")
            producer.send(config.kafka.events_topic, key=b"alice", value=b"{broken")
            producer.flush()
            labels = [("model_version", "v2"), ("path", "stored_interests")]
            expected = {("events", ("event_type", "buy"), *labels[:1], ("outcome", HIT), *labels[1:]): 1,
                        ("events", ("event_type", "click"), *labels[:1], ("outcome", MISS), *labels[1:]): 1,
                        ("errors", ("reason", "invalid_event")): 1}
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                now = scrape(port)
                if all(now[key] - before[key] >= n for key, n in expected.items()):
                    break
                time.sleep(0.2)
            assert {key: now[key] - before[key] for key in expected} == expected
        finally:
            producer.close()
            server.shutdown()
            server.server_close()
            collector.close()


def test_the_exporters_judge_starts_where_it_should_and_counts_a_broker_outage(tmp_path, monkeypatch):
    """On a real broker, with the exporter's own consumer: a new group skips the events sent before it
    (served long ago); a group that restarts judges what waited, also in a partition added meanwhile
    (one without a committed offset: "latest" there skipped them, uncounted); a broker that stops
    under an idle judge is counted "unavailable" (kafka-python's poll() just returns nothing)."""
    from kafka import KafkaAdminClient, KafkaProducer
    from kafka.admin import NewPartitions

    import recall_service.online_quality as online_quality
    from infra.exporter import StackCollector

    monkeypatch.setattr(online_quality, "LIVENESS_S", 1.0)
    broker = EmbeddedBroker(tmp_path / "broker").start()
    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
                                  "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models")})
    topic = config.kafka.events_topic
    ensure_topics(config.kafka, partitions=1, retention_ms=3_600_000)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, metadata_max_age_ms=500)
    reader = FakeServed({"u1": (served(served_ms=int(time.time() * 1000)),)})

    def send(event_type, n, partition=0):
        for _ in range(n):
            producer.send(topic, key=b"u1", value=encode_event(event("u1", "a", event_type)), partition=partition)
        producer.flush()

    def judging():
        judge, counts, errors = counting_judge(StackCollector(config)._online_consumer, reader, retry_s=0.2, ripe_s=0.0)
        stop = threading.Event()
        runner = threading.Thread(target=judge.run, args=(stop,), daemon=True)
        runner.start()
        return counts, errors, lambda: (stop.set(), runner.join(60))

    def judged(counts, event_type):
        return sum(n for labels, n in counts.items() if labels[2] == event_type)

    try:
        send("cart", 20)  # before the group exists
        counts, errors, stop = judging()
        deadline = time.monotonic() + 60
        while not judged(counts, "view") and time.monotonic() < deadline:
            send("view", 1)
            time.sleep(0.5)
        assert judged(counts, "view") and not judged(counts, "cart")
        stop()
        admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
        admin.create_partitions({topic: NewPartitions(total_count=2)})
        admin.close()
        wait_for(lambda: len(producer.partitions_for(topic) or ()) == 2, 30, "the producer to see the new partition")
        send("buy", 5, partition=0)
        send("buy", 20, partition=1)
        counts, errors, stop = judging()
        wait_for(lambda: judged(counts, "buy") == 25, 60, "the events that waited to be judged")
        broker.stop()
        wait_for(lambda: errors["unavailable"] >= 1, 30, "the broker outage to be counted")
        stop()
    finally:
        producer.close()
        broker.stop()


def test_with_the_served_log_off_neither_the_service_nor_the_exporter_keeps_or_judges_anything(tmp_path):
    from infra.exporter import serve
    from recall_service.server import RecallServer

    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_RECALL__SERVED_LOG_TTL_S": "0",
                                  "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models")})
    assert RecallServer(config, reader=object(), search=object(), models=object(), availability=object()).served_log is None
    server, collector = serve(config, free_port())
    try:
        assert collector._online is None
    finally:
        server.shutdown()
        server.server_close()
        collector.close()
