"""The system under load, shared by `python -m infra faults` and `python -m infra soak`.

    SystemUnderTest  the whole embedded stack (infra.stack.Stack: broker, Redis, Milvus (Lite or server), the
                     streaming job, the recall service; not the exporter and Prometheus) in a folder
                     of its own on free ports, with a trained export published into it
    EventStream      replays a dataset's events at a steady rate through the application's producer
                     (streaming.producer.EventProducer, acks=all); each acknowledgement is recorded,
                     and a failed send is sent again with the same event id, as an application would
    StorePoller      reads, several times a second, the stored windows of the users whose acked
                     events are not seen yet: when each event reached the store (infra.fault_report)
    RecallLoad       open loop: a few clients (one gRPC channel each) call Recall at a steady total
                     rate with a short deadline, whatever happened to the calls before; each call's
                     latency from its scheduled start, status code and fallback reason
    LoadRun          all of them together; `finish` stops the load and waits for the stream to drain

The accounting (what is lost, fresh again, recovered) is infra/fault_report.py; this module only
produces and observes.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import psutil

from infra.cli import UserError
from infra.config import REPO_ROOT, Config, MilvusConfig, MilvusServerKind, RecallServiceConfig, load_config
from infra.fault_report import EventLedger, RecallSample, percentile, window_anomalies
from infra.process import SigtermAsInterrupt
from infra.stack import Stack, render_toml
from streaming.producer import EventProducer, ReplayEvents, paced

NOT_UNDER_TEST = ("exporter", "prometheus")  # they would only take CPU from the services under test
# A replay at hundreds of events/s runs MovieLens' event time ~40,000x faster than it happened, so a
# send retried a second later is hours of event time behind its user's newer events and the job
# would rightly dead-letter it as late. The harness checks delivery, not the lateness policy
# (tests/test_streaming_job.py does): its stack accepts any lateness.
ANY_LATENESS_MS = 10 * 365 * 86_400_000
# gRPC's default reconnect back-off grows to 120 s: a client would wait long after a restart.
RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]


class HarnessError(UserError, RuntimeError):
    """The harness cannot run; the message says what to do next."""


class SystemUnderTest:
    """The embedded stack in `root/stack`, with its own settings in `root/settings.toml`."""

    def __init__(self, root: Path, export_dir: Path, say: Callable[[str], None], window_length: int | None = None, milvus: MilvusServerKind = MilvusConfig.embedded_server):
        self.root, self.export_dir, self.say = Path(root).resolve(), Path(export_dir), say
        streaming = {"allowed_lateness_ms": ANY_LATENESS_MS, **({"window_length": window_length} if window_length else {})}
        self.settings = {"streaming": streaming, "milvus": {"embedded_server": milvus}}
        self.settings_path = self.root / "settings.toml"
        environ = {**os.environ, "MINDSTREAM_CONFIG": str(self.settings_path)}  # never the shell's stack configuration
        self.stack = Stack(self.root / "stack", environ=environ, out=self._stack_line)
        self.config: Config | None = None

    def _stack_line(self, line: str) -> None:
        if "already running" not in line:  # a restart of one service would list every other one
            self.say(f"  {line.strip()}")

    def start(self) -> "SystemUnderTest":
        if not (self.export_dir / "manifest.json").is_file():
            raise HarnessError(f"no export at {self.export_dir}: run infra/run.sh (or model_export train + export) first, or pass --export-dir")
        self.stack.down()  # whatever an interrupted run left running in this folder
        shutil.rmtree(self.stack.layout.root, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings_path.write_text(render_toml(self.settings, "# The fault / soak harness' settings (infra/harness.py), on top of the defaults."))
        self.say(f"starting the stores in {self.stack.layout.root}")
        self.stack.up(skip=("streaming-job", "recall", *NOT_UNDER_TEST))
        self.publish()
        self.say("starting the streaming job and the recall service")
        self.stack.up(skip=NOT_UNDER_TEST)
        self.config = self.stack.config()
        return self

    def publish(self) -> None:
        began = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "model_export", "publish", "--export-dir", str(self.export_dir)],
                              cwd=REPO_ROOT, env=self.stack.env, capture_output=True, text=True)
        if done.returncode != 0:
            raise HarnessError(f"publishing {self.export_dir} failed:\n{done.stderr[-2000:]}\nsee the stack's logs in {self.stack.layout.root / 'logs'}")
        self.say(f"  published {self.export_dir} in {time.monotonic() - began:.1f} s")

    def stop_service(self, service: str, kill: bool) -> None:
        if self.stack.stop_service(service, self.config, kill=kill) is None:
            raise HarnessError(f"{service} was not running; see {self.stack.layout.log(service)}")
        _reap_children()

    def start_stopped(self) -> None:
        """Starts what is not running (on its port, with its data): the supervisor's own restart."""
        self.stack.up(skip=NOT_UNDER_TEST)

    def rss_bytes(self) -> dict[str, int]:
        return {**self.stack.rss_bytes(self.config), "load-generator": psutil.Process().memory_info().rss}

    def job(self):
        """The streaming job's process handle (its metrics), whatever PID it runs under now."""
        return self.stack.process("streaming-job", self.config)

    def stop(self) -> None:
        self.stack.down()
        _reap_children()

    def __enter__(self) -> "SystemUnderTest":
        SigtermAsInterrupt.hold()  # the stack's services run detached
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            SigtermAsInterrupt.release()


def event_ids_in_topic(kafka, timeout_s: float = 120.0) -> tuple[set[str], bool]:
    """The event ids of the records in the events topic, read from the beginning to the end offsets,
    and whether the read reached them (False: the deadline passed first, or the broker named no
    partition of the topic: the ids are only some of the log's)."""
    import json

    from kafka import KafkaConsumer, TopicPartition

    from streaming.kafka_clients import python_client_options

    consumer = KafkaConsumer(**python_client_options(kafka), enable_auto_commit=False)
    try:
        partitions = [TopicPartition(kafka.events_topic, p) for p in consumer.partitions_for_topic(kafka.events_topic) or ()]
        consumer.assign(partitions)
        consumer.seek_to_beginning(*partitions)
        ends = consumer.end_offsets(partitions)
        ids: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while (behind := any(consumer.position(tp) < ends[tp] for tp in partitions)) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500, max_records=5000).values():
                for record in records:
                    try:
                        ids.add(json.loads(record.value).get("event_id", ""))
                    except (ValueError, AttributeError):
                        continue  # not an event of ours
        return ids, bool(partitions) and not behind
    finally:
        consumer.close()


def _reap_children() -> None:
    """Collects the exit status of the services this process started and the stack stopped (the
    supervisor stops them by PID, like any later command would, so nobody waits for them here and
    they would stay zombies)."""
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                child.wait(timeout=0)
        except psutil.Error:
            continue


class TrackedProducer(EventProducer):
    """The application's producer, reporting every send and its acknowledgement or failure."""

    def __init__(self, kafka, stream: "EventStream", **overrides):
        super().__init__(kafka, **overrides)
        self.stream = stream

    def send(self, event):
        from kafka.errors import KafkaError

        self.stream.sending(event)
        try:
            future = super().send(event)
        except KafkaError as exc:  # e.g. no broker for max_block_ms: nothing was queued
            self.stream.failed(event, exc)
            return None
        future.add_callback(lambda metadata: self.stream.acked(event, metadata))
        future.add_errback(lambda exc: self.stream.failed(event, exc))
        return future


class EventStream:
    """The replay at a steady rate (streaming.producer.paced), plus the events to send again."""

    RESEND_AFTER_S = 0.5
    MAX_SENDS = 60  # then the event is abandoned and reported as never acked

    def __init__(self, config: Config, events: ReplayEvents, first: int, rate: float, ledger: EventLedger, say: Callable[[str], None]):
        self.config, self.events, self.first, self.rate, self.ledger, self.say = config, events, first, rate, ledger, say
        self.resend: deque = deque()  # (due, event), due in order: every resend waits the same time
        self.last_error = ""
        self.error: BaseException | None = None
        self._stopping = threading.Event()
        self._stop_deadline = float("inf")
        self._thread = threading.Thread(target=self._run, name="event-stream", daemon=True)

    def start(self) -> "EventStream":
        self._thread.start()
        return self

    def sending(self, event) -> None:
        self.ledger.sent(event.event_id, event.user_id, event.item_id, event.event_time_ms, time.monotonic())

    def acked(self, event, metadata) -> None:
        self.ledger.acked(event.event_id, time.monotonic(), metadata.partition, metadata.offset)

    def failed(self, event, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        if self.ledger.failed(event.event_id) < self.MAX_SENDS:  # else given up: it stays unacked in the ledger
            self.resend.append((time.monotonic() + self.RESEND_AFTER_S, event))

    def _due_events(self) -> Iterator:
        fresh = self.events.events(self.first)
        while True:
            if self.resend and self.resend[0][0] <= time.monotonic():
                yield self.resend.popleft()[1]
            elif self._stopping.is_set():
                if not self.resend or time.monotonic() > self._stop_deadline:
                    return
                time.sleep(0.05)
            else:
                event = next(fresh, None)
                if event is None:
                    self.say("the dataset is exhausted: no new events")
                    self._stopping.set()
                    continue
                yield event

    def _run(self) -> None:
        try:
            # max_block_ms: a send while no broker answers fails after 1 s (and is sent again)
            # instead of blocking the stream for kafka-python's default minute.
            # Its own send loop, not `replay`: a failed send is sent again (`failed`), and the ledger,
            # not the producer, says which events never got an acknowledgement.
            with TrackedProducer.for_config(self.config, stream=self, max_block_ms=1000) as producer:
                for event in paced(self._due_events(), rate=self.rate):
                    producer.send(event)
                producer.flush()
        except BaseException as exc:  # reported by the commands; the run's figures would be wrong
            self.error = exc
            self.say(f"the event stream stopped: {type(exc).__name__}: {exc}")

    def stop(self, resend_timeout_s: float = 30.0) -> bool:
        """No new events; failed sends are still sent again for up to resend_timeout_s. Returns whether
        the stream has ended: one still sending gets acknowledgements after the final check, unjudged."""
        self._stop_deadline = time.monotonic() + resend_timeout_s
        self._stopping.set()
        if self._thread.ident is not None:  # started
            self._thread.join(resend_timeout_s + 60)  # + the producer's flush
        return not self._thread.is_alive()


class StorePoller:
    """Reads the stored windows of users with unseen acked events, every poll_s."""

    def __init__(self, config: Config, ledger: EventLedger, poll_s: float, chunk: int = 2000):
        from streaming.feature_store import RedisFeatureStore

        self.store = RedisFeatureStore.from_config(config.redis, timeout_s=1.0)
        self.ledger, self.poll_s, self.chunk = ledger, poll_s, chunk
        self.read_error_times: list[float] = []  # when polls failed (Redis down): those events are seen later
        self._said_at = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="store-poller", daemon=True)

    def start(self) -> "StorePoller":
        self._thread.start()
        return self

    def poll_once(self) -> None:
        import redis

        users = self.ledger.users_to_check()
        for begin in range(0, len(users), self.chunk):
            chunk = users[begin:begin + self.chunk]
            try:
                windows = self.store.get_windows(chunk)
            except redis.RedisError:
                self.read_error_times.append(time.monotonic())
                return
            now = time.monotonic()
            for user, window in zip(chunk, windows):
                self.ledger.observe(user, window, now)

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self.poll_s - (time.monotonic() - began)))

    def drain(self, timeout_s: float, job_events_read: Callable[[], float], say: Callable[[str], None], idle_s: float = 20.0) -> bool:
        """Waits until every acked event is seen in the store (or pushed out by newer ones). False at
        the timeout, or sooner when for idle_s neither an event reached the store nor the job read
        one (`job_events_read`: its counter): what is missing then will not come."""
        deadline = time.monotonic() + timeout_s
        last, still_since = None, time.monotonic()
        while (left := self.ledger.unresolved_count()) > 0:
            now = time.monotonic()
            state = (left, job_events_read())
            if state != last:
                last, still_since = state, now
            if now > deadline or now - still_since > idle_s:
                why = f"after {timeout_s:.0f} s" if now > deadline else f"and for {idle_s:.0f} s the job has read nothing new"
                say(f"  {left:,} acked events are still not in the store {why}")
                return False
            if now - self._said_at > 5:
                say(f"  waiting for {left:,} acked events to reach the store")
                self._said_at = now
            time.sleep(0.5)
        return True

    def final_check(self) -> tuple[int, int]:
        """Every user's final window against every event acked for it (EventLedger.final_check);
        returns (doubled, phantom) behaviours over those windows."""
        users = self.ledger.users()
        doubled = phantom = 0
        for begin in range(0, len(users), self.chunk):
            chunk = users[begin:begin + self.chunk]
            now = time.monotonic()
            for user, window in zip(chunk, self.store.get_windows(chunk)):
                self.ledger.final_check(user, window, now)
                if window is not None:
                    d, p = window_anomalies(window, set(self.ledger.items_by_user[user]))
                    doubled, phantom = doubled + d, phantom + p
        return doubled, phantom

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def reason_name(proto_name: str) -> str:
    """FALLBACK_REASON_UNKNOWN_USER -> UNKNOWN_USER; UNSPECIFIED (stored interests) -> NONE."""
    name = proto_name.removeprefix("FALLBACK_REASON_")
    return "NONE" if name == "UNSPECIFIED" else name


class RecallLoad:
    """`qps` Recall calls per second in all, spread over `clients` channels, each call with a deadline."""

    def __init__(self, recall: RecallServiceConfig, qps: float, clients: int, deadline_s: float, pick_user: Callable[[random.Random], str],
                 n: int = 50, per_interest_n: int = 0):
        self.recall, self.qps, self.clients, self.deadline_s, self.pick_user = recall, qps, max(1, clients), deadline_s, pick_user
        self.n, self.per_interest_n = n, per_interest_n
        self.samples: list[RecallSample] = []  # appended from gRPC's callback threads (list.append is atomic)
        self.on_answer: Callable | None = None  # (sent_at, request, response) of each OK answer, for checks of the contents
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(i,), name=f"recall-client-{i}", daemon=True) for i in range(self.clients)]

    def start(self) -> "RecallLoad":
        for thread in self._threads:
            thread.start()
        return self

    def _client(self, index: int) -> None:
        from recall_service.channel import recall_channel
        from recall_service.stubs import recall_pb2, recall_pb2_grpc

        interval = self.clients / self.qps
        rng = random.Random(index)
        with recall_channel(self.recall, options=RECONNECT_OPTIONS) as channel:
            stub = recall_pb2_grpc.RecallServiceStub(channel)
            due = time.monotonic() + interval * index / self.clients  # the clients take turns
            outstanding = []
            while not self._stop.is_set():
                wait = due - time.monotonic()
                if wait > 0:
                    self._stop.wait(wait)
                    continue
                request = self.request(recall_pb2, rng)
                future = stub.Recall.future(request, timeout=self.deadline_s)
                future.add_done_callback(lambda f, sent_at=due, request=request: self._record(sent_at, f, recall_pb2, request))
                outstanding.append(future)
                if len(outstanding) > 1000:
                    outstanding = [f for f in outstanding if not f.done()]
                due += interval
            for future in outstanding:  # each ends by its deadline at the latest
                try:
                    future.exception(timeout=self.deadline_s + 5)
                except Exception:  # noqa: BLE001 - a cancelled call: nothing to wait for
                    pass

    def request(self, recall_pb2, rng: random.Random):
        return recall_pb2.RecallRequest(user_id=self.pick_user(rng), n=self.n, per_interest_n=self.per_interest_n)

    def _record(self, sent_at: float, future, recall_pb2, request) -> None:
        done_at = time.monotonic()
        code = future.code()
        reason = "NONE"
        if code.name == "OK":
            reason = reason_name(recall_pb2.FallbackReason.Name(future.result().fallback_reason))
            if self.on_answer is not None:
                self.on_answer(sent_at, request, future.result())
        self.samples.append(RecallSample(sent_at, done_at, code.name, reason))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.ident is not None:  # started
                thread.join(self.deadline_s + 15)


@dataclass
class LoadRun:
    sut: SystemUnderTest
    ledger: EventLedger
    stream: EventStream
    poller: StorePoller
    load: RecallLoad
    started_at: float
    say: Callable[[str], None]

    def progress_line(self, since: float, now: float) -> str:
        """What happened between `since` and `now`: events acked, recall answers (for the progress lines)."""
        events = self.ledger.snapshot()
        acked = sum(1 for e in events if e.acked_at is not None and since <= e.acked_at < now)
        failures = sum(e.failures for e in events if since <= e.first_sent_at < now)
        samples = [s for s in self.load.samples if since <= s.done_at < now]
        errors = sum(1 for s in samples if s.code != "OK")
        degraded = sum(1 for s in samples if s.code == "OK" and not s.normal)
        p99 = percentile([s.latency_s for s in samples if s.code == "OK"], 99)
        span = max(now - since, 1e-9)
        return (f"  t+{now - self.started_at:5.0f}s  events acked {acked / span:5.0f}/s, failed sends {failures}, not yet in store "
                f"{self.ledger.unresolved_count():,} | recall {len(samples) / span:5.1f}/s, errors {errors}, degraded {degraded}, "
                f"p99 {'–' if p99 is None else f'{p99 * 1000:.0f} ms'}")

    def finish(self, drain_timeout_s: float) -> dict:
        """Stops the recall load and the stream (failed sends still go out), waits for the store
        to reflect every acked event, then checks the stored windows for doubled or phantom behaviours."""
        self.load.stop()
        self.say("stopping the event stream; waiting for every acked event to reach the store")
        stream_stopped = self.stream.stop()
        job = self.sut.job()
        drained = self.poller.drain(drain_timeout_s, lambda: job.metric("mindstream_stream_events_in_total"), self.say)
        self.poller.stop()
        doubled, phantom = self.poller.final_check()
        self.ledger.mark_reused_offsets()
        lost = [e for e in self.ledger.snapshot() if e.lost]
        if lost:  # where were they lost: is the record still in the broker's log?
            self.say(f"  {len(lost):,} acked events are not in their windows: looking for them in the broker's log")
            in_log, complete = event_ids_in_topic(self.sut.config.kafka)
            if complete:
                with self.ledger.lock:
                    for event_id, event in self.ledger.events.items():
                        if event.lost:
                            event.in_broker = event_id in in_log
            else:  # absent from a partial read proves nothing: in_broker stays unknown, no loss is the broker's
                self.say("  the broker's log could not be read to its end: where they were lost is not known")
        return {"drained": drained, "stream_stopped": stream_stopped, "doubled_behaviours": doubled, "phantom_behaviours": phantom,
                "events_lost": len(lost), "events_lost_not_in_broker": sum(1 for e in lost if e.in_broker is False),
                "events_lost_at_reused_offset": sum(1 for e in lost if e.offset_reused),
                "store_read_errors": len(self.poller.read_error_times), "stream_error": repr(self.stream.error) if self.stream.error else None,
                "last_send_error": self.stream.last_error}


def final_problems(final: dict) -> list[str]:
    """What `LoadRun.finish` found wrong in the run as a whole. Lost events and failed store reads are
    judged per fault row (a Redis fault explains failed reads) or by the soak's verdict."""
    problems = []
    if not final["drained"]:
        problems.append("acked events were still missing from the store when the drain gave up (--drain-timeout-s, or the job read nothing more)")
    if not final["stream_stopped"]:
        problems.append("the event stream was still sending after its stop: what it got acknowledged after the final check was never checked")
    if final["doubled_behaviours"] or final["phantom_behaviours"]:
        problems.append(f"stored windows hold {final['doubled_behaviours']} behaviours twice and {final['phantom_behaviours']} never sent")
    if final["stream_error"]:
        problems.append(f"the event stream failed: {final['stream_error']}; the figures miss what it did not send")
    return problems


def write_report(args, name: str, report: dict, markdown: str, say: Callable[[str], None]) -> None:
    """<work-dir>/<name>-<time>.json (the command, its arguments and `report`) and .md (the command and `markdown`)."""
    import json

    command = " ".join(["python -m infra", name, *sys.argv[2:]])
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out = Path(args.work_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}-{stamp}.json").write_text(json.dumps({"command": command, "args": arguments, **report}, indent=1))
    (out / f"{name}-{stamp}.md").write_text(f"`{command}`\n\n{markdown}\n")
    say(f"tables and raw numbers: {out / f'{name}-{stamp}.md'}, {out / f'{name}-{stamp}.json'}")


class Ticker:
    """Calls `tick(since, now)` every interval_s from its own thread (progress lines, RSS samples)."""

    def __init__(self, interval_s: float, tick: Callable[[float, float], None]):
        self.interval_s, self.tick = interval_s, tick
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    def _run(self) -> None:
        since = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            self.tick(since, now)
            since = now

    def __enter__(self) -> "Ticker":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(self.interval_s + 5)


@contextmanager
def system_under_load(args, name: str, say: Callable[[str], None], start_load: bool = True) -> Iterator[LoadRun]:
    """The stack in <work-dir>/<name> with the event stream and (unless start_load is False: then
    `run.load.start()` later) the recall load running; stopped, and the stack shut down, on the way
    out. Call `run.finish` before leaving for the drain."""
    config = load_config()
    say(f"loading the {args.dataset} events to replay")
    events = ReplayEvents.from_dataset(args.dataset, config.paths.data_dir, config.paths.shared_data_dir)
    if args.start >= len(events):
        raise HarnessError(f"--start {args.start} is past the {len(events):,} events of {args.dataset}")
    export_dir = args.export_dir or config.paths.main_export_dir
    with SystemUnderTest(Path(args.work_dir) / name, export_dir, say, args.window_length, args.milvus) as sut:
        ledger = EventLedger(sut.config.streaming.window_length)
        first_user = str(events.users[args.start])

        def pick_user(rng: random.Random) -> str:
            seen = ledger.seen_users
            return seen[rng.randrange(len(seen))] if seen else first_user

        stream = EventStream(sut.config, events, args.start, args.rate, ledger, say)
        poller = StorePoller(sut.config, ledger, args.poll_s)
        load = RecallLoad(sut.config.recall, args.qps, args.clients, args.deadline_ms / 1000, pick_user, per_interest_n=args.per_interest_n)
        run = LoadRun(sut, ledger, stream, poller, load, time.monotonic(), say)
        say(f"load: {args.rate:,.0f} events/s from {args.dataset} (event {args.start:,} on; windows of {sut.config.streaming.window_length}), "
            f"{args.qps:,.0f} Recall calls/s from {args.clients} clients (deadline {args.deadline_ms:.0f} ms); "
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        poller.start()
        stream.start()
        if start_load:
            load.start()
        try:
            yield run
        finally:
            load.stop()
            stream.stop(resend_timeout_s=0)
            poller.stop()
