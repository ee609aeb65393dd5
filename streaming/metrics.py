"""The streaming job's Prometheus metrics (prometheus_client, served by the job on [streaming].metrics_port).

Defined once per interpreter: in thread mode the Python interpreter lives inside the Flink
TaskManager JVM and outlives a task restart, so the job imports this module rather than
registering metrics in its functions.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter as Tally

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from streaming.events import DEAD_LETTER_REASONS
from streaming.window import Applied

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
FRESHNESS_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)

EVENTS_IN = Counter("mindstream_stream_events_in_total", "Kafka records read by the job")
EVENTS_APPLIED = Counter("mindstream_stream_events_applied_total", "Valid events by what they did to the user's window", ["outcome"])
DEAD_LETTERS = Counter("mindstream_stream_dead_letters_total", "Records sent to the dead-letter topic, by reason", ["reason"])
INTERNAL_ERRORS = Counter("mindstream_stream_internal_errors_total", "Events and restored timers the job failed to handle (a bug, an "
                          "unreadable window state), by stage; such events are dead-lettered as internal", ["stage"])
BATCH_USERS = Histogram("mindstream_stream_batch_users", "Users per user-tower micro-batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
TOWER_SECONDS = Histogram("mindstream_stream_tower_seconds", "ONNX user-tower latency per micro-batch", buckets=LATENCY_BUCKETS)
STORE_WRITE_SECONDS = Histogram("mindstream_stream_store_write_seconds", "Feature-store write latency per micro-batch", buckets=LATENCY_BUCKETS)
FRESHNESS_SECONDS = Histogram("mindstream_stream_freshness_seconds", "Event produce time (Kafka timestamp) to feature-store write", buckets=FRESHNESS_BUCKETS)
UNKNOWN_WINDOWS = Counter("mindstream_stream_unknown_windows_total", "Updates skipped: no item in the window is known to the model yet")
STORE_ERRORS = Counter("mindstream_stream_store_errors_total", "Failed feature-store writes and window reads (retried until they succeed)")
WINDOW_SEEDS = Counter("mindstream_stream_window_seeds_total", "Users without job state, by what their stored record gave the window", ["result"])
SEEDED, NO_RECORD, UNREADABLE = "seeded", "none", "unreadable"  # WINDOW_SEEDS' results
MODEL_RELOADS = Counter("mindstream_stream_model_reloads_total", "User-tower hot reloads, by result", ["result"])
MODEL_INFO = Gauge("mindstream_stream_model_info", "A user tower in use by some task instance (value 1)", ["model_version"])
LAST_WRITE = Gauge("mindstream_stream_last_write_timestamp_seconds", "Wall-clock time of the newest feature-store write")
# Every known label value exported from the start at 0: a series born at 1 has no increase for
# Prometheus, so a one-off failed reload or the first dead letter of a kind would alert on nothing.
for _reason in DEAD_LETTER_REASONS:
    DEAD_LETTERS.labels(_reason)
for _stage in ("event", "timer"):
    INTERNAL_ERRORS.labels(_stage)
for _outcome in Applied:
    EVENTS_APPLIED.labels(_outcome.value)
for _result in (SEEDED, NO_RECORD, UNREADABLE):
    WINDOW_SEEDS.labels(_result)
for _result in ("ok", "failed"):
    MODEL_RELOADS.labels(_result)

_served_on: tuple[str, int] | None = None
# model version -> task instances of this interpreter using its tower: with parallelism > 1 each
# instance reloads at its own poll, and a version leaves MODEL_INFO only when the last one drops it
_towers_in_use: Tally[str] = Tally()
_towers_lock = threading.Lock()


def tower_swapped(loaded: str | None, dropped: str | None) -> None:
    """A task instance's tower changed: `loaded` (None: the instance closed) replaced `dropped` (None: its first)."""
    with _towers_lock:
        if loaded is not None:
            _towers_in_use[loaded] += 1
            MODEL_INFO.labels(loaded).set(1)
        if dropped is not None:
            _towers_in_use[dropped] -= 1
            if _towers_in_use[dropped] <= 0:
                del _towers_in_use[dropped]
                MODEL_INFO.remove(dropped)


def serve(host: str, port: int) -> None:
    """Starts the /metrics endpoint once per interpreter; a busy port is logged, not fatal."""
    global _served_on
    if _served_on is not None or port <= 0:
        return
    try:
        start_http_server(port, addr=host)
        _served_on = (host, port)
    except OSError as exc:
        log.warning("streaming metrics not served on %s:%d (%s)", host, port, exc)
