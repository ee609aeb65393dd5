"""`python -m streaming bench`: the streaming pipeline's targets, measured on a stack it starts itself.

    1. throughput  ML-1M events queued in Kafka, then the job started: events/s from the first
                   event read to the last one's interests written, and the job's peak resident
                   memory (Python client + JVM with the embedded Python)
    2. baseline    the bare broker: kafka-python produce -> consume latency at the freshness rate
    3. freshness   the job caught up, ML-1M events produced at that rate: produce (Kafka
                   timestamp) -> feature-store write, from the job's freshness histogram
    4. parity      stored interests vs the offline ONNX user tower on the same windows, and
                   stored windows vs the windows the replayed events must give

Targets (issue 3): >= 5,000 events/s at <= 1.5 GB; freshness p99 <= 2 x broker p99 + 100 ms;
parity <= 1e-4.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import redis
from tqdm import tqdm

from infra.broker import EmbeddedBroker, ensure_configured_topics
from infra.config import Config, load_config
from infra.job_process import StreamingJobProcess
from infra.redis_server import EmbeddedRedis, free_port
from model_export.artifact import UserTower
from model_export.registry import ModelRegistry
from streaming.feature_store import RedisFeatureStore
from streaming.kafka_clients import python_client_options
from streaming.producer import EventProducer, ReplayEvents, replay
from streaming.window import UserWindow



def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """Prometheus' estimate: linear interpolation inside the bucket holding the q-th observation."""
    total = buckets[-1][1]
    if total == 0:
        return float("nan")
    rank, lower, below = q * total, 0.0, 0.0
    for upper, cumulative in buckets:
        if cumulative >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(cumulative - below, 1e-12)
        lower, below = upper, cumulative
    return lower


def freshness_buckets(metrics_text: str) -> list[tuple[float, float]]:
    pattern = re.compile(r'^mindstream_stream_freshness_seconds_bucket\{le="([^"]+)"\} (\S+)$', re.M)
    return [(float(le), float(count)) for le, count in pattern.findall(metrics_text)]


def broker_baseline(kafka, topic: str, rate: float, seconds: float) -> dict:
    """Produce -> consume latency of the bare broker with the same client and rate as the job's input."""
    from kafka import KafkaConsumer, TopicPartition

    options = python_client_options(kafka)
    consumer = KafkaConsumer(**options, enable_auto_commit=False)
    partition = TopicPartition(topic, 0)
    consumer.assign([partition])
    consumer.seek_to_end(partition)
    consumer.position(partition)
    n = int(rate * seconds)
    producer = EventProducer(kafka)

    def produce() -> None:
        started = time.perf_counter()
        for i in range(n):
            wait = started + i / rate - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            producer.producer.send(topic, key=b"baseline", value=b"x" * 200, partition=0)
        producer.flush()

    sender = threading.Thread(target=produce)
    sender.start()
    latencies: list[float] = []
    deadline = time.monotonic() + seconds + 30
    while len(latencies) < n and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=100).values():
            now_ms = time.time() * 1000
            latencies += [now_ms - r.timestamp for r in records]
    sender.join()
    producer.close()
    consumer.close()
    lat = np.asarray(latencies)
    return {"messages": len(lat), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99))}


@dataclass
class Drain:
    """When the job has written the interests of the last of `events` queued events, from polls of
    its metrics. The last event is read after the last poll that saw fewer read (`below_s`), so its
    interests are in a write later than that poll; the job is done once such a write is followed by
    `quiet_s` without another (the last micro-batch is out). The answer is that write's time, not
    the poll's. (Waiting for a write later than the poll that saw all events read could wait
    forever: the last write usually comes before that poll.)"""

    events: int
    quiet_s: float
    below_s: float  # wall-clock time of the last poll that saw fewer events read; first, the job's start
    read: float = 0.0
    give_up_s: float = 30.0  # all read and no write since for this long: the last events wrote nothing (duplicates, say)

    def poll(self, now_s: float, events_in: float, last_write_s: float) -> float | None:
        """One poll: `now_s` taken before the job's metrics were read. Returns the drain time once known."""
        if events_in < self.read:  # a failed scrape reads 0; the counter itself never goes back
            return None
        self.read = events_in
        if events_in < self.events:
            self.below_s = now_s
            return None
        if last_write_s > self.below_s:
            return last_write_s if now_s - last_write_s >= self.quiet_s else None
        return last_write_s if now_s - self.below_s >= self.give_up_s else None


@dataclass
class BenchStack:
    root: Path
    config: Config  # pointing at this stack's broker, Redis and registry
    registry: ModelRegistry
    model_version: str
    job: StreamingJobProcess  # not started
    redis_uri: str


def resolve_export(config: Config, export_dir: str | None) -> Path:
    if export_dir:
        return Path(export_dir)
    registry = ModelRegistry(config.paths.models_dir)
    current = registry.current_version()
    return registry.path(current) if current else config.paths.main_export_dir


@contextmanager
def bench_stack(name: str, export_dir: Path, broker_kind: str = "noida") -> Iterator[BenchStack]:
    """A broker, a Redis, a registry holding export_dir, and the job (not started), all in var/bench/."""
    config = load_config()
    root = config.paths.var_dir / "bench" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}"
    registry = ModelRegistry(root / "models")
    manifest = registry.install(export_dir)
    registry.set_current(manifest.model_version)
    metrics_port = free_port()
    print(f"stack in {root}: {broker_kind} broker, redis, model {manifest.model_version}")
    with EmbeddedBroker(root / "broker", kind=broker_kind) as broker, EmbeddedRedis(root / "redis") as redis_server:
        env = {
            **os.environ,
            "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MINDSTREAM_REDIS__URI": redis_server.uri,
            "MINDSTREAM_PATHS__MODELS_DIR": str(registry.root),
            "MINDSTREAM_STREAMING__CHECKPOINT_DIR": str(root / "checkpoints"),
            "MINDSTREAM_STREAMING__METRICS_PORT": str(metrics_port),
            "MINDSTREAM_STREAMING__CONSUMER_GROUP": f"mindstream-{name}",
        }
        config = load_config(environ=env)
        ensure_configured_topics(config)
        job = StreamingJobProcess(env, root / "job.log", f"http://127.0.0.1:{metrics_port}/metrics")
        try:
            yield BenchStack(root, config, registry, manifest.model_version, job, redis_server.uri)
        finally:
            job.stop()


def run_bench(args) -> int:
    config = load_config()
    export_dir = resolve_export(config, args.export_dir)
    if not (export_dir / "manifest.json").is_file():
        print(f"error: no export at {export_dir}; run infra/run.sh (or model_export train + export) first, or pass --export-dir")
        return 2
    events = ReplayEvents.from_dataset("ml-1m", config.paths.data_dir, config.paths.shared_data_dir)
    n_throughput = min(args.events, len(events))
    n_fresh = int(args.freshness_rate * args.freshness_seconds)
    with bench_stack("streaming", export_dir, args.broker) as stack:
        config, job, registry = stack.config, stack.job, stack.registry
        report: dict = {"conditions": {"cores": os.cpu_count(), "broker": args.broker, "model_version": stack.model_version,
                                       "batch_max_users": config.streaming.batch_max_users, "batch_max_delay_ms": config.streaming.batch_max_delay_ms}}
        baseline_topic = "mindstream.bench.baseline"
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(**python_client_options(config.kafka))
        admin.create_topics([NewTopic(baseline_topic, 1, 1)])
        admin.close()

        # 1. throughput: a backlog of ML-1M events, then the job
        with EventProducer.for_config(config, linger_ms=20) as producer, tqdm(total=n_throughput, unit="ev", desc="queueing ML-1M events") as bar:
            replay(events.events(0, n_throughput), producer, on_progress=lambda sent: bar.update(sent - bar.n))
        print("starting the PyFlink job (10-25 s) ...")
        drain = Drain(n_throughput, quiet_s=1.0 + config.streaming.batch_max_delay_ms / 1000, below_s=time.time())
        job.start()
        try:
            first_seen = done_at = None
            last_idle = time.time()  # the last poll that saw no event read: reading began after it
            peak_rss = 0
            samples = []
            with tqdm(total=n_throughput, unit="ev", desc="job draining the backlog") as bar:
                while done_at is None:
                    now = time.time()  # wall clock, as the job's last-write gauge; before the metrics are read
                    seen = job.metric("mindstream_stream_events_in_total")
                    peak_rss = max(peak_rss, job.rss_bytes())
                    if seen == 0:
                        last_idle = now
                    elif first_seen is None:  # counted from the poll before: a poll interval too long rather than too short
                        first_seen = last_idle
                    samples.append((now, seen))
                    bar.update(int(seen) - bar.n)
                    done_at = drain.poll(now, seen, job.metric("mindstream_stream_last_write_timestamp_seconds"))
                    time.sleep(0.25)
            times, counts = np.array([s[0] for s in samples]), np.array([s[1] for s in samples])
            mid = (counts >= 0.1 * n_throughput) & (counts <= 0.9 * n_throughput)
            steady = (counts[mid][-1] - counts[mid][0]) / (times[mid][-1] - times[mid][0]) if mid.sum() >= 2 else float("nan")
            report["throughput"] = {
                "events": n_throughput,
                "seconds": done_at - first_seen,
                "events_per_s": n_throughput / (done_at - first_seen),
                "steady_events_per_s_10_to_90pct": float(steady),
                "peak_rss_mb": peak_rss / 2**20,
            }
            print(json.dumps(report["throughput"], indent=2))

            # 2. the bare broker, same client and rate
            print(f"bare broker produce->consume at {args.freshness_rate:.0f} msg/s for {args.freshness_seconds:.0f} s ...")
            report["broker_baseline"] = broker_baseline(config.kafka, baseline_topic, args.freshness_rate, args.freshness_seconds)
            print(json.dumps(report["broker_baseline"], indent=2))

            # 3. freshness at the same rate through the job
            before = freshness_buckets(job.metrics() or "")
            print(f"job freshness at {args.freshness_rate:.0f} events/s for {args.freshness_seconds:.0f} s ...")
            with EventProducer.for_config(config) as producer:
                replay(events.events(n_throughput, n_throughput + n_fresh), producer, rate=args.freshness_rate)
            wait_for_count(job, n_throughput + n_fresh)
            time.sleep(0.5)  # the last micro-batch
            after = freshness_buckets(job.metrics() or "")
            delta = [(le, a - b) for (le, a), (_, b) in zip(after, before)]
            p99 = histogram_quantile(0.99, delta) * 1000
            target = 2 * report["broker_baseline"]["p99_ms"] + 100
            report["freshness"] = {
                "events": n_fresh,
                "p50_ms": histogram_quantile(0.5, delta) * 1000,
                "p99_ms": p99,
                "target_p99_ms": target,
                "met": bool(p99 <= target),
                "note": "from the job's freshness histogram (buckets 5-50 ms wide up to 300 ms, wider above: streaming/metrics.py "
                        "FRESHNESS_BUCKETS), interpolated as histogram_quantile does",
            }
            print(json.dumps(report["freshness"], indent=2))
            report["job_metrics"] = {
                name: job.metric(name)
                for name in ("mindstream_stream_batch_users_sum", "mindstream_stream_batch_users_count", "mindstream_stream_tower_seconds_sum", "mindstream_stream_store_write_seconds_sum")
            }
        finally:
            job.stop()

        # 4. parity with the offline user tower, and windows with the replayed events
        sent = list(events.events(0, n_throughput + n_fresh))
        windows: dict[str, UserWindow] = {}
        for e in sent:
            windows.setdefault(e.user_id, UserWindow()).apply(e, config.streaming.window_length, config.streaming.allowed_lateness_ms)
        store = RedisFeatureStore(redis.Redis.from_url(stack.redis_uri))
        users = sorted(windows)
        records = store.get_many(users)
        wrong_windows = sum(1 for u, r in zip(users, records) if r is None or r.window != windows[u].item_ids())
        rng = np.random.default_rng(0)
        sample = [records[i] for i in rng.choice(len(users), size=min(500, len(users)), replace=False) if records[i] is not None]
        tower = UserTower.load(registry.path(stack.model_version), prefer_gpu=False)
        offline = tower.interests([r.window for r in sample], [events.profiles.get(r.user_id) for r in sample])
        diff = max(float(np.abs(r.interests - o).max()) for r, o in zip(sample, offline))
        report["parity"] = {"users": len(users), "windows_differing": wrong_windows, "sampled_users": len(sample), "max_abs_diff": diff}
        print(json.dumps(report["parity"], indent=2))

    t = report["throughput"]
    print("\nsummary")
    print(f"  throughput  {t['events_per_s']:,.0f} events/s (steady {t['steady_events_per_s_10_to_90pct']:,.0f}); target >= 5,000 -> {'met' if t['events_per_s'] >= 5000 else 'MISSED'}")
    print(f"  memory      peak {t['peak_rss_mb']:,.0f} MB (job: Python client + JVM); target <= 1,536 MB -> {'met' if t['peak_rss_mb'] <= 1536 else 'MISSED'}")
    f, b = report["freshness"], report["broker_baseline"]
    print(f"  freshness   p99 {f['p99_ms']:.0f} ms vs bare broker p99 {b['p99_ms']:.1f} ms: target <= {f['target_p99_ms']:.0f} ms -> {'met' if f['met'] else 'MISSED'}")
    p = report["parity"]
    print(f"  parity      max |store - offline ONNX| {p['max_abs_diff']:.2e} over {p['sampled_users']} users; windows differing {p['windows_differing']}/{p['users']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def wait_for_count(job: StreamingJobProcess, n: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while job.metric("mindstream_stream_events_in_total") < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the job read fewer than {n} events within {timeout_s}s; see its log")
        time.sleep(0.2)


POISON_KINDS = ("malformed", "oversized", "unknown_field", "invalid")


def poison_record(kind: str, i: int, max_bytes: int) -> tuple[str, bytes]:
    """(Kafka key, value) of one record the job must dead-letter, of the given kind."""
    user = f"poison-{i % 97}"
    valid = {"schema": 1, "user_id": user, "item_id": "x", "event_type": "click", "event_time_ms": 1}
    if kind == "malformed":
        return user, b'{"schema": 1, "user_id": "' + user.encode() + b'", "item_id": '
    if kind == "oversized":
        return user, json.dumps({**valid, "side": {"blob": "y" * max_bytes}}).encode()
    if kind == "unknown_field":
        return user, json.dumps({**valid, "price": 9.99}).encode()
    return user, json.dumps({**valid, "event_type": "like"}).encode()


def run_poison(args) -> int:
    """A stream with a fraction of poison records: the job stays up, the dead-letter topic holds
    exactly the poison records, and every valid event is reflected in its user's window."""
    from kafka import KafkaConsumer

    config = load_config()
    export_dir = resolve_export(config, args.export_dir)
    events = ReplayEvents.from_dataset("ml-1m", config.paths.data_dir, config.paths.shared_data_dir)
    total = int(args.rate * args.seconds)
    rng = np.random.default_rng(0)
    is_poison = rng.random(total) < args.poison
    with bench_stack("poison", export_dir) as stack:
        config, job = stack.config, stack.job
        print("starting the PyFlink job (10-25 s) ...")
        job.start()
        valid_sent, poison_futures, job_down_polls = [], [], 0
        valid_iter = events.events()
        with EventProducer.for_config(config) as producer, tqdm(total=total, unit="rec", desc=f"{args.rate:.0f} rec/s, {args.poison:.0%} poison") as bar:
            started = time.perf_counter()
            for i in range(total):
                wait = started + i / args.rate - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                if is_poison[i]:
                    key, value = poison_record(POISON_KINDS[i % len(POISON_KINDS)], i, config.streaming.max_event_bytes)
                    poison_futures.append(producer.send_raw(key, value))
                else:
                    event = next(valid_iter)
                    producer.send(event)
                    valid_sent.append(event)
                if i % 2000 == 0:
                    bar.update(i - bar.n)
                    job_down_polls += job.metrics() is None
            producer.flush()
            bar.update(total - bar.n)
        poison_at = {(f.get().partition, f.get().offset) for f in poison_futures}
        wait_for_count(job, total)
        time.sleep(1.0)
        job_alive = job.metrics() is not None

        consumer = KafkaConsumer(config.kafka.dead_letter_topic, **python_client_options(config.kafka), auto_offset_reset="earliest", consumer_timeout_ms=3000)
        letters = [json.loads(m.value) for m in consumer]
        consumer.close()
        lettered_at = [(x["partition"], x["offset"]) for x in letters]
        windows: dict[str, UserWindow] = {}
        for e in valid_sent:
            windows.setdefault(e.user_id, UserWindow()).apply(e, config.streaming.window_length, config.streaming.allowed_lateness_ms)
        users = sorted(windows)
        store = RedisFeatureStore(redis.Redis.from_url(stack.redis_uri))
        records = store.get_many(users)
        wrong = sum(1 for u, r in zip(users, records) if r is None or r.window != windows[u].item_ids())
        report = {
            "records": total,
            "poison_sent": len(poison_at),
            "valid_sent": len(valid_sent),
            "dead_letters": len(letters),
            "dead_letters_not_poison": len(set(lettered_at) - poison_at),
            "poison_missing_from_dead_letters": len(poison_at - set(lettered_at)),
            "dead_letters_repeated": len(lettered_at) - len(set(lettered_at)),
            "users": len(users),
            "windows_differing": wrong,
            "job_up_throughout": job_alive and job_down_polls == 0,
            "dead_letters_by_kind": {k: sum(1 for x in letters if x["kind"] == k) for k in POISON_KINDS},
        }
    print(json.dumps(report, indent=2))
    exact = report["dead_letters_not_poison"] == report["poison_missing_from_dead_letters"] == report["dead_letters_repeated"] == 0
    print(f"\nsummary: job up throughout: {report['job_up_throughout']}; dead-letter topic holds exactly the poison records: {exact}; "
          f"valid events reflected: {wrong == 0} ({report['valid_sent']:,} events, {len(users):,} users)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if exact and wrong == 0 and report["job_up_throughout"] else 1
