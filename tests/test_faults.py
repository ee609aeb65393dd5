"""The fault harness (python -m infra faults / soak).

Unit tests of its accounting (infra/fault_report.py: which acked events are lost, fresh again,
recall errors and recovery per fault, soak minutes and memory growth) without servers; then one
short run of the real command against real processes (broker, Redis, Milvus Lite server, the
PyFlink job, the recall service): Redis restarted, the job killed and restored from its
checkpoint, the broker restarted, with events and recall calls flowing. It asserts what must hold
whatever the timing (nothing lost, recall answering again, only UNAVAILABLE / DEADLINE_EXCEEDED),
never how fast.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from infra.fault_report import (
    EventLedger,
    FaultRun,
    RecallSample,
    SentEvent,
    fault_table,
    fault_verdict,
    fault_windows,
    memory_growth,
    memory_table,
    minute_row,
    percentile,
    soak_verdict,
    summarize_fault,
    window_anomalies,
)
from infra.faults import parse_faults
from infra.harness import HarnessError, event_ids_in_topic, final_problems, reason_name

REPO = Path(__file__).resolve().parent.parent


# -- the event ledger -------------------------------------------------------------------------------


def ledger_with(events, window_length=3):
    """events: (event id, user, item, time ms, acked?)"""
    ledger = EventLedger(window_length)
    for event_id, user, item, time_ms, acked in events:
        ledger.sent(event_id, user, item, time_ms, now=0.0)
        if acked:
            ledger.acked(event_id, now=1.0)
    return ledger


def test_an_acked_event_is_seen_once_its_item_is_in_the_users_window():
    ledger = ledger_with([("e1", "u", "a", 10, True), ("e2", "u", "b", 20, True), ("e3", "u", "c", 30, False)])
    assert ledger.users_to_check() == ["u"] and ledger.unresolved_count() == 2
    assert ledger.observe("u", ("a",), now=2.0) == 1
    assert ledger.events["e1"].seen_at == 2.0 and ledger.events["e2"].seen_at is None
    assert ledger.observe("u", None, now=2.5) == 0  # no record yet: nothing resolved
    ledger.observe("u", ("a", "b"), now=3.0)
    assert ledger.events["e2"].seen_at == 3.0 and ledger.unresolved_count() == 0
    assert ledger.seen_users == ["u"]
    assert ledger.events["e3"].seen_at is None  # never acked: never waited for


def test_an_unseen_event_older_than_a_full_window_is_evicted_not_lost():
    ledger = ledger_with([(f"e{t}", "u", f"i{t}", t, True) for t in range(5)], window_length=3)
    ledger.observe("u", ("i2", "i3", "i4"), now=2.0)  # full: i0 and i1 were pushed out unseen
    assert [ledger.events[f"e{t}"].evicted for t in range(5)] == [True, True, False, False, False]
    assert ledger.unresolved_count() == 0


def test_an_event_missing_from_a_window_that_is_not_full_stays_unresolved():
    ledger = ledger_with([("e0", "u", "i0", 0, True), ("e1", "u", "i1", 1, True)], window_length=3)
    ledger.observe("u", ("i1",), now=2.0)
    assert not ledger.events["e0"].evicted and ledger.events["e0"].seen_at is None
    assert ledger.unresolved_count() == 1


def test_the_final_check_counts_absent_acked_events_as_lost_even_if_seen_before():
    ledger = ledger_with([("e0", "u", "i0", 0, True), ("e1", "u", "i1", 1, True), ("e2", "u", "i2", 2, False),
                          ("e3", "v", "i0", 5, True)], window_length=10)
    ledger.observe("u", ("i0", "i1"), now=2.0)  # both seen ...
    ledger.final_check("u", ("i0",), now=9.0)  # ... then i1 vanished (a store that lost a write)
    ledger.final_check("v", None, now=9.0)  # no record at all
    assert [ledger.events[e].lost for e in ("e0", "e1", "e2", "e3")] == [False, True, False, True]  # e2 was never acked
    assert ledger.unresolved_count() == 0


def test_the_final_check_accepts_events_pushed_out_by_newer_ones():
    ledger = ledger_with([(f"e{t}", "u", f"i{t}", t, True) for t in range(4)], window_length=2)
    ledger.observe("u", ("i0", "i1"), now=2.0)
    ledger.final_check("u", ("i2", "i3"), now=3.0)
    events = [ledger.events[f"e{t}"] for t in range(4)]
    assert not any(e.lost for e in events)
    assert not any(e.evicted for e in events)  # i0 and i1 were seen before they were pushed out


def test_an_event_acked_at_an_offset_acked_before_for_another_is_marked_as_reused():
    # What noida did in a CI run: e1 acked at (0, 7) and read by the job, dropped from the broker's
    # snapshot at its restart; e3, sent after it, acked at (0, 7) again and never read by the job.
    ledger = ledger_with([(f"e{i}", "u", f"i{i}", i, False) for i in range(5)])
    ledger.acked("e0", now=1.0, partition=0, offset=6)
    ledger.acked("e1", now=2.0, partition=0, offset=7)
    ledger.acked("e2", now=2.5, partition=1, offset=7)  # another partition: no reuse
    ledger.acked("e4", now=4.0, partition=0, offset=8)
    ledger.acked("e3", now=3.0, partition=0, offset=7)
    assert ledger.mark_reused_offsets() == 1
    assert [e.offset_reused for e in ledger.snapshot()] == [False, False, False, True, False]  # the later ack only
    ledger.final_check("u", ("i0", "i1", "i2", "i4"), now=5.0)
    run = FaultRun("broker restart", "broker", "SIGINT", 2.6, 2.7, 2.9, 0.0, 10.0)
    s = summarize_fault(run, dict(ledger.events), [])
    assert (s.events_lost, s.events_lost_at_reused_offset, s.events_lost_not_in_broker) == (1, 1, 0)
    assert "**1** (1 at an offset the broker reused)" in fault_table([s])
    assert "1 acked at an offset the broker had acknowledged before for another record (all of them the broker's" in fault_verdict([s])[0]


def test_the_oldest_unseen_ack_says_how_far_the_store_is_behind():
    ledger = ledger_with([("e0", "u", "i0", 0, False), ("e1", "u", "i1", 1, False)])
    assert ledger.oldest_unseen_ack() is None
    ledger.acked("e0", now=5.0)
    ledger.acked("e1", now=7.0)
    ledger.acked("e0", now=9.0)  # a resent event's second ack changes nothing
    assert ledger.oldest_unseen_ack() == 5.0
    ledger.observe("u", ("i0",), now=8.0)
    assert ledger.oldest_unseen_ack() == 7.0


def test_window_anomalies_count_doubled_and_never_sent_behaviours():
    assert window_anomalies(("a", "b"), {"a", "b"}) == (0, 0)
    assert window_anomalies(("a", "a", "x"), {"a", "b"}) == (1, 1)


# -- fault rows ----------------------------------------------------------------------------------


def event(acked_at, seen_at=None, lost=False, failures=0, first_sent_at=None, evicted=False, in_broker=None):
    sent = acked_at if first_sent_at is None else first_sent_at
    return SentEvent("u", "i", 0, sent if sent is not None else 0.0, failures=failures, acked_at=acked_at, seen_at=seen_at, lost=lost,
                     evicted=evicted, in_broker=in_broker)


def test_a_fault_row_counts_its_window_only():
    run = FaultRun("Redis restart", "redis", "SIGTERM", injected_at=100.0, stopped_at=100.5, restarted_at=104.0, window_start=95.0, window_end=140.0)
    events = {
        "before": event(90.0, seen_at=90.5, lost=True),  # another fault's
        "ok": event(96.0, seen_at=97.0),
        "lost": event(101.0, lost=True, in_broker=False),
        "revert": event(99.0, seen_at=99.2, lost=True, in_broker=True),
        "after": event(104.5, seen_at=106.0),
        "later": event(105.0, seen_at=106.5),
        "unacked": event(None, failures=60, first_sent_at=102.0),
        "evicted": event(103.0, evicted=True),
    }
    samples = [
        RecallSample(96.0, 96.1, "OK"),
        RecallSample(100.8, 101.0, "OK", "FEATURE_STORE_UNAVAILABLE"),
        RecallSample(101.0, 102.0, "DEADLINE_EXCEEDED"),
        RecallSample(103.0, 103.01, "UNAVAILABLE"),
        RecallSample(103.5, 103.6, "OK", "UNKNOWN_USER"),  # normal, but sent before the restart
        RecallSample(104.2, 104.4, "OK", "VECTOR_SEARCH_UNAVAILABLE"),  # degraded: not recovered yet
        RecallSample(104.5, 104.7, "OK"),
        RecallSample(150.0, 150.1, "INTERNAL"),  # the next fault's
    ]
    s = summarize_fault(run, events, samples)
    assert (s.events_acked, s.events_lost, s.events_lost_after_seen, s.events_lost_not_in_broker, s.events_evicted_unverified) == (6, 2, 1, 1, 1)
    assert "**2** (1 not in the broker's log; 1 seen, then gone from the store)" in fault_table([s])
    assert (s.events_unacked, s.send_failures) == (1, 60)
    assert s.down_s == pytest.approx(4.0) and s.restart_s == pytest.approx(3.5)
    assert s.fresh_again_s == pytest.approx(2.0)  # the first event acked after the restart was seen 2 s after it
    assert s.lag_max_s == pytest.approx(1.5)
    assert s.recall_requests == 7
    assert s.recall_errors == {"DEADLINE_EXCEEDED": 1, "UNAVAILABLE": 1}
    assert s.recall_degraded == {"FEATURE_STORE_UNAVAILABLE": 1, "VECTOR_SEARCH_UNAVAILABLE": 1}
    assert s.recall_recovered_s == pytest.approx(0.7)
    assert sorted(s.lost_event_ids) == ["lost", "revert"]


def test_the_baseline_row_has_no_recovery_figures():
    run = FaultRun("no fault", "", "", 0.0, 0.0, 0.0, 0.0, 10.0)
    s = summarize_fault(run, {"e": event(1.0, seen_at=1.2)}, [RecallSample(1.0, 1.1, "OK")])
    assert s.down_s is s.fresh_again_s is s.recall_recovered_s is None
    assert s.lag_p50_s == pytest.approx(0.2)
    assert "| no fault | – |" in fault_table([s])


def test_fault_windows_start_a_lead_before_each_injection():
    assert fault_windows(0.0, 100.0, [30.0, 60.0], lead_s=5.0) == [(0.0, 25.0), (25.0, 55.0), (55.0, 100.0)]
    assert fault_windows(0.0, 100.0, [], lead_s=5.0) == [(0.0, 100.0)]


def test_the_verdict_names_losses_unexpected_codes_and_missing_recoveries():
    run = FaultRun("broker restart", "broker", "SIGINT", 10.0, 10.5, 14.0, 5.0, 50.0)
    fine = summarize_fault(run, {"e": event(12.0, seen_at=16.0)}, [RecallSample(11.0, 12.0, "UNAVAILABLE"), RecallSample(15.0, 15.1, "OK")])
    assert fault_verdict([fine]) == []
    bad = summarize_fault(run, {"e": event(12.0, lost=True, in_broker=False)}, [RecallSample(11.0, 11.1, "INTERNAL"), RecallSample(15.0, 15.1, "UNAVAILABLE")])
    problems = fault_verdict([bad])
    assert len(problems) == 3
    assert "1 acked events never reached their window: 1 not in the broker's log any more (all of them the broker's" in problems[0]
    assert "INTERNAL 1" in problems[1]
    assert "no normal recall answer after the restart" in problems[2]
    # CANCELLED: only from the recall service's own shutdown (calls it received but never ran)
    samples = [RecallSample(11.0, 11.1, "CANCELLED"), RecallSample(15.0, 15.1, "OK")]
    acked = {"e": event(12.0, seen_at=16.0)}
    own = summarize_fault(FaultRun("recall service restart", "recall", "SIGTERM", 10.0, 10.5, 14.0, 5.0, 50.0), acked, samples)
    assert fault_verdict([own]) == []
    assert "CANCELLED 1" in fault_verdict([summarize_fault(run, acked, samples)])[0]


def test_the_verdict_names_events_never_acked_rows_without_acks_and_unverified_events():
    run = FaultRun("broker restart", "broker", "SIGINT", 10.0, 10.5, 14.0, 5.0, 50.0)
    recalled = [RecallSample(20.0, 20.1, "OK")]
    # a broker that never acknowledges again: every send of the row given up on, none acked
    never_acked = {f"e{i}": event(None, failures=60, first_sent_at=12.0) for i in range(5000)}
    problems = fault_verdict([summarize_fault(run, never_acked, recalled)])
    assert problems == ["broker restart: no event was acknowledged in this row: the stream or the broker stopped, nothing was checked",
                        "broker restart: 5000 events sent were never acknowledged (the harness gave up resending them): unchecked"]
    # pushed out of full windows before a poll saw them: never verified
    evicted = {"ok": event(12.0, seen_at=12.5), **{f"e{i}": event(12.1, evicted=True) for i in range(800)}}
    problems = fault_verdict([summarize_fault(run, evicted, recalled)])
    assert len(problems) == 1 and problems[0].startswith("broker restart: 800 acked events were pushed out of their window before any poll saw them")


def test_failed_store_reads_are_a_problem_except_in_the_redis_fault():
    acked, recalled = {"e": event(12.0, seen_at=16.0)}, [RecallSample(15.0, 15.1, "OK")]
    read_errors = [11.0, 11.5, 60.0]  # the last one in another row
    redis = summarize_fault(FaultRun("Redis restart", "redis", "SIGTERM", 10.0, 10.5, 14.0, 5.0, 50.0), acked, recalled, read_errors)
    broker = summarize_fault(FaultRun("broker restart", "broker", "SIGINT", 10.0, 10.5, 14.0, 5.0, 50.0), acked, recalled, read_errors)
    assert redis.store_read_errors == broker.store_read_errors == 2
    assert fault_verdict([redis]) == []
    assert fault_verdict([broker]) == ["broker restart: 2 reads of the stored windows failed, and Redis was not the fault"]


def test_a_row_without_recall_requests_is_a_problem():
    # the recall clients died: no request in the row, so no recovery was ever checked either
    acked = {"e": event(12.0, seen_at=16.0)}
    for run in (FaultRun("Milvus restart", "milvus", "SIGINT", 10.0, 10.5, 14.0, 5.0, 50.0), FaultRun("no fault", "", "", 0.0, 0.0, 0.0, 0.0, 50.0)):
        assert fault_verdict([summarize_fault(run, acked, [])]) == [f"{run.name}: no recall request was sent in this row: the recall clients stopped"]


def final(**changes):
    """`LoadRun.finish`'s result for a run where all went well, with `changes`."""
    return {"drained": True, "stream_stopped": True, "doubled_behaviours": 0, "phantom_behaviours": 0, "events_lost": 0,
            "events_lost_not_in_broker": 0, "events_lost_at_reused_offset": 0, "store_read_errors": 0, "stream_error": None,
            "last_send_error": "", **changes}


def test_final_problems_name_a_drain_that_gave_up_and_a_stream_still_sending():
    assert final_problems(final()) == []
    problems = final_problems(final(drained=False, stream_stopped=False))
    assert len(problems) == 2
    assert problems[0].startswith("acked events were still missing from the store when the drain gave up")
    assert problems[1].startswith("the event stream was still sending after its stop")


class FakeConsumer:
    """kafka-python's KafkaConsumer over a topic of 2 partitions of 2 records each; it delivers the
    records of the partitions in `delivered` only (the others' leader does not answer)."""

    partitions: set[int] | None = {0, 1}  # None: the broker has no metadata for the topic
    delivered = (0, 1)

    def __init__(self, **options):
        self.read = {}

    def partitions_for_topic(self, topic):
        return self.partitions

    def assign(self, partitions):
        self.read = {tp: 0 for tp in partitions}

    def seek_to_beginning(self, *partitions):
        pass

    def end_offsets(self, partitions):
        return {tp: 2 for tp in partitions}

    def position(self, tp):
        return self.read[tp]

    def poll(self, timeout_ms, max_records):
        batch = {}
        for tp in self.read:
            if tp.partition in self.delivered and self.read[tp] < 2:
                batch[tp] = [SimpleNamespace(value=json.dumps({"event_id": f"p{tp.partition}-{o}"}).encode()) for o in (0, 1)]
                self.read[tp] = 2
        return batch

    def close(self):
        pass


def test_reading_the_broker_log_says_whether_it_read_every_record(monkeypatch):
    import kafka

    from infra.config import KafkaConfig

    monkeypatch.setattr(kafka, "KafkaConsumer", FakeConsumer)
    config = KafkaConfig(bootstrap_servers="127.0.0.1:9")
    assert event_ids_in_topic(config, timeout_s=5.0) == ({"p0-0", "p0-1", "p1-0", "p1-1"}, True)
    # the deadline passed with partition 1 unread: its events are not known to be missing from the log
    monkeypatch.setattr(FakeConsumer, "delivered", (0,))
    assert event_ids_in_topic(config, timeout_s=0.05) == ({"p0-0", "p0-1"}, False)
    monkeypatch.setattr(FakeConsumer, "partitions", None)  # nothing read at all
    assert event_ids_in_topic(config, timeout_s=0.05) == (set(), False)


def test_parse_faults_keeps_the_order_and_refuses_unknown_names():
    assert [f.service for f in parse_faults("redis, job")] == ["redis", "streaming-job"]
    with pytest.raises(HarnessError, match="broker, job, redis, milvus, recall"):
        parse_faults("redis,disk")


def test_fallback_reason_names_match_the_accounting():
    assert reason_name("FALLBACK_REASON_UNSPECIFIED") == "NONE"
    assert reason_name("FALLBACK_REASON_VECTOR_SEARCH_UNAVAILABLE") == "VECTOR_SEARCH_UNAVAILABLE"


# -- soak ----------------------------------------------------------------------------------------


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)


def test_a_minute_row_reports_errors_latency_events_and_memory():
    samples = [RecallSample(0.0, 0.010, "OK"), RecallSample(1.0, 1.030, "OK", "VECTOR_SEARCH_UNAVAILABLE"), RecallSample(2.0, 3.0, "DEADLINE_EXCEEDED"),
               RecallSample(3.0, 3.020, "OK")]
    acked = [event(float(t), seen_at=t + 0.5) for t in range(120)]
    row = minute_row(2, samples, acked, 60.0, {"redis": 8 * 2**20})
    assert row.requests == 4 and row.error_rate == pytest.approx(0.25) and row.errors == {"DEADLINE_EXCEEDED": 1}
    assert row.degraded == 1
    assert row.p50_ms == pytest.approx(20.0)  # the answered calls only
    assert row.events_per_s == pytest.approx(2.0)
    assert row.lag_p99_s == pytest.approx(0.5)
    assert row.rss_mb == {"redis": 8.0}


def test_memory_growth_uses_the_larger_of_the_relative_and_the_absolute_bound():
    mb = 2**20
    rows = {r.process: r for r in memory_growth({"job": 1000 * mb, "redis": 10 * mb, "gone": mb}, {"job": 1150 * mb, "redis": 40 * mb}, 10.0, 50.0)}
    assert rows["job"].growth_mb == pytest.approx(150) and rows["job"].bound_mb == pytest.approx(100) and not rows["job"].within_bound
    assert rows["redis"].growth_pct == pytest.approx(300) and rows["redis"].bound_mb == pytest.approx(50) and rows["redis"].within_bound
    # a process missing at the end (it died, or was killed for memory) is reported, not within bound
    assert rows["gone"].end_mb is None and rows["gone"].growth_mb is None and not rows["gone"].within_bound
    assert "| gone | 1 | – | – | – | 50 | NO: gone |" in memory_table(list(rows.values()))


def soak_minutes(errors=None, requests=100, acked=100):
    samples = [RecallSample(float(i), i + 0.01, "OK") for i in range(requests)]
    samples += [RecallSample(0.0, 1.0, code) for code, n in (errors or {}).items() for _ in range(n)]
    return [minute_row(m, samples, [event(float(t), seen_at=t + 0.5) for t in range(acked)], 60.0, {}) for m in (1, 2)]


def test_the_soak_verdict_counts_every_recall_error():
    events = [event(1.0, seen_at=1.5)]
    assert soak_verdict(soak_minutes(), events, [], 0) == []
    # no fault is injected in a soak: even the codes a restart explains are problems
    assert soak_verdict(soak_minutes({"DEADLINE_EXCEEDED": 3, "INTERNAL": 1}), events, [], 0) == [
        "soak: recall answered DEADLINE_EXCEEDED 6, INTERNAL 2; no error is expected"]
    assert soak_verdict(soak_minutes(requests=0), events, [], 0) == [
        f"minute {m}: no recall request was sent: the recall clients stopped" for m in (1, 2)]


def test_degraded_answers_are_a_problem_where_no_backend_was_stopped():
    events = [event(1.0, seen_at=1.5)]
    degraded = [RecallSample(float(i), i + 0.01, "OK", "VECTOR_SEARCH_UNAVAILABLE") for i in range(5)]
    rows = [minute_row(1, degraded, [event(1.0, seen_at=1.5)], 60.0, {})]
    assert soak_verdict(rows, events, [], 0) == [
        "5 answers were degraded (popular items: a backend was counted down while no fault was injected)"]
    # the faults' baseline row: neither the errors nor the fallbacks of an outage are expected there
    acked = {"e": event(1.0, seen_at=1.5)}
    baseline = FaultRun("no fault (warm-up)", "", "", 0.0, 0.0, 0.0, 0.0, 10.0)
    samples = [RecallSample(1.0, 1.1, "DEADLINE_EXCEEDED"), *degraded, RecallSample(5.0, 5.1, "OK")]
    assert fault_verdict([summarize_fault(baseline, acked, samples)]) == [
        "no fault (warm-up): recall answered DEADLINE_EXCEEDED 1; no error is expected",
        "no fault (warm-up): VECTOR_SEARCH_UNAVAILABLE 5 degraded answers while no backend was stopped"]
    milvus = FaultRun("Milvus restart", "milvus", "SIGTERM", 1.0, 1.5, 4.0, 0.0, 10.0)
    assert fault_verdict([summarize_fault(milvus, acked, samples)]) == []


def test_the_soak_verdict_names_memory_over_its_bound_and_processes_gone_but_exempts_the_broker():
    mb = 2**20
    growth = memory_growth({"broker": 46 * mb, "recall": 150 * mb, "redis": 6 * mb, "milvus": 290 * mb},
                           {"broker": 425 * mb, "recall": 400 * mb, "redis": 13 * mb}, 10.0, 50.0)
    problems = soak_verdict(soak_minutes(), [event(1.0, seen_at=1.5)], growth, 0)
    assert problems == ["milvus was not running at the end of the soak (it died or was killed)",
                        "recall grew +250 MB after the warm-up, over its bound of 50 MB"]  # the broker's +379 MB: exempt
    assert "| broker | 46 | 425 | +379 | +823.9% | 50 | NO (exempt: noida keeps the topic's records in memory until retention) |" in memory_table(growth)


def test_the_soak_verdict_names_lost_unacked_and_unverified_events_and_failed_store_reads():
    events = [event(1.0, seen_at=1.5), event(1.0, lost=True), event(None, failures=60, first_sent_at=1.0), event(1.0, evicted=True)]
    assert soak_verdict(soak_minutes(), events, [], store_read_errors=4) == [
        "1 acked events never reached their window",
        "1 events sent were never acknowledged (the harness gave up resending them): unchecked",
        "1 acked events were pushed out of their window before any poll saw them: unverified (run with windows longer than any user's events)",
        "4 reads of the stored windows failed"]


def test_the_soak_keeps_every_event_checkable_with_a_fixed_search_cost():
    from infra.soak import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([])
    assert (args.window_length, args.per_interest_n) == (2000, 100)  # as python -m infra faults has them


# -- the real command, short ------------------------------------------------------------------------


def replay_csv(path, users=3000, per_user=10, items=60, seed=0):
    """Events of the synthetic catalog (i0..i59, the items of `two_exports`), each (user, item) once."""
    rng = np.random.default_rng(seed)
    rows = [{"user": f"f{u}", "item": f"i{item}", "timestamp": 1_000 * t + u}
            for u in range(users) for t, item in enumerate(rng.choice(items, size=per_user, replace=False))]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_real_redis_restart_job_kill_and_broker_restart_lose_nothing_in_the_job_or_store(tmp_path, two_exports):
    dataset = replay_csv(tmp_path / "events.csv")
    work = tmp_path / "faults"
    done = subprocess.run(
        [sys.executable, "-m", "infra", "faults", "--export-dir", str(two_exports[0]), "--dataset", str(dataset),
         "--faults", "redis,job,broker", "--rate", "100", "--qps", "4", "--clients", "2",
         "--warmup-s", "6", "--lead-s", "2", "--down-s", "2", "--observe-s", "8", "--window-length", "100", "--drain-timeout-s", "90",
         "--work-dir", str(work)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    reports = sorted(work.glob("faults-*.json"))
    assert reports, f"no report written\n{done.stderr[-3000:]}"
    report = json.loads(reports[-1].read_text())
    rows = {row["service"]: row for row in report["faults"]}
    assert list(rows) == ["", "redis", "streaming-job", "broker"], done.stderr[-3000:]
    for service, row in rows.items():
        assert row["events_acked"] > 0, (service, row)
        # The job and the store lose nothing. noida 0.2.3, the embedded broker, acknowledges records
        # it then drops when it is stopped during its shutdown snapshot (README, fault injection):
        # such records are missing from the broker's own log, and when the job had read them, their
        # offsets are given to the next records, which the job is already past. The harness checks both.
        assert row["events_lost"] == row["events_lost_not_in_broker"] + row["events_lost_at_reused_offset"], (service, row["lost_event_ids"])
        if service != "broker":
            assert row["events_lost"] == 0, (service, row["lost_event_ids"])
        assert row["events_evicted_unverified"] == 0, service  # windows longer than any user's events: all checkable
        assert set(row["recall_errors"]) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, (service, row["recall_errors"])
        if service:
            assert row["recall_recovered_s"] is not None, f"no normal recall answer after the {service} restart"
            assert row["fresh_again_s"] is not None, f"no event acked after the {service} restart reached the store"
    final = report["final"]
    assert final["doubled_behaviours"] == 0 and final["phantom_behaviours"] == 0
    # the records noida dropped never reach the store: the drain waits for them until it gives up
    tolerated = ("broker restart:", "acked events were still missing from the store") if final["events_lost"] else ("broker restart:",)
    assert all(problem.startswith(tolerated) for problem in report["problems"]), report["problems"]
    assert done.returncode == (1 if report["problems"] else 0), done.stdout + done.stderr[-3000:]
    assert "| Redis restart |" in done.stdout and "| Flink job killed |" in done.stdout


def test_a_replay_into_a_stopped_broker_fails_and_resumes_from_its_first_unacknowledged_event(tmp_path):
    """The real client against a real broker: what Kafka did not acknowledge is reported (not counted
    as sent), and resending from the reported position leaves every event in the topic."""
    from kafka import KafkaConsumer

    from infra.broker import EmbeddedBroker, ensure_topics
    from infra.config import KafkaConfig
    from streaming.events import BehaviourEvent, parse_event
    from streaming.producer import EventProducer, ReplayError, replay

    def events(start: int, stop: int):
        return (BehaviourEvent(f"u{i % 7}", f"item{i}", "click", 978_300_760_000 + i, event_id=f"replay-{i}") for i in range(start, stop))

    broker = EmbeddedBroker(tmp_path / "broker").start()
    kafka = KafkaConfig(bootstrap_servers=broker.bootstrap_servers)
    try:
        ensure_topics(kafka, partitions=2, retention_ms=3_600_000)
        # a delivery timeout of seconds, not the default 2 minutes, only to keep the test short
        with EventProducer(kafka, delivery_timeout_ms=3000, request_timeout_ms=1000) as producer:
            assert replay(events(0, 50), producer) == 50
            broker.stop()
            with pytest.raises(ReplayError) as caught:
                replay(events(50, 100), producer)
        assert caught.value.first_failed == 0 and caught.value.failed == caught.value.sent == 50
        broker.start()
        next_start = 50 + caught.value.first_failed
        with EventProducer(kafka) as producer:
            assert replay(events(next_start, 100), producer) == 100 - next_start
        consumer = KafkaConsumer(kafka.events_topic, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest",
                                 consumer_timeout_ms=3000)
        ids = {parse_event(record.value).event_id for record in consumer}
        consumer.close()
        assert ids == {f"replay-{i}" for i in range(100)}
    finally:
        broker.stop()


def test_the_refresh_benchs_latency_counts_a_failed_call_as_the_deadline():
    from model_export.refresh_bench import window_latency

    answered = [RecallSample(float(i), i + 0.060, "OK") for i in range(90)]
    timed_out = [RecallSample(float(i), i + 0.2, "DEADLINE_EXCEEDED") for i in range(10)]
    w = window_latency(answered + timed_out, deadline_s=1.0)
    assert w["requests"] == 100 and w["failed"] == 10 and w["p50_ms"] == 60.0 and w["p99_ms"] == 1000.0
    assert window_latency(timed_out, 1.0)["p99_ms"] == 1000.0  # every call failed: the deadline, not "no figure"
    assert window_latency([], 1.0) == {"requests": 0, "failed": 0, "p50_ms": None, "p99_ms": None}
