"""Micro-batching across users -> user tower -> feature store, with hot reload of the tower.

The keyed function hands every changed window to `InterestWriter.add`, with the behaviour that
changed it; `flush` runs the user tower once for all pending users (one ONNX call instead of one
per event) and writes their records, and the behaviours to their seen sets, in one pipelined
round trip. The caller bounds a batch by size (`full`) and by time (a
timer). A failing store write is retried with backoff until it succeeds: the job then applies
back-pressure and Kafka keeps the events, instead of an update being dropped.

For a user the job holds no state for, `stored_window` reads the window the user's stored record
reflects (streaming/window.py), with the same retry: a window must never start empty only
because the store did not answer.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from model_export.artifact import UserTower
from streaming import metrics
from streaming.feature_store import FeatureStore, InterestRecord, RecordError, SeenOnly
from streaming.window import UserWindow

log = logging.getLogger(__name__)


class TowerSource(Protocol):
    def current(self) -> UserTower: ...


class RegistryTowers:
    """The user tower of the registry's current version, reloaded when CURRENT moves (no restart)."""

    def __init__(self, registry, poll_s: float = 2.0, prefer_gpu: bool = True, clock: Callable[[], float] = time.monotonic):
        self.registry, self.poll_s, self.prefer_gpu, self.clock = registry, poll_s, prefer_gpu, clock
        self.tower: UserTower | None = None
        self.checked = -float("inf")

    def current(self) -> UserTower:
        now = self.clock()
        if self.tower is None or now - self.checked >= self.poll_s:
            self.checked = now
            self._reload()
        return self.tower

    def _reload(self) -> None:
        """Loads the registry's current tower unless it is the one in use. A registry that cannot be
        read (e.g. a half-copied CURRENT.json on a shared volume) or a version that does not load is
        a failed reload: counted, and the loaded tower kept."""
        version = None
        try:
            version = self.registry.current_version()
            if self.tower is not None and (not version or version == self.tower.version):
                return
            tower = UserTower.load(self.registry.path(version) if version else self.registry.current(), prefer_gpu=self.prefer_gpu, threads=1)
        except Exception:
            metrics.MODEL_RELOADS.labels("failed").inc()
            if self.tower is None:
                raise  # nothing to serve with: the job cannot start without a model
            log.exception("could not load the registry's current user tower (%s); keeping %s", version, self.tower.version)
            return
        if self.tower is not None:
            metrics.MODEL_RELOADS.labels("ok").inc()
        metrics.tower_swapped(tower.version, self.tower.version if self.tower is not None else None)
        log.info("user tower %s loaded (%s)", tower.version, tower.session.provider)
        self.tower = tower

    def close(self) -> None:
        """The task instance is going (a restart, a failover): its version leaves the model gauge
        unless another instance of this interpreter still uses it."""
        if self.tower is not None:
            metrics.tower_swapped(None, self.tower.version)
            self.tower = None


class FixedTower:
    """One tower, never reloaded (tests, benchmarks, backfills of a given version)."""

    def __init__(self, tower: UserTower):
        self.tower = tower

    def current(self) -> UserTower:
        return self.tower


@dataclass
class PendingUpdate:
    # the newest state, read at flush time (the job replaces, never mutates, it); None: only behaviours
    # for the seen set (valid ones older than a full window), no new record
    window: UserWindow | None
    produced_ms: list[int] = field(default_factory=list)  # Kafka timestamps of the events it reflects
    # (event time ms, raw item id) of the behaviours applied since the last write: all of them, not
    # only those still in the window (a burst of one user can pass through it within one batch)
    seen: list[tuple[int, str]] = field(default_factory=list)
    # the oldest event time in `seen`: a behaviour older than it is not in this write, so it was written
    # before (the job keeps no record of it for a restore: window.apply_to_state)
    oldest_seen_ms: int = sys.maxsize


class InterestWriter:
    def __init__(self, towers: TowerSource, store: FeatureStore, max_users: int = 256, retry_max_s: float = 2.0,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep):
        self.towers, self.store, self.max_users, self.retry_max_s = towers, store, max_users, retry_max_s
        self.clock, self.sleep = clock, sleep
        self.pending: dict[str, PendingUpdate] = {}

    def add(self, user_id: str, window: UserWindow | None, produced_ms: int | None = None, seen: Iterable[tuple[int, str]] = ()) -> None:
        """Queues the newest state of a user's window (a later add for the same user replaces it;
        None keeps it) and the behaviours applied, (event time ms, raw item id), for the user's seen set."""
        update = self.pending.get(user_id)
        if update is None:
            update = self.pending[user_id] = PendingUpdate(window)
        elif window is not None:
            update.window = window
        if produced_ms is not None:
            update.produced_ms.append(produced_ms)
        for behaviour in seen:
            update.seen.append(behaviour)
            if behaviour[0] < update.oldest_seen_ms:
                update.oldest_seen_ms = behaviour[0]

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.max_users

    def flush(self) -> list[str]:
        """Extracts and stores the interests of every pending user; returns the users flushed."""
        if not self.pending:
            return []
        users = [u for u, update in self.pending.items() if update.window is not None]
        updates = [self.pending[u] for u in users]
        batch = self._extract(users, updates) if users else ([], [], None)
        # The seen set of every pending user, with a record written now or not: a window the model
        # knows nothing of yet holds items the next published version knows, and its behaviours are
        # accepted data (a user's sets expire with record_ttl_s, with or without a record).
        seen = {user: update.seen for user, update in self.pending.items() if update.seen}

        def with_the_current_tower() -> None:
            # A version published while the store was failing: its backfill may already have rewritten
            # these users, and records of the older version written after it would stay until the
            # users' next events. So the batch is extracted again with the tower now current.
            nonlocal batch
            if users and self.towers.current().version != batch[2]:
                batch = self._extract(users, updates)

        if batch[0] or seen:
            self._write(lambda: batch[0], seen, with_the_current_tower)
        records, written, _ = batch
        if records:  # freshness and the last write describe records written, not updates skipped
            written_s = self.clock()
            for update in written:
                for produced in update.produced_ms:
                    metrics.FRESHNESS_SECONDS.observe(max(0.0, written_s - produced / 1000.0))
            metrics.LAST_WRITE.set(written_s)
        flushed = list(self.pending)
        self.pending.clear()
        return flushed

    def write_seen(self, user_id: str, behaviours: list[tuple[int, str]]) -> None:
        """Adds (event time ms, raw item id) behaviours to the user's seen set now, outside any batch
        (with the same retry: never dropped)."""
        self._retrying(lambda: self.store.put_many([], {user_id: behaviours}), f"seen-set write of user {user_id!r:.80}")

    def stored_window(self, user_id: str) -> UserWindow:
        """The window of the user's stored record; empty when there is none or it is unreadable (counted)."""
        try:
            record = self._retrying(lambda: self.store.get_many([user_id])[0], f"feature-store read of user {user_id!r:.80}")
        except RecordError as exc:  # another schema, corrupt, or a key of another type: the job's next write replaces it
            metrics.WINDOW_SEEDS.labels(metrics.UNREADABLE).inc()
            log.warning("window of user %.80r not seeded: %s", user_id, exc)
            return UserWindow()
        if record is None or isinstance(record, SeenOnly):  # (a store that reads seen sets: a seen set alone is no window)
            metrics.WINDOW_SEEDS.labels(metrics.NO_RECORD).inc()
            return UserWindow()
        metrics.WINDOW_SEEDS.labels(metrics.SEEDED).inc()
        return UserWindow.from_record(record)

    def _extract(self, users: list[str], updates: list[PendingUpdate]) -> tuple[list[InterestRecord], list[PendingUpdate], str]:
        """The users' records by the current tower, the updates they write, and the tower's version."""
        tower = self.towers.current()
        started = time.perf_counter()
        windows = [u.window.item_ids() for u in updates]
        interests = tower.interests(windows, [u.window.profile for u in updates])
        metrics.TOWER_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_USERS.observe(len(users))
        now_ms = int(self.clock() * 1000)
        records, written = [], []
        for user, update, window, vectors in zip(users, updates, windows, interests):
            if vectors is None:
                metrics.UNKNOWN_WINDOWS.inc()
                continue
            w = update.window
            records.append(InterestRecord(user, tower.version, vectors, window, w.newest_ms, w.last_offset, now_ms, w.profile, w.vouched_ms,
                                          w.profile_ms))
            written.append(update)
        return records, written, tower.version

    def _write(self, records: Callable[[], list[InterestRecord]], seen: dict[str, list[tuple[int, str]]], before_retry: Callable[[], None]) -> None:
        started = time.perf_counter()
        self._retrying(lambda: self.store.put_many(records(), seen), f"feature-store write of {len(records())} records and {len(seen)} seen sets",
                       before_retry)
        metrics.STORE_WRITE_SECONDS.observe(time.perf_counter() - started)

    def _retrying(self, action: Callable, what: str, before_retry: Callable[[], None] = lambda: None):
        """action() until it does not raise: the store is down or unreachable, so wait, never drop.
        `before_retry` runs after each wait (outside the handler: its own errors are no store outage)."""
        delay = 0.05
        while True:
            try:
                return action()
            except RecordError:
                raise  # the store answered: a bad record, not an outage
            except Exception as exc:  # server errors too: CLUSTERDOWN, TRYAGAIN, READONLY, OOM pass, and a
                # read taken for unreadable would start the window empty, to be written over the stored one
                metrics.STORE_ERRORS.inc()
                log.warning("%s failed (%s); retrying in %.2fs", what, exc, delay)
                self.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
            before_retry()


def dead_letter(reason: str, kind: str, value: bytes, partition: int, offset: int, produced_ms: int, topic: str, max_bytes: int = 65_536) -> str:
    """The dead-letter record: why, where it came from, and the original value (truncated if huge):
    as text, and when it is no valid UTF-8 also as base64 (`value_base64`), so the bytes can be replayed."""
    kept = value[:max_bytes]
    record = {
        "reason": reason,
        "kind": kind,
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "produced_ms": produced_ms,
        "value": kept.decode("utf-8", errors="replace"),
        "value_bytes": len(value),
        "truncated": len(value) > max_bytes,
    }
    try:
        kept.decode("utf-8")
    except UnicodeDecodeError:  # (a cut through a multi-byte character at max_bytes counts too: base64 keeps it exact)
        record["value_base64"] = base64.b64encode(kept).decode("ascii")
    return json.dumps(record)
