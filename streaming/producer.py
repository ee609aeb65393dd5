"""The producer library for applications, and the dataset replayer behind `python -m streaming produce`.

`EventProducer.send` validates an event against the contract before it leaves the process (an
application learns about a bad event at once, not from the dead-letter topic), keys it by user
id and sends it with acks=all (kafka-python's defaults otherwise: idempotent, retried until its
120 s delivery timeout). `replay` turns a dataset's interactions into events in event-time
order at a chosen rate or speed-up of the real clock, and says which were not acknowledged.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from streaming.events import MAX_EVENT_BYTES, BehaviourEvent, EventError, encode_event
from streaming.kafka_clients import python_client_options


class EventProducer:
    def __init__(self, kafka, linger_ms: int = 5, max_event_bytes: int = MAX_EVENT_BYTES, **overrides):
        """`max_event_bytes`: the job's record limit, [streaming].max_event_bytes."""
        from kafka import KafkaProducer

        options = {**python_client_options(kafka), "acks": "all", "linger_ms": linger_ms, **overrides}
        self.producer = KafkaProducer(**options)
        self.topic = kafka.events_topic
        self.max_event_bytes = max_event_bytes
        self.sent = 0

    @classmethod
    def for_config(cls, config, **overrides) -> "EventProducer":
        """A producer to [kafka] that refuses what the job would: [streaming].max_event_bytes."""
        return cls(config.kafka, max_event_bytes=config.streaming.max_event_bytes, **overrides)

    def send(self, event: BehaviourEvent):
        """Queues one event (validated and encoded here; EventError if the job would refuse it);
        returns kafka-python's future."""
        # The record's timestamp is set here so the check against it is the job's (an event dated over
        # an hour ahead of it, e.g. microseconds sent as milliseconds, is dead-lettered as "future").
        produced_ms = int(time.time() * 1000)
        value = encode_event(event, self.max_event_bytes, produced_ms)  # first: it refuses a user id that is no UTF-8 text as an EventError
        return self.send_encoded(event.user_id, value, produced_ms)

    def send_encoded(self, user_id: str, value: bytes, produced_ms: int, headers: list[tuple[str, bytes]] | None = None):
        """Queues an encoded event of `user_id` that the job's rule (`accept_record`) takes from a
        record stamped `produced_ms` (a dead letter's original value: streaming/redrive.py)."""
        future = self.producer.send(self.topic, key=user_id.encode(), value=value, timestamp_ms=produced_ms, headers=headers)
        self.sent += 1
        return future

    def send_raw(self, user_id: str, value: bytes):
        """Sends bytes as they are: for tests and fault injection of malformed records."""
        return self.producer.send(self.topic, key=user_id.encode(), value=value)

    def flush(self, timeout_s: float | None = None) -> None:
        self.producer.flush(timeout=timeout_s)

    def close(self) -> None:
        self.producer.close()

    def __enter__(self) -> "EventProducer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class ReplayEvents:
    """A dataset's interactions as events in event-time order (ties keep the file order)."""

    users: np.ndarray  # raw user id per event
    items: np.ndarray
    times_ms: np.ndarray
    profiles: dict[str, dict[str, str]]  # raw user id -> profile fields

    @classmethod
    def from_dataset(cls, dataset: str, data_dir, shared_data_dir) -> "ReplayEvents":
        from model_export.data import load_raw

        raw = load_raw(dataset, data_dir, shared_data_dir)
        frame = raw.frame.sort_values("ts", kind="stable")
        profiles = {str(u): {str(k): str(v) for k, v in row.items()} for u, row in raw.user_profile.to_dict("index").items()}
        return cls(frame["user"].to_numpy(str), frame["item"].to_numpy(str), frame["ts"].to_numpy(np.int64), profiles)

    def __len__(self) -> int:
        return len(self.users)

    def events(self, start: int = 0, stop: int | None = None) -> Iterator[BehaviourEvent]:
        for i in range(start, len(self) if stop is None else min(stop, len(self))):
            user = str(self.users[i])
            yield BehaviourEvent(user, str(self.items[i]), "click", int(self.times_ms[i]), event_id=f"replay-{i}", profile=self.profiles.get(user, {}))


class ReplayError(RuntimeError):
    """A replay that stopped before its end or whose events Kafka did not all acknowledge.
    `first_failed`: the position (0 = the first event of the replay) from which to send again, the
    first event not acknowledged or not sent; resending from there loses nothing (the events after
    it that did arrive come again with their event ids, and the job drops those copies). `message`:
    why it stopped, when it was not a send Kafka refused (an invalid event, an interruption)."""

    def __init__(self, first_failed: int, failed: int, sent: int, error: BaseException, message: str = ""):
        super().__init__(message or f"{failed} of {sent} events were not acknowledged by Kafka (the first at position {first_failed}: {error!s:.200})")
        self.first_failed, self.failed, self.sent, self.error = first_failed, failed, sent, error


class _Failures:
    """Positions of the sends that failed, as the producer's I/O thread reports them."""

    def __init__(self):
        self.lock = threading.Lock()
        self.count, self.first, self.error = 0, None, None

    def add(self, position: int, error: BaseException) -> None:
        with self.lock:
            self.count += 1
            if self.first is None or position < self.first:
                self.first, self.error = position, error


def paced(events: Iterable[BehaviourEvent], rate: float = 0.0, speedup: float = 0.0) -> Iterator[BehaviourEvent]:
    """Each event when it is due: `rate` events per second, or the event-time gaps divided by
    `speedup`, or at once (both 0)."""
    started = time.perf_counter()
    first_event_ms = None
    for n, event in enumerate(events):
        if rate > 0:
            due = started + n / rate
        elif speedup > 0:
            first_event_ms = event.event_time_ms if first_event_ms is None else first_event_ms
            due = started + (event.event_time_ms - first_event_ms) / 1000.0 / speedup
        else:
            due = 0.0
        wait = due - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        yield event


def replay(
    events: Iterable[BehaviourEvent],
    producer: EventProducer,
    rate: float = 0.0,  # events per second; 0 = as fast as possible
    speedup: float = 0.0,  # alternatively: event-time gaps divided by this factor
    on_progress: Callable[[int], None] = lambda sent: None,
) -> int:
    """Sends events paced by rate or by their own timestamps and waits until Kafka has them all;
    returns how many were sent. ReplayError when any was not acknowledged (flush waits, it does not
    report): a count of queued events would pass lost ones for sent, and a resume skip them; also
    when an event is invalid or the replay is interrupted (Ctrl-C), once what was queued before is
    flushed, with the position to resume from."""
    sent = 0
    failures = _Failures()
    stopped: ReplayError | None = None
    try:
        for event in paced(events, rate, speedup):
            position, sent = sent, sent + 1
            try:
                producer.send(event).add_errback(failures.add, position)
            except EventError as exc:  # the dataset's own event breaks the contract (a time far ahead, say)
                sent = position
                stopped = ReplayError(position, 0, position, exc, f"the interaction at position {position} is no valid event ({exc}): "
                                      "fix it in the dataset (event times are milliseconds since the epoch)")
                break
            except Exception as exc:  # the producer refused to queue it (no metadata within max_block_ms, a closed producer)
                failures.add(position, exc)
                break
            if sent % 1000 == 0:
                on_progress(sent)
    except KeyboardInterrupt as exc:
        stopped = ReplayError(sent, 0, sent, exc, f"interrupted after {sent} events were queued")
    producer.flush()
    on_progress(sent)
    if failures.count:  # an earlier event that did not arrive is where a resume must start
        raise ReplayError(failures.first, failures.count, sent, failures.error)
    if stopped is not None:
        raise stopped
    return sent
