"""A user's behaviour window: the last L behaviours in event-time order (pure logic, no Flink).

The job keeps one `UserWindow` per user in keyed state. Events may arrive out of order by up
to `allowed_lateness_ms` behind the newest event seen for that user; they are inserted in
event-time order. Anything later than that is refused as late (dead-lettered with the reason,
never silently lost). Redeliveries are recognised and ignored: by `event_id` when the producer
sets one, else by (item, type, event time) among events without an id. Restoring state from a checkpoint and replaying
Kafka from the checkpointed offsets therefore leaves every window exactly as if no failure had
happened: nothing missing, nothing twice.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from enum import Enum

import orjson

from streaming.events import BehaviourEvent


class Applied(Enum):
    ADDED = "added"  # the window changed: the user's interests must be re-extracted
    DUPLICATE = "duplicate"  # already in the window (a redelivery)
    LATE = "late"  # older than allowed behind this user's newest event: dead-lettered
    EVICTED = "evicted"  # valid, but older than every behaviour of a full window


@dataclass
class UserWindow:
    # (event_time_ms, item_id, event_type, event_id), oldest first
    behaviours: list[tuple[int, str, str, str]] = field(default_factory=list)
    newest_ms: int = -1
    profile: dict[str, str] = field(default_factory=dict)
    last_offset: str = ""  # "partition:offset" of the newest record applied

    def item_ids(self) -> tuple[str, ...]:
        return tuple(b[1] for b in self.behaviours)

    def apply(self, event: BehaviourEvent, max_length: int, allowed_lateness_ms: int, offset: str = "") -> Applied:
        if self.newest_ms >= 0 and event.event_time_ms < self.newest_ms - allowed_lateness_ms:
            return Applied.LATE
        # Redeliveries carry the same event time, so only that stretch of the window is searched.
        lo = bisect.bisect_left(self.behaviours, (event.event_time_ms,))
        for time_ms, item, event_type, event_id in self.behaviours[lo:]:
            if time_ms != event.event_time_ms:
                break
            if (event_id == event.event_id != "") or (not event.event_id and not event_id and item == event.item_id and event_type == event.event_type):
                return Applied.DUPLICATE
        if len(self.behaviours) >= max_length and event.event_time_ms < self.behaviours[0][0]:
            return Applied.EVICTED
        # After equal times, keep arrival order: insert behind every entry of the same time.
        position = bisect.bisect_left(self.behaviours, (event.event_time_ms + 1,))
        self.behaviours.insert(position, (event.event_time_ms, event.item_id, event.event_type, event.event_id))
        del self.behaviours[:-max_length]
        self.newest_ms = max(self.newest_ms, event.event_time_ms)
        if event.profile and event.profile != self.profile:
            self.profile = {**self.profile, **event.profile}
        if offset:
            self.last_offset = offset
        return Applied.ADDED

    # Flink keeps the window as a JSON string (its own string serializer), never pickled:
    # restoring a checkpoint must not run whatever code a pickle in it would. orjson (PyFlink's
    # Beam already needs it) is faster than pickle here. (A Flink byte array would reach Python
    # as a tuple of ints.)
    def to_state(self) -> str:
        return orjson.dumps([self.behaviours, self.newest_ms, self.profile, self.last_offset]).decode()

    @classmethod
    def from_state(cls, state: str | None) -> "UserWindow":
        if state is None:
            return cls()
        behaviours, newest_ms, profile, last_offset = orjson.loads(state)[:4]  # older checkpoints hold a 5th field, a "pending" flag no longer used
        return cls([tuple(b) for b in behaviours], newest_ms, profile, last_offset)
