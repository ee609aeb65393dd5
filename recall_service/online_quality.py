"""Online recall quality: how many of the behaviour events that arrive name an item the recall
service had just served that user. It is the online counterpart of the offline HitRate
(model_export/metrics.py), counted by model version and recall path, so that a new version's effect
shows in production and not only on held-out users. `python -m infra exporter` runs the judge
(a thread reading the events topic with its own consumer group, [monitoring].online_quality_group)
and exports

    mindstream_online_recall_events_total{model_version, path, event_type, outcome}

Each event is judged against the answers its user was served in the [recall].served_log_ttl_s
before it, those "in force": the newest [recall].served_log_answers served before it and not
expired (recall_service/served_log.py keeps a few more, so that answers served after the event,
before a lagging judge reads the log, do not push out the ones in force):

    hit       an answer in force lists the event's item
    miss      answers were in force and none lists it
    unjudged  no answer in force (model_version and path ""): the user was not served in the ttl
              before the event, or the answers in force may have been trimmed from the log (the
              user was served more than LAG_ANSWERS times after the event before the judge read
              it: the oldest kept answers cannot tell which were in force), or the user's served
              records could not be read

An event is counted under the model version and path of the newest answer in force, hit or miss,
so each version's rate has its own events in both its numerator and denominator (counting a hit
under the answer that listed the item and a miss under the newest would lend an old version the
hits of the events a new one missed). An answer pushed out of the log by newer ones no longer
counts: a click on its items then is a miss of the newer answers.

"Before it" is decided on the Kafka record's timestamp, when the event entered the stream; its
event_time_ms is the application's clock (a phone's, skewed; hours or years behind in a replay).
Producers must leave that timestamp at the send time (CreateTime, Kafka's default) or the topic use
LogAppendTime; the service's and the producers' clocks are compared, so skew between servers shifts
the boundary. An item listed by an answer in force at the event's own time also makes a hit, when
that time lies within the ttl before the record's: an application that refreshes its
recommendations on a click and sends the click a moment later must not have the refreshed answer,
which no longer lists the item, turn the click into a miss. Misses and the labels go by the
record's timestamp only, so a skewed device clock cannot move an event to another answer.

An event is judged only once it is RIPE_S old: the service's answers reach Redis through a queue
(about 50 ms, seconds while Redis is slow), and a judgement is committed for good. Each event is
judged once: a record `streaming redrive` sent again (its REDRIVEN_HEADER; the original was judged
when it first entered) is skipped, and so is an event whose event_id the judge saw among its last
RECENT_EVENT_IDS (a producer's retry), as the streaming job and retraining ignore them.
A hit rate per version and path is then hit / (hit + miss); dashboards and alerts compute it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from typing import Callable, Iterable, Mapping, Protocol, Sequence

from recall_service.served_log import LAG_ANSWERS, ServedRecord, ServedRecordError
from streaming.events import REDRIVEN_HEADER, BehaviourEvent, EventError, accept_record, record_key

log = logging.getLogger(__name__)

HIT, MISS, UNJUDGED = "hit", "miss", "unjudged"
POLL_RECORDS = 2000  # events per poll: one Redis round trip and one offset commit each
RIPE_S = 5.0  # an event is judged this long after it entered Kafka, when its user's earlier answers are surely in Redis
# Polls do not block in the broker: the embedded broker (noida) answers an empty fetch at once instead of
# holding it for fetch.max.wait.ms, so a poll with a timeout sends ~200 fetches a second and takes a core.
# Once the group has its partitions the judge polls without waiting and sleeps IDLE_S after an empty one;
# joining the group needs polls that wait (JOIN_POLL_MS). Events are judged RIPE_S late anyway.
IDLE_S = 0.5
JOIN_POLL_MS = 200
# kafka-python's poll() does not fail while the broker is down (it reconnects in the background and returns
# nothing), so an idle judge asks the broker for its partitions' end offsets this often: a broker outage is
# then a failed read, counted "unavailable", not a quiet topic.
LIVENESS_S = 10.0
LIVENESS_TIMEOUT_MS = 5_000
RECENT_EVENT_IDS = 100_000  # (user, event_id) pairs remembered: a retried send of an event is judged once


def is_new_group(committed: Mapping[object, int | None]) -> bool:
    """Whether a group assigned these partitions (-> committed offset, None: none) is new: one that has
    committed none of them judges what arrives from now on (older events were served long ago). A
    partition without a committed offset in a group that has others (one added to the topic while the
    exporter was down) is read from its beginning instead: its waiting events are judged, not skipped."""
    return all(offset is None for offset in committed.values())


def in_force(kept: Sequence[ServedRecord], at_ms: int, ttl_ms: int, answers: int) -> list[ServedRecord] | None:
    """Of a user's kept answers (newest first), those in force at `at_ms`: the newest `answers`
    served at or before it, less those expired by then. None when the log cannot tell: it is full
    (answers + LAG_ANSWERS kept, so older ones were trimmed away), fewer than `answers` of the kept
    ones are at or before `at_ms`, and a trimmed one (older than every kept one) may still have been
    in force then: judging against the rest would count a click on its items as a miss."""
    before = [record for record in kept if record.served_ms <= at_ms][:answers]
    if len(kept) >= answers + LAG_ANSWERS and len(before) < answers and at_ms <= kept[-1].served_ms + ttl_ms:
        return None
    return [record for record in before if at_ms <= record.served_ms + ttl_ms]


def judge_events(events: Iterable[tuple[BehaviourEvent, int]], served: dict[str, Sequence[ServedRecord]], ttl_ms: int, answers: int) -> Counter:
    """(event, Kafka timestamp in ms) pairs and each user's kept answers, newest first -> event
    counts by (model_version, path, event_type, outcome); `answers`: [recall].served_log_answers."""
    item_sets: dict[int, frozenset[str]] = {}  # an answer's items as a set, built once per batch (keyed by id: `served` holds them)

    def items_of(record: ServedRecord) -> frozenset[str]:
        items = item_sets.get(id(record))
        if items is None:
            items = item_sets[id(record)] = frozenset(record.items)
        return items

    counts: Counter = Counter()
    for event, entered_ms in events:
        kept = served.get(event.user_id, ())
        shown = in_force(kept, entered_ms, ttl_ms, answers)
        if not shown:
            counts[("", "", event.event_type, UNJUDGED)] += 1
            continue
        delivered_late = 0 < entered_ms - event.event_time_ms <= ttl_ms
        shown_then = (in_force(kept, event.event_time_ms, ttl_ms, answers) or []) if delivered_late else []
        hit = any(event.item_id in items_of(record) for record in (*shown, *shown_then))
        counts[(shown[0].model_version, shown[0].path, event.event_type, HIT if hit else MISS)] += 1
    return counts


class ServedReader(Protocol):
    def get_many(self, user_ids: list[str]) -> list[tuple[ServedRecord, ...] | ServedRecordError]: ...


ONLINE_ERROR_REASONS = ("invalid_event", "unreadable_record", "unavailable")  # what `error(reason, n)` is called with


class ServedLogUnavailable(RuntimeError):
    """Redis did not answer the served-log read of a polled batch; the consumer was moved back to it."""


class OnlineQualityJudge:
    """Reads the events topic, judges each event, counts. `count(labels, n)` receives the
    judge_events keys; `error(reason, n)` counts what is left out: "invalid_event" (per record the
    streaming job dead-letters), "unreadable_record" (per user and batch whose served records do not
    all decode: the user's events are unjudged) and "unavailable" (per failed attempt to read the broker or Redis).

    A batch is counted only after its offsets are committed: a commit that fails (a rebalance) or a
    served log that does not answer leaves the batch to be read again, and it is counted then, once.
    When Redis fails the consumer seeks back to the batch and keeps its partitions; when the broker
    fails it is made again."""

    def __init__(self, make_consumer: Callable[[], object], served: ServedReader, count: Callable[[tuple, int], None],
                 error: Callable[[str, int], None], ttl_s: int, max_event_bytes: int, answers: int = 3, retry_s: float = 2.0,
                 ripe_s: float = RIPE_S, clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.make_consumer, self.served, self.count, self.error = make_consumer, served, count, error
        self.ttl_ms, self.max_event_bytes, self.answers, self.retry_s = ttl_s * 1000, max_event_bytes, answers, retry_s
        self.ripe_ms, self.clock, self.sleep = int(ripe_s * 1000), clock, sleep
        self._consumer = None
        self._positions_committed = False
        self._failing = False
        self._heard_s = 0.0  # self.clock() when the broker last answered
        self._recent_ids: OrderedDict[tuple[str, str], None] = OrderedDict()  # (user, event_id) judged lately, oldest first

    def step(self) -> int:
        """One poll: judge its events, commit their offsets, count them. Returns the events judged."""
        if self._consumer is None:
            self._consumer, self._positions_committed, self._heard_s = self.make_consumer(), False, self.clock()
        consumer = self._consumer
        assigned = bool(consumer.assignment())
        # Until its starting positions are committed the consumer polls with a wait: a poll only starts
        # the offset lookups that set a new group's positions, and a commit before they end commits nothing.
        polled = consumer.poll(timeout_ms=0 if assigned and self._positions_committed else JOIN_POLL_MS, max_records=POLL_RECORDS)
        if not polled:
            if not self._positions_committed and assigned:
                # a new group starts at the latest offsets: commit them, so that its lag reads 0, not the whole topic
                consumer.commit()
                self._positions_committed = all(consumer.committed(partition) is not None for partition in consumer.assignment())
            elif assigned:
                if self.clock() - self._heard_s >= LIVENESS_S:  # raises while the broker does not answer
                    consumer.end_offsets(list(consumer.assignment()), timeout_ms=LIVENESS_TIMEOUT_MS)
                    self._heard_s = self.clock()
                self.sleep(IDLE_S)
            return 0
        self._heard_s = self.clock()
        # Only what is RIPE_S old: each partition goes back to its first younger record, read again later
        now_ms = int(self.clock() * 1000)
        ripe_before = now_ms - self.ripe_ms
        wait_ms = None
        for partition, records in polled.items():
            # young: entered in the last RIPE_S; a time further ahead is another clock's, judged at once
            # (waiting for it would hold its partition for good)
            young = next((i for i, record in enumerate(records) if ripe_before < record.timestamp <= now_ms + self.ripe_ms), None)
            if young is not None:
                consumer.seek(partition, records[young].offset)
                wait_ms = min(wait_ms or self.ripe_ms, records[young].timestamp - ripe_before)
                polled[partition] = records[:young]
        events, errors = [], Counter()
        for records in polled.values():
            for record in records:
                if any(name == REDRIVEN_HEADER for name, _ in record.headers or ()):
                    continue
                try:
                    events.append((accept_record(record_key(record.key), record.value, self.max_event_bytes, record.timestamp), record.timestamp))
                except EventError:
                    errors["invalid_event"] += 1
        events, judged_ids = self._first_copies(events)
        counts: Counter = Counter()
        if events:
            users = sorted({event.user_id for event, _ in events})
            try:
                stored = self.served.get_many(users)
            except Exception as exc:
                for partition, records in polled.items():
                    if records:  # an empty one went back to its young records above
                        consumer.seek(partition, records[0].offset)
                raise ServedLogUnavailable(f"served log: {exc}") from exc
            served = {}
            for user, answers in zip(users, stored):
                if isinstance(answers, ServedRecordError):
                    log.warning("%s; the user's events are counted unjudged", answers)
                    errors["unreadable_record"] += 1
                    answers = ()
                served[user] = answers
            counts = judge_events(events, served, self.ttl_ms, self.answers)
        consumer.commit()
        self._positions_committed = True
        self._remember(judged_ids)
        for labels, n in counts.items():
            self.count(labels, n)
        for reason, n in errors.items():
            self.error(reason, n)
        if wait_ms is not None and not any(polled.values()):  # all of it too young: wait for the oldest, not poll it again at once
            self.sleep(min(wait_ms, 1000) / 1000)
        return len(events)

    def _first_copies(self, events: list[tuple[BehaviourEvent, int]]) -> tuple[list[tuple[BehaviourEvent, int]], list[tuple[str, str]]]:
        """The events whose event_id was not judged lately nor earlier in the batch, and their
        (user, event_id) keys: remembered only once the batch is committed (_remember), so that a
        batch read again after a failure is judged, not skipped as its own copy."""
        first, keys, seen = [], [], set()
        for event, entered_ms in events:
            if event.event_id:
                key = (event.user_id, event.event_id)
                if key in self._recent_ids or key in seen:
                    continue
                seen.add(key)
                keys.append(key)
            first.append((event, entered_ms))
        return first, keys

    def _remember(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._recent_ids[key] = None
        while len(self._recent_ids) > RECENT_EVENT_IDS:
            self._recent_ids.popitem(last=False)

    def run(self, stop: threading.Event) -> None:
        """step() until `stop` is set; a failure is counted and logged (once per outage) and the
        batch read again after retry_s, so the judge outlives any outage."""
        while not stop.is_set():
            try:
                self.step()
            except Exception as exc:
                self.error("unavailable", 1)
                if not self._failing:
                    log.warning("online quality: cannot read events or served records (%s); retrying every %.0f s", exc, self.retry_s)
                    self._failing = True
                if not isinstance(exc, ServedLogUnavailable):
                    self.close()
                stop.wait(self.retry_s)
                continue
            if self._failing:
                log.info("online quality: judging events again")
                self._failing = False
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # closing a broken consumer must not hide the original error
                pass
            self._consumer = None
