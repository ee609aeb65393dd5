"""The PyFlink job: Kafka -> validate (-> dead letters) -> per-user window -> micro-batched user tower -> Redis.

    events topic --KafkaSource (SQL connector: value bytes + partition, offset, timestamp)-->
    key_by(Kafka key = user id) --> UserWindows: parse + validate, apply to the user's window,
        queue the window for the next micro-batch, flush by size or by a timer
        --> InterestWriter: one ONNX user-tower call per batch, one pipelined Redis write
    dead letters (invalid, oversized, future, late records, with the reason; events whose application
        failed, as `internal`) --KafkaSink--> dead-letter topic

Exactly-once in the windows: the window lives in Flink keyed state and the source offsets in
the same checkpoint, so a restore rewinds both together and the replay is deduplicated by the
window. A window change that was queued but not yet written when a checkpoint was taken has its
flush timer in that checkpoint: after a restore the timer fires for a user this process never
queued nor wrote, and that user is re-extracted from the restored window, so no accepted event is
missing from the store; the seen set gets the window and what the state kept of the behaviours that
had left it (window.apply_to_state), and so does the first event of a restored user's state. Which users have a timer is kept in memory, not in state, so a timer
that finds its user already written costs no state access.

Thread execution mode (the Python functions run in the TaskManager's JVM through pemja) is
15-20x faster than process mode for keyed state; it does not scale with parallelism inside one
JVM, so scale out with TaskManagers (see the README's scaling notes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import site
import sys
import time
import uuid
from pathlib import Path

from infra.config import REPO_ROOT, Config

log = logging.getLogger(__name__)

JOB_NAME = "mindstream-interests"
# Flink restores keyed state only into the same state types: a checkpoint taken when the window was
# a pickled value cannot be restored into the JSON string of today's job (the restore fails and the
# job restarts forever). So checkpoints live in a folder per state layout, and `--restore latest`
# looks only in this one. Bump it whenever a state descriptor's type changes.
#   1  window as a pickled Python value (before the JSON window state), in the root folder
#   2  window as a JSON string (UserWindow.to_state)
#   3  operators with fixed uids and a fixed max parallelism (MAX_PARALLELISM)
STATE_LAYOUT = "state-v3"
# Key groups: the most subtasks the keyed state can ever be spread over. Flink derives it from the
# first run's parallelism otherwise (128 for small ones) and a checkpoint keeps it for good.
MAX_PARALLELISM = 1024
JVM_HEAP = "-Xmx640m"  # with the embedded Python the whole job stays well under 1.5 GB
INTERNAL_LOG_S = 10.0  # at most one traceback this often for events or timers the job fails to handle


def job_settings(config: Config) -> dict:
    """What the job's functions need, as plain values (they are pickled into the job graph)."""
    s = config.streaming
    return {
        "events_topic": config.kafka.events_topic,
        "window_length": s.window_length,
        "allowed_lateness_ms": s.allowed_lateness_ms,
        "max_event_bytes": s.max_event_bytes,
        "batch_max_users": s.batch_max_users,
        "batch_max_delay_ms": s.batch_max_delay_ms,
        "state_ttl_hours": s.state_ttl_hours,
        "record_ttl_s": s.record_ttl_s,
        "seen_items": s.seen_items,
        "seed_windows_from_store": s.seed_windows_from_store,
        "models_dir": str(config.paths.models_dir),
        "model_poll_s": s.model_poll_s,
        "metrics_host": s.metrics_host,
        "metrics_port": s.metrics_port,
        "redis": dataclasses.asdict(config.redis),  # every field: a new one (e.g. cluster) reaches the job
    }


def _user_windows_function(settings: dict):
    """The keyed function; built here so that importing this module needs no PyFlink."""
    from pyflink.common import Types
    from pyflink.common.time import Time
    from pyflink.datastream import KeyedProcessFunction, RuntimeContext
    from pyflink.datastream.state import StateTtlConfig, ValueStateDescriptor

    from infra.config import RedisConfig
    from model_export.registry import ModelRegistry
    from streaming import metrics
    from streaming.events import INTERNAL, LATE, EventError, accept_record
    from streaming.feature_store import RedisFeatureStore
    from streaming.interest_writer import InterestWriter, RegistryTowers, dead_letter
    from streaming.window import Applied, UserWindow, apply_to_state

    class UserWindows(KeyedProcessFunction):
        def open(self, runtime_context: RuntimeContext):
            descriptor = ValueStateDescriptor("window", Types.STRING())  # JSON: UserWindow.to_state
            ttl = StateTtlConfig.new_builder(Time.hours(settings["state_ttl_hours"])).set_update_type(
                StateTtlConfig.UpdateType.OnCreateAndWrite).set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired).build()
            descriptor.enable_time_to_live(ttl)
            self.state = runtime_context.get_state(descriptor)
            store = RedisFeatureStore.from_config(RedisConfig(**settings["redis"]), ttl_seconds=settings["record_ttl_s"],
                                                  seen_items=settings["seen_items"], read_seen=False)
            self.towers = RegistryTowers(ModelRegistry(Path(settings["models_dir"])), settings["model_poll_s"])
            self.towers.current()  # fail at start, with the registry's message, when no model is published
            self.writer = InterestWriter(self.towers, store, settings["batch_max_users"])
            self.seed = self.writer.stored_window if settings["seed_windows_from_store"] else None
            # tells this process's queued writes from a restored state's (apply_to_state); in every state, so short
            self.process_id = uuid.uuid4().hex[:12]
            self.timed: set[str] = set()  # users with a flush timer registered by this process
            self.flushed: set[str] = set()  # written users whose timer has not fired yet
            self.failure_logged_at, self.unlogged_failures = -INTERNAL_LOG_S, 0
            self.applied = {outcome: metrics.EVENTS_APPLIED.labels(outcome.value) for outcome in Applied}  # resolved once: per-event cost
            metrics.serve(settings["metrics_host"], settings["metrics_port"])

        def failed(self, stage: str, what: str) -> None:
            """An event or a timer the job could not handle, from within its except clause: counted, and
            logged with the traceback at most every INTERNAL_LOG_S (a bug that fails every event would
            otherwise write a traceback per event)."""
            metrics.INTERNAL_ERRORS.labels(stage).inc()
            self.unlogged_failures += 1
            now = time.monotonic()
            if now - self.failure_logged_at >= INTERNAL_LOG_S:
                log.exception("%s (%d such failures since the last one logged)", what, self.unlogged_failures)
                self.failure_logged_at, self.unlogged_failures = now, 0

        def close(self):
            if hasattr(self, "towers"):  # an open() that failed before it had them
                self.towers.close()

        def process_element(self, row, ctx: KeyedProcessFunction.Context):
            key, value, partition, offset, produced_ms = row[0], row[1], row[2], row[3], row[4]
            metrics.EVENTS_IN.inc()
            try:
                event = accept_record(key, value, settings["max_event_bytes"], produced_ms)
            except EventError as exc:
                metrics.DEAD_LETTERS.labels(exc.kind).inc()
                yield dead_letter(str(exc), exc.kind, value or b"", partition, offset, produced_ms, settings["events_topic"])
                return
            state = self.state.value()  # (outside the guard: a failing state backend fails the job, as it must)
            try:
                update = apply_to_state(state, event, settings["window_length"], settings["allowed_lateness_ms"],
                                        f"{partition}:{offset}", self.seed, produced_ms, self.process_id,
                                        pending.oldest_seen_ms if (pending := self.writer.pending.get(key)) else None)
            except MemoryError:
                raise  # the process is in trouble, not this event
            except Exception as exc:  # noqa: BLE001 - a bug or an unreadable state, not the store (seeding retries it)
                # Failing the job would replay this record after the restart and fail again, stalling
                # every user (a poison pill): the record is set aside with the error, as a dead letter
                # that can be redriven once the cause is fixed, and the user's state is left as it was.
                self.failed("event", f"event at {partition}:{offset} of user {key!r:.80} not applied")
                metrics.DEAD_LETTERS.labels(INTERNAL).inc()
                reason = f"internal: {type(exc).__name__}: {exc}"[:1000]
                yield dead_letter(reason, INTERNAL, value, partition, offset, produced_ms, settings["events_topic"])
                return
            if update.state is not None:
                self.state.update(update.state)
            outcome = update.outcome
            self.applied[outcome].inc()
            if outcome is Applied.LATE:
                metrics.DEAD_LETTERS.labels(LATE).inc()
                reason = f"late: event time {event.event_time_ms} is more than {settings['allowed_lateness_ms']} ms behind this user's newest {update.window.vouched_ms}"
                yield dead_letter(reason, LATE, value, partition, offset, produced_ms, settings["events_topic"])
            # ADDED: a new window and its behaviour for the seen set; EVICTED: valid but older than a
            # full window, so the user's seen set only; and what left the window under a process that died
            added = outcome is Applied.ADDED
            seen = [(event.event_time_ms, event.item_id)] if added or outcome is Applied.EVICTED else []
            if seen or update.requeued:  # (a restored state's window: its record's write may have died with the process too)
                self.writer.add(key, update.window if added or update.requeued else None, produced_ms if added else None, seen + update.requeued)
                if key not in self.timed:
                    self.timed.add(key)
                    timers = ctx.timer_service()
                    timers.register_processing_time_timer(timers.current_processing_time() + settings["batch_max_delay_ms"])
                if self.writer.full:
                    self.flushed.update(self.writer.flush())
            if update.spill:  # written now: the next checkpoint holds the state without them
                self.writer.write_seen(key, update.spill)

        def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):
            user = ctx.get_current_key()
            self.timed.discard(user)
            if user in self.writer.pending:
                self.flushed.update(self.writer.flush())
            elif user not in self.flushed:
                # A timer of a restored checkpoint, taken while this user's update was queued: redo it.
                # The seen set gets the window's behaviours and those that left it (a burst that
                # passed through the window, an evicted event) before the lost write.
                state = self.state.value()
                try:
                    window = UserWindow.from_state(state)
                except MemoryError:
                    raise
                except Exception:  # noqa: BLE001 - an unreadable state: failing would replay this timer at every restore
                    self.failed("timer", f"the lost write of user {user!r:.80} not redone")
                    window = UserWindow()
                if window.behaviours:
                    self.writer.add(user, window, seen=[(b[0], b[1]) for b in window.behaviours] + window.departed)
                    self.flushed.update(self.writer.flush())
            self.flushed.discard(user)
            return iter(())

    return UserWindows()


def is_uri(location: Path | str) -> bool:
    """A location on a file system Flink reaches by scheme (s3://, hdfs://, file://), not a local path."""
    return "://" in str(location)


def storage_uri(location: Path | str) -> str:
    """A location as Flink takes it: a URI as given, a local path made absolute."""
    return str(location) if is_uri(location) else Path(location).expanduser().resolve().as_uri()


def checkpoint_location(checkpoint_dir: Path | str) -> str:
    """Where this job's checkpoints go: [streaming].checkpoint_dir / STATE_LAYOUT, as a URI."""
    return f"{storage_uri(checkpoint_dir).rstrip('/')}/{STATE_LAYOUT}"


def latest_checkpoint(checkpoint_dir: Path | str) -> Path | None:
    """The newest complete checkpoint (a chk-N folder with _metadata) of any earlier run of this state layout."""
    done = [p.parent for p in (Path(checkpoint_dir) / STATE_LAYOUT).glob("*/chk-*/_metadata")]
    return max(done, key=lambda p: p.stat().st_mtime) if done else None


def unrestorable_checkpoints(checkpoint_dir: Path | str) -> list[Path]:
    """Complete checkpoints of other state layouts: this job cannot restore them."""
    root = Path(checkpoint_dir)
    return [p.parent for p in [*root.glob("*/chk-*/_metadata"), *root.glob("*/*/chk-*/_metadata")]
            if root / STATE_LAYOUT not in p.parents]


def forward_gateway_stderr() -> None:
    """PyFlink starts its JVM with stderr=PIPE and reads the pipe only if the start fails
    (pyflink.java_gateway.launch_gateway). In thread mode the job's own Python code writes there
    too (warnings such as a feature-store retry's, tracebacks): after 64 KiB every write blocks, and
    the task thread with it; the job stops without a word (measured: a thread-mode map writing 1 KB
    per record to stderr stalled for good after ~98 records). Here the pipe is forwarded line by
    line to this process's stderr, which the stack writes to the job's log. Call it before anything
    starts the gateway (the first Configuration())."""
    import threading

    from pyflink import java_gateway

    launch = java_gateway.launch_gateway_server_process
    if getattr(launch, "forwards_stderr", False):
        return

    def launching(env, args):
        process = launch(env, args)
        threading.Thread(target=_copy_lines, args=(process.stderr, sys.stderr), name="flink-gateway-stderr", daemon=True).start()
        return process

    launching.forwards_stderr = True
    java_gateway.launch_gateway_server_process = launching


def _copy_lines(source, sink) -> None:
    """Until the pipe closes; a line the sink cannot take (a full disk, a closed stream) is dropped,
    never the draining: a stopped reader is the stall again."""
    for line in iter(source.readline, b""):
        try:
            sink.write(line.decode("utf-8", "replace"))
            sink.flush()
        except (OSError, ValueError):
            pass


def _environment(config: Config, restore_from: Path | str | None):
    from pyflink.common import Configuration
    from pyflink.datastream import StreamExecutionEnvironment

    from infra.flink_jars import kafka_connector_jars

    log_dir = config.paths.var_dir / "flink" / "log"
    log_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("FLINK_LOG_DIR", str(log_dir))
    # JVM_ARGS adds to PyFlink's --add-opens flags (FLINK_ENV_JAVA_OPTS would replace them).
    os.environ["JVM_ARGS"] = f"{os.environ.get('JVM_ARGS', '')} {JVM_HEAP}".strip()
    # On a local cluster PyFlink starts a Beam worker-pool gRPC server on all interfaces ([::]:0)
    # for process-mode Python workers. Thread mode never uses it; "process" here keeps it unstarted.
    os.environ["_python_worker_execution_mode"] = "process"
    jars = kafka_connector_jars(config.paths.var_dir / "jars")
    forward_gateway_stderr()
    conf = Configuration()
    for key, value in job_configuration(config, jars, restore_from, submitted="PYFLINK_GATEWAY_PORT" in os.environ).items():
        conf.set_string(key, value)
    return StreamExecutionEnvironment.get_execution_environment(conf)


def job_configuration(config: Config, jars: list[Path], restore_from: Path | str | None, submitted: bool) -> dict[str, str]:
    """The Flink settings of the job. `submitted`: Flink's CLI (`flink run`, the operator's
    PythonDriver) started this program for a cluster of its own, whose addresses it was given; the
    program's settings go over them, so the local cluster's loopback addresses must not."""
    s = config.streaming
    settings = {
        "python.execution-mode": "thread",
        "python.executable": sys.executable,
        # the interpreter embedded in the JVM starts from the base Python: give it the venv and the repo
        "python.pythonpath": os.pathsep.join([*site.getsitepackages(), str(REPO_ROOT)]),
        "pipeline.jars": ";".join(p.resolve().as_uri() for p in jars),
        "pipeline.name": JOB_NAME,
        "pipeline.object-reuse": "true",  # no defensive copies between chained Java operators
        "execution.checkpointing.interval": f"{s.checkpoint_interval_ms} ms",
        "execution.checkpointing.dir": checkpoint_location(s.checkpoint_dir),
        "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
        "execution.checkpointing.num-retained": "2",
        # A write or read waiting out a store outage (interest_writer: wait, never drop) holds the
        # checkpoint barriers. With Flink's defaults (0 tolerable failures, a 180 s cancellation
        # watchdog) an outage past the 10 min checkpoint timeout failed the job over, the task could
        # not be cancelled out of the retry, and the watchdog took the local TaskManager down for good:
        # the job stayed up but processed nothing, also after Redis was back (measured with shortened
        # timeouts). Expired checkpoints are tolerated and a cancel waits for the task instead: after
        # the outage the job goes on by itself (5 s in the same experiment, every window correct).
        "execution.checkpointing.tolerable-failed-checkpoints": str(2**31 - 1),
        "task.cancellation.timeout": "0",
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": "1000000",
        "restart-strategy.fixed-delay.delay": "2 s",
        "parallelism.default": str(s.parallelism),
        "pipeline.max-parallelism": str(MAX_PARALLELISM),
        # Checkpointed state is matched to operators by uid: the SQL source's are generated from its
        # plan, the job's own operators name theirs (build_job), so a change elsewhere in the graph
        # (an operator added, another chaining) does not orphan the state on a restore.
        "table.exec.uid.generation": "ALWAYS",
    }
    if not submitted:
        # The local cluster's endpoints stay on loopback, and its REST API takes no job uploads
        # (an uploaded jar runs arbitrary code).
        settings.update({
            "rest.address": "127.0.0.1",
            "rest.bind-address": "127.0.0.1",
            "web.submit.enable": "false",
            "jobmanager.bind-host": "127.0.0.1",
            "taskmanager.bind-host": "127.0.0.1",
            "taskmanager.host": "127.0.0.1",
        })
    if restore_from is not None:
        settings["execution.state-recovery.path"] = storage_uri(restore_from)
    return settings


def build_job(config: Config, restore_from: Path | str | None = None):
    """The job graph on a local (mini-cluster) environment; returns the environment to execute."""
    from pyflink.common import Types
    from pyflink.datastream.connectors.base import DeliveryGuarantee
    from pyflink.datastream.connectors.kafka import KafkaRecordSerializationSchema, KafkaSink
    from pyflink.common.serialization import SimpleStringSchema
    from pyflink.table import StreamTableEnvironment

    from streaming.kafka_clients import java_client_properties

    env = _environment(config, restore_from)
    t_env = StreamTableEnvironment.create(env)
    kafka_props = java_client_properties(config.kafka)
    options = {
        "connector": "kafka",
        "topic": config.kafka.events_topic,
        "properties.group.id": config.streaming.consumer_group,
        "scan.startup.mode": "group-offsets",  # first start: committed offsets, else earliest
        "properties.auto.offset.reset": "earliest",
        "key.format": "raw",
        "key.fields": "user_key",
        "value.format": "raw",
        "value.fields-include": "EXCEPT_KEY",
        **{f"properties.{k}": v for k, v in kafka_props.items()},
    }
    with_clause = ", ".join(f"'{k}' = '{_sql_string(v)}'" for k, v in options.items())
    with kafka_secrets_hidden(kafka_props):  # a failure to create the source prints every table option
        records = _event_records(t_env, with_clause)
    dead_letters = records.key_by(lambda row: row[0] or "", key_type=Types.STRING()).process(
        _user_windows_function(job_settings(config)), output_type=Types.STRING()).name("user-windows").uid("user-windows")
    sink = KafkaSink.builder().set_bootstrap_servers(config.kafka.bootstrap_servers).set_record_serializer(
        KafkaRecordSerializationSchema.builder().set_topic(config.kafka.dead_letter_topic).set_value_serialization_schema(SimpleStringSchema()).build()
    ).set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
    for k, v in kafka_props.items():
        if k != "bootstrap.servers":
            sink = sink.set_property(k, v)
    dead_letters.sink_to(sink.build()).name("dead-letters").uid("dead-letters")
    return env


def _event_records(t_env, with_clause: str):
    """The events topic as a stream of (user key, value, partition, offset, produced ms) rows."""
    t_env.execute_sql(f"""
        CREATE TABLE events (
            `user_key` STRING,
            `value` BYTES,
            `partition` INT METADATA VIRTUAL,
            `offset` BIGINT METADATA VIRTUAL,
            `produced` TIMESTAMP_LTZ(3) METADATA FROM 'timestamp' VIRTUAL
        ) WITH ({with_clause})
    """)
    # Produce time and position are computed in SQL (Java): cheaper than per-record calls from Python.
    # Epoch seconds by EXTRACT, not through a string (a 4-digit year: a stamp in microseconds or
    # nanoseconds came out as another date, or 0, and was taken where every other reader refuses it).
    t_env.get_config().set("table.local-time-zone", "UTC")
    return t_env.to_data_stream(t_env.sql_query("""
        SELECT `user_key`, `value`, `partition`, `offset`,
               EXTRACT(EPOCH FROM `produced`) * 1000 + EXTRACT(MILLISECOND FROM `produced`) AS produced_ms
        FROM events
    """))


# Java client properties whose values are secrets. Flink hides an option whose name says password,
# secret, token or jaas.config in the table options it prints, but not the client's private key.
SECRET_PROPERTIES = ("ssl.keystore.key", "sasl.jaas.config")


@contextlib.contextmanager
def kafka_secrets_hidden(kafka_props: dict[str, str]):
    """Re-raises a failure inside as a RuntimeError whose message has the secret Kafka properties'
    values (as given and as SQL-quoted) replaced, without the original attached (its message and
    Java stack trace hold them)."""
    try:
        yield
    except Exception as exc:
        message = str(exc)
        for name in SECRET_PROPERTIES:
            if kafka_props.get(name):
                for form in (kafka_props[name], _sql_string(kafka_props[name])):
                    message = message.replace(form, f"[{name} hidden]")
        raise RuntimeError(message) from None


def _sql_string(value: str) -> str:
    return str(value).replace("'", "''")


def run_job(config: Config, restore_from: Path | str | None = None) -> None:
    """Runs the job until it is cancelled or killed (blocking)."""
    from infra.broker import ensure_configured_topics

    ensure_configured_topics(config)
    env = build_job(config, restore_from)
    log.info("starting %s%s", JOB_NAME, f" from {restore_from}" if restore_from else "")
    print(json.dumps({"job": JOB_NAME, "restore_from": str(restore_from) if restore_from else None, "metrics": f"http://{config.streaming.metrics_host}:{config.streaming.metrics_port}/metrics"}), flush=True)
    env.execute(JOB_NAME)
