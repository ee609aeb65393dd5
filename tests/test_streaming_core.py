"""The streaming core without servers: the event contract, the per-user window and the micro-batch writer."""

import base64
import copy
import dataclasses
import json
import time
from types import SimpleNamespace

import numpy as np
import pytest

from streaming.events import EVENT_TYPES, BehaviourEvent, EventError, accept_record, encode_event, json_schema, parse_event
from streaming.feature_store import InMemoryFeatureStore, InterestRecord, SeenOnly, decode, stored_fields
from streaming.interest_writer import FixedTower, InterestWriter, dead_letter
from streaming.window import Applied, UserWindow


def event(item="i1", t=1_000, user="u1", **kw) -> BehaviourEvent:
    return BehaviourEvent(user, item, kw.pop("event_type", "click"), t, **kw)


# ----------------------------------------------------------------------------- contract


def test_an_event_survives_encode_then_parse():
    e = event(event_id="e-1", profile={"gender": "F"}, side={"page": "home", "position": 3})
    assert parse_event(encode_event(e)) == e


@pytest.mark.parametrize(
    "raw, kind",
    [
        (b"{not json", "malformed"),
        (b"\xff\xfe", "malformed"),
        (b"[1, 2]", "malformed"),
        (b'{"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": 1, "price": 3}', "unknown_field"),
        (b'{"schema": 1, "user_id": "u", "event_type": "click", "event_time_ms": 1}', "missing_field"),
        (b'{"schema": 2, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": 1}', "invalid"),
        (b'{"schema": 1, "user_id": "u", "item_id": "i", "event_type": "like", "event_time_ms": 1}', "invalid"),
        (b'{"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": -5}', "invalid"),
        (b'{"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": true}', "invalid"),
        (b'{"schema": 1, "user_id": "", "item_id": "i", "event_type": "click", "event_time_ms": 1}', "invalid"),
        (b'{"schema": 1, "user_id": "u", "item_id": 7, "event_type": "click", "event_time_ms": 1}', "invalid"),
        (b'{"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": 1, "profile": {"age": 3}}', "invalid"),
    ],
)
def test_invalid_records_are_refused_with_a_reason(raw, kind):
    with pytest.raises(EventError) as caught:
        parse_event(raw)
    assert caught.value.kind == kind and str(caught.value)


@pytest.mark.parametrize("field", ["user_id", "item_id", "event_id"])
@pytest.mark.parametrize("control", ["\x00", "\t", "\x1f", "\x7f"])
def test_an_id_with_a_control_character_is_refused_by_the_parser_and_the_schema(field, control):
    """Retraining's numpy strings drop a trailing NUL and its pandas hashing stops at one: the users
    "x\\0a" and "x\\0b" were two to the job, one to retraining, whose merge then failed for good."""
    obj = {"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": 1, field: f"x{control}a"}
    with pytest.raises(EventError, match="without control characters") as caught:
        parse_event(json.dumps(obj).encode())
    assert caught.value.kind == "invalid"
    jsonschema = pytest.importorskip("jsonschema")
    assert not jsonschema.Draft202012Validator(json_schema()).is_valid(obj)
    assert parse_event(json.dumps({**obj, field: "x\u0080a"}).encode())  # C1 characters are no part of the rule


BASE_RECORD = '"schema": 1, "event_type": "click", "event_time_ms": 1'


@pytest.mark.parametrize("record", [
    '{"user_id": "a", "item_id": "i", "user_id": "b", %s}',
    '{"user_id": "a", "item_id": "Star Wars: Episode IV", "user_id": "b", %s}',  # a colon in a string besides
    '{"user_id": "a", "item_id": "i", "\\u0075ser_id": "b", %s}',  # the same key, escaped
    '{"user_id": "a", "item_id": "i", "profile": {"age": "25", "age": "56"}, %s}',
    '{"user_id": "a", "item_id": "i", "side": {"page": "a:b", "page": "c"}, %s}',
])
def test_a_key_repeated_in_one_object_is_refused(record):
    """orjson keeps the last value of a repeated key, other parsers the first: a consumer in another
    language would have read user "a" where the job read "b"."""
    with pytest.raises(EventError, match="appears twice") as caught:
        parse_event((record % BASE_RECORD).encode())
    assert caught.value.kind == "malformed"


@pytest.mark.parametrize("record", [
    '{"user_id": "a", "item_id": "Star Wars: Episode IV", %s}',
    '{"user_id": "a:b", "item_id": "i", "event_id": "x:y", "side": {"url": "https://e.com/p?q=1:2"}, %s}',
    '{"user_id": "a", "item_id": "i", "profile": {"age": "25"}, "side": {"age": "25"}, %s}',  # one key, two objects
])
def test_colons_in_strings_and_keys_shared_by_two_objects_are_no_repeat(record):
    assert parse_event((record % BASE_RECORD).encode()).user_id in ("a", "a:b")


def test_oversized_records_are_refused_before_parsing():
    raw = encode_event(event()) + b" " * 5000
    with pytest.raises(EventError, match="oversized") as caught:
        parse_event(raw, max_bytes=4096)
    assert caught.value.kind == "oversized"


@pytest.mark.parametrize("bad", [
    event(event_type="like"),
    event(user=""),
    event(item="x" * 257),
    event(t=-1),
    event(profile={"age": 25}),
    event(side={"flag": True}),
    event(item="a\ud800b"),  # a lone surrogate: no UTF-8 encoding
    event(side={"when": object()}),  # not a JSON value
])
def test_the_producer_side_refuses_what_the_job_would_dead_letter(bad):
    with pytest.raises(EventError) as caught:
        encode_event(bad)
    assert caught.value.kind == "invalid"


def test_the_producer_validates_against_the_configured_record_limit(monkeypatch):
    import kafka

    from infra.config import KafkaConfig
    from streaming.producer import EventProducer

    sent = []
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **options: type("Client", (), {"send": lambda self, topic, key, value, timestamp_ms, headers: sent.append(value)})())
    producer = EventProducer(KafkaConfig(), max_event_bytes=200)
    producer.send(event())
    with pytest.raises(EventError, match="oversized"):
        producer.send(event(side={"note": "y" * 200}))  # well under the default 4 KB
    with pytest.raises(EventError):
        producer.send(event(event_type="like"))
    with pytest.raises(EventError):  # the key too: a user id with no UTF-8 form
        producer.send(event(user="u\ud800"))
    assert len(sent) == 1 and parse_event(sent[0]) == event()


def test_the_producer_refuses_an_event_dated_over_an_hour_after_it_is_sent(monkeypatch):
    """The job dead-letters such an event as "future" (microseconds sent as milliseconds): the
    producer stamps the record itself and applies the same rule before sending."""
    import kafka

    from infra.config import KafkaConfig
    from streaming.events import MAX_AHEAD_MS
    from streaming.producer import EventProducer

    sent = []
    monkeypatch.setattr(kafka, "KafkaProducer", lambda **options: type("Client", (), {
        "send": lambda self, topic, key, value, timestamp_ms, headers: sent.append((value, timestamp_ms))})())
    producer = EventProducer(KafkaConfig())
    now_ms = int(time.time() * 1000)
    with pytest.raises(EventError) as caught:
        producer.send(event(t=now_ms * 1000))
    assert caught.value.kind == "future" and not sent
    producer.send(event(t=now_ms + MAX_AHEAD_MS // 2))  # a fast clock within the hour is accepted, as by the job
    value, stamped_ms = sent[0]
    assert accept_record("u1", value, produced_ms=stamped_ms) == event(t=now_ms + MAX_AHEAD_MS // 2)


class _FailingAfterFlush:
    """An EventProducer whose sends the broker acknowledges except at the given positions."""

    def __init__(self, failing: set[int]):
        from kafka.future import Future

        self.failing, self.futures, self.Future = failing, [], Future

    def send(self, event):
        self.futures.append(self.Future())
        return self.futures[-1]

    def flush(self):
        from kafka.errors import KafkaTimeoutError

        for position, future in enumerate(self.futures):  # out of order, as batches of partitions complete
            if position not in self.failing:
                future.success(None)
        for position in sorted(self.failing, reverse=True):
            self.futures[position].failure(KafkaTimeoutError(f"Expiring record {position}"))


def test_a_replay_with_unacknowledged_events_fails_naming_the_first_of_them():
    """flush() waits, it never raises: a replay counting queued events as sent passed lost ones
    for delivered, and `produce` printed a next_start past them (exit 0)."""
    from streaming.producer import ReplayError, replay

    events = [event(t=i) for i in range(10)]
    with pytest.raises(ReplayError) as caught:
        replay(iter(events), _FailingAfterFlush({7, 3, 4}))
    assert (caught.value.first_failed, caught.value.failed, caught.value.sent) == (3, 3, 10)
    assert "Expiring record 3" in str(caught.value)
    assert replay(iter(events), _FailingAfterFlush(set())) == 10


def test_a_replay_stopped_by_an_invalid_event_or_ctrl_c_flushes_and_names_where_to_resume():
    """What was queued before the stop is flushed and checked: an earlier send Kafka refused is where
    a resume starts (it went unreported behind the invalid event), else the stopping position."""
    from streaming.events import EventError
    from streaming.producer import ReplayError, replay

    class RefusingAt(_FailingAfterFlush):
        def __init__(self, failing, invalid_at):
            super().__init__(failing)
            self.invalid_at = invalid_at

        def send(self, event):
            if len(self.futures) == self.invalid_at:
                raise EventError("event_time_ms is more than 60 min after ...", kind="future")
            return super().send(event)

    events = [event(t=i) for i in range(10)]
    with pytest.raises(ReplayError) as caught:
        replay(iter(events), RefusingAt(set(), invalid_at=6))
    assert (caught.value.first_failed, caught.value.failed, caught.value.sent) == (6, 0, 6)
    assert str(caught.value).startswith("the interaction at position 6 is no valid event")
    with pytest.raises(ReplayError) as caught:
        replay(iter(events), RefusingAt({2}, invalid_at=6))
    assert (caught.value.first_failed, caught.value.failed) == (2, 1) and "Expiring record 2" in str(caught.value)

    def interrupted():
        yield from events[:4]
        raise KeyboardInterrupt

    producer = _FailingAfterFlush(set())
    with pytest.raises(ReplayError, match="interrupted after 4 events were queued") as caught:
        replay(interrupted(), producer)
    assert caught.value.first_failed == 4 and all(f.succeeded() for f in producer.futures)  # flushed before the report


def test_the_json_schema_is_generated_from_the_contract():
    schema = json_schema()
    assert set(schema["required"]) == {"schema", "user_id", "item_id", "event_type", "event_time_ms"}
    assert schema["properties"]["event_type"]["enum"] == list(EVENT_TYPES)
    assert schema["additionalProperties"] is False


def test_retraining_takes_exactly_the_records_the_job_accepts(monkeypatch):
    """The event log reads the topic with the job's rule: its record limit, a key that is its user id."""
    from conftest import FakeTopicConsumer

    from model_export import event_log

    big = event(user="42", side={f"k{i}": "x" * 200 for i in range(16)})  # over the default 4 KB
    values = [encode_event(big, max_bytes=8192), encode_event(event(user="42")), encode_event(event(user="42", t=1_000 + 3_600_001))]
    # (key, value, Kafka timestamp): the last one is dated over an hour after it entered Kafka
    records = [(b"42", values[0], 1_000), (None, values[1], 1_000), (b"7", values[1], 1_000), (b"42", None, 1_000), (b"42", values[1], -1),
               (b"42", values[2], 1_000)]
    monkeypatch.setattr(event_log, "group_consumer", lambda kafka, group: FakeTopicConsumer(records))  # all in the first poll
    read = event_log.read_new_events(None, "events", "group", {}, progress=False, max_event_bytes=8192)
    assert read.events == [big, event(user="42")] and read.offsets == {0: 6}  # a record without a timestamp (-1) is not judged by it
    assert read.rejected == {"invalid": 2, "malformed": 1, "future": 1}  # no key, another user's key (dead-lettered by the job), no value, future


def test_dead_letters_keep_the_reason_and_the_original_value():
    record = json.loads(dead_letter("malformed JSON", "malformed", b"{oops", 1, 42, 123, "events"))
    assert record == {**record, "reason": "malformed JSON", "kind": "malformed", "partition": 1, "offset": 42, "value": "{oops", "truncated": False}
    assert "value_base64" not in record
    # bytes that are no UTF-8 read alike as text; base64 keeps each exactly, to be replayed
    one, other = (json.loads(dead_letter("not UTF-8", "malformed", raw, 0, 1, 2, "events")) for raw in (b"\xff\xfe{}", b"\xfe\xff{}"))
    assert one["value"] == other["value"]
    assert [base64.b64decode(r["value_base64"]) for r in (one, other)] == [b"\xff\xfe{}", b"\xfe\xff{}"]


# ----------------------------------------------------------------------------- window


def test_window_orders_by_event_time_within_the_lateness_bound():
    w = UserWindow()
    assert w.apply(event("a", 3_000), 10, 2_500) is Applied.ADDED
    assert w.apply(event("b", 1_000), 10, 2_500) is Applied.ADDED  # 2 s behind: inserted in order
    assert w.apply(event("c", 4_000), 10, 2_500) is Applied.ADDED
    assert w.item_ids() == ("b", "a", "c")
    assert w.apply(event("d", 1_000), 10, 2_500) is Applied.LATE  # 3 s behind the newest
    assert w.item_ids() == ("b", "a", "c")


def test_a_retry_of_an_event_still_in_the_window_is_a_duplicate_not_late():
    w = UserWindow()
    assert w.apply(event("a", 1_000, event_id="x"), 10, 2_500, offset="0:1") is Applied.ADDED
    assert w.apply(event("b", 9_000), 10, 2_500, offset="0:2") is Applied.ADDED  # the newest moves 8 s on
    # the producer's retry of "a" lands at a later offset: still in the window, so not dead-lettered as late
    assert w.apply(event("a", 1_000, event_id="x"), 10, 2_500, offset="0:3") is Applied.DUPLICATE
    assert w.apply(event("c", 1_000), 10, 2_500, offset="0:4") is Applied.LATE  # a new event that old is


def test_a_late_events_profile_does_not_override_a_newer_events_values():
    w = UserWindow()
    w.apply(event("a", 2_000, profile={"age": "30"}), 10, 5_000)
    w.apply(event("b", 1_000, profile={"age": "25", "gender": "F"}), 10, 5_000)  # older, arrived later
    assert w.profile == {"gender": "F", "age": "30"}  # the field no newer event set is filled in
    w.apply(event("c", 3_000, profile={"age": "31"}), 10, 5_000)
    assert w.profile == {"gender": "F", "age": "31"}


def test_a_late_event_sets_a_profile_field_only_an_older_event_set():
    w = UserWindow()
    w.apply(event("a", 100_000, profile={"age": "25"}), 10, 60_000)
    w.apply(event("b", 200_000, profile={"gender": "F"}), 10, 60_000)
    w.apply(event("c", 150_000, profile={"age": "30", "gender": "M"}), 10, 60_000)  # late: newer than age's, older than gender's
    assert w.profile == {"age": "30", "gender": "F"}
    restored = UserWindow.from_state(w.to_state())
    restored.apply(event("d", 160_000, profile={"age": "31"}), 10, 60_000)  # the fields' times survive the state
    restored.apply(event("e", 120_000, profile={"age": "29"}), 10, 60_000)
    assert restored.profile == {"age": "31", "gender": "F"}
    # a state of older code keeps no times: its fields count as set at its newest event, as before
    older = UserWindow.from_state(json.dumps(json.loads(w.to_state())[:5]))
    older.apply(event("f", 190_000, profile={"age": "40"}), 10, 60_000)
    assert older.profile == {"age": "30", "gender": "F"}


def test_an_event_older_than_a_full_window_still_brings_its_profile_fields():
    """It is not kept in the window (EVICTED), but a field only it carries was lost without a trace
    (no dead letter to redrive): it sets the fields no newer event set, and a change is a new window
    (ADDED: the record is rewritten with the profile the tower reads)."""
    w = UserWindow()
    for i, t in enumerate((10_000, 10_001, 10_002)):
        w.apply(event(f"i{i}", t, profile={"age": "25"}), 3, 60_000)
    assert w.apply(event("old", 9_995, profile={"gender": "F", "age": "18"}), 3, 60_000, offset="0:7") is Applied.ADDED
    assert w.profile == {"age": "25", "gender": "F"} and w.item_ids() == ("i0", "i1", "i2") and w.last_offset == "0:7"
    assert w.apply(event("old2", 9_996, profile={"gender": "F"}), 3, 60_000) is Applied.EVICTED  # nothing new: no rewrite
    assert w.apply(event("older", 1_000, profile={"city": "x"}), 3, 5_000) is Applied.EVICTED  # and too late: not applied
    assert "city" not in w.profile


def test_a_profile_field_set_by_two_events_of_the_same_time_keeps_the_later_arrival():
    w = UserWindow()
    w.apply(event("a", 1_000, profile={"age": "25"}), 10, 5_000)
    w.apply(event("b", 1_000, profile={"age": "26"}), 10, 5_000)
    assert w.profile == {"age": "26"}


def test_the_field_cap_keeps_the_field_an_event_of_the_same_time_sets_again():
    """A field set again at an equal time kept its first position, so the cap took it for the oldest
    and dropped it: the later arrival's value was lost."""
    from streaming.events import MAX_MAP_ENTRIES

    w = UserWindow()
    w.apply(event("a", 5, profile={f"f{i}": "old" for i in range(MAX_MAP_ENTRIES)}), 10, 5_000)
    w.apply(event("b", 5, profile={"f0": "new", "x": "1"}), 10, 5_000)
    assert w.profile["f0"] == "new" and w.profile["x"] == "1" and len(w.profile) == MAX_MAP_ENTRIES and "f1" not in w.profile


def test_an_evicted_event_whose_only_new_field_the_cap_drops_changes_nothing():
    """Its field, set at its old time, is the oldest and capped away at once: it was reported ADDED
    (a tower call, a record rewrite, a wrong count) with the profile unchanged."""
    from streaming.events import MAX_MAP_ENTRIES

    w = UserWindow()
    w.apply(event("a", 10, profile={f"f{i}": "v" for i in range(MAX_MAP_ENTRIES)}), 1, 5_000)
    w.apply(event("b", 20), 1, 5_000)
    profile = dict(w.profile)
    assert w.apply(event("c", 5, profile={"z": "1"}), 1, 5_000) is Applied.EVICTED and w.profile == profile


def test_an_event_at_time_zero_is_not_taken_for_a_seeded_behaviour():
    """Seeded behaviours without a stored time were at 0, a time an event may have: a click on one of
    them at 0 was dropped as its duplicate."""
    seeded = UserWindow.from_record(InterestRecord("u1", "A", np.zeros((1, 2), np.float32), ("x", "y"), 5, "0:1"))
    assert seeded.apply(event("x", 0), 10, 60_000) is Applied.ADDED
    assert seeded.item_ids() == ("x", "x", "y")


def test_an_event_dated_ahead_of_kafka_does_not_make_the_users_next_events_late():
    """A device clock 5 minutes fast: its event is kept in event-time order, but the lateness bound
    follows what Kafka's timestamps vouch for, so the user's correctly dated events still apply."""
    now = 1_700_000_000_000
    w = UserWindow()
    assert w.apply(event("fast", now + 300_000), 10, 60_000, produced_ms=now) is Applied.ADDED
    for i, t in enumerate((now + 1_000, now + 2_000, now + 3_000)):
        assert w.apply(event(f"i{i}", t), 10, 60_000, produced_ms=t + 20) is Applied.ADDED
    assert w.item_ids() == ("i0", "i1", "i2", "fast")
    assert w.apply(event("old", now - 120_000), 10, 60_000, produced_ms=now + 4_000) is Applied.LATE  # still judged
    # its profile values do not outrank the next correctly dated event's for that long either
    w.apply(event("p1", now + 299_000, profile={"city": "X"}), 10, 60_000, produced_ms=now + 5_000)
    w.apply(event("p2", now + 6_000, profile={"city": "Y"}), 10, 60_000, produced_ms=now + 6_000)
    assert w.profile == {"city": "Y"}
    # the stored record keeps the true newest time: a restart seeded from it still knows the event again
    seeded = UserWindow.from_record(InterestRecord("u1", "v1", np.zeros((1, 4), np.float32), w.item_ids(), w.newest_ms, "0:9"))
    assert w.newest_ms == now + 300_000
    assert seeded.apply(event("fast", now + 300_000), 10, 60_000, offset="0:2", produced_ms=now) is Applied.DUPLICATE
    assert UserWindow.from_state(w.to_state()) == w
    # nor, seeded from that record after a restart without state, are the user's next events late or
    # its profile pinned: the record's write time bounds what Kafka vouched for
    written = InterestRecord("u1", "v1", np.zeros((1, 4), np.float32), w.item_ids(), w.newest_ms, "0:9", now + 6_050, {"city": "X"})
    restarted = UserWindow.from_record(written)
    assert restarted.apply(event("next", now + 60_000, profile={"city": "Z"}), 10, 60_000, offset="0:10", produced_ms=now + 60_000) is Applied.ADDED
    assert restarted.profile == {"city": "Z"}
    unstamped = UserWindow()  # no Kafka timestamp (tests, the bench): the event time itself
    unstamped.apply(event("fast", now + 300_000), 10, 60_000)
    assert unstamped.apply(event("i0", now + 1_000), 10, 60_000) is Applied.LATE


def test_an_event_older_than_a_full_window_is_evicted_whatever_its_lateness():
    """A resent copy of an evicted event (or any event the full window would not keep) is no late
    data: it goes to the seen set, not to the dead letters."""
    w = UserWindow()
    for i in range(5):
        w.apply(event(f"i{i}", i * 100_000, event_id=f"e{i}"), 3, 60_000, offset=f"0:{i}")
    assert w.apply(event("i0", 0, event_id="e0"), 3, 60_000, offset="0:9") is Applied.EVICTED
    assert w.apply(event("new", 250_000), 3, 60_000) is Applied.LATE  # would be kept, but too late


def test_window_ignores_redeliveries_but_keeps_repeated_behaviours():
    w = UserWindow()
    assert w.apply(event("a", 1_000), 10, 0) is Applied.ADDED
    assert w.apply(event("a", 1_000), 10, 0) is Applied.DUPLICATE  # same item, type, time
    assert w.apply(event("a", 2_000), 10, 0) is Applied.ADDED  # watched again later: a behaviour
    assert w.apply(event("b", 2_000, event_id="x"), 10, 0) is Applied.ADDED
    assert w.apply(event("b", 2_000, event_id="x"), 10, 0) is Applied.DUPLICATE
    assert w.apply(event("b", 2_000, event_id="y"), 10, 0) is Applied.ADDED
    assert w.item_ids() == ("a", "a", "b", "b")


def test_window_keeps_the_newest_l_and_survives_its_state_form():
    w = UserWindow()
    for t in range(8):
        w.apply(event(f"i{t}", 1_000 * t), 5, 10_000, offset=f"0:{t}")
    assert w.item_ids() == ("i3", "i4", "i5", "i6", "i7")
    assert w.apply(event("old", 2_500), 5, 10_000) is Applied.EVICTED  # older than all of a full window
    restored = UserWindow.from_state(w.to_state())
    assert restored == w and restored.last_offset == "0:7"
    assert UserWindow.from_state(None) == UserWindow()
    older = json.loads(w.to_state())[:4]  # checkpoints of older code: 4 fields, or a 5th "pending" flag
    assert w.departed == [[0, "i0"], [1000, "i1"], [2000, "i2"], [2500, "old"]]  # what left it, for the seen set
    for form in (older, older + [True]):
        assert UserWindow.from_state(json.dumps(form)) == dataclasses.replace(w, evicted_at_oldest=[], departed=[])
    assert UserWindow.from_state(json.dumps(json.loads(w.to_state())[:5])) == dataclasses.replace(w, departed=[])  # before the profile's times


@pytest.mark.parametrize("with_ids", [True, False])
def test_a_copy_of_an_evicted_event_that_ties_the_oldest_time_is_a_duplicate(with_ids):
    """A copy resent under a new offset after its original left a full window: its time ties the
    oldest behaviour's (both came in the same millisecond), so only the evicted ones can tell."""
    def ev(item, t):
        return event(item, t, event_id=f"id-{item}" if with_ids else "")

    w = UserWindow()
    for offset, (item, t) in enumerate([("a", 1_000), ("b", 1_000), ("c", 1_000), ("d", 2_000)]):
        assert w.apply(ev(item, t), 3, 10_000, offset=f"0:{offset}") is Applied.ADDED
    assert w.item_ids() == ("b", "c", "d")  # "a" evicted, at the oldest kept time
    restored = UserWindow.from_state(w.to_state())  # the evicted ones travel with the checkpointed state
    for window in (w, restored):
        assert window.apply(ev("a", 1_000), 3, 10_000, offset="0:9") is Applied.DUPLICATE
        assert window.item_ids() == ("b", "c", "d")
    # ... and once the oldest time moves on, an older copy is older than the whole window
    assert w.apply(ev("e", 3_000), 3, 10_000, offset="0:10") is Applied.ADDED
    assert w.apply(ev("f", 3_000), 3, 10_000, offset="0:11") is Applied.ADDED
    assert w.item_ids() == ("d", "e", "f") and w.evicted_at_oldest == []
    assert w.apply(ev("a", 1_000), 3, 10_000, offset="0:12") is Applied.EVICTED
    # the same item watched again at another time is a new behaviour, not a copy
    assert w.apply(event("d", 3_500), 3, 10_000, offset="0:13") is Applied.ADDED


def test_replaying_after_a_restore_leaves_the_window_unchanged():
    events = [event(f"i{t % 4}", 1_000 * t, event_id=f"e{t}") for t in range(20)]
    once = UserWindow()
    for e in events:
        once.apply(e, 8, 5_000)
    restored = UserWindow()
    for e in events[:12]:
        restored.apply(e, 8, 5_000)
    restored = UserWindow.from_state(restored.to_state())
    for e in events[9:]:  # the replay overlaps what the checkpoint already holds
        restored.apply(e, 8, 5_000)
    assert restored.item_ids() == once.item_ids()


def test_a_record_at_or_before_the_newest_applied_offset_of_its_partition_is_a_redelivery():
    w = UserWindow()
    assert w.apply(event("a", 1_000), 8, 5_000, offset="0:4") is Applied.ADDED
    assert w.apply(event("b", 3_000), 8, 5_000, offset="0:5") is Applied.ADDED
    assert w.apply(event("b", 3_000), 8, 5_000, offset="0:5") is Applied.DUPLICATE  # the same record again
    assert w.apply(event("x", 2_000), 8, 5_000, offset="0:3") is Applied.DUPLICATE  # an earlier record: handled before, whatever it holds
    assert w.apply(event("c", 2_500), 8, 5_000, offset="1:2") is Applied.ADDED  # another partition
    assert w.apply(event("d", 4_000), 8, 5_000) is Applied.ADDED  # no offset (offline use): not compared
    assert w.apply(event("e", 6_000), 8, 5_000, offset="1:0") is Applied.ADDED  # newer than the window: a recreated topic
    assert w.item_ids() == ("a", "c", "b", "d", "e")


# ----------------------------------------------------------------------------- micro-batch writer


class FakeTower:
    version = "v-test"

    def __init__(self):
        self.calls = []

    def interests(self, windows, profiles=None):
        self.calls.append(len(windows))
        return [None if not w else np.full((1, 4), float(len(w)), dtype=np.float32) for w in windows]


class FlakyStore(InMemoryFeatureStore):
    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def put_many(self, records, seen=None):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("redis is down")
        return super().put_many(records, seen)


def test_writer_batches_users_and_keeps_only_the_newest_window_per_user():
    tower, store = FakeTower(), InMemoryFeatureStore()
    writer = InterestWriter(FixedTower(tower), store, max_users=2)
    w = UserWindow()
    w.apply(event("a", 1), 10, 0, offset="0:1")
    writer.add("u1", copy.deepcopy(w), produced_ms=1)  # the job hands over a new window object per event
    w.apply(event("b", 2), 10, 0, offset="0:2")
    writer.add("u1", copy.deepcopy(w), produced_ms=2)
    assert not writer.full
    writer.add("u2", UserWindow(), produced_ms=3)  # no known item: nothing to store
    assert writer.full
    assert sorted(writer.flush()) == ["u1", "u2"] and tower.calls == [2]
    record = store.get_many(["u1"])[0]
    assert record.window == ("a", "b") and record.last_offset == "0:2" and record.model_version == "v-test"
    assert store.get_many(["u2"]) == [None] and writer.flush() == []


def test_freshness_and_the_last_write_count_only_the_users_written():
    from prometheus_client import REGISTRY

    from streaming import metrics

    def freshness_count():
        return REGISTRY.get_sample_value("mindstream_stream_freshness_seconds_count")

    metrics.LAST_WRITE.set(0)
    before = freshness_count()
    writer = InterestWriter(FixedTower(FakeTower()), InMemoryFeatureStore(), clock=lambda: 100.0)
    writer.add("nothing-known", UserWindow(), produced_ms=99_000)  # no known item: skipped, not written
    writer.flush()
    assert freshness_count() == before and REGISTRY.get_sample_value("mindstream_stream_last_write_timestamp_seconds") == 0
    w = UserWindow()
    w.apply(event("a", 1), 10, 0)
    writer.add("u1", w, produced_ms=99_000)
    writer.add("nothing-known", UserWindow(), produced_ms=99_500)
    writer.flush()
    assert freshness_count() == before + 1 and REGISTRY.get_sample_value("mindstream_stream_last_write_timestamp_seconds") == 100.0


def test_the_seen_set_gets_every_behaviour_applied_even_one_a_burst_pushed_out_of_the_window():
    store = InMemoryFeatureStore(seen_items=100)
    writer = InterestWriter(FixedTower(FakeTower()), store)
    w = UserWindow()
    for t, item in enumerate("abcde", start=1):  # five behaviours through a window of 2 within one batch
        w.apply(event(item, t), 2, 0)
        writer.add("u1", w, produced_ms=t, seen=[(t, item)])
    # nothing the tower knows yet (FakeTower: an empty window): no record, but the behaviour is kept
    # for the version that will know it
    writer.add("u2", UserWindow(), seen=[(9, "z")])
    writer.flush()
    record = store.get_many(["u1"])[0]
    assert record.window == ("d", "e") and record.seen == set("abcde")
    assert store.get_many(["u2"]) == [SeenOnly("u2", frozenset({"z"}))]  # (the recall service leaves it out)
    w.apply(event("f", 6), 2, 0)
    writer.add("u1", w, seen=[(6, "f")])
    writer.flush()  # the next write adds only its own behaviours
    assert store.get_many(["u1"])[0].seen == set("abcdef")
    # an event older than the full window (Applied.EVICTED): seen, with no new record and no tower call
    tower_calls = len(writer.towers.current().calls)
    writer.add("u1", None, seen=[(0, "old")])
    assert writer.flush() == ["u1"] and len(writer.towers.current().calls) == tower_calls
    assert store.get_many(["u1"])[0].seen == set("abcdef") | {"old"} and store.get_many(["u1"])[0].window == ("e", "f")


def test_writer_retries_a_failing_store_instead_of_dropping_the_update():
    slept = []
    store = FlakyStore(failures=3)
    store.seen_items = 10
    writer = InterestWriter(FixedTower(FakeTower()), store, sleep=slept.append)
    w = UserWindow()
    w.apply(event("a", 1), 10, 0)
    writer.add("u1", w, seen=[(1, "a")])
    writer.flush()
    assert store.get_many(["u1"])[0].window == ("a",) and store.get_many(["u1"])[0].seen == {"a"}
    assert slept == [0.05, 0.1, 0.2]  # backed off, then written


def test_a_write_retried_across_a_publish_is_extracted_again_with_the_new_tower():
    """The new version's backfill may rewrite the users while the store fails the job's write: the
    retried write must not put the old version's interests back over them."""
    class Published:  # the registry's current tower: v-new from the second store failure on
        def __init__(self):
            self.old, self.new = FakeTower(), FakeTower()
            self.new.version = "v-new"
            self.failures_seen = 0

        def current(self):
            return self.new if self.failures_seen >= 2 else self.old

    towers, store = Published(), FlakyStore(failures=3)
    writer = InterestWriter(towers, store, sleep=lambda s: setattr(towers, "failures_seen", towers.failures_seen + 1))
    w = UserWindow()
    w.apply(event("a", 1), 10, 0)
    writer.add("u1", w)
    writer.flush()
    assert store.get_many(["u1"])[0].model_version == "v-new"
    assert towers.old.calls == [1] and towers.new.calls == [1]  # extracted again once, not on every retry


def test_a_window_seeded_from_its_stored_record_takes_up_a_replay_from_older_offsets():
    # The job wrote the user's record after event 11, then lost its state (e.g. a state-layout
    # change); it starts again from the offsets committed at its last checkpoint, after event 7.
    events = [event(f"i{t}", 1_000 * t, event_id=f"e{t}") for t in range(20)]
    once = UserWindow()
    for t, e in enumerate(events):
        once.apply(e, 8, 5_000, offset=f"0:{t}")
    store = InMemoryFeatureStore()
    writer = InterestWriter(FixedTower(FakeTower()), store)
    before = UserWindow()
    for t, e in enumerate(events[:12]):
        before.apply(e, 8, 5_000, offset=f"0:{t}")
    writer.add("u1", before)
    writer.flush()
    seeded = writer.stored_window("u1")
    assert seeded.item_ids() == before.item_ids() and seeded.last_offset == "0:11" and seeded.newest_ms == 11_000
    outcomes = [seeded.apply(e, 8, 5_000, offset=f"0:{t}") for t, e in enumerate(events) if t >= 8]
    assert outcomes == [Applied.DUPLICATE] * 4 + [Applied.ADDED] * 8
    assert seeded.item_ids() == once.item_ids()  # nothing lost, nothing twice
    assert writer.stored_window("nobody") == UserWindow()


def test_a_window_seeded_from_its_record_judges_lateness_and_profile_times_as_its_lost_state_did():
    """The job's host clock 10 minutes behind the producers: the record's write time bounds nothing
    then; the vouched time stored with the record does, and the profile values' own times. (Before
    they were stored, a late but allowed event replaced the newer seeded profile value, a late event
    newer than a seeded value could not replace it, and a backfill of a record lost even the bound.)"""
    now = 1_700_000_000_000
    kept = UserWindow()
    kept.apply(event("a", now - 50_000, profile={"city": "OLD"}), 8, 60_000, offset="0:1", produced_ms=now - 50_000)
    kept.apply(event("b", now, profile={"city": "NEW"}), 8, 60_000, offset="0:2", produced_ms=now + 10)
    store = InMemoryFeatureStore()
    writer = InterestWriter(FixedTower(FakeTower()), store, clock=lambda: (now - 600_000) / 1000)
    writer.add("u1", kept)
    writer.flush()
    assert store.get_many(["u1"])[0].vouched_ms == now
    late = event("x", now - 30_000, profile={"city": "OLD"})
    seeded = writer.stored_window("u1")
    assert seeded.vouched_ms == kept.vouched_ms
    for window in (kept, seeded):
        assert window.apply(late, 8, 60_000, offset="0:3", produced_ms=now + 20) is Applied.ADDED
        assert window.profile == {"city": "NEW"}
        assert window.apply(event("y", now - 61_000), 8, 60_000, offset="0:4", produced_ms=now + 30) is Applied.LATE
    # a profile value older than the newest event: a late event newer than the value replaces it, seeded or not
    kept = UserWindow()
    kept.apply(event("a", now - 50_000, profile={"city": "OLD"}), 8, 60_000, offset="0:1", produced_ms=now - 50_000)
    kept.apply(event("b", now), 8, 60_000, offset="0:2", produced_ms=now + 10)
    writer.add("u3", kept)
    writer.flush()
    seeded = writer.stored_window("u3")
    for window in (kept, seeded):
        assert window.apply(event("x", now - 30_000, profile={"city": "NEW"}), 8, 60_000, offset="0:3", produced_ms=now + 20) is Applied.ADDED
        assert window.profile == {"city": "NEW"}
    # a record of the older layout (no vouched time) keeps the bound of its write time through a backfill
    from streaming.window import vouched_time

    old = InterestRecord("u2", "v1", np.ones((1, 4), np.float32), ("a",), now, "0:9", now + 5)
    assert old.vouched_ms == -1 and vouched_time(old) == now
    assert vouched_time(decode("u2", stored_fields(old))) == now and "vouched_ms".encode() not in stored_fields(old)


def stored_record(window, last_event_ms=10_000, last_offset="0:9"):
    from streaming.feature_store import InterestRecord

    return InterestRecord("u1", "v1", np.ones((1, 4), np.float32), window, last_event_ms, last_offset, last_event_ms + 50)  # written 50 ms after


def test_a_replay_up_to_and_including_the_stored_offset_is_not_applied_again():
    """The record at exactly the stored offset is known by that offset alone when it is a late but allowed
    event: seeded, it has an unknown time, so neither its time nor its item can tell it from a new one."""
    played = [event("a", 8_000), event("b", 9_500), event("c", 10_000), event("x", 9_000)]  # x: late but allowed
    window = UserWindow()
    for offset, e in enumerate(played, start=6):
        window.apply(e, 50, 5_000, offset=f"0:{offset}")
    assert window.item_ids() == ("a", "x", "b", "c") and window.last_offset == "0:9"
    seeded = UserWindow.from_record(stored_record(window.item_ids(), window.newest_ms, window.last_offset))
    # restarted without its state, the job reads again from its committed offset 0:6
    assert [seeded.apply(e, 50, 5_000, offset=f"0:{offset}") for offset, e in enumerate(played, start=6)] == [Applied.DUPLICATE] * 4
    assert seeded.item_ids() == ("a", "x", "b", "c")


def test_a_late_but_allowed_event_lands_before_the_newest_seeded_behaviour():
    full = UserWindow.from_record(stored_record(("a", "b", "c")))
    assert full.apply(event("x", 9_000), 3, 5_000, offset="0:10") is Applied.ADDED  # not evicted: only "a" is known to be older
    assert full.item_ids() == ("b", "x", "c")
    roomy = UserWindow.from_record(stored_record(("a", "b", "c")))
    assert roomy.apply(event("x", 9_000), 5, 5_000, offset="0:10") is Applied.ADDED
    assert roomy.apply(event("y", 12_000), 5, 5_000, offset="0:11") is Applied.ADDED
    assert roomy.item_ids() == ("a", "b", "x", "c", "y")  # the seeded order kept, x before the newest
    assert UserWindow.from_record(stored_record(())) == UserWindow([], 10_000, {}, "0:9", vouched_ms=10_000)


@pytest.mark.parametrize("event_id", ["e9", ""])
def test_a_producer_retry_of_the_newest_seeded_behaviour_is_not_applied_twice(event_id):
    """The retry comes under a new offset, and a seeded behaviour has no type or id: item and time tell."""
    seeded = UserWindow.from_record(stored_record(("a", "b")))  # "b" is the newest, at 10_000
    assert seeded.apply(event("b", 10_000, event_id=event_id), 8, 5_000, offset="0:10") is Applied.DUPLICATE
    assert seeded.apply(event("c", 10_000, event_id=event_id), 8, 5_000, offset="0:11") is Applied.ADDED  # another item: new
    assert seeded.item_ids() == ("a", "b", "c")


def test_a_seeded_window_goes_to_state_whatever_the_event_did_so_the_store_is_read_once():
    from streaming.window import apply_to_state

    reads = []

    def seed(user_id):
        reads.append(user_id)
        return UserWindow.from_record(stored_record(("a", "b")))

    state = None
    outcomes = []
    for e, offset in [(event("b", 10_000), "0:9"), (event("x", 1_000), "0:12"), (event("c", 11_000), "0:13"), (event("c", 11_000), "0:13")]:
        update = apply_to_state(state, e, 8, 5_000, offset, seed)
        outcomes.append(update.outcome)
        state, written = update.state or state, update.state
    assert outcomes == [Applied.DUPLICATE, Applied.LATE, Applied.ADDED, Applied.DUPLICATE] and reads == ["u1"]
    assert UserWindow.from_state(state).item_ids() == ("a", "b", "c") and written is None  # a duplicate leaves the state as it is
    update = apply_to_state(None, event("a"), 8, 5_000)  # not seeding: starts empty
    assert update.outcome is Applied.ADDED and UserWindow.from_state(update.state).item_ids() == ("a",)


class UnreadableStore(InMemoryFeatureStore):
    def __init__(self, error: Exception, times: int):
        super().__init__()
        self.error, self.times = error, times

    def get_many(self, user_ids):
        if self.times:
            self.times -= 1
            raise self.error
        return super().get_many(user_ids)


def test_a_window_is_seeded_after_a_store_outage_and_starts_empty_from_a_corrupt_record():
    from prometheus_client import REGISTRY

    from streaming.feature_store import InterestRecord, RecordError

    slept = []
    w = UserWindow()
    w.apply(event("a", 1), 10, 0, offset="0:1")
    store = UnreadableStore(ConnectionError("redis is down"), times=2)
    writer = InterestWriter(FixedTower(FakeTower()), store, sleep=slept.append)
    writer.add("u1", w)
    writer.flush()
    assert writer.stored_window("u1").item_ids() == ("a",) and slept == [0.05, 0.1]  # waited, never guessed empty
    corrupt = UnreadableStore(RecordError("user u1: corrupt record"), times=1)
    corrupt.put_many([InterestRecord("u1", "v-test", np.ones((1, 4), dtype=np.float32), ("b",), 1, "0:1", 1)])  # read if the error were retried
    unreadable = REGISTRY.get_sample_value("mindstream_stream_window_seeds_total", {"result": "unreadable"}) or 0.0
    assert InterestWriter(FixedTower(FakeTower()), corrupt, sleep=slept.append).stored_window("u1") == UserWindow()
    assert slept == [0.05, 0.1] and REGISTRY.get_sample_value("mindstream_stream_window_seeds_total", {"result": "unreadable"}) == unreadable + 1


def test_an_unreadable_registry_is_a_failed_reload_and_the_tower_in_use_stays(tmp_path, monkeypatch):
    from prometheus_client import REGISTRY

    from model_export.artifact import UserTower
    from model_export.registry import CURRENT_FILE, CurrentUnreadableError, ModelRegistry
    from streaming.interest_writer import RegistryTowers

    def failed() -> float:
        return REGISTRY.get_sample_value("mindstream_stream_model_reloads_total", {"result": "failed"}) or 0.0

    monkeypatch.setattr(UserTower, "load", lambda path, **kw: SimpleNamespace(version=path.name, session=SimpleNamespace(provider="CPU")))
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "manifest.json").write_text("{}")
    current = tmp_path / CURRENT_FILE
    current.write_text('{"model_version": "v1"}')
    clock = [0.0]
    towers = RegistryTowers(ModelRegistry(tmp_path), poll_s=2.0, clock=lambda: clock[0])
    assert towers.current().version == "v1"
    before = failed()
    for broken in ('{"model_version": "v2", "publ', '{"published_at": "x"}'):  # half copied; not the registry's shape
        current.write_text(broken)
        clock[0] += 2.0
        assert towers.current().version == "v1"
    assert failed() == before + 2
    with pytest.raises(CurrentUnreadableError, match="names no model version; publish"):  # nothing loaded yet: the job cannot start
        RegistryTowers(ModelRegistry(tmp_path)).current()
    assert failed() == before + 3


def test_the_model_gauge_keeps_a_version_while_any_task_instance_uses_it(tmp_path, monkeypatch):
    from prometheus_client import REGISTRY

    from model_export.artifact import UserTower
    from model_export.registry import CURRENT_FILE, ModelRegistry
    from streaming.interest_writer import RegistryTowers

    def shown(version: str) -> float | None:
        return REGISTRY.get_sample_value("mindstream_stream_model_info", {"model_version": version})

    monkeypatch.setattr(UserTower, "load", lambda path, **kw: SimpleNamespace(version=path.name, session=SimpleNamespace(provider="CPU")))
    for version in ("g1", "g2"):
        (tmp_path / version).mkdir()
        (tmp_path / version / "manifest.json").write_text("{}")
    current = tmp_path / CURRENT_FILE
    current.write_text('{"model_version": "g1"}')
    clock = [0.0]
    first, second = (RegistryTowers(ModelRegistry(tmp_path), poll_s=2.0, clock=lambda: clock[0]) for _ in range(2))  # parallelism 2
    assert first.current().version == second.current().version == "g1"
    current.write_text('{"model_version": "g2"}')
    clock[0] += 2.0
    assert first.current().version == "g2"  # the second instance polls later: it still extracts with g1
    assert shown("g1") == 1 and shown("g2") == 1
    assert second.current().version == "g2"
    assert shown("g1") is None and shown("g2") == 1
    third = RegistryTowers(ModelRegistry(tmp_path), poll_s=2.0, clock=lambda: clock[0])  # an instance of a restarted task
    current.write_text('{"model_version": "g1"}')
    assert third.current().version == "g1" and shown("g1") == 1
    third.close()  # the task goes again before any reload: g1 is used by nobody
    assert shown("g1") is None and shown("g2") == 1
    first.close()
    second.close()
    assert shown("g2") is None


def test_the_throughput_run_ends_at_the_write_of_the_last_event_read():
    from streaming.bench import Drain

    drain = Drain(events=1000, quiet_s=1.0, below_s=0.0)
    polls = [  # (poll time, events read, the job's last write)
        (1.00, 100, 0.90),  # the last event is read after this poll
        (1.25, 0, 0.0),  # a failed scrape: no news, not "fewer read"
        (1.50, 1000, 0.95),  # all read, but the newest write is older than the last read
        (1.75, 1000, 1.20),  # the last micro-batch, not yet known to be the last
        (2.00, 0, 0.0),
        (2.25, 1000, 1.20),  # quiet since: drained at 1.20
    ]
    assert [drain.poll(*poll) for poll in polls] == [None] * 5 + [1.20]
    # events read last that write nothing (all duplicates): the run still ends, at the job's last write
    stuck = Drain(events=1000, quiet_s=1.0, below_s=0.0, give_up_s=5.0)
    assert [stuck.poll(*poll) for poll in [(1.0, 100, 0.9), (2.0, 1000, 0.9), (5.5, 1000, 0.9), (6.5, 1000, 0.9)]] == [None, None, None, 0.9]


# ----------------------------------------------------------------------------- backfill


class VersionedTower(FakeTower):
    def __init__(self, version):
        super().__init__()
        self.version = version


class JobNotReloadedYet(InMemoryFeatureStore):
    """After the scans numbered in `late_after`, the job writes one more record with the old version."""

    def __init__(self, late_after: set[int]):
        super().__init__()
        self.late_after, self.scans = late_after, 0
        self.put_many([old_record(f"u{i}") for i in range(3)])

    def user_ids(self, batch=1000):
        yield from super().user_ids(batch)
        self.scans += 1
        if self.scans in self.late_after:
            self.put_many([old_record(f"late{self.scans}")])

    def versions(self) -> set[str]:
        return {r.model_version for r in self.get_many([f"u{i}" for i in range(3)] + [f"late{n}" for n in self.late_after]) if r is not None}


def old_record(user: str):
    from streaming.feature_store import InterestRecord

    return InterestRecord(user, "v1", np.ones((1, 4), np.float32), ("a",), 0, "0:0", 1)


def test_backfill_keeps_passing_while_the_job_still_writes_with_the_old_tower():
    from streaming.backfill import backfill

    store = JobNotReloadedYet(late_after={1, 2})
    report = backfill(store, VersionedTower("v2"), batch=2, max_passes=1, settle_s=0.3, pause_s=0.01)
    assert store.versions() == {"v2"} and report.passes >= 4 and report.rewritten == 5 and report.seconds >= 0.3
    assert report.stale_in_last_pass == 0  # the job reloaded within the settle time
    store = JobNotReloadedYet(late_after={1, 2})
    report = backfill(store, VersionedTower("v2"), batch=2, max_passes=1, settle_s=0.0, pause_s=0.01)
    assert store.versions() == {"v1", "v2"} and report.passes == 1  # without settling, the late write keeps the old version referenced


def test_backfill_reports_a_job_that_goes_on_writing_with_its_old_tower():
    """A job whose reload keeps failing writes the old version after every pass: the report (and the
    command's exit status) says so, instead of a rewrite count that reads as success."""
    from streaming.backfill import backfill

    store = JobNotReloadedYet(late_after=set(range(1, 1000)))
    report = backfill(store, VersionedTower("v2"), batch=2, settle_s=0.1, pause_s=0.01)
    assert report.stale_in_last_pass == 1 and store.versions() == {"v1", "v2"}


def test_backfill_goes_on_passing_after_a_clean_pass_until_it_has_settled():
    from streaming.backfill import backfill

    store = JobNotReloadedYet(late_after={2})  # the second pass finds nothing stale; the job writes once more after it
    report = backfill(store, VersionedTower("v2"), batch=2, settle_s=0.3, pause_s=0.01)
    assert store.versions() == {"v2"} and report.rewritten == 4 and report.passes > 2 and report.seconds >= 0.3


def test_backfill_stops_once_another_version_is_current():
    """A publish during a backfill: the older version's backfill must stop, not rewrite the records
    the newer version's job and backfill write back to its own version."""
    from streaming.backfill import backfill, current_moved_on
    from streaming.feature_store import InterestRecord

    class Registry:
        version = "v2"

        def current_version(self):
            if self.version is None:
                raise OSError("stale file handle")
            return self.version

    store, registry = InMemoryFeatureStore(), Registry()
    store.put_many([InterestRecord(f"u{i}", "v1", np.ones((1, 4), np.float32), ("a",), i, f"0:{i}", 1) for i in range(6)])
    superseded = current_moved_on(registry)

    def progress(done):  # after the first batch, v3 is published (and a CURRENT read fails once before)
        registry.version = None if registry.version == "v2" else "v3"

    report = backfill(store, VersionedTower("v2"), batch=2, settle_s=5.0, pause_s=0.01, progress=progress, superseded=superseded)
    assert report.superseded and report.rewritten == 4 and report.passes == 1 and report.seconds < 5.0
    assert sorted(r.model_version for r in store.get_many([f"u{i}" for i in range(6)])) == ["v1", "v1", "v2", "v2", "v2", "v2"]
    assert current_moved_on(registry, "v3")() is False and current_moved_on(registry, "v2")() is True


def test_the_backfill_command_settles_for_the_job_s_model_poll_interval(monkeypatch, capsys):
    import streaming.backfill
    from model_export import artifact, registry
    from streaming import __main__ as cli
    from streaming import feature_store

    settles, superseded = [], []
    current = ["v2"]

    def backfill(store, tower, **options):
        settles.append(options["settle_s"])
        superseded.append(options["superseded"]())
        return streaming.backfill.BackfillReport(tower.version, 0, 0, 0, 0, 0, 1, 0.0)

    def load(path, **kw):  # v3 is published while the tower loads: the backfill writes v3, the current version
        current[0] = "v3"
        return VersionedTower("v3")

    monkeypatch.setenv("MINDSTREAM_STREAMING__MODEL_POLL_S", "3")
    monkeypatch.setattr(registry, "ModelRegistry", lambda root: type("Registry", (), {
        "current": lambda self: root, "current_version": lambda self: current[0], "path": lambda self, version: root / version})())
    monkeypatch.setattr(artifact.UserTower, "load", load)
    monkeypatch.setattr(feature_store.RedisFeatureStore, "from_config", lambda *a, **kw: InMemoryFeatureStore())
    monkeypatch.setattr(streaming.backfill, "backfill", backfill)
    assert cli.main(["backfill", "--quiet"]) == 0 and cli.main(["backfill", "--quiet", "--settle-s", "1.5"]) == 0
    assert settles == [8.0, 1.5]  # 2 x model_poll_s + 2 by default
    assert superseded == [False, False]  # checked against the version written, not CURRENT as read before the load
    # a version other than the current one would overwrite the job's records of the current one
    assert cli.main(["backfill", "--quiet", "--model-version", "v1"]) == 2 and settles == [8.0, 1.5]
    assert "model version v1 is not the current one (v3)" in capsys.readouterr().err


def test_a_user_with_a_seen_set_and_no_record_has_no_window_to_seed_or_record_to_backfill():
    """A store that reads seen sets answers SeenOnly for such a user (a record expired since the scan,
    or a window of items no model knew): no window to start from, nothing to rewrite."""
    from streaming.backfill import backfill

    store = InMemoryFeatureStore(seen_items=5)
    store.put_many([InterestRecord("u0", "v1", np.ones((1, 4), np.float32), ("a",), 1, "0:1", 2)], seen={"gone": [(1, "a")]})
    assert InterestWriter(FixedTower(FakeTower()), store).stored_window("gone") == UserWindow()
    store.user_ids = lambda batch=1000: iter([["u0", "gone"]])  # as a scan that found the record before it expired
    report = backfill(store, VersionedTower("v2"), batch=10)
    assert report.rewritten == 1 and report.skipped_unreadable == 0 and store.get_many(["u0"])[0].model_version == "v2"


def test_a_corrupt_record_is_skipped_by_the_backfill_and_its_version_count_not_fatal():
    from streaming.backfill import backfill, stored_versions
    from streaming.feature_store import InterestRecord

    store = InMemoryFeatureStore()
    store.put_many([InterestRecord(f"u{i}", "v1", np.ones((1, 4), dtype=np.float32), ("a",), i, f"0:{i}", 1000 + i) for i in range(3)])
    store.rows["broken"] = {b"schema": b"999"}  # written by another version of the job, or by hand
    report = backfill(store, VersionedTower("v2"), batch=10)
    # the second pass finds nothing left to do: the unreadable record does not keep the passes going
    assert (report.rewritten, report.skipped_unreadable, report.users_seen, report.passes) == (3, 1, 4, 2)
    assert stored_versions(store) == {"v2": 3}


def test_backfill_moves_every_record_to_the_new_version_but_never_over_a_newer_write():
    from streaming.backfill import backfill
    from streaming.feature_store import InterestRecord

    store = InMemoryFeatureStore()
    old = np.ones((1, 4), dtype=np.float32)
    # records of the older layout, without a vouched time: its bound is the write time, 1000 + i
    store.put_many([InterestRecord(f"u{i}", "v1", old, ("a",) * (i + 1), 2000 + i, f"0:{i}", 1000 + i, {"gender": "F"}) for i in range(5)])
    store.put_many([InterestRecord("empty", "v1", old, ("unknown",)[:0], 0, "0:9", 7)])
    tower = VersionedTower("v2")
    report = backfill(store, tower, batch=2)
    assert report.rewritten == 5 and report.skipped_unknown == 1 and report.users_seen == 6
    for i, record in enumerate(store.get_many([f"u{i}" for i in range(5)])):
        assert record.model_version == "v2" and record.window == ("a",) * (i + 1) and record.profile == {"gender": "F"}
        assert record.interests[0, 0] == i + 1  # the new tower's output on the stored window
        assert record.vouched_ms == 1000 + i  # the bound of the record it replaced, not the rewrite's time
    # a record written after it was read is left alone
    stale = store.get_many(["u0"])[0]
    store.put_many([InterestRecord("u0", "v2", old, ("b",), 99, "0:99", stale.updated_ms + 5)])
    fresh = InterestRecord("u0", "v3", old, ("a",), 0, "0:0", 1)
    assert store.replace_if_unchanged([fresh], [stale]) == 0
    assert store.get_many(["u0"])[0].window == ("b",)


def test_restore_latest_takes_only_checkpoints_of_this_state_layout(tmp_path):
    """A checkpoint of another keyed-state layout cannot be restored (Flink refuses the serializer
    and the job would restart forever): `--restore latest` must not pick it."""
    import os

    from streaming.job import STATE_LAYOUT, checkpoint_location, latest_checkpoint, unrestorable_checkpoints

    def checkpoint(*parts: str, complete: bool = True, age_s: int = 0):
        folder = tmp_path.joinpath(*parts)
        folder.mkdir(parents=True)
        if complete:
            (folder / "_metadata").write_bytes(b"")
            os.utime(folder, (1e9 - age_s, 1e9 - age_s))
        return folder

    assert latest_checkpoint(tmp_path) is None and unrestorable_checkpoints(tmp_path) == []
    older_layout = checkpoint("0f3a", "chk-40")  # layout 1 wrote straight into the root
    other_layout = checkpoint("state-v0", "77aa", "chk-2")
    checkpoint(STATE_LAYOUT, "b1c2", "chk-5", age_s=20)
    newest = checkpoint(STATE_LAYOUT, "b1c2", "chk-6", age_s=10)
    checkpoint(STATE_LAYOUT, "b1c2", "chk-7", complete=False)  # still being written
    assert latest_checkpoint(tmp_path) == newest
    assert sorted(unrestorable_checkpoints(tmp_path)) == sorted([older_layout, other_layout])
    assert checkpoint_location("s3://bucket/checkpoints/") == f"s3://bucket/checkpoints/{STATE_LAYOUT}"
    assert checkpoint_location(tmp_path) == f"{tmp_path.resolve().as_uri()}/{STATE_LAYOUT}"


def test_the_evicted_behaviours_a_window_keeps_are_bounded_by_its_length():
    """Coarse clocks (a bulk import stamped with one time) must not grow a user's state without end."""
    w = UserWindow()
    for i in range(500):
        w.apply(event(f"i{i}", 1_000, event_id=f"e{i}"), 5, 10_000, offset=f"0:{i}")
    assert len(w.behaviours) == 5 and len(w.evicted_at_oldest) == 5
    assert w.apply(event("i494", 1_000, event_id="e494"), 5, 10_000, offset="0:900") is Applied.DUPLICATE  # among the kept ones


def test_the_merged_profile_keeps_the_newest_value_of_at_most_max_map_entries_fields():
    """A producer sending new profile keys with every event must not grow the window's state and the record without bound."""
    from streaming.events import MAX_MAP_ENTRIES

    window = UserWindow()
    window.apply(event("i1", 1, profile={"gender": "F", "age": "25"}), 5, 10_000)
    window.apply(event("i2", 2, profile={"gender": "M"}), 5, 10_000)
    assert window.profile == {"age": "25", "gender": "M"}
    for i in range(3, 40):
        window.apply(event(f"i{i}", i, profile={f"tracking{i}-{j}": "x" for j in range(MAX_MAP_ENTRIES)}), 5, 10_000)
    assert len(window.profile) == MAX_MAP_ENTRIES and all(key.startswith("tracking39-") for key in window.profile)
    assert UserWindow.from_state(window.to_state()).profile == window.profile


def test_an_event_dated_over_an_hour_after_it_entered_kafka_is_refused_as_future():
    from streaming.events import MAX_AHEAD_MS, accept_record

    value = encode_event(event(user="u1", t=10_000_000))
    assert accept_record("u1", value, produced_ms=10_000_000 - MAX_AHEAD_MS).event_time_ms == 10_000_000  # an hour of skew is allowed
    with pytest.raises(EventError, match="more than 60 min after the record entered Kafka") as refused:
        accept_record("u1", value, produced_ms=10_000_000 - MAX_AHEAD_MS - 1)
    assert refused.value.kind == "future"
    assert accept_record("u1", value, produced_ms=-1).user_id == "u1"  # a record without a timestamp: not judged by it


def test_a_record_stamped_over_an_hour_after_the_readers_clock_is_refused_as_future(monkeypatch):
    """A producer stamping records and events alike in microseconds: the event is not ahead of its
    record, but the vouched time (min of both) would make every later event of the user late."""
    from streaming.events import MAX_AHEAD_MS, accept_record

    now_ms = 1_700_000_000_000
    value = encode_event(event(user="u1", t=now_ms * 1000))
    with pytest.raises(EventError, match="Kafka timestamp .* more than 60 min after this reader's clock") as refused:
        accept_record("u1", value, produced_ms=now_ms * 1000, now_ms=now_ms)
    assert refused.value.kind == "future"
    ahead = encode_event(event(user="u1", t=now_ms + MAX_AHEAD_MS))
    assert accept_record("u1", ahead, produced_ms=now_ms + MAX_AHEAD_MS, now_ms=now_ms).event_time_ms == now_ms + MAX_AHEAD_MS
    with pytest.raises(EventError, match="this reader's clock"):  # the reader's clock by default
        accept_record("u1", value, produced_ms=int(time.time() * 1000) + MAX_AHEAD_MS + 60_000)


def _keyed_function(monkeypatch, **overrides):
    """The job's keyed function itself (PyFlink's class, no cluster) with an in-memory store and state:
    (started(state values) -> (function, state), send(function, state, offset, user, item, at_ms=offset),
    context(state, user), store, tower, timers registered)."""
    import streaming.feature_store as feature_store
    import streaming.interest_writer as interest_writer
    from infra.config import load_config
    from streaming.job import _user_windows_function, job_settings

    store, tower = InMemoryFeatureStore(seen_items=100), FakeTower()
    monkeypatch.setattr(feature_store.RedisFeatureStore, "from_config", classmethod(lambda cls, *args, **kw: store))
    monkeypatch.setattr(interest_writer, "RegistryTowers", lambda *args, **kw: SimpleNamespace(current=lambda: tower, close=lambda: None))
    settings = {**job_settings(load_config()), "metrics_port": 0, **overrides}

    class KeyedState:  # Flink's ValueState of the current key
        def __init__(self, values):
            self.values, self.key = dict(values), None

        def value(self):
            return self.values.get(self.key)

        def update(self, value):
            self.values[self.key] = value

    def started(values):
        function, state = _user_windows_function(settings), KeyedState(values)
        function.open(SimpleNamespace(get_state=lambda descriptor: state))
        return function, state

    timers = []

    def context(state, user):
        state.key = user
        service = SimpleNamespace(current_processing_time=lambda: 0, register_processing_time_timer=lambda t: timers.append((user, t)))
        return SimpleNamespace(timer_service=lambda: service, get_current_key=lambda: user)

    now = int(time.time() * 1000)

    def send(function, state, offset, user, item, at_ms=None):
        at = now + (offset if at_ms is None else at_ms)
        record = (user, encode_event(BehaviourEvent(user, item, "click", at)), 0, offset, at)
        return list(function.process_element(record, context(state, user)))

    return started, send, context, store, tower, timers, settings


def test_what_left_the_window_before_a_lost_write_reaches_the_seen_set_after_a_restore(monkeypatch):
    """A burst through a window of 3 and an event older than the full window, queued when the process
    died: neither is in the restored window, but both are in the user's seen set once the restored
    job has written, whether the restored timer or the user's next event comes first."""
    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch, window_length=3, batch_max_users=10)
    job, state = started({})
    for user in ("u1", "u2"):
        for offset, item in enumerate("abcde"):
            send(job, state, offset, user, item)
        send(job, state, 5, user, "z", at_ms=-1_000)  # older than the full window: evicted, for the seen set only
    assert not store.seen and UserWindow.from_state(state.values["u1"]).item_ids() == ("c", "d", "e")
    checkpoint = dict(state.values)  # the queued write is in no checkpoint
    everything = set("abcdez")

    job, state = started(checkpoint)  # restored: u1's timer first
    list(job.on_timer(0, context(state, "u1")))
    assert set(store.seen["u1"]) == everything and store.get_many(["u1"])[0].window == ("c", "d", "e")
    job, state = started(checkpoint)  # restored again: u2's next event first
    send(job, state, 6, "u2", "f")
    list(job.on_timer(0, context(state, "u2")))
    assert set(store.seen["u2"]) == everything | {"f"}
    # once written, the next event finds them so and lets them go, and keeps none of what it pushes
    # out (d, written too); while its write waits, what later events push out is kept only if queued
    # with it: e and f were written before, g was not
    send(job, state, 7, "u2", "g")
    kept = UserWindow.from_state(state.values["u2"])
    assert kept.departed == [] and kept.queued_by == job.process_id
    for offset, item in zip((8, 9, 10), "hij"):
        send(job, state, offset, "u2", item)
    kept = UserWindow.from_state(state.values["u2"])
    assert kept.departed == [[kept.newest_ms - 3, "g"]] and kept.queued_by == job.process_id
    # more unwritten departures than the state keeps (a burst of 8 through a window of 3): written at once
    job, state = started({})
    for offset, item in enumerate("abcdefgh"):
        send(job, state, offset, "u3", item)
    job, state = started(dict(state.values))
    list(job.on_timer(0, context(state, "u3")))
    assert set(store.seen["u3"]) == set("abcdefgh")


def test_a_stored_record_with_numbers_the_state_cannot_hold_seeds_no_window_and_stops_no_job(monkeypatch):
    """A record whose vouched time (or offset) is beyond 64 bits decoded, seeded the window, and failed
    the job's state encoding on every replay of the user's event: a restart loop stalling every user."""
    from prometheus_client import REGISTRY

    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch)
    job, state = started({})
    send(job, state, 0, "u1", "a")
    list(job.on_timer(0, context(state, "u1")))
    store.rows["u1"][b"vouched_ms"] = str(2**70).encode()
    unreadable = REGISTRY.get_sample_value("mindstream_stream_window_seeds_total", {"result": "unreadable"}) or 0.0
    job, state = started({})  # no state: seeded from the store
    send(job, state, 1, "u1", "b")
    list(job.on_timer(0, context(state, "u1")))
    assert UserWindow.from_state(state.values["u1"]).item_ids() == ("b",) and store.get_many(["u1"])[0].window == ("b",)
    assert REGISTRY.get_sample_value("mindstream_stream_window_seeds_total", {"result": "unreadable"}) == unreadable + 1


def test_an_event_whose_application_fails_is_dead_lettered_and_stops_no_job(monkeypatch):
    """An unreadable window state (or a bug applying the event) failed the job, and the restart
    replayed the same record into the same failure: every user stalled. The record goes to the
    dead-letter topic as `internal`, counted, with the error; the user's state is left as it was and
    other users' events go on."""
    from prometheus_client import REGISTRY

    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch)
    job, state = started({"u1": "{not a window"})
    internal = REGISTRY.get_sample_value("mindstream_stream_dead_letters_total", {"reason": "internal"})
    letters = send(job, state, 0, "u1", "a")
    assert len(letters) == 1 and state.values["u1"] == "{not a window"
    letter = json.loads(letters[0])
    assert letter["kind"] == "internal" and letter["reason"].startswith("internal: JSONDecodeError") and letter["offset"] == 0
    assert parse_event(letter["value"].encode()).item_id == "a"  # the event itself, to replay once fixed
    assert REGISTRY.get_sample_value("mindstream_stream_dead_letters_total", {"reason": "internal"}) == internal + 1
    assert send(job, state, 1, "u2", "b") == []
    list(job.on_timer(0, context(state, "u2")))
    assert store.get_many(["u2"])[0].window == ("b",)


def test_a_restored_timer_that_finds_an_unreadable_state_stops_no_job(monkeypatch, caplog):
    """The restored flush timer of a user whose state does not decode failed the job, and every
    restore replayed the timer into the same failure. It is counted and logged; and a burst of
    failures writes one traceback, not one each."""
    from prometheus_client import REGISTRY

    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch)
    job, state = started({"u1": "{not a window", "u2": "{nor this"})
    failed = REGISTRY.get_sample_value("mindstream_stream_internal_errors_total", {"stage": "timer"})
    with caplog.at_level("ERROR", logger="streaming.job"):
        for user in ("u1", "u2"):
            assert list(job.on_timer(0, context(state, user))) == []
        for offset in range(3):
            send(job, state, offset, "u1", "a")
    assert REGISTRY.get_sample_value("mindstream_stream_internal_errors_total", {"stage": "timer"}) == failed + 2
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "the lost write of user 'u1' not redone" in tracebacks[0].getMessage()
    assert store.get_many(["u1", "u2"]) == [None, None] and state.values["u1"] == "{not a window"


@pytest.mark.parametrize("first", ["a retry of the lost event", "a late event"])
def test_a_restored_users_first_event_redoes_its_lost_record_whatever_its_outcome(monkeypatch, first):
    """The record's write of b died with the process; the restored user's first event is no new
    behaviour (a producer's retry of b: a duplicate; or late), and the restored timer comes after it:
    the record is written from the restored window all the same, not left at (a,) until the next one."""
    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch, window_length=3, batch_max_users=10)
    job, state = started({})
    send(job, state, 0, "u1", "a")
    list(job.on_timer(0, context(state, "u1")))
    send(job, state, 1, "u1", "b")
    job, state = started(dict(state.values))  # killed before b's write
    send(job, state, 2, "u1", "b", at_ms=1) if first.startswith("a retry") else send(job, state, 2, "u1", "old", at_ms=-3_600_000)
    list(job.on_timer(0, context(state, "u1")))
    assert store.get_many(["u1"])[0].window == ("a", "b") and set(store.seen["u1"]) == {"a", "b"}


def test_the_jobs_function_redoes_a_write_lost_with_a_crash_from_its_restored_timer(monkeypatch):
    """An update queued when a checkpoint was taken and lost with the process is written by the
    restored timer from the restored window; a timer that finds its user written by a size flush
    costs no tower call."""
    started, send, context, store, tower, timers, settings = _keyed_function(monkeypatch, batch_max_users=2)

    job, state = started({})
    send(job, state, 0, "u1", "a")
    assert job.writer.pending and timers == [("u1", settings["batch_max_delay_ms"])]
    checkpoint = dict(state.values)  # the window and the timer; the queued write is in no checkpoint
    job, state = started(checkpoint)  # the process died; the job restores
    list(job.on_timer(0, context(state, "u1")))
    assert store.get_many(["u1"])[0].window == ("a",) and set(store.seen["u1"]) == {"a"} and tower.calls == [1]
    send(job, state, 1, "u2", "b")
    send(job, state, 2, "u3", "c")  # the batch is full: flushed now
    assert tower.calls == [1, 2] and [r.window for r in store.get_many(["u2", "u3"])] == [("b",), ("c",)]
    for user in ("u2", "u3"):
        list(job.on_timer(0, context(state, user)))
    assert tower.calls == [1, 2] and not job.flushed


def test_a_job_that_flinks_cli_submits_keeps_the_addresses_it_was_given(tmp_path):
    """`flink run --jobmanager host:port` (compose) and the operator's PythonDriver start the program
    for their cluster, and the program's settings go over theirs: the local cluster's loopback
    addresses would send the submission to the submitting container itself."""
    from infra.config import load_config
    from streaming.job import job_configuration

    config = load_config()
    local = job_configuration(config, [], None, submitted=False)
    submitted = job_configuration(config, [], tmp_path / "chk-1", submitted=True)
    assert local["rest.address"] == local["taskmanager.host"] == "127.0.0.1" and local["web.submit.enable"] == "false"
    assert not any(key.startswith(("rest.", "jobmanager.", "taskmanager.", "web.")) for key in submitted)
    assert submitted["execution.state-recovery.path"] == (tmp_path / "chk-1").as_uri()
    assert {k: v for k, v in submitted.items() if k != "execution.state-recovery.path"} == {
        k: v for k, v in local.items() if not k.startswith(("rest.", "jobmanager.", "taskmanager.", "web."))}


def test_a_long_store_outage_neither_fails_the_job_over_nor_takes_its_task_manager_down():
    """A write waiting out a Redis outage holds the checkpoint barriers. Measured with the checkpoint
    timeout at 20 s and the cancellation watchdog at 30 s (Flink's 10 min and 180 s, scaled down):
    with 0 tolerable failures the job failed over, the task could not be cancelled out of the retry,
    the watchdog stopped the local TaskManager, and the job read nothing more after Redis was back;
    with these two settings it went on by itself 5 s after Redis returned, every window correct."""
    from infra.config import load_config
    from streaming.job import job_configuration

    settings = job_configuration(load_config(environ={"MINDSTREAM_CONFIG": ""}), [], None, submitted=False)
    assert int(settings["execution.checkpointing.tolerable-failed-checkpoints"]) == 2**31 - 1
    assert settings["task.cancellation.timeout"] == "0"  # 0: no watchdog, a cancel waits for the task


def test_a_failure_building_the_kafka_source_names_no_secret_of_its_options():
    """Flink prints every table option when it cannot create a source, hiding passwords and JAAS
    settings but not the client's private key, which the job passes inline."""
    from streaming.job import _sql_string, kafka_secrets_hidden

    key = "-----BEGIN PRIVATE KEY-----\nMIIE'secret\n-----END PRIVATE KEY-----\n"
    jaas = 'org.apache.kafka.common.security.scram.ScramLoginModule required username="u" password="pw";'
    props = {"ssl.keystore.key": key, "sasl.jaas.config": jaas, "ssl.keystore.certificate.chain": "CERT"}
    with pytest.raises(RuntimeError) as failed:
        with kafka_secrets_hidden(props):
            raise ValueError(f"Unable to create a source. Table options are: 'properties.ssl.keystore.key'='{_sql_string(key)}' "
                             f"'properties.sasl.jaas.config'='{_sql_string(jaas)}' 'properties.ssl.keystore.certificate.chain'='CERT' / {key}")
    message = str(failed.value)
    assert "BEGIN PRIVATE KEY" not in message and "secret" not in message and 'password="pw"' not in message
    assert "Unable to create a source" in message and "[ssl.keystore.key hidden]" in message and "CERT" in message
    assert failed.value.__cause__ is None and failed.value.__suppress_context__  # the original, key and all, is not attached
