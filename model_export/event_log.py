"""The retraining event log: every valid behaviour event read from Kafka since the base dataset.

Retraining reads the events topic with its own consumer group, from the offsets it stopped at, up
to the end offsets seen when it starts (a bounded read, so a run always ends). Events are appended
here, with the next offsets to read, in one atomic file write:

    <retrain state_dir>/event_log.npz   users, items, times_ms, event_ids (str / int64 arrays),
                                        profile_users + profile_json (latest profile per user),
                                        partitions + next_offsets

A crash before the write loses nothing (the offsets did not move either); a crash after it leaves
the group's committed offsets behind, which is harmless: the log's offsets are the ones used.
Records the job would dead-letter (malformed, unknown fields, ...) are counted and skipped.
"""

from __future__ import annotations

import json
import sys
import time
import typing
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from infra.config import ConfigError, StartOffsets
from infra.files import write_atomically
from streaming.events import MAX_EVENT_BYTES, BehaviourEvent, EventError, accept_record, record_key
from streaming.kafka_clients import group_consumer, offset_and_metadata, records_before, resumed_offsets, topic_partitions, unread

LOG_FILE = "event_log.npz"
START_POLICIES = typing.get_args(StartOffsets)


@dataclass
class EventLog:
    users: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    items: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    times_ms: np.ndarray = field(default_factory=lambda: np.array([], dtype=np.int64))
    event_ids: np.ndarray = field(default_factory=lambda: np.array([], dtype=str))
    profiles: dict[str, dict[str, str]] = field(default_factory=dict)  # raw user id -> latest profile
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read

    def __len__(self) -> int:
        return len(self.users)

    def append(self, events: list[BehaviourEvent], offsets: dict[int, int]) -> int:
        """Adds events not already in the log (by user and event id, where they have one: producers may
        number events per user, as the job's per-user windows allow); returns how many."""
        if not events:
            self.offsets.update(offsets)
            return 0
        seen = {(u, e) for u, e in zip(self.users.tolist(), self.event_ids.tolist()) if e}
        fresh = []
        for e in events:
            if e.event_id and (e.user_id, e.event_id) in seen:
                continue  # a producer retry or a replay of the same event
            seen.add((e.user_id, e.event_id))
            fresh.append(e)
            if e.profile:
                self.profiles[e.user_id] = dict(e.profile)
        if fresh:
            self.users = np.concatenate([self.users, np.array([e.user_id for e in fresh], dtype=str)])
            self.items = np.concatenate([self.items, np.array([e.item_id for e in fresh], dtype=str)])
            self.times_ms = np.concatenate([self.times_ms, np.array([e.event_time_ms for e in fresh], dtype=np.int64)])
            self.event_ids = np.concatenate([self.event_ids, np.array([e.event_id for e in fresh], dtype=str)])
        self.offsets.update(offsets)
        return len(fresh)

    def save(self, state_dir: Path) -> Path:
        partitions = sorted(self.offsets)
        return write_atomically(state_dir / LOG_FILE, lambda fh: np.savez(
            fh, users=self.users, items=self.items, times_ms=self.times_ms, event_ids=self.event_ids,
            profile_users=np.array(list(self.profiles), dtype=str),
            profile_json=np.array([json.dumps(p, sort_keys=True) for p in self.profiles.values()], dtype=str),
            partitions=np.array(partitions, dtype=np.int64), next_offsets=np.array([self.offsets[p] for p in partitions], dtype=np.int64),
        ))

    @classmethod
    def load(cls, state_dir: Path) -> "EventLog":
        path = state_dir / LOG_FILE
        if not path.is_file():
            return cls()
        with np.load(path, allow_pickle=False) as z:
            profiles = {str(u): json.loads(str(p)) for u, p in zip(z["profile_users"], z["profile_json"])}
            offsets = {int(p): int(o) for p, o in zip(z["partitions"], z["next_offsets"])}
            return cls(z["users"].astype(str), z["items"].astype(str), z["times_ms"].astype(np.int64), z["event_ids"].astype(str), profiles, offsets)


@dataclass
class ReadReport:
    events: list[BehaviourEvent]
    offsets: dict[int, int]  # partition -> next offset after this read
    rejected: Counter  # EventError kind -> count (the job dead-letters these)
    seconds: float
    gaps: list[str] = field(default_factory=list)  # records the log can no longer have (retention, a recreated topic)


def pending_events(kafka, topic: str, group: str, offsets: dict[int, int], start: str = "earliest") -> tuple[int, dict[int, int]]:
    """How many records wait on the topic after `offsets` (the scheduler's trigger), and the offset
    each partition was counted from (partition -> offset; `start` decides for unrecorded ones)."""
    consumer = group_consumer(kafka, group)
    try:
        partitions = topic_partitions(consumer, topic)
        starts, _ = _start_offsets(consumer, partitions, offsets, start)
        ends = consumer.end_offsets(partitions)
        return sum(max(0, ends[tp] - starts[tp]) for tp in partitions), {tp.partition: starts[tp] for tp in partitions}
    finally:
        consumer.close()


def read_new_events(kafka, topic: str, group: str, offsets: dict[int, int], start: str = "earliest",
                    max_events: int = 0, timeout_s: float = 120.0, progress: bool = True, max_event_bytes: int = MAX_EVENT_BYTES) -> ReadReport:
    """Reads every record after `offsets` (partition -> next offset) up to the end offsets seen now.

    Partitions without a recorded offset start at `start`: earliest, latest, or the group's
    committed offset. max_events > 0 stops early, and so does `timeout_s` (with a warning): what was
    read is returned with its offsets, the rest is read next time, so a backlog larger than one
    read's time still drains run by run. A record is taken by the job's own rule (`accept_record`);
    `max_event_bytes` is the job's [streaming].max_event_bytes.
    """
    started = time.perf_counter()
    consumer = group_consumer(kafka, group)
    try:
        partitions = topic_partitions(consumer, topic)
        starts, gaps = _start_offsets(consumer, partitions, offsets, start)
        ends = consumer.end_offsets(partitions)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, starts[tp])
        position = dict(starts)
        total = sum(max(0, ends[tp] - starts[tp]) for tp in partitions)
        if max_events:
            total = min(total, max_events)
        events: list[BehaviourEvent] = []
        rejected: Counter = Counter()
        read = 0
        last_report = time.monotonic()
        for tp, record in records_before(consumer, ends, timeout_s):
            position[tp] = record.offset + 1
            read += 1
            try:
                events.append(accept_record(record_key(record.key), record.value, max_event_bytes, record.timestamp))
            except EventError as exc:
                rejected[exc.kind] += 1
            if read >= total:
                break
            if progress and time.monotonic() - last_report > 2:
                print(f"  read {read:,}/{total:,} new events", file=sys.stderr, flush=True)
                last_report = time.monotonic()
        if read < total and unread(consumer, ends):
            print(f"warning: read {read:,} of {total:,} records of {topic} in {timeout_s:.0f} s (is the broker at "
                  f"{kafka.bootstrap_servers} slow?): the rest is read by the next retraining", file=sys.stderr, flush=True)
        return ReadReport(events, {tp.partition: position[tp] for tp in partitions}, rejected, time.perf_counter() - started, gaps)
    finally:
        consumer.close()


def commit_offsets(kafka, topic: str, group: str, offsets: dict[int, int]) -> None:
    """Mirrors the log's offsets into the consumer group, so lag dashboards see the retraining too."""
    from kafka import TopicPartition

    consumer = group_consumer(kafka, group)
    try:
        consumer.commit({TopicPartition(topic, p): offset_and_metadata(o) for p, o in offsets.items()})
    finally:
        consumer.close()


def _start_offsets(consumer, partitions: list, offsets: dict[int, int], start: str) -> tuple[dict, list[str]]:
    """(partition -> offset to read from, what the log missed: one line per partition with a gap)."""
    if start not in START_POLICIES:
        raise ConfigError(f"[retrain].start_offsets {start!r}: use one of {', '.join(START_POLICIES)}")
    earliest = consumer.beginning_offsets(partitions)
    latest = consumer.end_offsets(partitions)
    resumed, gaps = resumed_offsets(partitions, offsets, earliest, latest, "retraining", "retrain more often than the topic's retention")
    out = {}
    for tp in partitions:
        if tp in resumed:
            out[tp] = resumed[tp]
        elif start == "committed":
            committed = consumer.committed(tp)
            out[tp] = earliest[tp] if committed is None else committed
        else:
            out[tp] = earliest[tp] if start == "earliest" else latest[tp]
    return out, gaps
