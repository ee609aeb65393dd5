"""`python -m infra soak`: the whole stack under steady load for --minutes, on the fault harness
(infra/harness.py) without faults: events replayed at --rate, Recall called open loop at --qps.

Before the soak, with the event stream running, a closed-loop capacity probe (--capacity-clients
clients calling back to back for --capacity-s, recall_service.bench.closed_loop) says how many
calls per second this stack answers, so the open-loop rate can be set from a measurement. Then
per minute: requests, error rate, degraded answers, latency p50 / p99 (from each call's
scheduled start), events/s acked, ack->store p99, resident memory of every process (its whole
tree: the job is a Python client plus a JVM). At the end: RSS growth per process from the end of
the warm-up minutes to the end, with a bound check, and every acked event checked in the store as
by `python -m infra faults` (with windows as long, so that every one is checkable). Tables to
stdout and to <work-dir>/soak-<time>.{md,json}. Exit status 1 when the verdict finds a problem
(infra/fault_report.soak_verdict, infra/harness.final_problems): an event lost, unacknowledged or
unverified, any recall error, a minute without events or calls, a process gone at the end or
grown past its bound (but for the broker and the load generator, which grow by design:
fault_report.GROWTH_EXEMPT), a failed store read, a damaged window, a drain that gave up.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from infra.cli import at_least
from infra.fault_report import memory_growth, memory_table, minute_header, minute_line, minute_row, soak_verdict
from infra.harness import HarnessError, Ticker, final_problems, system_under_load, write_report
from infra.load_options import add_load_arguments


def add_arguments(p) -> None:
    # The target load needs the Milvus server: beside a 500 events/s stream on 2 cores the stack
    # answered 248.6 normal calls/s closed loop with it, 9.2 with Milvus Lite (--milvus lite
    # --qps 8). The capacity probe prints this stack's figure before every soak.
    # Long windows and a fixed per-interest search, as `python -m infra faults` has them (see its
    # add_arguments): with the configuration's 50 behaviours, an estimated 18% of a 10-minute soak's
    # ML-1M events are pushed out of their window by newer ones before a poll sees them: unverified.
    add_load_arguments(p, window_length=2000, per_interest_n=100, qps=100.0, clients=8, milvus="server")
    p.add_argument("--minutes", type=at_least(1), default=10, help="soak length, after the stream warm-up and the capacity probe")
    p.add_argument("--warmup-minutes", type=at_least(0), default=1, help="soak minutes before the RSS baseline of the memory-growth check")
    p.add_argument("--stream-warmup-s", type=at_least(0, float), default=20.0, help="events only, before the capacity probe (users get stored interests)")
    p.add_argument("--capacity-s", type=at_least(0, float), default=15.0, help="closed-loop capacity probe length (0: skip)")
    p.add_argument("--capacity-clients", type=at_least(1), default=4,
                   help="closed-loop clients of the capacity probe (with Milvus Lite, more only add fast degraded answers once it is saturated)")
    p.add_argument("--rss-every-s", type=at_least(0.5, float), default=10.0, help="resident-memory sampling interval")
    p.add_argument("--rss-bound-pct", type=at_least(0, float), default=10.0, help="memory check: growth after warm-up within this %% of the RSS ...")
    p.add_argument("--rss-bound-mb", type=at_least(0, float), default=50.0, help="... or within this many MB, whichever is larger")


class DegradedAnswer(RuntimeError):
    """A fallback for a backend outage (Milvus search over its timeout): not capacity."""


def capacity_probe(running, seconds: float, clients: int, deadline_s: float) -> dict:
    """Closed loop: `clients` threads calling Recall back to back, as recall_service bench does;
    only normal answers count (a Milvus search over the service's timeout answers at once with
    popular items, which would make an overloaded stack look fast)."""
    from infra.fault_report import OUTAGE_REASONS
    from infra.harness import reason_name
    from recall_service.bench import closed_loop
    from recall_service.channel import recall_channel
    from recall_service.stubs import recall_pb2, recall_pb2_grpc

    with recall_channel(running.sut.config.recall) as channel:
        stub = recall_pb2_grpc.RecallServiceStub(channel)

        def call(rng) -> None:
            answer = stub.Recall(running.load.request(recall_pb2, rng), timeout=deadline_s)
            if reason_name(recall_pb2.FallbackReason.Name(answer.fallback_reason)) in OUTAGE_REASONS:
                raise DegradedAnswer

        phase = closed_loop(call, clients, seconds, warmup_s=2.0)
    return dataclasses.asdict(phase)


def run(args) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.minutes < 1 or not 0 <= args.warmup_minutes < args.minutes:
        raise HarnessError(f"--minutes {args.minutes} / --warmup-minutes {args.warmup_minutes}: need minutes >= 1 and 0 <= warm-up minutes < minutes")
    rss_samples: list[tuple[float, dict[str, int]]] = []
    rows, capacity = [], None
    with system_under_load(args, "soak", say, start_load=False) as running:
        say(f"stream warm-up: {args.stream_warmup_s:.0f} s of events before the recall load")
        time.sleep(args.stream_warmup_s)
        if args.capacity_s > 0:
            capacity = capacity_probe(running, args.capacity_s, args.capacity_clients, args.deadline_ms / 1000)
            say(f"closed-loop capacity with the stream running: {capacity['qps']:.1f} normal answers/s at {args.capacity_clients} clients "
                f"(p50 {capacity['p50_ms']:.0f} ms, p99 {capacity['p99_ms']:.0f} ms; {capacity['errors']} errors or degraded answers); "
                f"the soak calls at {args.qps:.0f}/s open loop"
                + (" - ABOVE that capacity: expect DEADLINE_EXCEEDED" if args.qps > capacity["qps"] else f" ({args.qps / capacity['qps']:.0%} of it)"))
        rss_samples.append((time.monotonic(), running.sut.rss_bytes()))
        running.load.start()
        soak_start = time.monotonic()
        processes = sorted(rss_samples[0][1])
        say(minute_header(processes))
        with Ticker(args.rss_every_s, lambda since, now: rss_samples.append((now, running.sut.rss_bytes()))), \
                Ticker(10.0, lambda since, now: say(running.progress_line(since, now))):
            for minute in range(1, args.minutes + 1):
                time.sleep(max(0.0, soak_start + 60 * minute - time.monotonic()))
                rows.append(_minute(running, minute, soak_start, rss_samples[-1][1]))
                say(minute_line(rows[-1], processes))
        end_rss = running.sut.rss_bytes()
        final = running.finish(args.drain_timeout_s)
        # again, now that every event of the last minutes has had time to reach the store
        rows = [_minute(running, r.minute, soak_start, _rss_at(rss_samples, soak_start + 60 * r.minute)) for r in rows]
        events = running.ledger.snapshot()
    baseline_rss = _rss_at(rss_samples, soak_start + 60 * args.warmup_minutes)
    growth = memory_growth(baseline_rss, end_rss, args.rss_bound_pct, args.rss_bound_mb)
    lost, evicted = sum(1 for e in events if e.lost), sum(1 for e in events if e.evicted)
    minutes_table = "\n".join([minute_header(processes), "|" + "---|" * (len(processes) + 8), *(minute_line(r, processes) for r in rows)])
    memory = memory_table(growth)
    total = sum(r.requests for r in rows)
    errors = sum(sum(r.errors.values()) for r in rows)
    summary = (f"{args.minutes} minutes at {args.qps:.0f} calls/s open loop and {args.rate:.0f} events/s: {total:,} calls, {errors:,} errors "
               f"({errors / max(total, 1):.2%}); {sum(e.acked_at is not None for e in events):,} events acked, {lost} lost, "
               f"{evicted} pushed out of their window before seen (unverified); "
               f"doubled behaviours {final['doubled_behaviours']}, phantom {final['phantom_behaviours']}; "
               f"load average at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    print(minutes_table)
    print(f"\nmemory growth from the end of minute {args.warmup_minutes} to the end of minute {args.minutes}:")
    print(memory)
    problems = soak_verdict(rows, events, growth, final["store_read_errors"]) + final_problems(final)
    print("\n" + summary)
    print("\n".join(["verdict: every check holds"] if not problems else ["verdict: PROBLEMS", *(f"  - {p}" for p in problems)]))
    report = {
        "capacity_probe": capacity,
        "minutes": [dataclasses.asdict(r) for r in rows],
        "memory_growth": [dataclasses.asdict(g) for g in growth],
        "rss_mb_series": [{"t": t - soak_start, **{k: v / 2**20 for k, v in rss.items()}} for t, rss in rss_samples],
        "events_lost": lost,
        "events_evicted_unverified": evicted,
        "final": final,
        "problems": problems,
        "summary": summary,
    }
    write_report(args, "soak", report, f"{minutes_table}\n\n{memory}\n\n{summary}", say)
    return 1 if problems else 0


def _minute(running, minute: int, soak_start: float, rss: dict[str, int]):
    begin, end = soak_start + 60 * (minute - 1), soak_start + 60 * minute
    samples = [s for s in running.load.samples if begin <= s.sent_at < end]
    acked = [e for e in running.ledger.snapshot() if e.acked_at is not None and begin <= e.acked_at < end]
    return minute_row(minute, samples, acked, 60.0, rss)


def _rss_at(samples: list[tuple[float, dict[str, int]]], at: float) -> dict[str, int]:
    """The last RSS sample taken at or before `at` (the first one if none)."""
    before = [rss for t, rss in samples if t <= at]
    return before[-1] if before else samples[0][1]
