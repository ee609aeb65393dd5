"""Property-based tests of the event parser: whatever arrives, a clear EventError or a valid event."""

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from streaming.events import EVENT_TYPES, MAX_ID_CHARS, MAX_MAP_ENTRIES, MAX_TIME_MS, BehaviourEvent, EventError, encode_event, json_schema, parse_event

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


# what the contract takes as an id: no control character (U+0000-U+001F, U+007F), and no lone surrogate (no UTF-8 form)
id_characters = st.characters(exclude_categories=("Cs",), exclude_characters="".join(map(chr, [*range(0x20), 0x7F])))
ids = st.text(id_characters, min_size=1, max_size=MAX_ID_CHARS)
small_maps = st.dictionaries(st.text(max_size=20), st.text(max_size=20), max_size=4)


@settings(max_examples=300, deadline=None)
@given(ids, ids, st.sampled_from(EVENT_TYPES), st.integers(0, 2**53 - 1), st.text(id_characters, max_size=30), small_maps)
def test_every_valid_event_round_trips(user, item, event_type, time_ms, event_id, profile):
    event = BehaviourEvent(user, item, event_type, time_ms, event_id, profile)
    try:
        raw = encode_event(event)
    except EventError as exc:  # the only way to fail: over the size limit
        assert exc.kind == "oversized"
        return
    assert parse_event(raw) == event


# Values at and just past every limit of the contract, for the schema and the parser to agree on.
edge_text = st.sampled_from([0, 1, MAX_ID_CHARS, MAX_ID_CHARS + 1]).flatmap(lambda n: st.text(min_size=n, max_size=n))
edge_numbers = st.integers(-2, 2) | st.integers(MAX_TIME_MS - 2, MAX_TIME_MS + 1) | st.floats(allow_nan=False, allow_infinity=False) | st.booleans()
edge_maps = st.dictionaries(edge_text, edge_text | edge_numbers | st.none(), max_size=MAX_MAP_ENTRIES + 1)
edge_events = st.fixed_dictionaries(
    {"schema": st.sampled_from([1, 1.0, 2, True, "1"]), "user_id": edge_text, "item_id": edge_text,
     "event_type": st.sampled_from([*EVENT_TYPES, "like"]), "event_time_ms": edge_numbers | edge_text},
    optional={"event_id": edge_text | edge_numbers, "profile": edge_maps, "side": edge_maps},
)
base = {"schema": 1, "user_id": "u", "item_id": "i", "event_type": "click", "event_time_ms": 1000}


@settings(max_examples=300, deadline=None)
@given(edge_events)
@example({**base, "side": {"page": "x" * (MAX_ID_CHARS + 1)}})
@example({**base, "profile": {"k" * (MAX_ID_CHARS + 1): "F"}})
@example({**base, "event_time_ms": 1000.0})
def test_the_json_schema_accepts_exactly_what_the_parser_accepts(obj):
    """`python -m streaming schema` is what producers in other languages validate against: it must
    refuse what the job dead-letters and accept what it takes (the record size aside: configured)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema_says = jsonschema.Draft202012Validator(json_schema()).is_valid(obj)
    try:
        parse_event(json.dumps(obj, allow_nan=False).encode(), max_bytes=2**31)
        parser_says = True
    except EventError:
        parser_says = False
    assert schema_says == parser_says
