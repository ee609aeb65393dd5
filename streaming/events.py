"""The behaviour-event contract (version 1): the one definition producers and the job share.

An event is one compact JSON object per Kafka record, keyed by the user id (so a user's events
stay in one partition, in order):

    {"schema": 1, "user_id": "42", "item_id": "Toy Story (1995)", "event_type": "click",
     "event_time_ms": 978300760000, "event_id": "optional, makes retries idempotent",
     "profile": {"gender": "F", "age": "25"}, "side": {"page": "home"}}

`FIELDS` below is the source of truth; `json_schema()` renders it as a JSON Schema document
(`python -m streaming schema`). The parser rejects, with a reason, anything else: bad JSON,
missing, unknown or repeated fields, wrong types, an unknown event type, oversized records. Rejected
records go to the dead-letter topic; they are never silently dropped.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field

import orjson

EVENT_SCHEMA = 1
EVENT_TYPES = ("view", "click", "cart", "buy")
MAX_EVENT_BYTES = 4096  # default record limit; [streaming].max_event_bytes overrides it
MAX_ID_CHARS = 256
MAX_MAP_ENTRIES = 16  # profile / side fields per event
MAX_AHEAD_MS = 3_600_000  # an event time this far after the record's Kafka timestamp is refused (clock skew allowed)
MAX_TIME_MS = 2**53  # JSON numbers are exact integers below this
# No id holds a C0 control character or DEL: retraining's numpy and pandas string handling stops at or
# drops a NUL, so "x\0a" and "x\0b" would be two users to the job and one (or a crash) to retraining.
ID_CONTROL_CHARACTERS = r"[\u0000-\u001f\u007f]"
_ID_CONTROL = re.compile(ID_CONTROL_CHARACTERS)

# name -> (JSON type, required, description)
FIELDS: dict[str, tuple[str, bool, str]] = {
    "schema": ("integer", True, f"contract version; this code reads {EVENT_SCHEMA}"),
    "user_id": ("string", True, f"raw user id, 1-{MAX_ID_CHARS} characters, no control characters; also the Kafka key"),
    "item_id": ("string", True, f"raw item id, 1-{MAX_ID_CHARS} characters, no control characters, as in the model's vocabulary"),
    "event_type": ("string", True, f"one of {', '.join(EVENT_TYPES)}"),
    "event_time_ms": ("integer", True, "when the behaviour happened, ms since the Unix epoch; at most an hour after the record's Kafka timestamp"),
    "event_id": ("string", False, f"unique id of this event, at most {MAX_ID_CHARS} characters, no control characters; a redelivered event with the same id is ignored"),
    "profile": ("object", False, f"user profile fields (e.g. gender, age, occupation) -> string values, at most {MAX_MAP_ENTRIES}"),
    "side": ("object", False, f"other side fields -> string or number values, at most {MAX_MAP_ENTRIES}; carried, not modelled"),
}


# The classes of invalid records (the dead-letter reason label)
EVENT_ERROR_KINDS = ("oversized", "malformed", "unknown_field", "missing_field", "invalid", "future")
# The job's reasons for valid events it does not apply: too late for the user's window, or its
# application failed (a bug or an unreadable state: logged with the traceback)
LATE, INTERNAL = "late", "internal"
DEAD_LETTER_REASONS = (*EVENT_ERROR_KINDS, LATE, INTERNAL)
# A Kafka record header `streaming redrive` puts on a dead letter's event it sends again: the job applies
# it as any event; the online judge skips it (it judged the original when it first entered)
REDRIVEN_HEADER = "mindstream-redriven"


class EventError(ValueError):
    """A record that is not a valid event; the message is the dead-letter reason, `kind` its class."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind  # one of EVENT_ERROR_KINDS


@dataclass(frozen=True)
class BehaviourEvent:
    user_id: str
    item_id: str
    event_type: str
    event_time_ms: int
    event_id: str = ""
    profile: dict[str, str] = field(default_factory=dict)
    side: dict[str, str | int | float] = field(default_factory=dict)

    def to_json(self) -> dict:
        out = {"schema": EVENT_SCHEMA, "user_id": self.user_id, "item_id": self.item_id, "event_type": self.event_type, "event_time_ms": self.event_time_ms}
        if self.event_id:
            out["event_id"] = self.event_id
        if self.profile:
            out["profile"] = self.profile
        if self.side:
            out["side"] = self.side
        return out


def encode_event(event: BehaviourEvent, max_bytes: int = MAX_EVENT_BYTES, produced_ms: int | None = None) -> bytes:
    """The event's record value, or EventError for an event the job would dead-letter: it is checked
    by the job's own parser, so producer and job cannot disagree on the contract (with `produced_ms`,
    the record's Kafka timestamp, also by its rule against events dated far ahead of it)."""
    try:
        raw = json.dumps(event.to_json(), separators=(",", ":"), ensure_ascii=False).encode()
    except (TypeError, ValueError) as exc:  # a lone surrogate (UnicodeEncodeError), a value that is not JSON
        raise EventError(f"not encodable as a JSON record: {exc!s:.160}") from None
    _check_not_ahead(parse_event(raw, max_bytes), produced_ms)
    return raw


def _string_id(obj: dict, name: str) -> str:
    value = obj[name]
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS or _ID_CONTROL.search(value):
        raise EventError(f"{name} must be a string of 1-{MAX_ID_CHARS} characters without control characters (U+0000-U+001F, U+007F), got {value!r:.80}")
    return value


def value_text(value: str | int | float) -> str:
    """A profile or side-feature value as the model's vocabulary holds it, the same whoever reads it
    (a training table, an event): without surrounding spaces, a whole number as an integer (25, 25.0
    and "25" are one value: a Parquet integer column with nulls reads as floats)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _string_map(obj: dict, name: str, numbers_allowed: bool) -> dict:
    value = obj.get(name, {})
    allowed = (str, int, float) if numbers_allowed else (str,)
    if not isinstance(value, dict) or len(value) > MAX_MAP_ENTRIES:
        raise EventError(f"{name} must be an object with at most {MAX_MAP_ENTRIES} entries")
    for k, v in value.items():
        if len(k) > MAX_ID_CHARS or isinstance(v, bool) or not isinstance(v, allowed) or (isinstance(v, str) and len(v) > MAX_ID_CHARS):
            raise EventError(f"{name}.{k:.80} must be a {'string or number' if numbers_allowed else 'string'} of at most {MAX_ID_CHARS} characters")
    return value


def _check_keys_unique(raw: bytes, keys: int) -> None:
    """EventError for a key repeated in one object: JSON leaves such a record's meaning open (RFC 8259:
    names SHOULD be unique; parsers keep the last value, the first, or refuse it), so a consumer in
    another language could read another user or item than the job did. `keys`: the distinct keys parsed."""
    # Every key is followed by one ":" outside strings, so a record with no more colons than distinct
    # keys (the common case; UTF-8 holds no other 0x3A byte) repeats none. Otherwise, a colon in a
    # string or a repeated key: parse again keeping every pair (~8 us against the ~0.3 us count).
    if raw.count(b":") <= keys:
        return

    def refuse_repeats(pairs: list) -> dict:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise EventError(f"key {key!r:.80} appears twice in one object; JSON parsers differ on which value that means", "malformed")
            seen.add(key)
        return dict(pairs)

    json.loads(raw, object_pairs_hook=refuse_repeats)


def parse_event(raw: bytes, max_bytes: int = MAX_EVENT_BYTES) -> BehaviourEvent:
    """One Kafka record value -> a validated event, or EventError saying what is wrong."""
    if len(raw) > max_bytes:
        raise EventError(f"oversized: {len(raw)} bytes, limit {max_bytes}", "oversized")
    try:
        obj = orjson.loads(raw)  # strict: also refuses NaN, integers beyond 64 bits and lone surrogates
    except orjson.JSONDecodeError as exc:
        raise EventError(f"malformed JSON: {exc}", "malformed") from None
    if not isinstance(obj, dict):
        raise EventError(f"an event is a JSON object, got {type(obj).__name__}", "malformed")
    unknown = set(obj) - set(FIELDS)
    if unknown:
        raise EventError(f"unknown fields {sorted(unknown)[:5]}; the v{EVENT_SCHEMA} contract has {sorted(FIELDS)}", "unknown_field")
    missing = [name for name, (_, required, _) in FIELDS.items() if required and name not in obj]
    if missing:
        raise EventError(f"missing required fields {missing}", "missing_field")
    if obj["schema"] != EVENT_SCHEMA or isinstance(obj["schema"], bool):
        raise EventError(f"schema {obj['schema']!r:.20}: this job reads version {EVENT_SCHEMA}")
    if obj["event_type"] not in EVENT_TYPES:
        raise EventError(f"event_type {obj['event_type']!r:.40} is not one of {EVENT_TYPES}")
    time_ms = obj["event_time_ms"]
    if isinstance(time_ms, float) and time_ms.is_integer():  # 1000.0 is an integer to JSON Schema (json_schema()) too
        time_ms = int(time_ms)
    if isinstance(time_ms, bool) or not isinstance(time_ms, int) or not 0 <= time_ms < MAX_TIME_MS:
        raise EventError(f"event_time_ms must be an integer number of ms since the epoch, got {time_ms!r:.40}")
    event_id = obj.get("event_id", "")
    if not isinstance(event_id, str) or len(event_id) > MAX_ID_CHARS or _ID_CONTROL.search(event_id):
        raise EventError(f"event_id must be a string of at most {MAX_ID_CHARS} characters without control characters (U+0000-U+001F, U+007F)")
    event = BehaviourEvent(
        user_id=_string_id(obj, "user_id"),
        item_id=_string_id(obj, "item_id"),
        event_type=obj["event_type"],
        event_time_ms=time_ms,
        event_id=event_id,
        profile=_string_map(obj, "profile", numbers_allowed=False),
        side=_string_map(obj, "side", numbers_allowed=True),
    )
    # last: the fields are scalars or the two flat maps of scalars by now
    _check_keys_unique(raw, len(obj) + len(event.profile) + len(event.side))
    return event


def record_key(raw: bytes | None) -> str | None:
    """A Kafka record's key as the job reads it (Flink's raw STRING key), for Python consumers."""
    return None if raw is None else raw.decode("utf-8", "replace")


def accept_record(key: str | None, value: bytes | None, max_bytes: int = MAX_EVENT_BYTES, produced_ms: int | None = None,
                  now_ms: int | None = None) -> BehaviourEvent:
    """The job's acceptance rule for one Kafka record (key decoded as UTF-8, `produced_ms` its Kafka
    timestamp): a valid event keyed by its own user id, not dated more than MAX_AHEAD_MS after it
    entered Kafka, which was not more than MAX_AHEAD_MS after the reader's clock (`now_ms`, default
    now), else EventError with the dead-letter reason. Whoever reads the events topic besides the
    job (retraining, the online judge) applies this, so all take the same events (a record stamped
    between one hour and the reader's delay ahead excepted: refused by the job, taken by later readers)."""
    event = parse_event(value or b"", max_bytes)
    if event.user_id != key:
        raise EventError(f"Kafka key {key!r:.80} differs from user_id {event.user_id!r:.80}; producers key events by user id")
    _check_not_ahead(event, produced_ms, now_ms)
    return event


def _check_not_ahead(event: BehaviourEvent, produced_ms: int | None, now_ms: int | None = None) -> None:
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    if produced_ms is not None and produced_ms > now_ms + MAX_AHEAD_MS:
        # a producer stamping its records (CreateTime) in microseconds, or with a clock far ahead: the
        # window's lateness follows min(event time, record time), so it would make the user's later
        # events late as an event dated ahead would (below)
        raise EventError(f"the record's Kafka timestamp {produced_ms} is more than {MAX_AHEAD_MS // 60_000} min after this reader's clock "
                         f"({now_ms}); producers stamp records with their send time in milliseconds since the epoch", kind="future")
    if produced_ms is not None and produced_ms > 0 and event.event_time_ms > produced_ms + MAX_AHEAD_MS:
        # e.g. microseconds sent as milliseconds: applied, it would make every later real event of the
        # user "late" (the window follows its newest event time) until its state and record expired
        raise EventError(f"event_time_ms {event.event_time_ms} is more than {MAX_AHEAD_MS // 60_000} min after the record entered Kafka "
                         f"({produced_ms}); event times are milliseconds since the epoch", kind="future")


def json_schema() -> dict:
    """FIELDS as a JSON Schema (draft 2020-12) document, for producers in other languages."""
    properties = {name: {"type": kind, "description": text} for name, (kind, _, text) in FIELDS.items()}
    properties["schema"]["const"] = EVENT_SCHEMA
    properties["event_type"]["enum"] = list(EVENT_TYPES)
    properties["event_time_ms"].update(minimum=0, maximum=MAX_TIME_MS - 1)
    for name in ("user_id", "item_id"):
        properties[name].update(minLength=1, maxLength=MAX_ID_CHARS)
    properties["event_id"]["maxLength"] = MAX_ID_CHARS
    # not a match anywhere: "^[^...]*$" would pass "a\n" to validators whose "$" matches before a final newline (Python's)
    for name in ("user_id", "item_id", "event_id"):
        properties[name]["not"] = {"pattern": ID_CONTROL_CHARACTERS}
    for name, value_type in (("profile", "string"), ("side", ["string", "number"])):  # _string_map's rules
        properties[name].update(maxProperties=MAX_MAP_ENTRIES, propertyNames={"maxLength": MAX_ID_CHARS},
                                additionalProperties={"type": value_type, "maxLength": MAX_ID_CHARS})  # maxLength: strings only
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://mindstream.dev/schemas/behaviour-event-v{EVENT_SCHEMA}.json",
        "title": f"mindstream behaviour event v{EVENT_SCHEMA}",
        "description": f"One JSON object per Kafka record, key = user_id, at most {MAX_EVENT_BYTES} bytes by default; "
                       "no key may appear twice in one object (JSON Schema cannot say so; the job refuses it).",
        "type": "object",
        "properties": properties,
        "required": [name for name, (_, required, _) in FIELDS.items() if required],
        "additionalProperties": False,
    }
