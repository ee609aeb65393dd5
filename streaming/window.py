"""A user's behaviour window: the last L behaviours in event-time order (pure logic, no Flink).

The job keeps one `UserWindow` per user in keyed state. Events may arrive out of order by up
to `allowed_lateness_ms` behind the newest event seen for that user (its time counted at most up
to its record's Kafka timestamp: `vouched_ms`, see `apply`); they are inserted in event-time order. Anything later than
that is refused as late (dead-lettered with the reason, never silently lost), unless a full
window would not keep it anyway (evicted). Redeliveries are recognised and ignored: by `event_id` when the producer
sets one, else by (item, type, event time) among events without an id, among the behaviours in the
window and the last `max_length` a full window evicted at the time of its oldest behaviour (a copy
of one of them ties the oldest time and would otherwise look new; a copy of anything evicted
earlier is older than the whole window and refused as such). Restoring state from a checkpoint and replaying
Kafka from the checkpointed offsets therefore leaves every window the checkpoint holds exactly as if
no failure had happened: nothing missing, nothing twice. A user the checkpoint does not hold (new
since it, or expired) is seeded from the stored record, which the failed process may have written
after the checkpoint: that window is judged as a seeded one (below: older behaviours without their
times or ids, so a producer's retry of one of them applies again, and an event that was evicted
rather than late may come back as late).

A record at or before the newest applied offset of its partition (`last_offset`) and no newer than
the newest event time is a redelivery too: Kafka delivers a partition in order, and a user's
events share one partition. (The time bound keeps a recreated topic's newer events, whose offsets
start again, from being taken for old ones; an event of such a topic no newer than the user's newest
and at or below the stored offset is still taken for a redelivery and dropped, uncounted as late.
Offsets carry no topic, so a new topic name does not help: after recreating the events topic or
moving the job to another, start it without its state (no `--restore`) and with
[streaming].seed_windows_from_store = false; each user's window then starts again from their next event.)

A job that starts without its state (a state-layout change, a lost checkpoint, an expired state)
seeds a user's window from the user's stored feature-store record (`from_record`) instead of
starting it empty, so the next write does not replace a long stored window with a one-item one.
The record keeps the raw item ids, the newest event time, the vouched time and the time of each
profile value (so lateness and the profile are judged as the lost state judged them; a record
written before those two were kept bounds the first by its write time and counts every profile
value as set then) and the newest offset, not each
behaviour's time or id: the newest seeded behaviour carries the record's newest event time, the
others `UNKNOWN_TIME_MS`, before any event the window can still accept, in their stored order. So
a late but allowed event lands before the newest behaviour and is never evicted in favour of
older ones; it lands after every other seeded behaviour, though, even one it is older than. The
records the job reads again from its committed offsets, up to the stored offset, are recognised
by that offset and not applied twice; a copy resent under a new offset (a producer's retry) of the
newest behaviour is recognised by item and time, a seeded behaviour having no type or id, while a
copy of an older one is not (its time is unknown). (What such a start cannot know either: the events
of a write that was still queued when a checkpoint covered them and the job died before it, within
`batch_max_delay_ms`.)
The job writes a seeded window to its state whatever the first event did to it, so the store is
read once per such user (`apply_to_state`).
"""

from __future__ import annotations

import bisect
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import orjson

from streaming.events import MAX_MAP_ENTRIES, BehaviourEvent
from streaming.feature_store import InterestRecord

UNKNOWN_TIME_MS = -1  # a seeded behaviour's time when the record does not say: before every valid event, one at 0 too


class Applied(Enum):
    ADDED = "added"  # the window changed (a behaviour, or an evicted event's profile): the user's interests must be re-extracted
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
    # behaviours evicted at the oldest kept behaviour's time, in the same tuple form
    evicted_at_oldest: list[tuple[int, str, str, str]] = field(default_factory=list)
    # profile field -> (vouched, see below) event time of its value; a field missing here (seeded from a
    # record, or kept by an older checkpoint) counts as set at vouched_ms, so no late event replaces it
    profile_ms: dict[str, int] = field(default_factory=dict)
    # The newest event time as far as the records' Kafka timestamps vouch for it: each event counts
    # with min(its time, its record's timestamp). Lateness is judged against it, not newest_ms.
    vouched_ms: int = -1
    # [event_time_ms, item_id] of behaviours that left the window (pushed out by newer ones, or refused
    # as evicted) that the job may not have written to the user's seen set yet (lists, as the state's
    # JSON gives them back: no conversion on every event); and the job process that last queued a
    # write of the user: see apply_to_state
    departed: list[list] = field(default_factory=list)
    queued_by: str = ""

    def item_ids(self) -> tuple[str, ...]:
        return tuple(b[1] for b in self.behaviours)

    @classmethod
    def from_record(cls, record: InterestRecord) -> "UserWindow":
        """The window a stored record reflects (see the module docstring)."""
        times = [UNKNOWN_TIME_MS] * (len(record.window) - 1) + [record.last_event_ms]
        return cls([(time_ms, item, "", "") for time_ms, item in zip(times, record.window)], record.last_event_ms, dict(record.profile), record.last_offset,
                   profile_ms={k: t for k, t in record.profile_ms.items() if k in record.profile}, vouched_ms=vouched_time(record))

    def apply(self, event: BehaviourEvent, max_length: int, allowed_lateness_ms: int, offset: str = "", produced_ms: int | None = None,
              written_before_ms: int | None = None) -> Applied:
        """Behaviours this event pushes out of the window are kept in `departed` unless they are older
        than `written_before_ms` (None: none is known to be in the user's seen set yet); an evicted
        event's own behaviour always is (it is queued now). `produced_ms`: the record's Kafka timestamp. The time later events are judged late against
        (vouched_ms) moves at most to it: an event dated ahead of when it entered Kafka (a device
        clock minutes fast; events.MAX_AHEAD_MS allows an hour) is kept in its place, and newest_ms
        (redeliveries, the stored record) keeps its time, but it must not make the user's next
        correctly dated events late, or pin its profile values, for that long."""
        if offset and self.last_offset and event.event_time_ms <= self.newest_ms and _not_after(offset, self.last_offset):
            return Applied.DUPLICATE
        # Redeliveries carry the same event time, so only that stretch of the window is searched (and
        # what a full window evicted at its oldest time, which a copy of it ties). Before the lateness
        # check: a producer's retry of an event still in the window is a duplicate, however far the
        # user's newest event has moved on since.
        t = event.event_time_ms
        for b in self.behaviours[bisect.bisect_left(self.behaviours, (t,)):]:
            if b[0] != t:
                break
            if _same_event(b, event):
                return Applied.DUPLICATE
        left_at_oldest = self.evicted_at_oldest  # all of one time: the oldest kept behaviour's
        if left_at_oldest and left_at_oldest[0][0] == t and any(_same_event(b, event) for b in left_at_oldest):
            return Applied.DUPLICATE
        # Older than every behaviour of a full window first: such an event would not be kept however
        # late it is, and a resent copy of an evicted event is no late data to alert on.
        late = self.vouched_ms >= 0 and t < self.vouched_ms - allowed_lateness_ms
        vouched = t if produced_ms is None or produced_ms <= 0 else min(t, produced_ms)
        if len(self.behaviours) >= max_length and t < self.behaviours[0][0]:
            self._depart([[t, event.item_id]], max_length)
            # Its profile counts as an in-time event's does (fields no newer event set), or a value no
            # other event carries would be lost without a trace; a changed profile is a new tower input.
            if event.profile and not late and self._merge_profile(event.profile, vouched):
                if offset:
                    self.last_offset = offset
                return Applied.ADDED
            return Applied.EVICTED
        if late:
            return Applied.LATE
        # After equal times, keep arrival order: insert behind every entry of the same time.
        position = bisect.bisect_left(self.behaviours, (event.event_time_ms + 1,))
        self.behaviours.insert(position, (event.event_time_ms, event.item_id, event.event_type, event.event_id))
        excess = len(self.behaviours) - max_length  # 1 once the window is full
        if excess > 0:
            evicted = self.behaviours[:excess]
            del self.behaviours[:excess]
            unwritten = [[b[0], b[1]] for b in evicted if written_before_ms is None or b[0] >= written_before_ms]
            if unwritten:
                self._depart(unwritten, max_length)
            oldest_ms = self.behaviours[0][0]
            if self.evicted_at_oldest or evicted[-1][0] == oldest_ms:
                # Only those left at the oldest kept time count (a copy of an older one is older than the window), and
                # the newest max_length of them: a state that cannot grow with a burst of events of one time.
                self.evicted_at_oldest = [b for b in self.evicted_at_oldest + evicted if b[0] == oldest_ms][-max_length:]
        if event.profile:
            self._merge_profile(event.profile, vouched)
        self.newest_ms = max(self.newest_ms, t)
        self.vouched_ms = max(self.vouched_ms, vouched)
        if offset:
            self.last_offset = offset
        return Applied.ADDED

    def _depart(self, behaviours: list[list], max_length: int) -> None:
        # apply_to_state spills them above max_length; bounded for a caller of apply alone too
        self.departed.extend(behaviours)
        if len(self.departed) > 2 * max_length:
            del self.departed[:-2 * max_length]

    def _merge_profile(self, profile: dict[str, str], time_ms: int) -> bool:
        """The newest value of each field by event time (a late event sets only fields no newer event
        set; equal times: the later arrival), at most MAX_MAP_ENTRIES fields, the most recently set:
        a producer sending new keys with every event must not grow the state and the record without bound.
        Returns whether a field's value changed."""
        times = self.profile_ms  # in place: this runs for every event that carries a profile
        if len(times) != len(self.profile):  # fields kept without a time (a seeded window, an older checkpoint)
            for k in self.profile:
                times.setdefault(k, self.vouched_ms)
        # the profile before, when the cap may drop a field this event sets (then "changed" is the net change)
        before = dict(self.profile) if len(self.profile) + len(profile) > MAX_MAP_ENTRIES else None
        changed = False
        for k, v in profile.items():
            if time_ms >= times.get(k, time_ms):  # a new field, or one no newer event set
                changed = changed or self.profile.get(k) != v
                # moved to the end: the dict's order is the order of setting, so a tie goes to the later arrival
                self.profile.pop(k, None)
                times.pop(k, None)
                self.profile[k], times[k] = v, time_ms
        # Kept in order of their times (ties: as they came), so the cap keeps the last; usually already so
        in_order = [times[k] for k in self.profile]
        if len(in_order) > MAX_MAP_ENTRIES or in_order != sorted(in_order):
            kept = sorted(self.profile, key=times.__getitem__)[-MAX_MAP_ENTRIES:]  # stable: ties keep their order
            self.profile = {k: self.profile[k] for k in kept}
            self.profile_ms = {k: times[k] for k in kept}
        return changed if before is None else self.profile != before

    # Flink keeps the window as a JSON string (its own string serializer), never pickled:
    # restoring a checkpoint must not run whatever code a pickle in it would. orjson (PyFlink's
    # Beam already needs it) is faster than pickle here. (A Flink byte array would reach Python
    # as a tuple of ints.)
    def to_state(self) -> str:
        return orjson.dumps([self.behaviours, self.newest_ms, self.profile, self.last_offset, self.evicted_at_oldest, self.profile_ms,
                             self.vouched_ms, self.departed, self.queued_by]).decode()

    @classmethod
    def from_state(cls, state: str | None) -> "UserWindow":
        if state is None:
            return cls()
        behaviours, newest_ms, profile, last_offset, *rest = orjson.loads(state)
        # Older checkpoints end at last_offset, or hold a "pending" flag (no longer used) in 5th place,
        # or end before the profile's times, the vouched time (then: the newest event time) or the departed.
        evicted = [tuple(b) for b in rest[0]] if rest and isinstance(rest[0], list) else []
        profile_ms = rest[1] if len(rest) > 1 and isinstance(rest[1], dict) else {}
        vouched_ms = rest[2] if len(rest) > 2 and isinstance(rest[2], int) else newest_ms
        departed, queued_by = (rest[3], rest[4]) if len(rest) > 4 else ([], "")
        return cls([tuple(b) for b in behaviours], newest_ms, profile, last_offset, evicted, profile_ms, vouched_ms, departed, queued_by)


def vouched_time(record: InterestRecord) -> int:
    """The vouched time of the window a record reflects: the one stored with it; for a record written
    before it was stored, a bound: the time the record was written is no earlier than the Kafka
    timestamps of the events it reflects (loose when it was written long after them: a backlog, a
    backfill of such a record), and a device clock an hour fast must not make the user's next events
    late after a restart either."""
    if record.vouched_ms >= 0:
        return record.vouched_ms
    return min(record.last_event_ms, record.updated_ms) if record.updated_ms > 0 else record.last_event_ms


@dataclass(slots=True)
class StateUpdate:
    window: UserWindow
    outcome: Applied
    state: str | None  # the state to write back; None: leave it as it is
    requeued: list  # (event time ms, raw item id) pairs to queue again for the user's seen set
    # departed behaviours the state no longer keeps (more than max_length): for the caller to write to
    # the seen set at once, before a checkpoint can hold the state without them
    spill: list = field(default_factory=list)


def apply_to_state(state: str | None, event: BehaviourEvent, max_length: int, allowed_lateness_ms: int, offset: str = "",
                   seed: Callable[[str], UserWindow] | None = None, produced_ms: int | None = None, process_id: str = "",
                   queued_since_ms: int | None = None) -> StateUpdate:
    """Applies an event to the user's window kept as `state` (`to_state`; None: the job holds none,
    and the window starts from `seed(user id)`, the stored record's, when given, else empty). A window
    new to the state is written back whatever the event did, so the seed is read once per user.

    The seen set is written with the job's next batch, after the state that checkpoints take, so a
    restored state may reflect behaviours whose write died with the process: those still in the
    window and those that had left it (a burst through it, an event older than the full window). So
    the state keeps what left the window (`departed`) and which job process last queued a write of
    the user (`queued_by`; `process_id` is new with every start of the job's function). The first
    event of a state another process queued returns its window and departed behaviours in `requeued`,
    for the caller to queue again (the restored flush timer writes the same: job.py); a later event
    of this process lets the departed go once the user's batch is written (nothing queued any more).
    What an event pushes out is kept only when the user's queued write may hold it: not older than
    the oldest behaviour queued (`queued_since_ms`; None: nothing queued), as in a burst through the
    window within one batch; what left earlier was written with an earlier batch. So departed stay
    empty unless a user sends more than the window within one of the job's batches.
    The state keeps at most max_length of them; more (a burst through the window within one batch)
    are handed over as `spill`, for the caller to write at once (one seen-set write per max_length
    departures of such a burst; writing the whole queue instead made the job ~20% slower on the ML-1M
    replay, whose users rate in bursts)."""
    requeued: list = []
    written_before_ms = sys.maxsize if queued_since_ms is None else queued_since_ms
    cleared = False
    if state is None:
        window = seed(event.user_id) if seed else UserWindow()
        window.queued_by = process_id  # a seed is what the store holds: nothing to queue again
    else:
        window = UserWindow.from_state(state)
        if window.queued_by != process_id:
            requeued = [(b[0], b[1]) for b in window.behaviours] + window.departed
            written_before_ms = None  # queued again now, none of them written by this process
        elif window.departed and queued_since_ms is None:
            window.departed, cleared = [], True  # written with this process's last batch of the user
    queued_by, n_departed = window.queued_by, len(window.departed)
    outcome = window.apply(event, max_length, allowed_lateness_ms, offset, produced_ms, written_before_ms)
    spill: list = []
    if len(window.departed) > max_length:
        spill, window.departed = window.departed, []
    if requeued or outcome is Applied.ADDED or outcome is Applied.EVICTED:
        window.queued_by = process_id
    # (apply only appends to departed, a few at a time: its length tells whether it changed)
    changed = (state is None or outcome is Applied.ADDED or cleared or spill or len(window.departed) != n_departed
               or window.queued_by != queued_by)
    return StateUpdate(window, outcome, window.to_state() if changed else None, requeued, spill)


def _same_event(behaviour: tuple[int, str, str, str], event: BehaviourEvent) -> bool:
    """Whether a behaviour of the event's own time is this event: the same event_id, or for events
    without one the same item and type; for a behaviour seeded from a stored record (no type, no id)
    the same item."""
    _, item, event_type, event_id = behaviour
    if not event_type:
        # Seeded (`from_record`): the record keeps neither type nor id, so a producer's retry of the
        # newest event under a new offset would otherwise be applied twice. The price: another type
        # of behaviour on the same item in the same millisecond as the seeded one is taken for a copy.
        return item == event.item_id
    if event.event_id or event_id:
        return event_id == event.event_id
    return item == event.item_id and event_type == event.event_type


def _not_after(offset: str, last_offset: str) -> bool:
    """Whether Kafka record `offset` ("partition:offset") is at or before `last_offset` of the same partition."""
    partition, _, position = offset.partition(":")
    last_partition, _, last_position = last_offset.partition(":")
    return partition == last_partition and int(position) <= int(last_position)
