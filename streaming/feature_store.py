"""The online feature store: one record per user with the interests the user tower extracted.

This module owns the record layout and its version; the streaming job writes records and the
recall service reads them, both only through `FeatureStore`. A record is a Redis hash at
`<prefix>:user:<user id>`:

    schema          RECORD_SCHEMA, checked on read
    model_version   the export that produced the interests (recall searches that version's collection)
    k, dim          K_u and the vector dimension
    interests       K_u x dim float32, little-endian, row-major
    window          JSON list of the raw item ids in the user's behaviour window, oldest first
    last_event_ms   event time of the newest behaviour reflected
    last_offset     "partition:offset" of the Kafka record that triggered the update
    updated_ms      wall-clock time of the write
    profile         JSON object of the user-profile fields the tower read (a backfill re-reads them)
    vouched_ms      the window's newest event time as far as Kafka's timestamps vouch for it
                    (streaming/window.py); optional: records written before it was kept lack it
    profile_ms      JSON object: the (vouched) event time of each profile field's value; optional
                    as vouched_ms (a field missing there counts as set at vouched_ms)

Raw item ids (not model indices) keep the window valid across model versions.

Beside the record, the user's seen set: a sorted set at `<prefix>:seen:<user id>` of the raw ids of
the newest `[streaming].seen_items` items the user interacted with (score: the newest event time
of each), so the recall service leaves out what the user has already seen beyond the window. The
job adds each behaviour it applies (`put_many(..., seen=...)`: ZADD GT, then trimmed to the newest
`seen_items`, with the record's TTL); a store made with `seen_items` reads it into
`InterestRecord.seen` in the same round trip as the record (a user with a seen set and no record,
whose window held only items the model does not know, reads as `SeenOnly`). A sorted set of at most 128 members
stays in Redis's compact encoding (`zset-max-ziplist-entries`, listpack in Redis 7): ~2.5 KB per
user at 128 items, ~44 KB at 500 (measured on Redis 6.2).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, replace
from typing import Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import numpy as np
import orjson
from redis.exceptions import ResponseError

RECORD_SCHEMA = 2  # 2: + profile

log = logging.getLogger(__name__)


class RecordError(ValueError):
    """A stored record is of another schema or is corrupt. `seen`: the user's seen set when it was
    read beside the record (a reader leaves what the user saw out of the fallback's answer)."""

    seen: frozenset[str] = frozenset()


@dataclass(frozen=True)
class InterestRecord:
    user_id: str
    model_version: str
    interests: np.ndarray  # [K_u, dim] float32: only the active interests
    window: tuple[str, ...]  # raw item ids, oldest first
    last_event_ms: int
    last_offset: str  # "partition:offset"
    updated_ms: int = 0
    profile: dict[str, str] = field(default_factory=dict)
    # UserWindow.vouched_ms of the window, so a window seeded from the record judges lateness and profile
    # times as the job's state did; -1: not stored (a record written before the field existed)
    vouched_ms: int = -1
    profile_ms: dict[str, int] = field(default_factory=dict)  # UserWindow.profile_ms: when each profile value was set
    # The user's seen set as read beside the record (never written with it: see put_many's `seen`);
    # empty from a store that keeps none.
    seen: frozenset[str] = frozenset()

    @property
    def k(self) -> int:
        return int(self.interests.shape[0])


@dataclass(frozen=True)
class SeenOnly:
    """A user with a seen set and no record (every item of the window was unknown to the model, or the
    record expired first): what a store that reads seen sets answers instead of None, so a reader
    still leaves what the user saw out of its answer."""

    user_id: str
    seen: frozenset[str]


def encode(record: InterestRecord) -> dict[str, bytes | str | int]:
    vectors = np.ascontiguousarray(record.interests, dtype="<f4")
    if vectors.ndim != 2 or vectors.shape[0] < 1:
        raise RecordError(f"user {record.user_id}: interests must be [K_u >= 1, dim], got {vectors.shape}")
    return {
        "schema": RECORD_SCHEMA,
        "model_version": record.model_version,
        "k": vectors.shape[0],
        "dim": vectors.shape[1],
        "interests": vectors.tobytes(),
        "window": json.dumps(list(record.window)),
        "last_event_ms": int(record.last_event_ms),
        "last_offset": record.last_offset,
        "updated_ms": int(record.updated_ms or time.time() * 1000),
        "profile": json.dumps(record.profile),
        # An optional field, not a new schema: a reader of schema 2 that does not know it ignores it.
        **({"vouched_ms": int(record.vouched_ms)} if record.vouched_ms >= 0 else {}),
        **({"profile_ms": json.dumps(record.profile_ms)} if record.profile_ms else {}),
    }


def stored_fields(record: InterestRecord) -> dict[bytes, bytes]:
    """The hash exactly as a Redis server returns it (bytes keys and values)."""
    return {k.encode(): v if isinstance(v, bytes) else str(v).encode() for k, v in encode(record).items()}


# "partition:offset" of the event that made the window, "" for none: a Kafka partition is an int32,
# an offset an int64 (a longer run of digits would fail the job's int() or its state's orjson)
OFFSET = re.compile(r"([0-9]{1,10}:[0-9]{1,19})?")
INT64 = range(-(2**63), 2**63)  # the times: the job's window state (orjson) and Flink's timers take no more


def decode(user_id: str, fields: dict[bytes, bytes]) -> InterestRecord:
    try:
        schema = int(fields[b"schema"])
        if schema != RECORD_SCHEMA:
            raise RecordError(f"user {user_id}: record schema {schema}, this code reads {RECORD_SCHEMA}")
        k, dim = int(fields[b"k"]), int(fields[b"dim"])
        raw = fields[b"interests"]
        if k < 1 or dim < 1 or len(raw) != k * dim * 4:
            raise RecordError(f"user {user_id}: {len(raw)} interest bytes for k={k}, dim={dim} (K_u >= 1 vectors)")
        # orjson, the parser of the job's window state that a record seeds: json also takes a lone surrogate
        # ("\ud800"), which the state cannot encode, so every event of the user would fail (an internal letter)
        window, profile = orjson.loads(fields[b"window"]), orjson.loads(fields[b"profile"])
        profile_ms = orjson.loads(fields.get(b"profile_ms", b"{}"))
        last_offset = fields[b"last_offset"].decode()
        if not OFFSET.fullmatch(last_offset):
            raise RecordError(f"user {user_id}: last_offset {last_offset!r:.40} is not partition:offset")
        if not isinstance(window, list) or not all(isinstance(item, str) for item in window):
            raise RecordError(f"user {user_id}: the window must be a list of item ids (strings)")
        if not isinstance(profile, dict) or not all(isinstance(v, str) for v in profile.values()):
            raise RecordError(f"user {user_id}: the profile must be an object of strings")
        if not isinstance(profile_ms, dict) or not all(type(v) is int and v in INT64 for v in profile_ms.values()):
            raise RecordError(f"user {user_id}: profile_ms must be an object of event times (64-bit integers)")
        times = {name: int(fields[name.encode()]) for name in ("last_event_ms", "updated_ms")}
        times["vouched_ms"] = int(fields.get(b"vouched_ms", -1))
        for name, value in times.items():
            if value not in INT64:
                raise RecordError(f"user {user_id}: {name} {str(value):.40} is no 64-bit time in ms")
        return InterestRecord(
            user_id=user_id,
            model_version=fields[b"model_version"].decode(),
            interests=np.frombuffer(raw, dtype="<f4").reshape(k, dim).astype(np.float32),
            window=tuple(window),
            last_offset=last_offset,
            profile=profile,
            profile_ms=profile_ms,
            **times,
        )
    except RecordError:
        raise
    except (KeyError, ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors; RecursionError: nesting
        raise RecordError(f"user {user_id}: corrupt record ({exc!r:.200})") from None


def _record_of(user_id: str, reply, seen_reply=()) -> InterestRecord | SeenOnly | None:
    """The record of an HGETALL reply with the seen set of a ZRANGE reply (no key: SeenOnly when the
    seen set is not empty, else None). A record
    key of another Redis type (WRONGTYPE) is a bad record, not an outage: RecordError, so a reader
    counts it as unreadable instead of retrying it for ever, and the job's next write replaces it
    (put_many deletes first). A seen key of another type only loses the seen set: the record is
    served without it, and the job's next write of the set replaces the key."""
    if isinstance(seen_reply, Exception):
        if not str(seen_reply).startswith("WRONGTYPE"):
            raise seen_reply
        log.warning("user %.80r: the seen-set key holds another Redis type; answered without it", user_id)
        seen_reply = ()
    # a member that is not UTF-8 was not written by the job (raw ids are text): read as no item rather than failing the batch
    seen = frozenset(item.decode(errors="replace") for item in seen_reply)
    try:
        if isinstance(reply, Exception):
            if str(reply).startswith("WRONGTYPE"):
                raise RecordError(f"user {user_id}: the key holds another Redis type, not a record hash")
            raise reply
        if not reply:
            return SeenOnly(user_id, seen) if seen else None
        record = decode(user_id, reply)
    except RecordError as exc:
        exc.seen = seen
        raise
    return replace(record, seen=seen) if seen else record


Seen = Mapping[str, Sequence[tuple[int, str]]]  # user id -> (event time ms, raw item id) newly seen


class FeatureStore(Protocol):
    def put_many(self, records: Iterable[InterestRecord], seen: Seen | None = None) -> int: ...
    def get_many(self, user_ids: list[str]) -> list[InterestRecord | SeenOnly | None]: ...  # SeenOnly: only where seen sets are read
    def delete(self, user_id: str) -> None: ...
    def user_ids(self, batch: int = 1000) -> Iterator[list[str]]: ...
    def replace_if_unchanged(self, records: list[InterestRecord], read: list[InterestRecord]) -> int: ...


def get_each(store, user_ids: list[str], before_each: Callable[[], object] = lambda: None) -> list[InterestRecord | SeenOnly | RecordError | None]:
    """`store.get_many`, where a corrupt record fails only its own place (its RecordError there) rather
    than the whole read: one round trip while every record decodes, one per user after one does not,
    each after `before_each()` (a request's deadline check: a batch of reads must not outlast it)."""
    try:
        return store.get_many(user_ids)
    except RecordError:
        out: list[InterestRecord | SeenOnly | RecordError | None] = []
        for user_id in user_ids:
            before_each()
            try:
                out.extend(store.get_many([user_id]))
            except RecordError as exc:
                out.append(exc)
        return out


def write_id(record: InterestRecord) -> tuple[str, str]:
    """What tells one write of a user's record from the next: updated_ms alone does not (two writes
    can fall in one millisecond), but the job writes a new window only with the Kafka offset of the
    event that changed it, so (updated_ms, last_offset) changes with every new window; a rewrite with
    both unchanged is of the same window."""
    return str(record.updated_ms), record.last_offset


# Replaces a record whole in one step: a reader between a DEL and an HSET sent apart would find no
# record and fall back. DEL first, so no field of an older layout survives.
# KEYS[1] = record key; ARGV = ttl seconds (0 = none), field, value, ...
REPLACE = """
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
if ARGV[1] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return 1
"""

# Replaces a record only if nobody wrote it since it was read (its write_id is unchanged), so a
# backfill never overwrites a newer window the streaming job has just written. The record keeps the
# time it had left to live: a backfill is no activity of the user's, and the user's seen set (another
# key, on another cluster slot) expires with the record; a record without one gets the ttl.
# KEYS[1] = record key; ARGV = the write_id read (updated_ms, last_offset), ttl seconds (0 = none), field, value, ...
REPLACE_IF_UNCHANGED = """
local stored = redis.call('HMGET', KEYS[1], 'updated_ms', 'last_offset')
if stored[1] ~= ARGV[1] or stored[2] ~= ARGV[2] then return 0 end
local left_ms = redis.call('PTTL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if left_ms > 0 then redis.call('PEXPIRE', KEYS[1], left_ms)
elseif ARGV[3] ~= '0' then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return 1
"""


class _ConnectOnFirstUse:
    """A Redis Cluster client made on first use. RedisCluster reads the slot map in its constructor,
    so a cluster that is down when a service starts would fail the start rather than the calls
    (a standalone client connects lazily anyway). A failed connect is tried again by the next call."""

    def __init__(self, connect):
        self._connect, self._client, self._lock = connect, None, threading.Lock()

    def close(self) -> None:
        """Closes the client if one was made (never connects to close)."""
        if self._client is not None:
            self._client.close()

    def __getattr__(self, name):
        if self._client is None:
            with self._lock:  # the recall service's request threads: one client, not one each
                if self._client is None:
                    self._client = self._connect()
        return getattr(self._client, name)


@functools.cache
def host_checked_ssl_connection() -> type:
    """redis-py's TLS connection, checking that the certificate names the host it dialled (made on
    first use: redis is imported only by what talks to Redis)."""
    import redis

    class HostCheckedSSLConnection(redis.connection.SSLConnection):
        def __init__(self, **kwargs):
            super().__init__(**{**kwargs, "ssl_check_hostname": True})

    return HostCheckedSSLConnection


def redis_client(redis_config, timeout_s: float = 1.0):
    """A client for [redis] (URI, password, TLS CA, cluster): the feature store's, and that of
    anything else keeping one key per user in the same Redis (recall_service/served_log.py)."""
    import redis

    options = {"password": redis_config.password or None, "socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if redis_config.uri.startswith("rediss://"):
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(redis_config.uri).query)
        if not {"ssl_cert_reqs", "ssl_check_hostname"} & set(query):  # the URI's own TLS settings win, as redis-py lets them
            # redis-py checks no host name by default: any certificate the CAs trust would do, and hear the AUTH
            # password. A connection class, since RedisCluster drops an ssl_check_hostname option (redis-py 5).
            options.update(ssl_cert_reqs="required", connection_class=host_checked_ssl_connection())
        if redis_config.ssl_cafile:
            options["ssl_ca_certs"] = redis_config.ssl_cafile
    if not redis_config.cluster:
        return redis.Redis.from_url(redis_config.uri, **options)
    # RedisCluster lets a rediss:// URL's scheme replace connection_class with plain SSLConnection (no
    # host-name check), and its nodes take a connection class only when it is built from a URL: so the URL
    # goes as redis:// and the connection class alone makes it TLS (the URI's query parameters still apply).
    url = redis_config.uri
    if url.startswith("rediss://"):
        url = "redis://" + url.removeprefix("rediss://")
        options.setdefault("connection_class", redis.SSLConnection)
    # One key per user and no command spans two users' keys, so a cluster client needs nothing
    # else: its pipelines split by slot owner, and its SCAN visits every primary.
    return _ConnectOnFirstUse(lambda: redis.RedisCluster.from_url(url, **options))


class RedisFeatureStore:
    """Redis / Valkey (any RESP server); pipelined writes, one round trip per batch of reads."""

    def __init__(self, client, prefix: str = "mindstream", ttl_seconds: int = 0, seen_items: int = 0, read_seen: bool = True):
        self.client, self.prefix, self.ttl_seconds, self.seen_items = client, prefix, ttl_seconds, seen_items
        self.read_seen = read_seen and seen_items > 0  # the job writes seen sets but never needs them back

    @classmethod
    def from_config(cls, redis_config, prefix: str = "mindstream", ttl_seconds: int = 0, timeout_s: float = 1.0, seen_items: int = 0,
                    read_seen: bool = True) -> "RedisFeatureStore":
        return cls(redis_client(redis_config, timeout_s), prefix, ttl_seconds, seen_items, read_seen)

    def key(self, user_id: str) -> str:
        return f"{self.prefix}:user:{user_id}"

    def close(self) -> None:
        self.client.close()

    def seen_key(self, user_id: str) -> str:
        return f"{self.prefix}:seen:{user_id}"

    def put_many(self, records: Iterable[InterestRecord], seen: Seen | None = None) -> int:
        """Writes the records and, when this store keeps seen sets, adds `seen` to them: one round
        trip (per cluster node). A seen key of another Redis type (an operator's stray key) is
        replaced rather than failing the write: the job would retry it for ever."""
        pipe = self.client.pipeline(transaction=False)
        n = 0
        written = set()
        for record in records:  # a plain EVAL, as replace_if_unchanged explains
            written.add(record.user_id)
            flat = [x for kv in encode(record).items() for x in kv]
            pipe.execute_command("EVAL", REPLACE, 1, self.key(record.user_id), str(self.ttl_seconds), *flat)
            n += 1
        owners: list[str | None] = [None] * len(pipe)  # the user whose seen set each queued command writes
        active = {user_id: behaviours for user_id, behaviours in (seen or {}).items() if behaviours}
        seen_users = active if self.seen_items else {}
        for user_id, behaviours in seen_users.items():
            self._add_seen(pipe, user_id, behaviours)
            owners += [user_id] * (len(pipe) - len(owners))
        if self.ttl_seconds:  # a behaviour that wrote no record (evicted, no known item) is activity too, seen sets kept or not:
            for user_id in active.keys() - written:
                pipe.expire(self.key(user_id), self.ttl_seconds)  # the record lives ttl_seconds after the user's last behaviour
            owners += [None] * (len(pipe) - len(owners))
        stray = set()
        for owner, reply in zip(owners, pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception):
                if owner is None or not str(reply).startswith("WRONGTYPE"):
                    raise reply
                stray.add(owner)
        if stray:
            log.warning("replacing %d seen-set key(s) of another Redis type, e.g. %s", len(stray), self.seen_key(next(iter(stray))))
            pipe = self.client.pipeline(transaction=False)
            for user_id in stray:
                pipe.delete(self.seen_key(user_id))
                self._add_seen(pipe, user_id, seen_users[user_id])
            pipe.execute()
        return n

    def _add_seen(self, pipe, user_id: str, behaviours: Sequence[tuple[int, str]]) -> None:
        key = self.seen_key(user_id)
        newest: dict[str, int] = {}
        for time_ms, item in behaviours:
            newest[item] = max(time_ms, newest.get(item, time_ms))
        pipe.zadd(key, newest, gt=True)  # GT (Redis >= 6.2): a redelivered or seeded older time never moves an item back
        pipe.zremrangebyrank(key, 0, -self.seen_items - 1)  # keep the newest seen_items
        if self.ttl_seconds:
            pipe.expire(key, self.ttl_seconds)
        else:  # as the record's rewrite drops its TTL: a set written while record_ttl_s was on must not expire before it
            pipe.persist(key)

    def get_many(self, user_ids: list[str]) -> list[InterestRecord | SeenOnly | None]:
        if len(user_ids) == 1 and not self.read_seen:  # a single read without seen sets: a pipeline costs ~35 us more
            try:
                reply = self.client.hgetall(self.key(user_ids[0]))
            except ResponseError as exc:
                reply = exc
            return [_record_of(user_ids[0], reply)]
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hgetall(self.key(user_id))
            if self.read_seen:  # the newest seen_items only: a set not trimmed since seen_items was lowered reads as trimmed
                pipe.zrange(self.seen_key(user_id), -self.seen_items, -1)
        replies = pipe.execute(raise_on_error=False)
        if not self.read_seen:
            return [_record_of(u, reply) for u, reply in zip(user_ids, replies)]
        return [_record_of(u, replies[2 * i], replies[2 * i + 1]) for i, u in enumerate(user_ids)]

    def get_windows(self, user_ids: list[str]) -> list[tuple[str, ...] | None]:
        """Only the stored behaviour windows (None: no record), one round trip: what a checker of
        the stream polls many times a second, without the interest vectors."""
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.hget(self.key(user_id), "window")
        return [tuple(json.loads(raw)) if raw is not None else None for raw in pipe.execute()]

    def delete(self, user_id: str) -> None:
        """The user's record and seen set (whether or not this store reads seen sets)."""
        pipe = self.client.pipeline(transaction=False)  # two keys of two cluster slots: one DEL each
        pipe.delete(self.key(user_id))
        pipe.delete(self.seen_key(user_id))
        pipe.execute()

    def user_ids(self, batch: int = 1000) -> Iterator[list[str]]:
        """Every stored user, in batches (SCAN: never blocks the server like KEYS would)."""
        prefix = f"{self.prefix}:user:"
        chunk: list[str] = []
        foreign = 0
        for key in self.client.scan_iter(match=f"{prefix}*", count=batch):
            try:
                chunk.append(key.decode()[len(prefix):])
            except UnicodeDecodeError:  # no key this store writes (user ids are text): one must not stop every backfill
                foreign += 1
                continue
            if len(chunk) >= batch:
                yield chunk
                chunk = []
        if chunk:
            yield chunk
        if foreign:
            log.warning("%d keys under %s* are not UTF-8 text, so no user record of this store: skipped", foreign, prefix)

    def replace_if_unchanged(self, records: list[InterestRecord], read: list[InterestRecord]) -> int:
        # A plain EVAL with the script's text (a few hundred bytes per record): redis-py's cluster
        # pipeline refuses EVALSHA (a node may lack the cached script) and has no eval() method, but
        # routes a queued EVAL by its key like any single-key command.
        pipe = self.client.pipeline(transaction=False)
        for record, before in zip(records, read):
            flat = [x for kv in encode(record).items() for x in kv]
            pipe.execute_command("EVAL", REPLACE_IF_UNCHANGED, 1, self.key(record.user_id), *write_id(before), str(self.ttl_seconds), *flat)
        replaced = 0
        for record, reply in zip(records, pipe.execute(raise_on_error=False)):
            if isinstance(reply, ResponseError) and "WRONGTYPE" in str(reply):  # from inside the script
                continue  # the key changed type since it was read: not unchanged, so not replaced (as any changed record)
            if isinstance(reply, Exception):  # raised without the pipeline's text, which holds the whole record
                raise type(reply)(f"rewriting the record of user {record.user_id!r:.80}: {str(reply)[:200]}")
            replaced += reply
        return replaced


class InMemoryFeatureStore:
    """The same contract in a dict, for unit tests of code that reads or writes the store."""

    def __init__(self, seen_items: int = 0) -> None:
        self.rows: dict[str, dict[bytes, bytes]] = {}
        self.seen_items = seen_items
        self.seen: dict[str, dict[str, int]] = {}  # user -> item -> newest event time

    def put_many(self, records: Iterable[InterestRecord], seen: Seen | None = None) -> int:
        n = 0
        for record in records:
            self.rows[record.user_id] = stored_fields(record)
            n += 1
        for user_id, behaviours in (seen or {}).items() if self.seen_items else ():
            if not behaviours:
                continue
            times = self.seen.setdefault(user_id, {})
            for time_ms, item in behaviours:
                times[item] = max(time_ms, times.get(item, time_ms))
            # Redis orders equal scores by member: so does this
            self.seen[user_id] = dict(sorted(times.items(), key=lambda kv: (kv[1], kv[0]))[-self.seen_items:])
        return n

    def get_many(self, user_ids: list[str]) -> list[InterestRecord | SeenOnly | None]:
        # as Redis answers: the record's hash ({} when none) and the seen set's members
        return [_record_of(u, self.rows.get(u, {}), [item.encode() for item in self.seen.get(u, ())] if self.seen_items else ())
                for u in user_ids]

    def delete(self, user_id: str) -> None:
        self.rows.pop(user_id, None)
        self.seen.pop(user_id, None)

    def user_ids(self, batch: int = 1000) -> Iterator[list[str]]:
        users = list(self.rows)
        for start in range(0, len(users), batch):
            yield users[start : start + batch]

    def replace_if_unchanged(self, records: list[InterestRecord], read: list[InterestRecord]) -> int:
        n = 0
        for record, before in zip(records, read):
            if record.user_id in self.rows and write_id(decode(record.user_id, self.rows[record.user_id])) == write_id(before):
                self.rows[record.user_id] = stored_fields(record)
                n += 1
        return n
