"""A refresh while requests and events flow, on the real components: the noida broker, the PyFlink
job, Redis, Milvus Lite (served over gRPC, shared by the processes), the recall service, and
`python -m model_export retrain --schedule` as its own process.

Asserted: the retraining reads the events of its own consumer group and publishes a new version
with the item first seen in the stream; no request fails; every response names a version that
existed; the responses of "quiet" users (no events during the refresh, so their stored interests
change only by the backfill) are consistent with their version: every score is the inner product
of that version's interest and that version's item vector (a response mixing versions fails
this); the old version is retired once nothing refers to it; the new item is retrievable.
"""

import json
import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest

from infra.broker import EmbeddedBroker, ensure_topics
from infra.config import load_config
from infra.job_process import StreamingJobProcess
from infra.milvus_server import MilvusLiteServer
from infra.redis_server import EmbeddedRedis, free_port
from model_export.artifact import ModelArtifact
from model_export.manifest import Manifest
from model_export.publish import connect, publish_version
from model_export.registry import ModelRegistry
from recall_service.server import RecallServer
from recall_service.stubs import recall_pb2, recall_pb2_grpc
from streaming.events import BehaviourEvent
from streaming.feature_store import RedisFeatureStore
from streaming.producer import EventProducer

from conftest import REPO, synthetic_interactions, wait_for

CLUSTER0 = [f"i{i}" for i in range(15)]
STORED = recall_pb2.RECALL_PATH_STORED_INTERESTS


@pytest.fixture(scope="module")
def system(tmp_path_factory, two_exports):
    root = tmp_path_factory.mktemp("retrain")
    metrics_port = free_port()
    with EmbeddedBroker(root / "broker") as broker, EmbeddedRedis(root / "redis") as redis_server, MilvusLiteServer(root / "milvus") as milvus:
        env = {
            **os.environ,
            "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MINDSTREAM_REDIS__URI": redis_server.uri,
            "MINDSTREAM_MILVUS__URI": milvus.uri,
            "MINDSTREAM_PATHS__MODELS_DIR": str(root / "models"),
            "MINDSTREAM_PATHS__CACHE_DIR": str(root / "cache"),
            "MINDSTREAM_STREAMING__CHECKPOINT_DIR": str(root / "checkpoints"),
            "MINDSTREAM_STREAMING__MODEL_POLL_S": "0.5",
            "MINDSTREAM_STREAMING__METRICS_PORT": str(metrics_port),
            "MINDSTREAM_RETRAIN__STATE_DIR": str(root / "retrain"),
            "MINDSTREAM_RETRAIN__MIN_NEW_EVENTS": "200",
            "MINDSTREAM_RETRAIN__EPOCHS": "2",
            "MINDSTREAM_RETRAIN__BATCH_SIZE": "64",
            # The gate itself is covered by tests/test_retrain_core.py; this test is about the refresh.
            "MINDSTREAM_RETRAIN__TOLERANCE": "1.0",
            "MINDSTREAM_RECALL__PORT": "0",
            "MINDSTREAM_RECALL__METRICS_PORT": "0",
        }
        config = load_config(environ=env)
        ensure_topics(config.kafka, partitions=2, retention_ms=3_600_000)
        registry = ModelRegistry(config.paths.models_dir)
        client = connect(config.milvus.uri)
        publish_version(two_exports[0], registry, client, config.milvus.collection_prefix, progress=lambda m: None)
        job = StreamingJobProcess(env, root / "job.log", f"http://127.0.0.1:{metrics_port}/metrics").start()
        producer = EventProducer(config.kafka)
        store = RedisFeatureStore.from_config(config.redis)
        try:
            with RecallServer(config) as server:
                channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
                yield {"env": env, "config": config, "registry": registry, "client": client, "producer": producer, "store": store,
                       "stub": recall_pb2_grpc.RecallServiceStub(channel), "first": registry.current_version(), "first_export": two_exports[0]}
                channel.close()
        finally:
            producer.close()
            job.stop()


def test_a_refresh_under_load_fails_nothing_mixes_no_versions_and_serves_the_new_item(system):
    table = synthetic_interactions()
    users = sorted(table.user.unique(), key=lambda u: int(u[1:]))
    quiet, active = users[:40], users[40:]
    gender = {u: "MF"[int(u[1:]) % 2] for u in users}
    now = int(time.time() * 1000)
    clock = iter(range(now, now + 10**9))

    def send(user, item):
        system["producer"].send(BehaviourEvent(user, item, "click", next(clock), profile={"gender": gender[user]}))

    # Before the refresh: every user's history; active users who like cluster 0 also meet a new item.
    for user in users:
        for item in table[table.user == user].item.tolist()[-12:]:
            send(user, item)
    for user in active:
        history = set(table[table.user == user].item)
        if history & set(CLUSTER0):
            for item in (CLUSTER0[int(user[1:]) % 15], CLUSTER0[(int(user[1:]) + 5) % 15], "fresh"):
                send(user, item)
    system["producer"].flush()
    store = system["store"]
    wait_for(lambda: all(r is not None for r in store.get_many(users)), 90, "every user's interests in the store")
    first = system["first"]
    before = {r.user_id: r for r in store.get_many(quiet)}
    assert {r.model_version for r in before.values()} == {first}

    # During the refresh: events from the active users and recall requests from everyone.
    responses, failures, stop = [], [], threading.Event()

    def request_loop(seed):
        rng = np.random.default_rng(seed)
        while not stop.is_set():
            user = str(rng.choice(users))
            try:
                responses.append((user, system["stub"].Recall(recall_pb2.RecallRequest(user_id=user, n=10), timeout=5)))
            except grpc.RpcError as exc:
                failures.append((user, exc.code(), exc.details()))
            time.sleep(0.02)

    def event_loop():
        rng = np.random.default_rng(7)
        while not stop.is_set():
            send(str(rng.choice(active)), f"i{rng.integers(60)}")
            time.sleep(0.02)

    threads = [threading.Thread(target=request_loop, args=(s,)) for s in range(2)] + [threading.Thread(target=event_loop)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        # The scheduled mode, as an operator runs it, stopped after its first retraining.
        retrain = subprocess.run([sys.executable, "-m", "model_export", "retrain", "--schedule", "--runs", "1", "--poll", "0.5", "--quiet"],
                                 cwd=REPO, env={**system["env"], "MINDSTREAM_RETRAIN__EVERY_EVENTS": "200", "MINDSTREAM_RETRAIN__KEEP_PREVIOUS": "0"},
                                 capture_output=True, text=True, timeout=600)
        assert retrain.returncode == 0, retrain.stderr[-3000:]
        report = json.loads(retrain.stdout)
        second = report["model_version"]
        wait_for(lambda: any(r.model_version == second for _, r in responses[-20:]), 30, "responses of the new version")
        time.sleep(2)
    finally:
        stop.set()
        for t in threads:
            t.join()

    assert report["status"] == "published" and report["parent"] == first and report["new_items"] >= 1
    assert report["offsets"] and sum(report["offsets"].values()) >= report["events_read"] > 0
    assert failures == []
    versions = {r.model_version for _, r in responses}
    assert versions <= {first, second} and second in versions
    assert first in report["retired"] and set(report["stored_versions"]) == {second}
    assert not system["client"].has_collection(f"{system['config'].milvus.collection_prefix}_{first.replace('-', '_')}")

    # Quiet users: a response of version v = v's interests against v's item vectors, never a mix.
    after = {r.user_id: r for r in store.get_many(quiet)}
    assert {r.model_version for r in after.values()} == {second}
    interests = {first: {u: r.interests for u, r in before.items()}, second: {u: r.interests for u, r in after.items()}}
    # (the first version is retired from the stack's registry by now; its export is still the test's)
    artifacts = {first: ModelArtifact.load(system["first_export"]), second: ModelArtifact.load(system["registry"].path(second))}
    vectors = {v: a.item_vectors() for v, a in artifacts.items()}
    index = {v: a.item_index for v, a in artifacts.items()}
    checked = 0
    for user, response in responses:
        if user not in before or response.path != STORED:
            continue
        v = response.model_version
        for item in response.items:
            expected = float(interests[v][user][item.interest_index] @ vectors[v][index[v][item.item_id] - 1])
            assert abs(expected - item.score) < 1e-3, (user, v, item.item_id)
        checked += 1
    assert checked > 20

    # The item first seen in the stream is in the new version's catalog and is recalled like the cluster-0
    # items it was met with: for a cluster-0 history, above every item of the other clusters. (Measured:
    # 12th of 57, after the 11 cluster-0 items not in the history; with a fine-tuning at lr 0, items of other
    # clusters come before it, 16th, and with a random vector too, 45th.)
    assert "fresh" in index[second]
    found = system["stub"].Recall(recall_pb2.RecallRequest(user_id="someone-new", n=15, recent_item_ids=CLUSTER0[:4]), timeout=10)
    ranked = [i.item_id for i in found.items]
    assert found.model_version == second and "fresh" in ranked, ranked
    assert set(ranked[:ranked.index("fresh")]) <= set(CLUSTER0), ranked



def test_retraining_without_publishing_exports_a_candidate_and_leaves_the_current_version(system):
    current = system["registry"].current_version()
    now = int(time.time() * 1000)
    for t in range(250):  # past min_new_events (200)
        system["producer"].send(BehaviourEvent(f"u{t % 60}", f"i{(7 * t) % 60}", "click", now + t))
    system["producer"].flush()
    retrain = subprocess.run([sys.executable, "-m", "model_export", "retrain", "--no-publish", "--quiet"], cwd=REPO, env=system["env"],
                             capture_output=True, text=True, timeout=600)
    assert retrain.returncode == 0, retrain.stderr[-3000:]
    report = json.loads(retrain.stdout)
    assert report["status"] == "trained" and report["parent"] == current and report["new_events"] >= 250
    candidate = Manifest.load(report["export_dir"])
    assert candidate.extra["retrain"]["parent"] == current  # judged and exported, with its lineage
    assert system["registry"].current_version() == current and candidate.model_version not in system["registry"].versions()
