"""The real PyFlink job against the real broker (noida) and the real Redis.

One job is started for the module and restarted by the last two tests, which kill it (each start
costs 10-25 s). Tests run in file order.
"""

import contextlib
import json
import os
import time

import numpy as np
import psutil
import pytest
import redis

from infra.broker import EmbeddedBroker, ensure_topics
from infra.config import load_config
from infra.job_process import StreamingJobProcess
from infra.redis_server import EmbeddedRedis, EmbeddedRedisCluster, free_port
from model_export.artifact import UserTower
from model_export.registry import ModelRegistry
from streaming.events import BehaviourEvent, encode_event
from streaming.feature_store import InterestRecord, RedisFeatureStore
from streaming.producer import EventProducer
from streaming.window import UserWindow

from conftest import is_loopback, listening_addresses, wait_for

LATENESS_MS = 10_000
WINDOW = 50


@contextlib.contextmanager
def job_stack(root, exports, store_server, cluster=False):
    """A broker and the streaming job writing to `store_server` (a Redis, or a Redis Cluster)."""
    registry = ModelRegistry(root / "models")
    first = registry.install(exports[0])
    registry.set_current(first.model_version)
    metrics_port = free_port()
    with EmbeddedBroker(root / "broker") as broker:
        env = {
            **os.environ,
            "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MINDSTREAM_REDIS__URI": store_server.uri,
            "MINDSTREAM_REDIS__CLUSTER": str(cluster).lower(),
            "MINDSTREAM_PATHS__MODELS_DIR": str(registry.root),
            "MINDSTREAM_STREAMING__CHECKPOINT_DIR": str(root / "checkpoints"),
            "MINDSTREAM_STREAMING__CHECKPOINT_INTERVAL_MS": "1000",
            "MINDSTREAM_STREAMING__ALLOWED_LATENESS_MS": str(LATENESS_MS),
            "MINDSTREAM_STREAMING__WINDOW_LENGTH": str(WINDOW),
            "MINDSTREAM_STREAMING__MODEL_POLL_S": "0.5",
            "MINDSTREAM_STREAMING__METRICS_PORT": str(metrics_port),
        }
        config = load_config(environ=env)
        ensure_topics(config.kafka, partitions=2, retention_ms=3_600_000)
        job = StreamingJobProcess(env, root / "job.log", f"http://127.0.0.1:{metrics_port}/metrics").start()
        producer = EventProducer(config.kafka)
        store = RedisFeatureStore.from_config(config.redis)
        try:
            yield {"job": job, "producer": producer, "store": store, "config": config, "registry": registry, "first": first}
        finally:
            producer.close()
            job.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, two_exports):
    root = tmp_path_factory.mktemp("streaming")
    with EmbeddedRedis(root / "redis") as store_server, job_stack(root, two_exports, store_server) as running:
        yield running


def expected_windows(events):
    """The windows the job must hold, computed with the same pure logic in event order."""
    windows = {}
    for e in events:
        windows.setdefault(e.user_id, UserWindow()).apply(e, WINDOW, LATENESS_MS)
    return {u: w.item_ids() for u, w in windows.items()}


def send(producer, events):
    for e in events:
        producer.send(e)
    producer.flush()


def kill_then_send(job, producer, events):
    """SIGKILL to the job, then `events` accepted by the broker while the job is down."""
    job.kill()
    send(producer, events)


def dead_letters(config, n, timeout_s=30.0):
    from kafka import KafkaConsumer

    from streaming.kafka_clients import python_client_options

    consumer = KafkaConsumer(config.kafka.dead_letter_topic, **python_client_options(config.kafka), auto_offset_reset="earliest", consumer_timeout_ms=1000)
    records, deadline = [], time.monotonic() + timeout_s
    while len(records) < n and time.monotonic() < deadline:
        records += [json.loads(m.value) for m in consumer]
    consumer.close()
    return records


def test_events_in_interests_out_equal_to_the_offline_user_tower(stack):
    producer, store = stack["producer"], stack["store"]
    events = [BehaviourEvent(f"a{u}", f"i{(7 * u + 3 * t) % 60}", "click", 1_000_000 + 1_000 * t, profile={"gender": "MF"[u % 2]}) for u in range(5) for t in range(12)]
    events.append(BehaviourEvent("a0", "i5", "view", 1_000_000 + 5_500))  # out of order, within the bound
    events.append(BehaviourEvent("a0", "i5", "view", 1_000_000 + 5_500))  # a redelivery
    events.append(BehaviourEvent("a1", "never-seen-item", "buy", 1_000_000 + 20_000))  # unknown to the model: kept in the window
    for e in events:
        producer.send(e)
    producer.flush()
    expected = expected_windows(events)
    users = sorted(expected)
    records = wait_for(lambda: (r := store.get_many(users)) and all(x is not None and x.window == expected[x.user_id] for x in r) and r, what="all windows stored")
    tower = UserTower.load(stack["registry"].path(stack["first"].model_version), prefer_gpu=False)
    offline = tower.interests([r.window for r in records], [{"gender": "MF"[int(r.user_id[1:]) % 2]} for r in records])
    for record, vectors in zip(records, offline):
        assert record.model_version == stack["first"].model_version
        np.testing.assert_allclose(record.interests, vectors, atol=1e-4)
    assert records[0].window.count("i5") == expected["a0"].count("i5")  # the redelivery was not added
    assert stack["job"].metric("mindstream_stream_events_applied_total", 'outcome="duplicate"') >= 1
    # every behaviour also went to the user's seen set (read by the recall service with the record)
    seen_store = RedisFeatureStore.from_config(stack["config"].redis, seen_items=stack["config"].streaming.seen_items)
    assert [r.seen for r in seen_store.get_many(users)] == [frozenset(e.item_id for e in events if e.user_id == u) for u in users]


def test_the_job_listens_on_loopback_only(stack):
    """Every socket of the job's process tree: the client, its JVM (REST, RPC, data exchange) and
    the Python embedded in it."""
    addresses = listening_addresses(psutil.Process(stack["job"].pid))
    assert addresses and all(is_loopback(a.rsplit(":", 1)[0]) for a in addresses), addresses


def test_dead_letters_are_counted_and_do_not_stop_the_job(stack):
    producer, store, job = stack["producer"], stack["store"], stack["job"]
    before = job.metric("mindstream_stream_dead_letters_total")
    poison = [
        ("p1", b"{not json"),
        ("p1", json.dumps({"schema": 1, "user_id": "p1", "item_id": "i1", "event_type": "click", "event_time_ms": 5, "price": 1}).encode()),
        ("p1", b'{"schema": 1, "user_id": "p1", "item_id": "i1", "event_type": "click", "event_time_ms": 1, "side": {"x": "' + b"y" * 5000 + b'"}}'),
        ("someone-else", json.dumps({"schema": 1, "user_id": "p1", "item_id": "i1", "event_type": "click", "event_time_ms": 5}).encode()),
    ]
    for key, value in poison:
        producer.send_raw(key, value)
    producer.send(BehaviourEvent("p1", "i2", "click", 50_000))
    producer.send(BehaviourEvent("p1", "i3", "click", 50_000 - LATENESS_MS - 1))  # late: dead-lettered
    # dated two hours after it enters Kafka (microseconds sent as milliseconds, say): dead-lettered, so
    # it cannot make the user's later real events late (EventProducer refuses it: another producer's)
    producer.send_raw("p1", encode_event(BehaviourEvent("p1", "i4", "click", int(time.time() * 1000) + 7_200_000)))
    # records stamped (Kafka CreateTime) in microseconds, in nanoseconds, or 10,000 years ahead: the job
    # refuses them as every other reader does (its SQL read such stamps as another date, or as 0)
    now_ms = int(time.time() * 1000)
    for stamp in (now_ms * 1000, now_ms * 1_000_000, now_ms + 315_569_520_000_000):
        producer.producer.send(stack["config"].kafka.events_topic, key=b"p1", timestamp_ms=stamp,
                               value=encode_event(BehaviourEvent("p1", "i5", "click", now_ms)))
    producer.flush()
    wait_for(lambda: (r := store.get_many(["p1"])[0]) is not None and r.window == ("i2",), what="the valid event after the poison")
    letters = dead_letters(stack["config"], 9)
    assert sorted(letter["kind"] for letter in letters) == ["future"] * 4 + ["invalid", "late", "malformed", "oversized", "unknown_field"]
    assert all(letter["reason"] and letter["topic"] == stack["config"].kafka.events_topic for letter in letters)
    assert next(x for x in letters if x["kind"] == "malformed")["value"] == "{not json"
    wait_for(lambda: job.metric("mindstream_stream_dead_letters_total") - before == 9, what="dead letters counted")


def test_a_newly_published_user_tower_is_used_without_a_restart(stack, two_exports):
    registry, producer, store = stack["registry"], stack["producer"], stack["store"]
    second = registry.install(two_exports[1])
    registry.set_current(second.model_version)
    producer.send(BehaviourEvent("h1", "i4", "click", 1_000))
    producer.send(BehaviourEvent("h1", "i9", "click", 2_000))
    producer.flush()
    record = wait_for(lambda: (r := store.get_many(["h1"])[0]) is not None and r.window == ("i4", "i9") and r, what="h1 stored")
    assert record.model_version == second.model_version
    np.testing.assert_allclose(record.interests, UserTower.load(registry.path(second.model_version), prefer_gpu=False).interests([record.window])[0], atol=1e-4)


def test_a_user_the_job_holds_no_state_for_continues_the_window_of_its_stored_record(stack):
    # Records as an earlier job (or one whose state was lost) left them, for users this job never saw.
    producer, store, job = stack["producer"], stack["store"], stack["job"]
    tower = UserTower.load(stack["registry"].path(stack["first"].model_version), prefer_gpu=False)
    old = {f"r{u}": tuple(f"i{(u + j) % 60}" for j in range(5)) for u in range(8)}
    vectors = tower.interests(list(old.values()), [{}] * len(old))
    store.put_many([InterestRecord(user, tower.version, v, window, 4_000_000, "") for (user, window), v in zip(old.items(), vectors)])
    seeded_before = job.metric("mindstream_stream_window_seeds_total", 'result="seeded"')
    events = [BehaviourEvent(user, f"i{(7 * u + t) % 60}", "click", 4_000_001 + t, event_id=f"r-{u}-{t}") for u, user in enumerate(old) for t in range(3)]
    send(producer, events)
    expected = {user: window + tuple(e.item_id for e in events if e.user_id == user) for user, window in old.items()}
    wait_for(lambda: all(r is not None and r.window == expected[r.user_id] for r in store.get_many(sorted(old))), timeout_s=30,
             what="the new events appended to the stored windows")
    assert job.metric("mindstream_stream_window_seeds_total", 'result="seeded"') - seeded_before == len(old)


def test_kill_and_restore_from_a_checkpoint_loses_and_doubles_nothing(stack):
    producer, store, job = stack["producer"], stack["store"], stack["job"]
    rng = np.random.default_rng(3)
    events = [BehaviourEvent(f"k{rng.integers(40)}", f"i{rng.integers(60)}", "click", 2_000_000 + 100 * t, event_id=f"k-{t}") for t in range(3000)]
    send(producer, events[:1500])
    wait_for(lambda: job.metric("mindstream_stream_events_applied_total") >= 1, what="progress")
    time.sleep(2.5)  # at least one checkpoint (every 1 s) covers part of the stream
    kill_then_send(job, producer, events[1500:])  # SIGKILL, mid-stream: some events are applied after the last checkpoint
    # Without seeding from the store, which would rebuild the same windows from the stored records:
    # only the restored state can make them whole.
    seeding = job.env
    job.env = {**seeding, "MINDSTREAM_STREAMING__SEED_WINDOWS_FROM_STORE": "false"}
    try:
        job.start(restore="latest")
    finally:
        job.env = seeding  # the next start (the next test's) seeds again
    started = [json.loads(line) for line in job.log_path.read_text().splitlines() if line.startswith('{"job"')]
    assert "/chk-" in (started[-1]["restore_from"] or ""), started[-1]
    expected = expected_windows(events)
    users = sorted(expected)
    wait_for(lambda: all(r is not None and r.window == expected[r.user_id] for r in store.get_many(users)), timeout_s=90, what="every window complete after the restore")
    for record in store.get_many(users):
        assert len(record.window) == len(expected[record.user_id])  # nothing twice
    assert job.metric("mindstream_stream_window_seeds_total") == 0  # the restarted job read no stored record: seeding was off
    # and every behaviour reached its user's seen set, also those that left the window before a write the kill lost
    seen_store = RedisFeatureStore.from_config(stack["config"].redis, seen_items=stack["config"].streaming.seen_items)
    every_item = [frozenset(e.item_id for e in events if e.user_id == u) for u in users]
    assert max(map(len, every_item)) <= stack["config"].streaming.seen_items
    wait_for(lambda: [r.seen for r in seen_store.get_many(users)] == every_item, timeout_s=30, what="every behaviour in its user's seen set")


def test_a_job_started_without_its_state_seeds_windows_from_the_store_and_doubles_nothing(stack):
    # As after a state-layout change: no checkpoint to restore; the job reads again from the
    # group's committed offsets (from the earliest when there are none: here the job is killed
    # before its source's first commit, which a fresh consumer sent ~9-10 s after its data was
    # stored in a probe of this stack, checkpoints every 1 s), and every user's window is taken up
    # from the stored record, the records it reflects not twice.
    producer, store, job = stack["producer"], stack["store"], stack["job"]
    rng = np.random.default_rng(4)
    events = [BehaviourEvent(f"s{rng.integers(30)}", f"i{rng.integers(60)}", "click", 3_000_000 + 100 * t, event_id=f"s-{t}") for t in range(2000)]
    send(producer, events[:1000])
    written = expected_windows(events[:1000])
    users = sorted(written)
    wait_for(lambda: all(r is not None and r.window == written[r.user_id] for r in store.get_many(users)), timeout_s=60, what="the first half stored")
    time.sleep(2.5)  # checkpoints (every 1 s) after the first half
    kill_then_send(job, producer, events[1000:])
    job.start(restore="")  # no state at all
    expected = expected_windows(events)
    wait_for(lambda: all(r is not None and r.window == expected[r.user_id] for r in store.get_many(users)), timeout_s=90,
             what="every window whole after a start without state")
    assert len(expected[users[0]]) == WINDOW  # full windows: an empty start would show
    assert job.metric("mindstream_stream_window_seeds_total", 'result="seeded"') >= len(users)


def test_the_job_writes_interests_to_a_redis_cluster(tmp_path, two_exports):
    with EmbeddedRedisCluster(tmp_path / "redis") as cluster, job_stack(tmp_path, two_exports, cluster, cluster=True) as running:
        rng = np.random.default_rng(5)
        events = [BehaviourEvent(f"c{rng.integers(40)}", f"i{rng.integers(60)}", "click", 5_000_000 + 100 * t) for t in range(600)]
        send(running["producer"], events)
        expected = expected_windows(events)
        users = sorted(expected)
        store = running["store"]
        wait_for(lambda: all(r is not None and r.window == expected[r.user_id] for r in store.get_many(users)), timeout_s=90,
                 what="every window in the cluster")
        assert all(redis.Redis(node.host, node.port).dbsize() > 0 for node in cluster.nodes)  # the users' keys are spread


GATEWAY_STDERR_JOB = """
import os, site, sys
from pyflink.common import Configuration, Types
from pyflink.datastream import StreamExecutionEnvironment
from pyflink.datastream.functions import MapFunction
from streaming.job import forward_gateway_stderr

class Noisy(MapFunction):
    def map(self, value):
        sys.stderr.write(f"warning {value} " + "x" * 1000 + "\\n")  # as the job's retry warnings do, in the JVM's interpreter
        sys.stderr.flush()
        return value

os.environ["_python_worker_execution_mode"] = "process"
forward_gateway_stderr()
config = Configuration()
config.set_string("python.execution-mode", "thread")
config.set_string("python.executable", sys.executable)
config.set_string("python.pythonpath", os.pathsep.join([*site.getsitepackages(), sys.argv[1]]))
env = StreamExecutionEnvironment.get_execution_environment(config)
env.set_parallelism(1)
env.from_collection(list(range(300)), type_info=Types.INT()).map(Noisy(), output_type=Types.INT()).print()
env.execute("noisy")
"""


def test_the_jobs_python_writes_to_stderr_never_stall_it(tmp_path):
    """PyFlink keeps its JVM's stderr as a pipe it never reads; the thread-mode Python code writes
    there: without the forwarding, 300 KB stalled the job for good after ~64 KB."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "noisy_job.py"
    script.write_text(GATEWAY_STDERR_JOB)
    done = subprocess.run([sys.executable, str(script), str(REPO)], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sum(line.startswith("warning ") for line in done.stderr.splitlines()) == 300
