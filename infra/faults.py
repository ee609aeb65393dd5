"""`python -m infra faults`: faults injected one after the other into a stack of its own, real
processes stopped and started again, while events and recall calls flow (infra/harness.py).

    broker   SIGINT to the broker (noida saves its store), then started again on its port and data
    job      SIGKILL to the streaming job's process group (client + JVM), then restored from its
             latest checkpoint (`streaming run --restore latest`)
    redis    SIGTERM (Redis writes its append-only file), then started again on its data
    milvus   SIGINT to the Milvus Lite server, then started again on its data
    recall   SIGTERM to the recall service, then started again; its clients keep calling

A restart is the supervisor's (infra.stack.Stack.up starts what is not running, on its port, the
job from its newest checkpoint). Each fault waits until the store has caught up with the stream
(--caught-up-s), gets --down-s of outage, then --observe-s. After the last, the stream stops and
the harness waits until every acked event is in the store (or --drain-timeout-s). Per fault (infra/fault_report.py: what each figure means):
acked events lost, how long until interests were fresh again, recall errors by status code,
degraded answers and time to recover. The table goes to stdout, progress to stderr, the table
and the raw numbers to <work-dir>/faults-<time>.{md,json}. Exit status 1 when an acked event was
lost or pushed out of its window before it was seen (unverified), an event was never acknowledged
or a row has none acknowledged, a row has no recall call, a recall call failed with a code other
than UNAVAILABLE / DEADLINE_EXCEEDED (or CANCELLED while the recall service itself stops: calls
gRPC received but never ran) or never succeeded again after a fault, a read of the store failed
outside the Redis fault, the drain gave up, the event stream failed or did not stop, or a stored
window holds a behaviour twice or one never sent (infra/fault_report.fault_verdict,
infra/harness.final_problems).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

from infra.cli import at_least
from infra.fault_report import FaultRun, fault_table, fault_verdict, fault_windows, per_second, summarize_fault
from infra.harness import HarnessError, LoadRun, Ticker, final_problems, system_under_load, write_report
from infra.load_options import add_load_arguments
from model_export.registry import ModelRegistry


@dataclass(frozen=True)
class Fault:
    key: str
    title: str
    service: str  # infra.stack.SERVICES
    kill: bool  # SIGKILL (a crash) instead of the service's own clean stop
    how: str


FAULTS = {f.key: f for f in (
    Fault("broker", "broker restart", "broker", False, "SIGINT (noida saves its store), started again on the same port and data"),
    Fault("job", "Flink job killed", "streaming-job", True, "SIGKILL to the job's process group, restored from its latest checkpoint"),
    Fault("redis", "Redis restart", "redis", False, "SIGTERM (append-only file written), started again on the same data"),
    Fault("milvus", "Milvus restart", "milvus", False, "SIGINT to milvus-lite server, started again on the same data"),
    Fault("recall", "recall service restart", "recall", False, "SIGTERM, started again; clients keep calling"),
)}


def add_arguments(p) -> None:
    # Windows longer than any MovieLens-1M user's events in a run of this length (the most active
    # one has 1,344 in the first 500k events): every acked event stays checkable in the store.
    # The recall calls ask for the candidates a 50-behaviour window would (n 50 + 50).
    # 5 calls/s: the stack answered 9.2 normal (not degraded) calls/s closed loop with 4 clients
    # while the stream ran at 500 events/s (python -m infra soak's capacity probe, 2 busy cores);
    # above that, Milvus Lite searches pass the service's timeout and the answers degrade.
    add_load_arguments(p, window_length=2000, per_interest_n=100, qps=5.0)
    p.add_argument("--faults", default=",".join(FAULTS), help=f"the faults to inject, comma-separated, in this order: any of {', '.join(FAULTS)}")
    p.add_argument("--warmup-s", type=at_least(0, float), default=30.0, help="load before the first fault (the baseline row)")
    p.add_argument("--down-s", type=at_least(0, float), default=5.0, help="how long each service stays down before it is started again")
    p.add_argument("--observe-s", type=at_least(0, float), default=35.0, help="load after each restart before the next fault")
    p.add_argument("--lead-s", type=at_least(0, float), default=5.0, help="a fault's row starts this long before its injection (events acked just before it)")
    p.add_argument("--caught-up-s", type=at_least(0, float), default=5.0,
                   help="before each fault, wait until no acked event has waited longer than this for the store (each fault starts from a steady state)")
    p.add_argument("--settle-timeout-s", type=at_least(0, float), default=120.0, help="... but at most this long")


def parse_faults(text: str) -> list[Fault]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in FAULTS]
    if unknown or not keys:
        raise HarnessError(f"--faults {text!r}: use a comma-separated list of {', '.join(FAULTS)}")
    return [FAULTS[k] for k in keys]


def inject(run: LoadRun, fault: Fault, down_s: float) -> tuple[float, float, float]:
    """Stops (or kills) the service, waits, starts it again; (injected, stopped, restarted) times."""
    run.say(f"==> {fault.title}: {fault.how}")
    injected = time.monotonic()
    run.sut.stop_service(fault.service, kill=fault.kill)
    stopped = time.monotonic()
    time.sleep(down_s)
    run.sut.start_stopped()
    restarted = time.monotonic()
    run.say(f"  {fault.service} answers again {restarted - injected:.1f} s after the fault ({restarted - stopped:.1f} s after the stop)")
    return injected, stopped, restarted


def wait_caught_up(run: LoadRun, lag_s: float, timeout_s: float) -> None:
    """Waits until the store has caught up with the stream (the previous fault's backlog is gone)."""
    began = time.monotonic()
    while (oldest := run.ledger.oldest_unseen_ack()) is not None and time.monotonic() - oldest > lag_s:
        if time.monotonic() - began > timeout_s:
            run.say(f"  the store is still {time.monotonic() - oldest:.0f} s behind the stream after {timeout_s:.0f} s; going on")
            return
        time.sleep(0.5)
    if time.monotonic() - began > 1:
        run.say(f"  the store caught up with the stream after {time.monotonic() - began:.0f} s more")


def run(args) -> int:
    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    faults = parse_faults(args.faults)
    load_before = os.getloadavg()[0]
    with system_under_load(args, "faults", say) as running, Ticker(10.0, lambda since, now: say(running.progress_line(since, now))):
        say(f"warm-up: {args.warmup_s:.0f} s of load before the first fault")
        time.sleep(args.warmup_s)
        injected = []
        for fault in faults:
            wait_caught_up(running, args.caught_up_s, args.settle_timeout_s)
            injected.append((fault, *inject(running, fault, args.down_s)))
            time.sleep(args.observe_s)
        faults_end = time.monotonic()
        final = running.finish(args.drain_timeout_s)
        ended_at = time.monotonic()
        config = running.sut.config
        model_version = ModelRegistry(config.paths.models_dir).current_version()
    started_at, events, samples = running.started_at, dict(running.ledger.events), list(running.load.samples)
    read_errors = list(running.poller.read_error_times)

    windows = fault_windows(started_at, ended_at, [at for _, at, _, _ in injected], args.lead_s)
    runs = [FaultRun("no fault (warm-up)", "", "", *[windows[0][0]] * 4, windows[0][1])]
    runs += [FaultRun(fault.title, fault.service, fault.how, at, stopped, restarted, *window)
             for (fault, at, stopped, restarted), window in zip(injected, windows[1:])]
    summaries = [summarize_fault(r, events, samples, read_errors) for r in runs]
    table = fault_table(summaries)
    problems = fault_verdict(summaries) + final_problems(final)

    print(table)
    print(f"\nevents sent {len(events):,}, acked {sum(e.acked_at is not None for e in events.values()):,}, lost {final['events_lost']:,} "
          f"({final['events_lost_not_in_broker']:,} of them not in the broker's log, {final['events_lost_at_reused_offset']:,} at an offset "
          f"the broker reused); recall calls {len(samples):,}; "
          f"doubled behaviours {final['doubled_behaviours']}, phantom behaviours {final['phantom_behaviours']}; "
          f"load average {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end ({os.cpu_count()} CPUs)")
    print("\n".join(["verdict: every check holds"] if not problems else ["verdict: PROBLEMS", *(f"  - {p}" for p in problems)]))
    report = {
        "conditions": {"model_version": model_version, "cpus": os.cpu_count(), "load_average_start": load_before, "load_average_end": os.getloadavg()[0],
                       "window_length": config.streaming.window_length, "checkpoint_interval_ms": config.streaming.checkpoint_interval_ms,
                       "recall_outage_cooldown_ms": config.recall.outage_cooldown_ms},
        "timeline_s": [{"fault": f.key, "injected": at - started_at, "stopped": stopped - started_at, "restarted": restarted - started_at}
                       for f, at, stopped, restarted in injected] + [{"faults_end": faults_end - started_at, "drained": ended_at - started_at}],
        "faults": [dataclasses.asdict(s) for s in summaries],
        "final": final,
        "problems": problems,
        "per_second": per_second(list(events.values()), samples, started_at, ended_at),
    }
    write_report(args, "faults", report, table, say)
    return 1 if problems else 0
