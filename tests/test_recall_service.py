"""The recall service end to end: real Redis (EmbeddedRedis), Milvus Lite (a file), the model
registry with two published versions, the gRPC server in this process and real gRPC clients
(Python, and Node through the .proto file)."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.config import RedisConfig
from infra.redis_server import EmbeddedRedis, free_port
from model_export.artifact import ModelArtifact, UserTower
from recall_service.served_log import LAG_S
from recall_service.server import RecallServer
from recall_service.stubs import PROTO_ROOT, SERVICE_NAME, recall_pb2, recall_pb2_grpc
from streaming.feature_store import RedisFeatureStore

from conftest import REPO, self_signed_certificate, wait_for
from model_export.publish import collection_name
from recall_stack import ON_THE_FLY, POPULAR, PREFIX, STORED, WINDOW, service_config

# `stack` (tests/conftest.py, built by tests/recall_stack.py): the server on real Redis and Milvus Lite.


def exact_merge(artifact: ModelArtifact, interests: np.ndarray, n: int, excluded, keep=None):
    """The reference: every catalog item at its best inner product over the interests, excluded
    items dropped, top n (what a FLAT index and the papers' merge must return)."""
    scores = interests @ artifact.item_vectors().T
    best = scores.max(axis=0)
    rows = [i for i in np.argsort(-best, kind="stable") if artifact.raw_items[i] not in excluded
            and (keep is None or keep("|".join(artifact.item_side[i])))][:n]
    return [artifact.raw_items[i] for i in rows], best[rows], [int(scores[:, i].argmax()) for i in rows]


def assert_same(response, expected):
    ids, scores, interests = expected
    assert [i.item_id for i in response.items] == ids
    np.testing.assert_allclose([i.score for i in response.items], scores, rtol=1e-4, atol=1e-5)
    assert [i.interest_index for i in response.items] == interests


def stored_interests(stack, user):
    return stack.store.get_many([user])[0].interests


def test_stored_path_equals_the_exact_merge_in_the_records_version(stack):
    for user, version in (("user-new", stack.new), ("user-old", stack.old)):
        response = stack.recall(user_id=user, n=12, exclude_item_ids=["i5", "i20"])
        assert response.path == STORED and response.model_version == version
        assert response.fallback_reason == recall_pb2.FALLBACK_REASON_UNSPECIFIED
        assert_same(response, exact_merge(stack.artifacts[version], stored_interests(stack, user), 12, {"i5", "i20", *WINDOW}))


def test_raw_ids_read_from_the_registrys_vocabulary_equal_those_milvus_stores(stack):
    """The service asks Milvus for ids and scores only and reads raw ids from the version's
    vocabulary: for both published versions that gives what the collection's raw_id field holds,
    and the request it sends names no output field."""
    from model_export.registry import ModelRegistry
    from recall_service.backends import MilvusItemSearch, RegistryVocabularies

    vocabularies = RegistryVocabularies(ModelRegistry(stack.config.paths.models_dir))
    with_vocabulary = MilvusItemSearch(stack.config.milvus.uri, prefix=PREFIX, vocabularies=vocabularies)
    from_milvus = MilvusItemSearch(stack.config.milvus.uri, prefix=PREFIX)
    sent = []  # the requests with_vocabulary's searches send
    build = with_vocabulary._request
    with_vocabulary._request = lambda *args: sent.append(build(*args)) or sent[-1]
    for version in (stack.old, stack.new):
        vectors = stack.artifacts[version].item_vectors()[[0, 7, 20]]
        for search in (with_vocabulary, from_milvus):
            search.connect()
        expected = from_milvus.search(version, vectors, 15, "", 10.0)
        assert (expected.raw_ids != "").all()
        assert with_vocabulary.search(version, vectors, 15, "", 10.0).raw_ids.tolist() == expected.raw_ids.tolist()  # before it is read: from Milvus
        assert list(sent[-1].output_fields) == ["raw_id"]
        wait_for(lambda: vocabularies.raw_ids(version) is not None, 30, f"the vocabulary of {version}")
        read = with_vocabulary.search(version, vectors, 15, "", 10.0)
        assert read.raw_ids.tolist() == expected.raw_ids.tolist() and read.item_ids.tolist() == expected.item_ids.tolist()
        assert not sent[-1].output_fields  # ids and scores only
    # the service's own search reads them too once it has served a user of each version
    for user in ("user-old", "user-new"):
        stack.recall(user_id=user, n=3)
    wait_for(lambda: all(stack.server.search.vocabularies.raw_ids(v) is not None for v in (stack.old, stack.new)), 30, "the service's vocabularies")


def test_what_the_user_has_seen_beyond_the_window_is_left_out(stack):
    """The job's seen set (written here as the job writes it) in the real Redis: the service reads
    it with the record and answers the exact top n of the rest; a key of another Redis type under
    the seen set's name only loses the set (not the record, not the service)."""
    seen_store = RedisFeatureStore.from_config(stack.config.redis, seen_items=stack.config.streaming.seen_items)
    before = [i.item_id for i in stack.recall(user_id="user-new", n=12).items]
    seen = before[:5]
    seen_store.put_many([], seen={"user-new": [(1_000 + t, item) for t, item in enumerate(seen)]})
    try:
        response = stack.recall(user_id="user-new", n=12)
        assert response.path == STORED and not {i.item_id for i in response.items} & set(seen)
        assert_same(response, exact_merge(stack.artifacts[stack.new], stored_interests(stack, "user-new"), 12, {*seen, *WINDOW}))
        seen_store.client.delete(seen_store.seen_key("user-new"))
        seen_store.client.set(seen_store.seen_key("user-new"), "not a set")
        assert [i.item_id for i in stack.recall(user_id="user-new", n=12).items] == before
    finally:
        seen_store.client.delete(seen_store.seen_key("user-new"))
    assert [i.item_id for i in stack.recall(user_id="user-new", n=12).items] == before
    # a user with a seen set and no record (a window of items no model knew): left out of the fallback too
    popular = [i.item_id for i in stack.recall(user_id="seen-only", n=8).items]
    seen_store.put_many([], seen={"seen-only": [(1_000, popular[0]), (1_001, popular[3])]})
    try:
        response = stack.recall(user_id="seen-only", n=8)
        assert response.path == POPULAR and [i.item_id for i in response.items][:6] == [popular[1], popular[2], *popular[4:8]]
    finally:
        seen_store.client.delete(seen_store.seen_key("seen-only"))


def test_every_answer_is_kept_in_the_served_log_as_the_client_got_it(stack):
    """What the online hit rate is judged against (recall_service/online_quality.py): per user the
    newest answers, by any path, with their version, path, time and items in order."""
    from recall_service.served_log import RedisServedLog

    log = RedisServedLog.for_config(stack.config)
    before = int(time.time() * 1000)
    answers = {"user-new": stack.recall(user_id="user-new", n=7),
               "walk-in": stack.recall(user_id="walk-in", n=5, recent_item_ids=["i1", "i2"]),
               "nobody-known": stack.recall(user_id="nobody-known", n=4)}
    batch = stack.stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id="user-old", n=3)]), timeout=10)
    answers["user-old"] = batch.responses[0]
    after = int(time.time() * 1000)
    assert [answers[u].path for u in ("user-new", "walk-in", "nobody-known", "user-old")] == [STORED, ON_THE_FLY, POPULAR, STORED]
    assert stack.server.served_log.flush(timeout_s=10)
    records = dict(zip(answers, log.get_many(list(answers))))
    for user, response in answers.items():
        record = records[user][0]  # the newest (earlier tests served some of these users too)
        assert record.items == tuple(i.item_id for i in response.items) and record.model_version == response.model_version, user
        assert record.path == recall_pb2.RecallPath.Name(response.path).removeprefix("RECALL_PATH_").lower(), user
        assert before <= record.served_ms <= after
    assert stack.config.recall.served_log_ttl_s < stack.store.client.ttl(log.key("user-new")) <= stack.config.recall.served_log_ttl_s + LAG_S


def test_a_record_of_the_old_version_is_answered_from_its_own_collection(stack):
    """The alias and CURRENT point at the new version; the old record must not be searched there."""
    response = stack.recall(user_id="user-old", n=10)
    interests = stored_interests(stack, "user-old")
    assert response.model_version == stack.old
    assert_same(response, exact_merge(stack.artifacts[stack.old], interests, 10, set(WINDOW)))
    wrong = exact_merge(stack.artifacts[stack.new], interests, 10, set(WINDOW))
    assert [i.item_id for i in response.items] != wrong[0]


def test_filter_is_applied_by_milvus_like_the_reference_predicate(stack):
    response = stack.recall(user_id="user-new", n=8, filter='category like "item_genre=g1%" and active == true')
    assert response.items and all(i.item_id for i in response.items)
    expected = exact_merge(stack.artifacts[stack.new], stored_interests(stack, "user-new"), 8, set(WINDOW), keep=lambda c: c.startswith("item_genre=g1"))
    assert_same(response, expected)


def test_contains_filter_tests_one_category_token_in_milvus_like_the_reference(stack):
    response = stack.recall(user_id="user-new", n=8, filter='category contains "item_genre=g2"')
    expected = exact_merge(stack.artifacts[stack.new], stored_interests(stack, "user-new"), 8, set(WINDOW),
                           keep=lambda c: "item_genre=g2" in c.split("|"))
    assert_same(response, expected)


def test_deactivated_items_leave_every_path_at_once_and_come_back(stack):
    """`model_export items` in two steps: the registry's set alone takes the items out of every
    answer (the service re-reads it), then the Milvus flag lets the search fill the places."""
    from model_export.publish import connect, published_collections, set_active
    from model_export.registry import ModelRegistry

    registry, client = ModelRegistry(stack.config.paths.models_dir), connect(stack.config.milvus.uri)
    artifact, interests = stack.artifacts[stack.new], stored_interests(stack, "user-new")
    before_stored = stack.recall(user_id="user-new", n=10)
    before_popular = stack.recall(user_id="stranger", n=5)
    gone = {i.item_id for i in before_stored.items[:3]} | {i.item_id for i in before_popular.items[:2]}
    try:
        registry.set_active(gone, False)
        wait_for(lambda: not gone & {i.item_id for i in stack.recall(user_id="user-new", n=10).items}, 10, "the service to read the inactive set")
        # the search still returns them (their rows are active in Milvus): dropped after it, so the
        # answer is the exact one without them, cut where the search's margin ran out
        stored = [i.item_id for i in stack.recall(user_id="user-new", n=10).items]
        assert len(stored) >= 7 and stored == exact_merge(artifact, interests, 10, set(WINDOW) | gone)[0][:len(stored)]
        popular = stack.recall(user_id="stranger", n=5)
        assert popular.path == POPULAR and not gone & {i.item_id for i in popular.items} and len(popular.items) == 5

        changed = set_active(client, published_collections(client, PREFIX, registry.versions()), gone, False)
        assert changed == {collection_name(PREFIX, v): sum(r in gone for r in stack.artifacts[v].raw_items) for v in (stack.old, stack.new)}
        assert_same(wait_for(lambda: (r := stack.recall(user_id="user-new", n=10)) and len(r.items) == 10 and r, 10, "a full answer"),
                    exact_merge(artifact, interests, 10, set(WINDOW) | gone))
        fly = stack.recall(user_id="newcomer", n=10, recent_item_ids=list(WINDOW))
        assert fly.path == ON_THE_FLY and len(fly.items) == 10 and not gone & {i.item_id for i in fly.items}
        metrics_url = f"http://127.0.0.1:{stack.server.metrics_port}/metrics"
        wait_for(lambda: f"mindstream_recall_inactive_items {float(len(gone))}" in urllib.request.urlopen(metrics_url, timeout=5).read().decode(),
                 10, "the inactive-items gauge")
    finally:
        registry.set_active(gone, True)
        set_active(client, published_collections(client, PREFIX, registry.versions()), gone, True)
    wait_for(lambda: [i.item_id for i in stack.recall(user_id="user-new", n=10).items] == [i.item_id for i in before_stored.items], 10, "the items back")


def test_quota_policy_spreads_the_result_over_the_interests(stack):
    k = len(stored_interests(stack, "user-new"))
    response = stack.recall(user_id="user-new", n=2 * k, merge_policy=recall_pb2.MERGE_POLICY_QUOTA)
    assert len(response.items) == 2 * k and len({i.item_id for i in response.items}) == 2 * k
    assert sorted(i.interest_index for i in response.items) == sorted(list(range(k)) * 2)
    assert not set(WINDOW) & {i.item_id for i in response.items}


def test_unknown_user_with_recent_items_gets_interests_on_the_fly_from_the_current_model(stack):
    recent = ["i40", "i41", "i45", "i50", "i52"]
    response = stack.recall(user_id="newcomer", n=10, recent_item_ids=recent)
    assert response.path == ON_THE_FLY and response.model_version == stack.new
    assert response.fallback_reason == recall_pb2.FALLBACK_REASON_UNKNOWN_USER
    interests = UserTower(stack.artifacts[stack.new], prefer_gpu=False).interests([recent])[0]
    assert_same(response, exact_merge(stack.artifacts[stack.new], interests, 10, set(recent)))


def test_unknown_user_without_known_items_gets_popular_items_with_exclusions_and_filter(stack):
    artifact = stack.artifacts[stack.new]
    response = stack.recall(user_id="stranger", n=5, exclude_item_ids=[artifact.raw_items[int(np.argmax(artifact.popularity))]],
                            recent_item_ids=["never-seen"], filter='category like "item_genre=g2%"')
    assert response.path == POPULAR and response.fallback_reason == recall_pb2.FALLBACK_REASON_NO_KNOWN_RECENT_ITEMS
    order = [i for i in np.argsort(-artifact.popularity, kind="stable") if "|".join(artifact.item_side[i]).startswith("item_genre=g2")]
    expected = [artifact.raw_items[i] for i in order if i != int(np.argmax(artifact.popularity))][:5]
    assert [i.item_id for i in response.items] == expected
    assert all(i.interest_index == -1 for i in response.items)
    assert [i.score for i in response.items] == [float(artifact.popularity[artifact.item_index[r] - 1]) for r in expected]


def test_batch_recall_answers_each_request_like_recall(stack):
    requests = [recall_pb2.RecallRequest(user_id="user-old", n=5), recall_pb2.RecallRequest(user_id="user-new", n=7, exclude_item_ids=["i9"]),
                recall_pb2.RecallRequest(user_id="nobody", n=3, recent_item_ids=["i7", "i8"]), recall_pb2.RecallRequest(user_id="nobody", n=4)]
    batch = stack.stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=requests), timeout=10)
    assert [r.path for r in batch.responses] == [STORED, STORED, ON_THE_FLY, POPULAR]
    for request, response in zip(requests, batch.responses):
        single = stack.stub.Recall(request, timeout=10)
        assert [i.item_id for i in response.items] == [i.item_id for i in single.items]
        assert response.model_version == single.model_version


@pytest.mark.parametrize("fields, message", [
    ({"n": 0}, "n: 0 is out of range"),
    ({"n": 1001}, "ask for 1..1000"),
    ({"n": 5, "filter": "category ="}, "filter: unexpected character '='"),
    ({"n": 5, "filter": 'category like "%g1%"'}, "prefix pattern"),
    ({"n": 5, "exclude_item_ids": [f"x{i}" for i in range(5001)]}, "exclude_item_ids: 5001 ids, at most 5000"),
    ({"n": 5, "merge_policy": 7}, "merge_policy: unknown value 7"),
    ({"n": 5, "per_interest_n": 100_000}, "per_interest_n"),
    ({"n": 5, "exclude_item_ids": ["x" * 250] * 4500}, "bytes, at most 1048576"),
])
def test_bad_input_is_invalid_argument_with_a_message(stack, fields, message):
    with pytest.raises(grpc.RpcError) as error:
        stack.recall(user_id="user-new", **fields)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.value.details()


def test_a_batch_names_the_bad_request_and_is_bounded(stack):
    requests = [recall_pb2.RecallRequest(user_id="a", n=1), recall_pb2.RecallRequest(user_id="b", n=-1)]
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=requests), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and error.value.details().startswith("requests[1].n:")
    with pytest.raises(grpc.RpcError) as error:
        stack.stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id="a", n=1)] * 65), timeout=10)
    assert "at most 64" in error.value.details()


def test_health_reflection_and_metrics(stack):
    health_stub = health_pb2_grpc.HealthStub(stack.channel)
    for service in ("", SERVICE_NAME):
        assert health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == health_pb2.HealthCheckResponse.SERVING

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    reflected = ProtoReflectionDescriptorDatabase(stack.channel)
    assert SERVICE_NAME in reflected.get_services()
    assert reflected.FindFileContainingSymbol(SERVICE_NAME).name == "mindstream/recall/v1/recall.proto"

    def scraped() -> dict[str, float]:  # the exposition the service serves, by sample
        text = urllib.request.urlopen(f"http://127.0.0.1:{stack.server.metrics_port}/metrics", timeout=5).read().decode()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}

    ok = 'mindstream_recall_requests_total{code="OK",method="Recall"}'
    invalid = 'mindstream_recall_requests_total{code="INVALID_ARGUMENT",method="Recall"}'
    timed = 'mindstream_recall_latency_seconds_count{code="OK",path="stored_interests",stage="total"}'
    before = scraped()  # the module's earlier tests have counted requests on this server already
    stack.recall(user_id="user-new", n=3)
    with pytest.raises(grpc.RpcError):
        stack.recall(user_id="user-new", n=0)
    after = scraped()
    for sample, added in ((ok, 1), (invalid, 1), (timed, 1)):
        assert after[sample] - before.get(sample, 0.0) == added, sample
    assert f'mindstream_recall_model_info{{model_version="{stack.new}"}}' in after
    assert any(name.startswith("mindstream_recall_result_items_bucket") for name in after)
    assert not any('code="INVALID_ARGUMENT",path="none"' in name for name in after)  # a client's mistake is counted, not timed


def test_a_stopped_server_closes_the_connections_it_opened(stack):
    import redis

    from recall_service.server import RecallServer

    clients = redis.Redis.from_url(stack.config.redis.uri)
    before = len(clients.client_list())
    server = RecallServer(stack.config, search=stack.server.search).start()  # its own feature-store reader
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        recall_pb2_grpc.RecallServiceStub(channel).Recall(recall_pb2.RecallRequest(user_id="user-new", n=3), timeout=10)
        assert len(clients.client_list()) > before
    finally:
        channel.close()
        server.stop(grace_s=0)
    wait_for(lambda: len(clients.client_list()) == before, 10, "the server's Redis connections closed")


def test_redis_down_falls_back_fast_or_is_unavailable_when_configured(stack):
    with EmbeddedRedis(stack.root / "redis-down") as redis_server:
        store = RedisFeatureStore.from_config(RedisConfig(uri=redis_server.uri))
        store.put_many([stack.store.get_many(["user-new"])[0]])
        for fallback in (True, False):
            config = service_config(stack.root, redis_server.uri, stack.config.milvus.uri, fallback_on_outage=fallback)
            server = RecallServer(config, search=stack.server.search, models=stack.server.models).start()
            try:
                stub = recall_pb2_grpc.RecallServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
                request = recall_pb2.RecallRequest(user_id="user-new", n=5, recent_item_ids=["i3", "i4"])
                if fallback:
                    assert stub.Recall(request, timeout=5).path == STORED
                    redis_server.stop()
                # the first call meets the dead socket, the next ones the open breaker; the deadline
                # bounds each, so a call that waited on the store would fail DEADLINE_EXCEEDED
                for _ in range(3):
                    if fallback:
                        response = stub.Recall(request, timeout=2)
                        assert response.path == ON_THE_FLY and response.fallback_reason == recall_pb2.FALLBACK_REASON_FEATURE_STORE_UNAVAILABLE
                    else:
                        with pytest.raises(grpc.RpcError) as error:
                            stub.Recall(request, timeout=2)
                        assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "feature store" in error.value.details()
                assert not server.probe()  # health: NOT_SERVING
            finally:
                server.stop()


def test_milvus_down_serves_popular_items_at_once(stack):
    config = service_config(stack.root, stack.config.redis.uri, f"http://127.0.0.1:{free_port()}")
    server = RecallServer(config, models=stack.server.models)
    server.search.connect_timeout_s = 0.3
    server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
        response = recall_pb2_grpc.RecallServiceStub(channel).Recall(recall_pb2.RecallRequest(user_id="user-new", n=4), timeout=2)
        assert response.path == POPULAR and response.fallback_reason == recall_pb2.FALLBACK_REASON_VECTOR_SEARCH_UNAVAILABLE
        assert not set(WINDOW) & {i.item_id for i in response.items}
    finally:
        server.stop()


def test_a_released_collection_is_loaded_in_the_background(stack):
    """Milvus Lite forgets what was loaded when its process restarts: the first request falls back,
    the collection loads behind it, later requests are served from the stored interests again."""
    stack.server.search.connect().release_collection(stack.server.search.collection(stack.old))
    first = stack.recall(user_id="user-old", n=3)
    assert first.path == POPULAR and first.fallback_reason == recall_pb2.FALLBACK_REASON_VECTOR_SEARCH_UNAVAILABLE
    deadline = time.monotonic() + 30
    while stack.recall(user_id="user-old", n=3).path != STORED:
        assert time.monotonic() < deadline, "the collection was not loaded again"
        time.sleep(0.1)


class SlowSearch:
    def __init__(self, inner, delay_s):
        self.inner, self.delay_s, self.timeouts = inner, delay_s, []

    def search(self, version, vectors, limit, expr, timeout_s):
        self.timeouts.append(timeout_s)
        time.sleep(min(self.delay_s, timeout_s))
        return self.inner.search(version, vectors, limit, expr, timeout_s)

    def ping(self):
        self.inner.ping()


def test_the_client_deadline_bounds_the_work(stack):
    slow = SlowSearch(stack.server.search, delay_s=1.0)
    server = RecallServer(stack.config, reader=stack.server.reader, search=slow, models=stack.server.models).start()
    try:
        stub = recall_pb2_grpc.RecallServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
        with pytest.raises(grpc.RpcError) as error:
            stub.Recall(recall_pb2.RecallRequest(user_id="user-new", n=5), timeout=0.2)
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The search got the remaining budget, not its own 0.5 s cap. (The server's time_remaining()
        # can exceed the client's 0.2 s timeout slightly: 0.20009 s in a CI run.)
        assert slow.timeouts and slow.timeouts[0] <= 0.21
    finally:
        server.stop()


def test_bearer_token_and_tls(stack, tmp_path):
    cert, key = self_signed_certificate(tmp_path)
    config = dataclasses.replace(stack.config, recall=dataclasses.replace(stack.config.recall, auth_token="s3cret", tls_certfile=str(cert), tls_keyfile=str(key)))
    server = RecallServer(config, reader=stack.server.reader, search=stack.server.search, models=stack.server.models).start()
    try:
        channel = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(cert.read_bytes()))
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        request = recall_pb2.RecallRequest(user_id="user-new", n=3)
        for metadata in ([], [("authorization", "Bearer wrong")], [("authorization", "s3cret")], [("authorization", "bearer s3cret")]):
            with pytest.raises(grpc.RpcError) as error:
                stub.Recall(request, timeout=5, metadata=metadata)
            assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and "token" in error.value.details()
        with pytest.raises(grpc.RpcError) as error:
            stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=[request]), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert server.metrics.requests.labels("Recall", "UNAUTHENTICATED")._value.get() == 4
        assert stub.Recall(request, timeout=5, metadata=[("authorization", "Bearer s3cret")]).path == STORED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)  # probes need no token
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as error:  # plaintext is refused by a TLS port
            recall_pb2_grpc.RecallServiceStub(grpc.insecure_channel(f"localhost:{server.port}")).Recall(request, timeout=2)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        other_ca, _ = self_signed_certificate(tmp_path, "impostor")  # the handshake verifies the server's certificate
        impostor_trusting = grpc.secure_channel(f"localhost:{server.port}", grpc.ssl_channel_credentials(other_ca.read_bytes()))
        with pytest.raises(grpc.RpcError) as error:
            recall_pb2_grpc.RecallServiceStub(impostor_trusting).Recall(request, timeout=2, metadata=[("authorization", "Bearer s3cret")])
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE

        # the command line client, with the flags a user passes to reach such a server
        def command(*flags):
            return subprocess.run([sys.executable, "-m", "recall_service", "recall", "--user-id", "user-new", "--n", "3",
                                   "--target", f"localhost:{server.port}", "--tls-ca", str(cert), *flags],
                                  cwd=REPO, env={**os.environ, "MINDSTREAM_CONFIG": ""}, capture_output=True, text=True, timeout=60)

        answered = command("--token", "s3cret")
        assert answered.returncode == 0, answered.stderr
        printed = json.loads(answered.stdout)
        assert printed["path"] == "RECALL_PATH_STORED_INTERESTS" and len(printed["items"]) == 3
        refused = command()
        assert refused.returncode == 1 and refused.stderr.startswith("error: UNAUTHENTICATED")

        if shutil.which("node") and shutil.which("npm"):  # the Node client, with the same settings by their variables
            subprocess.run([str(REPO / "recall_service" / "clients" / "node" / "install.sh")], check=True, capture_output=True, timeout=300)

            def node(**variables) -> subprocess.CompletedProcess:
                return subprocess.run(["node", str(REPO / "recall_service" / "clients" / "node" / "recall.js"), f"localhost:{server.port}",
                                       str(PROTO_ROOT), json.dumps({"user_id": "user-new", "n": 3})],
                                      env={**os.environ, "MINDSTREAM_RECALL__TLS_CAFILE": str(cert), **variables}, capture_output=True, text=True, timeout=60)

            answered = node(MINDSTREAM_RECALL__AUTH_TOKEN="s3cret")
            assert answered.returncode == 0 and len(json.loads(answered.stdout)["items"]) == 3, answered.stderr
            refused = node()
            assert refused.returncode == 1 and json.loads(refused.stdout)["code"] == grpc.StatusCode.UNAUTHENTICATED.value[0]
    finally:
        server.stop()


@pytest.fixture(scope="module")
def node_client() -> Path:
    """recall.js, its pinned packages installed (install.sh, once); skipped where node and npm are not."""
    if not (shutil.which("node") and shutil.which("npm")):
        pytest.skip("node and npm are not installed: the Node client test needs them")
    client_dir = REPO / "recall_service" / "clients" / "node"
    subprocess.run([str(client_dir / "install.sh")], check=True, capture_output=True, timeout=300)
    return client_dir / "recall.js"


def test_recall_from_node_through_the_proto_file(stack, node_client):
    env = {k: v for k, v in os.environ.items() if k != "NODE_PATH"}  # the client finds install.sh's packages itself

    def node(request: dict) -> tuple[int, dict]:
        done = subprocess.run(["node", str(node_client), f"127.0.0.1:{stack.server.port}", str(PROTO_ROOT), json.dumps(request)],
                              capture_output=True, text=True, env=env, timeout=60)
        return done.returncode, json.loads(done.stdout)

    status, answer = node({"user_id": "user-old", "n": 6, "exclude_item_ids": ["i5"], "merge_policy": "MERGE_POLICY_QUOTA"})
    python = stack.recall(user_id="user-old", n=6, exclude_item_ids=["i5"], merge_policy=recall_pb2.MERGE_POLICY_QUOTA)
    assert status == 0 and answer["path"] == "RECALL_PATH_STORED_INTERESTS" and answer["model_version"] == stack.old
    assert [i["item_id"] for i in answer["items"]] == [i.item_id for i in python.items]
    assert [i["interest_index"] for i in answer["items"]] == [i.interest_index for i in python.items]
    status, answer = node({"user_id": "user-old", "n": 0})
    assert status == 1 and answer["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "n: 0" in answer["details"]


def test_node_client_gives_up_at_its_deadline(node_client):
    """The Node client waited a fixed 10 s for any server: TIMEOUT_S (default 2 s, as the Python client's
    --timeout) is its deadline, here against a socket that accepts and never answers; a bad TIMEOUT_S is usage."""
    env = {k: v for k, v in os.environ.items() if k != "NODE_PATH"}
    with socket.create_server(("127.0.0.1", 0)) as silent:
        def node(*timeout: str) -> tuple[subprocess.CompletedProcess, float]:
            started = time.monotonic()
            done = subprocess.run(["node", str(node_client), f"127.0.0.1:{silent.getsockname()[1]}", str(PROTO_ROOT),
                                   '{"user_id": "u1"}', *timeout], capture_output=True, text=True, env=env, timeout=60)
            return done, time.monotonic() - started

        done, took = node("0.5")
        assert done.returncode == 1 and json.loads(done.stdout)["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and took < 5
        done, took = node()
        assert done.returncode == 1 and json.loads(done.stdout)["code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and took < 8
        for bad in ("0", "soon"):
            done, _ = node(bad)
            assert done.returncode == 2 and "TIMEOUT_S must be a number of seconds above 0" in done.stderr


# -- the server's own accounting, on in-memory backends (no Redis, Milvus or exports) --------------


class GatedSearch:
    """FakeSearch behind a gate: a call waits until `gate` is set (then searches), or until its timeout (then, as
    Milvus' client, raises DeadlineExceeded)."""

    def __init__(self, catalogs):
        from test_recall_logic import FakeSearch

        self.inner, self.entered, self.gate = FakeSearch(catalogs), threading.Semaphore(0), threading.Event()

    def search(self, version, vectors, limit, expr, timeout_s):
        from recall_service.recaller import DeadlineExceeded

        self.entered.release()
        if not self.gate.wait(timeout_s):
            raise DeadlineExceeded(f"no answer within {timeout_s * 1e3:.0f} ms")
        return self.inner.search(version, vectors, limit, expr, timeout_s)

    def ping(self):
        pass


@pytest.fixture
def in_memory_server(tmp_path):
    """A RecallServer on fakes (tests/test_recall_logic.py): alice stored in version A; search held by a gate."""
    from recall_service.recaller import EveryItemActive
    from streaming.feature_store import InMemoryFeatureStore, InterestRecord
    from test_recall_logic import DIM, FakeModel, FakeModels

    rng = np.random.default_rng(0)
    catalogs = {v: rng.standard_normal((40, DIM)).astype(np.float32) for v in "AB"}
    store = InMemoryFeatureStore()
    store.put_many([InterestRecord("alice", "A", rng.standard_normal((2, DIM)).astype(np.float32), (), 0, "0:0")])
    store.ping = lambda: None
    search = GatedSearch(catalogs)
    servers = []

    def start(served_log=None, **recall):
        config = service_config(tmp_path, "redis://127.0.0.1:1/0", str(tmp_path / "unused.db"), search_batch_vectors=0, **recall)
        server = RecallServer(config, reader=store, search=search, models=FakeModels(FakeModel("B", catalogs["B"])),
                              availability=EveryItemActive(), served_log=served_log).start()
        servers.append(server)
        return server, recall_pb2_grpc.RecallServiceStub(grpc.insecure_channel(f"127.0.0.1:{server.port}")), search

    yield start
    for server in servers:
        server.search.gate.set()
        server.stop(grace_s=0)


def test_the_largest_batch_answer_within_the_limits_reaches_the_projects_clients():
    """64 requests of 1,000 items with ids of 256 characters (every limit at its default): ~17 MB, past
    gRPC's default 4 MiB receive limit, which made the client refuse an answer the server counted OK."""
    from concurrent import futures

    from infra.config import RecallServiceConfig
    from recall_service.channel import largest_answer_bytes, recall_channel
    from recall_service.metrics import RecallMetrics
    from recall_service.query import FallbackReason, Limits, RecallPath
    from recall_service.recaller import RecallResult
    from recall_service.server import RecallServicer
    from streaming.events import MAX_ID_CHARS

    class LongIds:
        def recall_many(self, queries, deadline):
            return [RecallResult([(f"{i:0{MAX_ID_CHARS}d}", 1.0, -1) for i in range(q.n)], "v1", RecallPath.POPULAR_FALLBACK,
                                 FallbackReason.UNKNOWN_USER) for q in queries]

    recall = RecallServiceConfig()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    RecallServicer(LongIds(), Limits.from_config(recall), RecallMetrics(), 5.0, recall.max_request_bytes).add_to_server(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        request = recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id=f"u{i}", n=recall.max_n) for i in range(recall.max_batch)])
        with recall_channel(recall, f"127.0.0.1:{port}") as channel:
            answer = recall_pb2_grpc.RecallServiceStub(channel).BatchRecall(request, timeout=60)
        assert [len(r.items) for r in answer.responses] == [recall.max_n] * recall.max_batch
        assert 4 * 2**20 < answer.ByteSize() <= largest_answer_bytes(recall)
    finally:
        server.stop(0)


def test_an_ipv6_host_is_bracketed_in_the_address_grpc_binds_and_dials():
    from recall_service.channel import grpc_address

    assert grpc_address("::1", 50051) == "[::1]:50051" and grpc_address("::", 0) == "[::]:0"
    assert grpc_address("127.0.0.1", 50051) == "127.0.0.1:50051" and grpc_address("recall.internal", 443) == "recall.internal:443"


def _has_ipv6_loopback() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1) to bind")
def test_a_server_on_an_ipv6_host_answers_the_projects_client(in_memory_server):
    from recall_service.channel import recall_channel

    server, _, search = in_memory_server(host="::1", metrics_host="::1")
    search.gate.set()
    recall = dataclasses.replace(server.config.recall, port=server.port)
    health = health_pb2_grpc.HealthStub(recall_channel(recall)).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert recall_pb2_grpc.RecallServiceStub(recall_channel(recall)).Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=5).items
    assert urllib.request.urlopen(f"http://[::1]:{server.metrics_port}/metrics", timeout=5).status == 200


def test_the_model_version_metric_names_the_model_that_answers_not_current(in_memory_server):
    """A published version that fails to load leaves the one loaded before answering: the metric names that one."""
    server, stub, _ = in_memory_server()
    info = lambda version: server.metrics.registry.get_sample_value("mindstream_recall_model_info", {"model_version": version})  # noqa: E731
    server.probe()
    assert info("B") == 1
    server.models.current_version = lambda: "C"  # CURRENT moved on; C does not load, B goes on answering
    server.probe()
    assert info("B") == 1 and info("C") is None
    server.models.current, server.models.current_version = lambda: None, lambda: None  # nothing published
    server.probe()
    assert info("B") is None


def latency_count(server, path, code):
    return server.metrics.registry.get_sample_value("mindstream_recall_latency_seconds_count", {"path": path, "stage": "total", "code": code}) or 0


def test_every_answer_is_timed_failures_too(in_memory_server):
    server, stub, search = in_memory_server()
    with pytest.raises(grpc.RpcError) as error:
        stub.Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=0.3)  # the search holds it past its deadline
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError):
        stub.Recall(recall_pb2.RecallRequest(user_id="alice", n=0), timeout=5)
    with pytest.raises(grpc.RpcError) as error:  # a failed batch weighs as many recalls as it holds, as an answered one
        stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id="alice", n=5)] * 3), timeout=0.3)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    search.gate.set()
    assert stub.Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=5).path == STORED
    wait_for(lambda: latency_count(server, "none", "DEADLINE_EXCEEDED") == 1 + 3, 5, "the late answers' latency")
    slowest = server.metrics.registry.get_sample_value("mindstream_recall_latency_seconds_sum",
                                                       {"path": "none", "stage": "total", "code": "DEADLINE_EXCEEDED"})
    assert slowest >= 0.25  # in the SLO's histogram: the slowest answers are no longer left out
    # a request the client got wrong says nothing of the service's speed: counted, not timed
    assert server.metrics.requests.labels("Recall", "INVALID_ARGUMENT")._value.get() == 1
    assert latency_count(server, "none", "INVALID_ARGUMENT") == 0 and latency_count(server, "stored_interests", "OK") == 1


def test_a_served_log_that_fails_never_fails_the_answer(in_memory_server):
    class BrokenLog:
        def record(self, served):
            raise RuntimeError("a bug in the served log")

        def flush(self, timeout_s=5.0):
            return True

        def close(self, timeout_s=5.0):
            pass

    server, stub, search = in_memory_server(served_log=BrokenLog())
    search.gate.set()
    assert stub.Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=5).path == STORED
    batch = stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=[recall_pb2.RecallRequest(user_id="alice", n=5)] * 2), timeout=5)
    assert len(batch.responses) == 2
    assert server.metrics.registry.get_sample_value("mindstream_recall_served_log_dropped_total", {"reason": "error"}) == 3
    assert server.metrics.requests.labels("Recall", "OK")._value.get() == 1


def test_rpcs_over_the_concurrency_limit_are_refused_at_once_and_counted(in_memory_server):
    server, stub, search = in_memory_server(workers=1, max_concurrent_rpcs=2)
    request = recall_pb2.RecallRequest(user_id="alice", n=5)
    running = stub.Recall.future(request, timeout=10)
    assert search.entered.acquire(timeout=5)  # the one worker is held by the search
    queued = stub.Recall.future(request, timeout=10)
    wait_for(lambda: server._limit.executor.tasks == 2, 5, "the second RPC queued for the worker")
    with pytest.raises(grpc.RpcError) as error:  # queued behind the held work instead, it would end DEADLINE_EXCEEDED
        stub.Recall(request, timeout=5)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert server.metrics.requests.labels("Recall", "RESOURCE_EXHAUSTED")._value.get() == 1
    assert "max_concurrent_rpcs" in error.value.details()
    search.gate.set()
    assert running.result().path == queued.result().path == STORED
    assert stub.Recall(request, timeout=5).path == STORED  # capacity is back


def test_health_checks_are_answered_at_once_over_the_concurrency_limit(in_memory_server):
    """A busy replica is healthy: refusing (or queueing) its readiness probe would take a whole
    overloaded fleet out of its load balancer at once."""
    server, stub, search = in_memory_server(workers=1, max_concurrent_rpcs=1, vector_search_timeout_ms=10_000)
    running = stub.Recall.future(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=10)
    assert search.entered.acquire(timeout=5)  # the limit is reached and the one worker is held
    health_stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    for service in ("", SERVICE_NAME):
        assert health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2).status == health_pb2.HealthCheckResponse.SERVING
    assert server.metrics.requests.labels("Check", "RESOURCE_EXHAUSTED")._value.get() == 0
    assert not running.done()  # answered beside the work, not after it
    search.gate.set()
    assert running.result().path == STORED


def test_an_rpc_refused_for_its_token_is_counted_once_even_over_the_limit(in_memory_server):
    from recall_service.channel import recall_channel

    server, anonymous, search = in_memory_server(workers=1, max_concurrent_rpcs=1, auth_token="s3cret", vector_search_timeout_ms=10_000)
    recall = dataclasses.replace(server.config.recall, host="127.0.0.1", port=server.port)
    authorised = recall_pb2_grpc.RecallServiceStub(recall_channel(recall))
    running = authorised.Recall.future(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=10)
    assert search.entered.acquire(timeout=5)  # the limit is reached and the one worker is held
    with pytest.raises(grpc.RpcError) as error:
        anonymous.Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not running.done()  # refused beside the work, not after it
    # a streaming RPC (reflection) is refused the same way, not failed by a handler of the wrong kind
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))
    with pytest.raises(grpc.RpcError) as error:
        list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED and not running.done()
    assert server.metrics.requests.labels("Recall", "UNAUTHENTICATED")._value.get() == 1
    assert server.metrics.requests.labels("Recall", "RESOURCE_EXHAUSTED")._value.get() == 0
    search.gate.set()
    running.result()  # the authorised call in flight is answered


def test_a_flood_of_refused_calls_refuses_no_health_check_nor_authorised_call(in_memory_server):
    """The server's own limit is its only one, and refusals are answered in place (no thread, no
    queue): during a flood of calls without a token every health check and authorised call is
    answered, and every refused call is counted once, under the code its client got."""
    import collections

    from recall_service.channel import recall_channel

    server, _, search = in_memory_server(max_concurrent_rpcs=4, auth_token="s3cret")
    search.gate.set()
    target = f"127.0.0.1:{server.port}"
    request = recall_pb2.RecallRequest(user_id="alice", n=5)
    got = [collections.Counter() for _ in range(4)]  # per flooding thread: the codes its calls ended with
    stop = threading.Event()

    def flood(codes: collections.Counter) -> None:
        stub = recall_pb2_grpc.RecallServiceStub(grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]))
        while not stop.is_set():
            for call in [stub.Recall.future(request, timeout=10) for _ in range(200)]:
                codes[call.code().name] += 1

    threads = [threading.Thread(target=flood, args=(codes,), daemon=True) for codes in got]
    for thread in threads:
        thread.start()
    wait_for(lambda: sum(sum(codes.values()) for codes in got) > 400, 30, "the flood")
    authorised = recall_pb2_grpc.RecallServiceStub(recall_channel(dataclasses.replace(server.config.recall, host="127.0.0.1", port=server.port)))
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    answered = collections.Counter()
    for _ in range(50):
        for name, call in (("health", lambda: health.Check(health_pb2.HealthCheckRequest(), timeout=5)),
                           ("recall", lambda: authorised.Recall(request, timeout=5))):
            try:
                call()
                answered[f"{name} OK"] += 1
            except grpc.RpcError as error:
                answered[f"{name} {error.code().name}"] += 1
    stop.set()
    for thread in threads:
        thread.join(30)
    refused = sum(got, collections.Counter())
    assert answered == {"health OK": 50, "recall OK": 50}
    assert set(refused) == {"UNAUTHENTICATED"}, refused
    assert server.metrics.requests.labels("Recall", "UNAUTHENTICATED")._value.get() == refused["UNAUTHENTICATED"]
    assert server.metrics.requests.labels("Recall", "RESOURCE_EXHAUSTED")._value.get() == 0


def test_without_a_model_the_recall_service_is_not_serving_while_the_server_is(in_memory_server):
    """With no model to answer with (none published, or none loadable and none loaded) every user
    without stored interests gets UNAVAILABLE: readiness (the RecallService's status) says
    NOT_SERVING. The overall status, which the stack waits for at start (it starts the service
    before the first publish), says whether the stores answer. Stored users are still answered."""
    server, stub, search = in_memory_server()
    search.gate.set()
    health = health_pb2_grpc.HealthStub(grpc.insecure_channel(f"127.0.0.1:{server.port}"))

    def status(service: str) -> str:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status)

    model, server.models.model = server.models.model, None
    server.probe()
    assert status("") == "SERVING" and status(SERVICE_NAME) == "NOT_SERVING"
    assert server.metrics.backend_up.labels("model")._value.get() == 0  # RecallBackendDown says why, when no replica has one
    assert stub.Recall(recall_pb2.RecallRequest(user_id="alice", n=5), timeout=5).path == STORED
    with pytest.raises(grpc.RpcError) as error:
        stub.Recall(recall_pb2.RecallRequest(user_id="newcomer", n=5), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE and "publish" in error.value.details()
    server.models.model = model  # published
    server.probe()
    assert status("") == status(SERVICE_NAME) == "SERVING" and server.metrics.backend_up.labels("model")._value.get() == 1


def test_the_projects_own_clients_follow_the_configured_tls_and_token(in_memory_server, tmp_path):
    """recall_service/channel.py: the health check script, the stack's readiness probe and the demo reach a server
    with TLS and a token as the configuration says, where a plaintext channel without the token is refused."""
    from infra.demo import recall
    from infra.recall_process import health_status

    cert, key = self_signed_certificate(tmp_path)
    server, _, search = in_memory_server(tls_certfile=str(cert), tls_keyfile=str(key), auth_token="s3cret")
    search.gate.set()
    config = dataclasses.replace(server.config, recall=dataclasses.replace(server.config.recall, port=server.port))
    assert recall(config, "alice", 3)[1] == "RECALL_PATH_STORED_INTERESTS"
    assert health_status(config.recall, f"localhost:{server.port}") == "SERVING"
    env = {**os.environ, "MINDSTREAM_CONFIG": "", "MINDSTREAM_RECALL__TLS_CERTFILE": str(cert),
           "MINDSTREAM_RECALL__TLS_KEYFILE": str(key)}
    check = subprocess.run([sys.executable, str(REPO / "infra" / "deploy" / "grpc_health_check.py"), f"localhost:{server.port}"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SERVING" in check.stdout, check.stdout + check.stderr
    plain = dataclasses.replace(config.recall, tls_certfile="", tls_keyfile="")
    assert health_status(plain, f"localhost:{server.port}") is None  # what every client did before
    token_only, _, _ = in_memory_server(auth_token="s3cret")  # the token without TLS: sent all the same
    assert recall(dataclasses.replace(token_only.config, recall=dataclasses.replace(token_only.config.recall, port=token_only.port)), "alice", 3)[0].items


def test_the_node_client_trusts_the_servers_certificate_and_says_what_is_wrong_in_one_line(in_memory_server, node_client, tmp_path):
    """As the Python clients (recall_service/channel.py): without a CA file, the configured
    tls_certfile is what the server's certificate is verified with; a request that is not JSON (or
    not a RecallRequest) or a CA file that cannot be read is a one-line error and exit status 2, not
    a stack trace."""
    cert, key = self_signed_certificate(tmp_path)
    server, _, search = in_memory_server(tls_certfile=str(cert), tls_keyfile=str(key), auth_token="s3cret")
    search.gate.set()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINDSTREAM_")}

    def node(request: str, **variables) -> subprocess.CompletedProcess:
        return subprocess.run(["node", str(node_client), f"localhost:{server.port}", str(PROTO_ROOT), request],
                              env={**env, "MINDSTREAM_RECALL__AUTH_TOKEN": "s3cret", **variables}, capture_output=True, text=True, timeout=60)

    answered = node('{"user_id": "alice", "n": 3}', MINDSTREAM_RECALL__TLS_CERTFILE=str(cert))
    assert answered.returncode == 0 and len(json.loads(answered.stdout)["items"]) == 3, answered.stderr
    trusting = {"MINDSTREAM_RECALL__TLS_CERTFILE": str(cert)}
    for request, variables, says in (('{"user_id": "alice", "n": 3', trusting, "not JSON"),
                                     ('{"user_id": "alice", "n": 3}', {"MINDSTREAM_RECALL__TLS_CAFILE": str(tmp_path / "missing.pem")}, "missing.pem"),
                                     # protobufjs would drop the field, send QUOTA as 0 and 4294967306 as 10
                                     ('{"user_id": "alice", "n": 3, "exclude_items": ["i1"]}', trusting, "exclude_items is not a RecallRequest field"),
                                     ('{"user_id": "alice", "n": 3, "merge_policy": "QUOTA"}', trusting, "MERGE_POLICY_QUOTA"),
                                     ('{"user_id": "alice", "n": 4294967306}', trusting, "n must be an integer")):
        failed = node(request, **variables)
        assert failed.returncode == 2 and says in failed.stderr and len(failed.stderr.strip().splitlines()) == 1, failed.stderr


def test_a_server_that_cannot_start_lets_go_of_what_it_made(in_memory_server):
    """A port taken (or a bad certificate) fails start(); the threads and clients made so far are
    released, not left behind in the process (tests and benches start many servers)."""
    import socket

    from recall_service.server import ServeError

    server, _, _ = in_memory_server()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        config = dataclasses.replace(server.config, recall=dataclasses.replace(server.config.recall, port=held.getsockname()[1]))
        blocked = RecallServer(config, reader=server.reader, search=server.search, models=server.models, availability=server.availability)
        with pytest.raises(ServeError, match="cannot listen"):
            blocked.start()
    assert blocked._executor._shutdown and blocked._limit.health_lane._shutdown
    assert server.port and not server._executor._shutdown  # the first server goes on
    server.stop(grace_s=0)
    assert server._executor._shutdown
