"""Backfill: re-extract every stored user's interests with another user tower, from the stored windows.

Run after a new model version is published so that users who send no event meanwhile are served
with the new version too. The streaming job keeps writing while this runs, so each record is
replaced only if it is unchanged since it was read (`replace_if_unchanged`): a newer window the
job has just written is never overwritten with an older one. Passes repeat until one finds no
record of another version left, and go on until a settle time has passed even then: the job may
still write with the old tower for up to one model poll interval after the switch. A backfill
stops as soon as its version is superseded (another publish moved CURRENT on): it would otherwise
rewrite records the newer version's job or backfill had just written back to its own older version.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

from model_export.artifact import UserTower
from model_export.registry import CurrentUnreadableError
from streaming.feature_store import FeatureStore, InterestRecord, RecordError, get_each
from streaming.window import vouched_time

log = logging.getLogger(__name__)


@dataclass
class BackfillReport:
    model_version: str
    users_seen: int
    rewritten: int
    already_current: int
    skipped_unknown: int  # windows with no item the tower knows
    skipped_unreadable: int  # corrupt records (another schema, another Redis type): the job's next write replaces them
    passes: int
    seconds: float
    superseded: bool = False  # stopped early: another version became current meanwhile
    # Records of another version the last pass still found, after the settle time (it rewrote those
    # unchanged since read): the job still writes with its old tower (a failed reload), and writes them
    # again. The figures above but `rewritten` and `passes` are the first pass's.
    stale_in_last_pass: int = 0


def backfill(store: FeatureStore, tower: UserTower, batch: int = 512, max_passes: int = 3, settle_s: float = 0.0,
             pause_s: float = 0.5, progress: Callable[[int], None] = lambda n: None,
             superseded: Callable[[], bool] = lambda: False) -> BackfillReport:
    """Passes over the store, back to back until one finds no record of another version left
    (records whose window has no item the tower knows stay as they are) or `max_passes` have run;
    then one every `pause_s` until `settle_s` after the start, since the streaming job may still be
    writing with the old tower meanwhile (see `job_settle_s`). `superseded` is asked before every
    batch; once it says True the backfill stops (the newer version's backfill takes over)."""
    started = time.perf_counter()
    report = None
    rewritten = passes = 0
    while True:
        seen, current, unknown, unreadable, done = _one_pass(store, tower, batch, progress, superseded)
        report = report or (seen, current, unknown, unreadable)
        rewritten, passes = rewritten + done, passes + 1
        stopped = superseded()
        if stopped:
            break
        if seen - current - unknown - unreadable == 0 or passes >= max_passes:
            # Even after a clean pass: until settle_s the job may still write with the old tower.
            if time.perf_counter() - started >= settle_s:
                break
            time.sleep(pause_s)
    return BackfillReport(tower.version, report[0], rewritten, report[1], report[2], report[3], passes, time.perf_counter() - started, stopped,
                          stale_in_last_pass=seen - current - unknown - unreadable)


def job_settle_s(model_poll_s: float) -> float:
    """How long after a switch of CURRENT the streaming job may still write with the old tower: until
    its next look at the registry (up to `model_poll_s` later; twice that, for safety) plus a batch."""
    return 2 * model_poll_s + 2.0


def current_moved_on(registry, version: str | None = None) -> Callable[[], bool]:
    """A `superseded` check: True once the registry's CURRENT names another version than `version`
    (by default the one it names now). A CURRENT that cannot be read (a shared volume's hiccup, a
    write in progress) counts as unchanged: the next batch looks again."""
    started_with = version if version is not None else registry.current_version()

    def superseded() -> bool:
        try:
            return registry.current_version() != started_with
        except (OSError, CurrentUnreadableError) as exc:
            log.warning("the registry's current version is unreadable (%s): backfill goes on", exc)
            return False

    return superseded


def _one_pass(store: FeatureStore, tower: UserTower, batch: int, progress: Callable[[int], None],
              superseded: Callable[[], bool]) -> tuple[int, int, int, int, int]:
    """(records seen, already current, windows with no known item, unreadable, rewritten) of one scan,
    cut short when `superseded`."""
    seen = current = unknown = unreadable = rewritten = 0
    for user_ids in store.user_ids(batch):
        if superseded():
            break
        read = [r for r in get_each(store, user_ids) if isinstance(r, (InterestRecord, RecordError))]  # not gone since the scan
        records = [r for r in read if not isinstance(r, RecordError)]
        stale = [r for r in records if r.model_version != tower.version]
        seen, current, unreadable = seen + len(read), current + len(records) - len(stale), unreadable + len(read) - len(records)
        if not stale:
            continue
        interests = tower.interests([r.window for r in stale], [r.profile for r in stale])
        now_ms = int(time.time() * 1000)
        fresh, as_read = [], []  # each rewrite, and the record it replaces as it was read
        for record, vectors in zip(stale, interests):
            if vectors is None:
                unknown += 1
                continue
            fresh.append(InterestRecord(record.user_id, tower.version, vectors, record.window, record.last_event_ms, record.last_offset, now_ms, record.profile,
                                        vouched_time(record), record.profile_ms))  # the bound of a record without one, not its rewrite's time
            as_read.append(record)
        done = store.replace_if_unchanged(fresh, as_read)
        rewritten += done
        progress(done)
    return seen, current, unknown, unreadable, rewritten


def stored_versions(store: FeatureStore, batch: int = 1000) -> Counter:
    """Model version -> how many stored records carry it (what may still be searched in Milvus);
    unreadable records name none (the recall service answers them as corrupt, searching nothing)."""
    versions: Counter = Counter()
    for user_ids in store.user_ids(batch):
        versions.update(r.model_version for r in get_each(store, user_ids) if isinstance(r, InterestRecord))
    return versions
