"""The accounting of `python -m infra faults` and `python -m infra soak`: pure logic, no servers,
no clocks (every time is a `time.monotonic()` value handed in by the harness, infra/harness.py).

Event fates. Every event the harness sends gets a `SentEvent`: when it was first sent, how many
sends of it failed, when the broker acknowledged it (acks=all) and when it was first seen in its
user's stored window (polled while the load runs: the ack->store time). Once the stream has
drained, every user's final stored window is checked against every event acked for that user
(`EventLedger.final_check`): an acked event must be in it, so an event that was seen and then
vanished (a store that lost writes) counts as lost too. A lost event is then looked for in the
broker's log, and its acknowledged offset compared with the others': a broker that dropped
records it had served gives their offsets out again, which a consumer past them never reads.
A window holds the newest L behaviours by event time, so an absent event is not necessarily
lost: when the window is full and the event is no newer than its oldest behaviour, newer events
pushed it out. If such an event was never seen, it is `evicted`: the harness cannot tell whether
it was ever applied: each one is a problem in the verdicts (both commands' stacks keep windows
longer than any user's events in a run, so that there are none). Any other absent acked event is lost. The check needs each (user, item) pair at most once in the replay
(true of MovieLens-1M: a user rates a movie once).

Fault rows. A fault owns the events acknowledged and the requests sent from `lead_s` before it
was injected until `lead_s` before the next one (an event acked just before a broker stop is
the one a broker that loses unsaved data would lose).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

# Fallbacks that mean a backend was down (recall_service/query.py FallbackReason): a degraded answer.
OUTAGE_REASONS = frozenset({"FEATURE_STORE_UNAVAILABLE", "VECTOR_SEARCH_UNAVAILABLE"})
# What a client may see while a backend or the service restarts; anything else is a bug to look at.
EXPECTED_ERROR_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})
# ... and while the recall service itself shuts down, CANCELLED: gRPC core cancels the calls the
# server had received but not yet handed to a handler (grpc/grpc#41785, open); they never ran.
EXPECTED_IN_OWN_SHUTDOWN = frozenset({"CANCELLED"})


@dataclass(slots=True)
class SentEvent:
    user_id: str
    item_id: str
    event_time_ms: int
    first_sent_at: float
    failures: int = 0  # sends refused or failed (each one sent again with the same event id)
    acked_at: float | None = None
    seen_at: float | None = None
    evicted: bool = False  # never seen, and older than a full window's oldest behaviour
    lost: bool = False  # acked, yet not in its user's final window (set by the final check)
    in_broker: bool | None = None  # for a lost event: whether the broker's log still holds it (None: not looked)
    acked_offset: tuple[int, int] | None = None  # (partition, offset) the broker's acknowledgement named
    offset_reused: bool = False  # acked at an offset the broker had acknowledged earlier for another record


def oldest_time_ms(window: tuple[str, ...], times: dict[str, int]) -> int | None:
    """Event time of the oldest behaviour in a stored window, from the times of the events sent."""
    known = [times[item] for item in window if item in times]
    return min(known) if known else None


def window_anomalies(window: tuple[str, ...], sent_items: set[str]) -> tuple[int, int]:
    """(doubled, phantom): behaviours in a stored window more than once, and behaviours that no
    event sent for this user carries. Both must be 0."""
    return len(window) - len(set(window)), sum(1 for item in window if item not in sent_items)


class EventLedger:
    """The fate of every event sent, shared by the producer's callbacks (kafka-python's I/O thread),
    the store poller and the reports: hence one lock."""

    def __init__(self, window_length: int):
        self.window_length = window_length
        self.events: dict[str, SentEvent] = {}  # event id -> fate
        self.items_by_user: dict[str, dict[str, int]] = {}  # user -> item -> event time, of every event sent
        self.ids_by_user: dict[str, list[str]] = {}
        self.unseen: dict[str, set[str]] = {}  # user -> ids of its acked events not yet resolved
        self.seen_users: list[str] = []  # users with at least one event seen in the store, in that order
        self._seen_user_set: set[str] = set()
        self.lock = threading.Lock()

    def sent(self, event_id: str, user_id: str, item_id: str, event_time_ms: int, now: float) -> None:
        with self.lock:
            if event_id not in self.events:
                self.events[event_id] = SentEvent(user_id, item_id, event_time_ms, now)
                self.items_by_user.setdefault(user_id, {})[item_id] = event_time_ms
                self.ids_by_user.setdefault(user_id, []).append(event_id)

    def acked(self, event_id: str, now: float, partition: int | None = None, offset: int | None = None) -> None:
        with self.lock:
            event = self.events[event_id]
            if event.acked_at is None:  # a resent event may be acked twice: the first ack counts
                event.acked_at = now
                event.acked_offset = None if offset is None else (partition, offset)
                self.unseen.setdefault(event.user_id, set()).add(event_id)

    def mark_reused_offsets(self) -> int:
        """Marks every event acknowledged at a (partition, offset) the broker had acknowledged earlier
        for another event; returns how many. A broker that loses records it has already served (noida
        0.2.3 at a restart, README) hands their offsets out again: a consumer that read the lost
        record is already past the offset and never reads the new one there."""
        first_at: dict[tuple[int, int], str] = {}
        with self.lock:
            acked = sorted((kv for kv in self.events.items() if kv[1].acked_offset is not None), key=lambda kv: kv[1].acked_at)
            for event_id, event in acked:
                event.offset_reused = first_at.setdefault(event.acked_offset, event_id) != event_id
            return sum(1 for _, e in acked if e.offset_reused)

    def failed(self, event_id: str) -> int:
        """Counts a failed send; returns how many sends of this event failed so far."""
        with self.lock:
            event = self.events[event_id]
            event.failures += 1
            return event.failures

    def users_to_check(self) -> list[str]:
        with self.lock:
            return [user for user, ids in self.unseen.items() if ids]

    def observe(self, user_id: str, window: tuple[str, ...] | None, now: float) -> int:
        """Resolves the user's unseen events against its stored window; returns how many were seen."""
        if window is None:
            return 0
        with self.lock:
            ids = self.unseen.get(user_id, set())
            present = set(window)
            oldest = oldest_time_ms(window, self.items_by_user.get(user_id, {}))
            full = len(window) >= self.window_length
            seen = 0
            for event_id in list(ids):
                event = self.events[event_id]
                if event.item_id in present:
                    event.seen_at = now
                    seen += 1
                elif full and oldest is not None and event.event_time_ms <= oldest:
                    event.evicted = True
                else:
                    continue
                ids.discard(event_id)
            if seen and user_id not in self._seen_user_set:
                self._seen_user_set.add(user_id)
                self.seen_users.append(user_id)
            return seen

    def final_check(self, user_id: str, window: tuple[str, ...] | None, now: float) -> None:
        """Marks the user's acked events absent from its final stored window as lost (or, never seen
        and pushed out by newer ones, as evicted); see the module docstring."""
        with self.lock:
            present = set(window or ())
            oldest = oldest_time_ms(window or (), self.items_by_user.get(user_id, {}))
            full = len(present) >= self.window_length
            for event_id in self.ids_by_user.get(user_id, []):
                event = self.events[event_id]
                if event.acked_at is None:
                    continue
                if event.item_id in present:
                    event.seen_at = now if event.seen_at is None else event.seen_at
                elif full and oldest is not None and event.event_time_ms <= oldest:
                    event.evicted = event.seen_at is None
                else:
                    event.lost = True
            self.unseen.pop(user_id, None)

    def users(self) -> list[str]:
        with self.lock:
            return list(self.ids_by_user)

    def oldest_unseen_ack(self) -> float | None:
        """When the longest-waiting acked event not yet in the store was acked (None: none waits)."""
        with self.lock:
            return min((self.events[eid].acked_at for ids in self.unseen.values() for eid in ids), default=None)

    def unresolved_count(self) -> int:
        with self.lock:
            return sum(len(ids) for ids in self.unseen.values())

    def snapshot(self) -> list[SentEvent]:
        with self.lock:
            return list(self.events.values())


# -- faults -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FaultRun:
    """One injected fault, in monotonic seconds. The baseline row (no fault) has no service."""

    name: str
    service: str
    how: str  # what was done to the service, in words
    injected_at: float
    stopped_at: float  # the stop (or kill) returned: the service is down
    restarted_at: float  # its health check answers again
    window_start: float  # events acked and requests sent in [window_start, window_end) are this fault's
    window_end: float


@dataclass(frozen=True)
class RecallSample:
    sent_at: float  # the call's scheduled start (open loop: a late start counts in its latency)
    done_at: float
    code: str  # gRPC status code name
    reason: str = "NONE"  # fallback reason of an OK answer; NONE = stored interests

    @property
    def latency_s(self) -> float:
        return self.done_at - self.sent_at

    @property
    def normal(self) -> bool:
        """Answered, and not by a fallback for a backend outage (an unknown user's popular items are normal)."""
        return self.code == "OK" and self.reason not in OUTAGE_REASONS


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class FaultSummary:
    name: str
    service: str
    how: str
    down_s: float | None  # from the injection until the service answered again
    restart_s: float | None  # from the restart command until the service answered
    events_acked: int
    events_lost: int  # acked, not in the final stored window, not pushed out of it by newer events
    events_lost_after_seen: int  # of those: seen in the store earlier, then gone (the store lost a write)
    events_lost_not_in_broker: int  # of those: absent from the broker's log too (the broker dropped an acked record)
    events_lost_at_reused_offset: int  # of those: acked at an offset already acked for another record (the broker reused it)
    events_evicted_unverified: int
    events_unacked: int  # never acknowledged: the producer gave up (not a loss of the system's, yet unchecked)
    send_failures: int  # sends refused or failed, each sent again
    store_read_errors: int  # reads of the stored windows that failed (the harness' own poll of Redis)
    lag_p50_s: float | None  # ack -> seen in the store, events acked in the window
    lag_max_s: float | None
    fresh_again_s: float | None  # restart -> the first event acked after it seen in the store
    recall_requests: int
    recall_errors: dict[str, int]  # gRPC status code -> count
    recall_degraded: dict[str, int]  # outage fallback reason -> count (answered, with popular items)
    recall_recovered_s: float | None  # restart -> the first normal answer to a request sent after it
    recall_p99_ms: float | None  # of the answered requests
    lost_event_ids: list[str] = field(default_factory=list)


def summarize_fault(run: FaultRun, events: dict[str, SentEvent], samples: list[RecallSample], store_read_errors: Iterable[float] = ()) -> FaultSummary:
    """The row of one fault; `store_read_errors`: when the harness' reads of the stored windows failed."""
    start, end = run.window_start, run.window_end
    acked = {eid: e for eid, e in events.items() if e.acked_at is not None and start <= e.acked_at < end}
    lost = sorted(eid for eid, e in acked.items() if e.lost)
    sent_here = [e for e in events.values() if start <= e.first_sent_at < end]
    lags = [e.seen_at - e.acked_at for e in acked.values() if e.seen_at is not None]
    after_restart = [e.seen_at for e in acked.values() if e.acked_at >= run.restarted_at and e.seen_at is not None]
    requests = [s for s in samples if start <= s.sent_at < end]
    recovered = [s.done_at for s in requests if s.sent_at >= run.restarted_at and s.normal]
    faulted = bool(run.service)
    return FaultSummary(
        name=run.name,
        service=run.service,
        how=run.how,
        down_s=run.restarted_at - run.injected_at if faulted else None,
        restart_s=run.restarted_at - run.stopped_at if faulted else None,
        events_acked=len(acked),
        events_lost=len(lost),
        events_lost_after_seen=sum(1 for eid in lost if acked[eid].seen_at is not None),
        events_lost_not_in_broker=sum(1 for eid in lost if acked[eid].in_broker is False),
        events_lost_at_reused_offset=sum(1 for eid in lost if acked[eid].offset_reused),
        events_evicted_unverified=sum(1 for e in acked.values() if e.evicted),
        events_unacked=sum(1 for e in sent_here if e.acked_at is None),
        send_failures=sum(e.failures for e in sent_here),
        store_read_errors=sum(1 for at in store_read_errors if start <= at < end),
        lag_p50_s=percentile(lags, 50),
        lag_max_s=max(lags) if lags else None,
        fresh_again_s=min(after_restart) - run.restarted_at if faulted and after_restart else None,
        recall_requests=len(requests),
        recall_errors=dict(Counter(s.code for s in requests if s.code != "OK")),
        recall_degraded=dict(Counter(s.reason for s in requests if s.code == "OK" and s.reason in OUTAGE_REASONS)),
        recall_recovered_s=min(recovered) - run.restarted_at if faulted and recovered else None,
        recall_p99_ms=_ms(percentile([s.latency_s for s in requests if s.code == "OK"], 99)),
        lost_event_ids=lost[:100],
    )


def fault_windows(started_at: float, ended_at: float, injections: list[float], lead_s: float) -> list[tuple[float, float]]:
    """[start, end) of the baseline (before the first fault) and of each fault (see the module docstring)."""
    bounds = [started_at, *[max(started_at, t - lead_s) for t in injections], ended_at]
    return list(zip(bounds[:-1], bounds[1:]))


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _num(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{code} {n}" for code, n in sorted(counts.items())) or "0"


def _lost(s: FaultSummary) -> str:
    if not s.events_lost:
        return "0"
    where = [f"{s.events_lost_not_in_broker:,} not in the broker's log"] if s.events_lost_not_in_broker else []
    where += [f"{s.events_lost_at_reused_offset:,} at an offset the broker reused"] if s.events_lost_at_reused_offset else []
    where += [f"{s.events_lost_after_seen:,} seen, then gone from the store"] if s.events_lost_after_seen else []
    return f"**{s.events_lost:,}**" + (f" ({'; '.join(where)})" if where else "")


def fault_table(summaries: list[FaultSummary]) -> str:
    """The markdown table `python -m infra faults` prints and the README shows."""
    header = ("| fault | down (s) | acked events | lost | evicted before seen | send failures (resent) | ack→store p50 / max (s) "
              "| fresh again after restart (s) | recall requests | recall errors | degraded answers | recall recovered after restart (s) |")
    lines = [header, "|" + "|".join("---" for _ in range(header.count("|") - 1)) + "|"]
    for s in summaries:
        lines.append(
            f"| {s.name} | {_num(s.down_s)} | {s.events_acked:,} | {_lost(s)} | {s.events_evicted_unverified:,} | {s.send_failures:,} "
            f"| {_num(s.lag_p50_s, 2)} / {_num(s.lag_max_s)} | {_num(s.fresh_again_s)} | {s.recall_requests:,} | {_counts(s.recall_errors)} "
            f"| {_counts(s.recall_degraded)} | {_num(s.recall_recovered_s, 2)} |")
    return "\n".join(lines)


def recall_error_problems(name: str, errors: dict[str, int], expected: frozenset[str]) -> list[str]:
    """The recall answers with a status code outside `expected` (gRPC code -> count in `errors`), as
    one problem; none when every error was expected. An empty `expected`: every error is a problem."""
    unexpected = {code: n for code, n in errors.items() if code not in expected}
    if not unexpected:
        return []
    allowed = f"only {' / '.join(sorted(expected))} are expected" if expected else "no error is expected"
    return [f"{name}: recall answered {_counts(unexpected)}; {allowed}"]


def _unacked_problem(n: int) -> str:
    return f"{n} events sent were never acknowledged (the harness gave up resending them): unchecked"


def _unverified_problem(n: int) -> str:
    return f"{n} acked events were pushed out of their window before any poll saw them: unverified (run with windows longer than any user's events)"


def fault_verdict(summaries: list[FaultSummary]) -> list[str]:
    """What must hold whatever the timing: in every row, events acked and none lost, none unacked
    (the harness gave up: unchecked), none pushed out of its window unverified, recall called and
    answering again after each fault, no status other than UNAVAILABLE / DEADLINE_EXCEEDED (and
    CANCELLED while the recall service itself stops; in the row without a fault, no error and no
    degraded answer at all), no failed read of the store outside a Redis
    fault. Empty when all holds."""
    problems = []
    for s in summaries:
        if not s.events_acked:
            problems.append(f"{s.name}: no event was acknowledged in this row: the stream or the broker stopped, nothing was checked")
        if s.events_unacked:
            problems.append(f"{s.name}: {_unacked_problem(s.events_unacked)}")
        if s.events_lost:
            broker_lost = s.events_lost_not_in_broker + s.events_lost_at_reused_offset
            causes = [f"{s.events_lost_not_in_broker} not in the broker's log any more"] if s.events_lost_not_in_broker else []
            causes += [f"{s.events_lost_at_reused_offset} acked at an offset the broker had acknowledged before for another record"
                       ] if s.events_lost_at_reused_offset else []
            cause = f": {'; '.join(causes)}" if causes else ""
            if broker_lost == s.events_lost:
                cause += " (all of them the broker's: it dropped records it had acknowledged)"
            problems.append(f"{s.name}: {s.events_lost} acked events never reached their window{cause} (first ids: {', '.join(s.lost_event_ids[:5])})")
        if s.events_evicted_unverified:
            problems.append(f"{s.name}: {_unverified_problem(s.events_evicted_unverified)}")
        if s.store_read_errors and s.service != "redis":  # Redis down: the poll fails, and sees the events later
            problems.append(f"{s.name}: {s.store_read_errors} reads of the stored windows failed, and Redis was not the fault")
        # the row without a fault is the baseline: an error or a degraded answer there is no fault's
        expected = (EXPECTED_ERROR_CODES | (EXPECTED_IN_OWN_SHUTDOWN if s.service == "recall" else frozenset())) if s.service else frozenset()
        problems += recall_error_problems(s.name, s.recall_errors, expected)
        if not s.service and s.recall_degraded:
            problems.append(f"{s.name}: {_counts(s.recall_degraded)} degraded answers while no backend was stopped")
        if not s.recall_requests:  # the recall clients stopped: no recovery to judge either
            problems.append(f"{s.name}: no recall request was sent in this row: the recall clients stopped")
        elif s.service and s.recall_recovered_s is None:
            problems.append(f"{s.name}: no normal recall answer after the restart")
    return problems


# -- soak ---------------------------------------------------------------------------------------


@dataclass
class MinuteRow:
    minute: int
    requests: int
    error_rate: float
    errors: dict[str, int]
    degraded: int
    p50_ms: float | None
    p99_ms: float | None
    events_per_s: float
    lag_p99_s: float | None  # ack -> store, events acked this minute
    rss_mb: dict[str, float]  # per process, at the end of the minute


def minute_row(minute: int, samples: list[RecallSample], acked_events: list[SentEvent], seconds: float, rss: dict[str, int]) -> MinuteRow:
    """One minute of a soak: requests sent, events acked in it; resident memory at its end."""
    answered = [s.latency_s for s in samples if s.code == "OK"]
    errors = Counter(s.code for s in samples if s.code != "OK")
    lags = [e.seen_at - e.acked_at for e in acked_events if e.seen_at is not None]
    return MinuteRow(
        minute=minute,
        requests=len(samples),
        error_rate=sum(errors.values()) / len(samples) if samples else 0.0,
        errors=dict(errors),
        degraded=sum(1 for s in samples if s.code == "OK" and s.reason in OUTAGE_REASONS),
        p50_ms=_ms(percentile(answered, 50)),
        p99_ms=_ms(percentile(answered, 99)),
        events_per_s=len(acked_events) / seconds if seconds > 0 else 0.0,
        lag_p99_s=percentile(lags, 99),
        rss_mb={name: rss_bytes / 2**20 for name, rss_bytes in rss.items()},
    )


def minute_header(processes: list[str]) -> str:
    return ("| minute | requests | error rate | degraded | p50 (ms) | p99 (ms) | events/s | ack→store p99 (s) | "
            + " | ".join(f"{p} RSS (MB)" for p in processes) + " |")


def minute_line(row: MinuteRow, processes: list[str]) -> str:
    return (f"| {row.minute} | {row.requests:,} | {row.error_rate:.2%} | {row.degraded} | {_num(row.p50_ms)} | {_num(row.p99_ms)} "
            f"| {row.events_per_s:,.0f} | {_num(row.lag_p99_s, 2)} | " + " | ".join(_num(row.rss_mb.get(p), 0) for p in processes) + " |")


# Processes (as named in the RSS samples: infra.stack.SERVICES and the harness' own) whose memory grows
# with the load by design; their growth is shown, not judged (one that is gone at the end still is a problem).
GROWTH_EXEMPT = {
    # noida, the stack's embedded broker, keeps the topic's records in memory until [streaming].topic_retention_ms
    # (one day by default): 46 -> 425 MB in a 10-minute soak (README); a Kafka cluster keeps its log on disk
    "broker": "noida keeps the topic's records in memory until retention",
    # the harness itself, not under test: it keeps the fate of every event and every call's latency
    "load-generator": "the harness keeps every event's fate and every call's latency",
}


@dataclass
class MemoryGrowth:
    process: str
    after_warmup_mb: float
    end_mb: float | None  # None: the process was not running at the end
    growth_mb: float | None
    growth_pct: float | None
    bound_mb: float  # the larger of the relative and the absolute bound
    within_bound: bool


def memory_growth(after_warmup: dict[str, int], end: dict[str, int], bound_pct: float, bound_mb: float) -> list[MemoryGrowth]:
    """RSS at the end against RSS after the warm-up, per process running after the warm-up, with the
    bound check: growth within bound_pct of the post-warm-up RSS or within bound_mb, whichever is
    larger (a small process moves by a few MB for reasons that are not leaks). A process gone at the
    end (it died, or was killed for memory) is not within bound."""
    out = []
    for name in sorted(after_warmup):
        start_mb = after_warmup[name] / 2**20
        bound = max(start_mb * bound_pct / 100, bound_mb)
        if name not in end:
            out.append(MemoryGrowth(name, start_mb, None, None, None, bound, False))
            continue
        end_mb = end[name] / 2**20
        growth = end_mb - start_mb
        out.append(MemoryGrowth(name, start_mb, end_mb, growth, 100 * growth / start_mb if start_mb else 0.0, bound, growth <= bound))
    return out


def _memory_line(r: MemoryGrowth) -> str:
    if r.end_mb is None:
        return f"| {r.process} | {r.after_warmup_mb:,.0f} | – | – | – | {r.bound_mb:,.0f} | NO: gone |"
    within = "yes" if r.within_bound else f"NO (exempt: {GROWTH_EXEMPT[r.process]})" if r.process in GROWTH_EXEMPT else "NO"
    return (f"| {r.process} | {r.after_warmup_mb:,.0f} | {r.end_mb:,.0f} | {r.growth_mb:+,.0f} | {r.growth_pct:+.1f}% | {r.bound_mb:,.0f} "
            f"| {within} |")


def memory_table(rows: list[MemoryGrowth]) -> str:
    lines = ["| process | RSS after warm-up (MB) | RSS at end (MB) | growth (MB) | growth | bound (MB) | within bound |", "|---|---|---|---|---|---|---|"]
    return "\n".join(lines + [_memory_line(r) for r in rows])


def soak_verdict(rows: list[MinuteRow], events: list[SentEvent], growth: list[MemoryGrowth], store_read_errors: int) -> list[str]:
    """What must hold in a soak beyond `LoadRun.finish`'s checks (infra.harness.final_problems): every
    minute with events acked and calls sent; every event acked, none lost, none unverified; no recall
    error and no degraded answer (no fault is injected: none is expected); no failed read of the store; no process gone, and
    none grown past its bound but those of GROWTH_EXEMPT."""
    problems = [f"minute {r.minute}: no event was acknowledged" for r in rows if not r.events_per_s]
    problems += [f"minute {r.minute}: no recall request was sent: the recall clients stopped" for r in rows if not r.requests]
    lost = sum(1 for e in events if e.lost)
    unacked = sum(1 for e in events if e.acked_at is None)
    evicted = sum(1 for e in events if e.evicted)
    problems += [f"{lost} acked events never reached their window"] if lost else []
    problems += [_unacked_problem(unacked)] if unacked else []
    problems += [_unverified_problem(evicted)] if evicted else []
    errors = Counter()
    for r in rows:
        errors.update(r.errors)
    problems += recall_error_problems("soak", dict(errors), frozenset())
    degraded = sum(r.degraded for r in rows)
    problems += [f"{degraded} answers were degraded (popular items: a backend was counted down while no fault was injected)"] if degraded else []
    problems += [f"{store_read_errors} reads of the stored windows failed"] if store_read_errors else []
    for g in growth:
        if g.end_mb is None:
            problems.append(f"{g.process} was not running at the end of the soak (it died or was killed)")
        elif not g.within_bound and g.process not in GROWTH_EXEMPT:
            problems.append(f"{g.process} grew {g.growth_mb:+,.0f} MB after the warm-up, over its bound of {g.bound_mb:,.0f} MB")
    return problems


def per_second(events: list[SentEvent], samples: list[RecallSample], started_at: float, ended_at: float) -> list[dict]:
    """The run second by second (raw numbers for plots): events acked and seen in the store, recall
    answers by outcome."""
    seconds = max(0, math.ceil(ended_at - started_at))
    rows = [{"t": t, "acked": 0, "seen": 0, "recall_normal": 0, "recall_degraded": 0, "recall_errors": 0} for t in range(seconds)]

    def bump(at: float | None, key: str) -> None:
        if at is not None and started_at <= at < started_at + seconds:
            rows[int(at - started_at)][key] += 1

    for e in events:
        bump(e.acked_at, "acked")
        bump(e.seen_at, "seen")
    for s in samples:
        bump(s.done_at, "recall_normal" if s.normal else "recall_errors" if s.code != "OK" else "recall_degraded")
    return rows
