"""Property-based tests of the event parser: whatever arrives, a clear EventError or a valid event."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from streaming.events import EVENT_TYPES, MAX_ID_CHARS, BehaviourEvent, EventError, encode_event, parse_event

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["schema", "user_id", "item_id", "event_type", "event_time_ms", "event_id", "profile", "side", "extra"])


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_parser(raw):
    try:
        parse_event(raw)
    except EventError as exc:
        assert str(exc) and exc.kind in ("oversized", "malformed", "unknown_field", "missing_field", "invalid")


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=9))
def test_arbitrary_json_objects_are_valid_events_or_refused_with_a_reason(obj):
    try:
        event = parse_event(json.dumps(obj).encode())
    except EventError as exc:
        assert str(exc)
        return
    assert event.event_type in EVENT_TYPES and 0 < len(event.user_id) <= MAX_ID_CHARS and event.event_time_ms >= 0


ids = st.text(min_size=1, max_size=MAX_ID_CHARS)
small_maps = st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4)


@settings(max_examples=300, deadline=None)
@given(ids, ids, st.sampled_from(EVENT_TYPES), st.integers(0, 2**53 - 1), st.text(max_size=30), small_maps)
def test_every_valid_event_round_trips(user, item, event_type, time_ms, event_id, profile):
    event = BehaviourEvent(user, item, event_type, time_ms, event_id, profile)
    try:
        raw = encode_event(event)
    except EventError as exc:  # the only way to fail: over the size limit
        assert exc.kind == "oversized"
        return
    assert parse_event(raw) == event
