"""The served log: the last answers the recall service gave each user, kept for
[recall].served_log_ttl_s so that the user's next events can be judged against them (the online
hit rate, recall_service/online_quality.py). This module owns the record; the service writes it
and the judge reads it, both only through this module. One Redis list per user, newest first:

    <prefix>:answers:<user id> -> [JSON {"schema": 1, "model_version": "...", "path": "stored_interests",
                                         "served_ms": 1763900000000, "items": ["raw item id", ...]}, ...]

written with LPUSH, LTRIM to the newest [recall].served_log_answers + LAG_ANSWERS and EXPIRE ttl +
LAG_S (the judge reads the log after the events, seconds to minutes later, and must still find the
answers in force when each happened, not only the newest): the log grows
with the users served within the ttl (times the answers kept), not with the number of recalls, and
needs no clean-up. More than one answer is kept because an application shows several (a carousel
refreshed, a second page): an event on an item of an earlier answer still counts as a hit.
`items` are raw ids, best first, as the response listed them. (An earlier release kept
one answer as a string at `<prefix>:served:<user id>`: a new key name, so that during an upgrade
neither release trips over the other's keys; the old keys expire within the ttl.)

A recall must never wait for, or fail by, its monitoring: `RedisServedLog.record` only queues, and
a writer thread sends what has queued every 50 ms as pipelines. When Redis cannot take it (down,
slow, the queue of about MAX_PENDING records full), records are dropped and counted by reason,
never retried: a lost record only leaves that user's next events unjudged, or judged against the
user's earlier answers.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

import orjson

log = logging.getLogger(__name__)

SERVED_SCHEMA = 1
MAX_PENDING = 10_000  # records queued for the writer; beyond, a recall's record is dropped (reason "queue_full")
FLUSH_INTERVAL_S = 0.05  # how often the writer sends what has queued: records reach Redis within ~50 ms
WRITE_BATCH = 256  # records per pipeline
LAG_ANSWERS = 5  # answers kept beyond [recall].served_log_answers: served after an event the judge has not read yet
LAG_S = 900  # the log outlives its ttl by this: a judge this far behind still finds the answers in force


class ServedRecordError(ValueError):
    """A stored served record that cannot be read (another schema, not JSON, fields of the wrong
    type, or a key of another Redis type under the log's name)."""


@dataclass(frozen=True)
class ServedRecord:
    user_id: str
    model_version: str
    path: str  # the recall path that answered: RecallPath name in lower case, as the service's metrics label it
    served_ms: int  # the service's wall clock when it answered
    items: tuple[str, ...]  # raw item ids, best first


def encode_served(record: ServedRecord) -> bytes:
    return orjson.dumps({"schema": SERVED_SCHEMA, "model_version": record.model_version, "path": record.path,
                         "served_ms": record.served_ms, "items": record.items})


def decode_served(user_id: str, raw: bytes) -> ServedRecord:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ServedRecordError(f"served record of user {user_id!r:.80}: not JSON ({exc})") from None
    if not isinstance(obj, dict) or obj.get("schema") != SERVED_SCHEMA:
        raise ServedRecordError(f"served record of user {user_id!r:.80}: not a schema-{SERVED_SCHEMA} record")
    version, path, served_ms, items = (obj.get(name) for name in ("model_version", "path", "served_ms", "items"))
    if not (isinstance(version, str) and isinstance(path, str) and isinstance(served_ms, int) and not isinstance(served_ms, bool)
            and isinstance(items, list) and all(isinstance(item, str) for item in items)):
        raise ServedRecordError(f"served record of user {user_id!r:.80}: model_version, path (strings), served_ms (integer) "
                                "or items (list of strings) missing or of the wrong type")
    return ServedRecord(user_id, version, path, served_ms, tuple(items))


class ServedLog(Protocol):
    def record(self, served: Iterable[ServedRecord]) -> None:
        """Keep these answers; never blocks and never raises (what cannot be kept is dropped and counted)."""

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until what `record` was given is kept or dropped; False if that took longer."""

    def close(self, timeout_s: float = 5.0) -> None:
        """flush(), then stop writing; later records are dropped."""


def _wrong_type(reply) -> bool:
    return isinstance(reply, Exception) and str(reply).startswith("WRONGTYPE")


class RedisServedLog:
    """The served log in Redis: `record` appends to a queue that a writer thread sends every
    FLUSH_INTERVAL_S as pipelines of WRITE_BATCH records; `get_many` reads in one round trip."""

    def __init__(self, client, ttl_s: int, prefix: str = "mindstream", dropped: Callable[[str, int], None] = lambda reason, n: None,
                 max_pending: int = MAX_PENDING, answers: int = 3):
        self.client, self.ttl_s, self.prefix, self.dropped, self.max_pending = client, ttl_s, prefix, dropped, max_pending
        self.answers = answers  # kept per user, newest first ([recall].served_log_answers: see for_config)
        # A deque, not a queue.Queue: append and popleft are atomic without a lock, and the writer
        # wakes on its interval rather than once per record (each wake-up costs every request thread the GIL).
        self._pending: deque = deque()
        self._wake = threading.Event()
        self._writer: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._failing = False  # logged when writes start and stop failing, not once per batch of an outage
        self._closed = False

    @classmethod
    def for_config(cls, config, dropped: Callable[[str, int], None] = lambda reason, n: None) -> "RedisServedLog":
        """The log of [redis] with [recall]'s ttl and answers kept: the service's, the judge's, the replay's."""
        from streaming.feature_store import redis_client

        return cls(redis_client(config.redis), config.recall.served_log_ttl_s, dropped=dropped, answers=config.recall.served_log_answers)

    def key(self, user_id: str) -> str:
        return f"{self.prefix}:answers:{user_id}"

    def record(self, served: Iterable[ServedRecord]) -> None:
        if self._closed:
            self.dropped("closed", sum(1 for _ in served))
            return
        if self._writer is None:
            self._start_writer()
        for record in served:
            if len(self._pending) >= self.max_pending:  # checked, then appended: concurrent recalls may pass it by a few
                self.dropped("queue_full", 1)
            else:
                self._pending.append(record)
        if self._closed:  # closed meanwhile: the writer may have made its last pass before these came
            self._drop_unsent()

    def get_many(self, user_ids: list[str]) -> list[tuple[ServedRecord, ...] | ServedRecordError]:
        """Each user's kept answers, newest first (empty: none), or a ServedRecordError where one is
        unreadable; Redis errors propagate (the caller retries the batch)."""
        pipe = self.client.pipeline(transaction=False)
        for user_id in user_ids:
            pipe.lrange(self.key(user_id), 0, -1)
        out: list[tuple[ServedRecord, ...] | ServedRecordError] = []
        for user_id, reply in zip(user_ids, pipe.execute(raise_on_error=False)):
            if isinstance(reply, Exception):
                if not str(reply).startswith("WRONGTYPE"):
                    raise reply
                out.append(ServedRecordError(f"served record of user {user_id!r:.80}: the key holds another Redis type, not a list"))
                continue
            try:
                out.append(tuple(sorted((decode_served(user_id, raw) for raw in reply), key=lambda r: -r.served_ms)))
            except ServedRecordError as exc:
                out.append(exc)
        return out

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every record given so far has been sent (or dropped); False if that took longer."""
        if self._writer is None:
            return True
        done = threading.Event()
        self._pending.append(done)  # the writer sets it once everything before it is written
        self._wake.set()
        return done.wait(timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Sends what is queued (waiting up to timeout_s), then stops the writer thread."""
        self.flush(timeout_s)
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout_s)
        self._drop_unsent()
        self.client.close()  # its connections (a later read would open new ones)

    def _drop_unsent(self) -> None:
        """Counts what is still queued after close (a record that passed the closed check just before
        it, or one the writer had no time to send), so no answer is lost uncounted. The writer may
        still be in its last pass, a write outlasting close's wait: each record is taken from the
        queue once, so it is either sent by that pass or counted here, never both, never neither."""
        unsent = 0
        while self._pending:
            try:
                item = self._pending.popleft()
            except IndexError:  # another thread emptied it meanwhile
                break
            if isinstance(item, threading.Event):
                item.set()
            else:
                unsent += 1
        if unsent:
            self.dropped("closed", unsent)

    def _start_writer(self) -> None:
        with self._start_lock:
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_forever, name="served-log", daemon=True)
                self._writer.start()

    def _write_forever(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_INTERVAL_S)
            self._wake.clear()
            batch: list[ServedRecord] = []
            while self._pending:
                item = self._pending.popleft()
                if isinstance(item, threading.Event):  # a flush() waiting for what came before it
                    self._write(batch)
                    batch = []
                    item.set()
                    continue
                batch.append(item)
                if len(batch) == WRITE_BATCH:
                    self._write(batch)
                    batch = []
            self._write(batch)

    def _send(self, batch: list[ServedRecord], replace: frozenset[str] = frozenset()) -> list[list]:
        """One pipeline for the batch, errors answered per command; per record, the replies of its LPUSH,
        LTRIM and EXPIRE. `replace`: users whose key is deleted first, once, before their first record
        (a DEL before each would keep only a user's last record of the batch)."""
        pipe = self.client.pipeline(transaction=False)
        starts, commands, deleted = [], 0, set()
        for record in batch:
            key = self.key(record.user_id)
            if record.user_id in replace and record.user_id not in deleted:
                pipe.delete(key)
                deleted.add(record.user_id)
                commands += 1
            starts.append(commands)
            pipe.lpush(key, encode_served(record))
            pipe.ltrim(key, 0, self.answers + LAG_ANSWERS - 1)
            pipe.expire(key, self.ttl_s + LAG_S)
            commands += 3
        replies = pipe.execute(raise_on_error=False)
        return [replies[start:start + 3] for start in starts]

    def _write(self, batch: list[ServedRecord]) -> None:
        if not batch:
            return
        try:
            replies = self._send(batch)
            # A key of another Redis type under a user's name (not this log's: a stray write) fails that
            # user's commands only: replaced, as the feature store replaces its stray keys, rather than
            # keeping that user unjudged or counting the whole batch lost
            stray = [record for record, answered in zip(batch, replies) if _wrong_type(answered[0])]
            if stray:
                log.warning("served log: %d user key(s) held another Redis type, e.g. %.80r; replaced", len(stray), self.key(stray[0].user_id))
                replies = [answered for answered in replies if not _wrong_type(answered[0])] + self._send(stray, replace=frozenset(record.user_id for record in stray))
        except Exception as exc:  # the writer outlives any failure: an outage drops records, it never ends the log
            self._lost(len(batch), exc)
            return
        refused = [next(r for r in answered if isinstance(r, Exception)) for answered in replies if any(isinstance(r, Exception) for r in answered)]
        if refused:  # errors Redis answered per command (out of memory, say): those records only
            self._lost(len(refused), refused[0])
            return
        if self._failing:
            log.info("served log: writing to Redis again")
            self._failing = False

    def _lost(self, n: int, why: Exception) -> None:
        self.dropped("unavailable", n)
        if not self._failing:
            log.warning("served log: cannot write to Redis (%s); records are dropped, recalls go on", why)
            self._failing = True
