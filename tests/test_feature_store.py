"""The feature-store record contract, with an in-memory store and against a real Redis server."""

import contextlib
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import redis

from infra.config import RedisConfig
from infra.redis_server import EmbeddedRedis, EmbeddedRedisCluster
from streaming.feature_store import InMemoryFeatureStore, InterestRecord, RecordError, RedisFeatureStore, SeenOnly, decode, encode, stored_fields


def _record(user="u1", k=3, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    return InterestRecord(user, "ml-1m-mind-v1", rng.normal(size=(k, dim)).astype(np.float32), ("Toy Story (1995)", "Heat (1995)"), 978300760000, "0:41")


def _same(a: InterestRecord, b: InterestRecord) -> bool:
    return (
        a.user_id == b.user_id and a.model_version == b.model_version and a.window == b.window
        and a.last_event_ms == b.last_event_ms and a.last_offset == b.last_offset and np.array_equal(a.interests, b.interests)
    )


def test_round_trip_is_exact():
    record = _record()
    fields = stored_fields(record)
    back = decode("u1", fields)
    assert _same(record, back) and back.k == 3 and back.interests.dtype == np.float32 and back.updated_ms > 0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda f: f.update({b"schema": b"99"}), "record schema 99"),
        (lambda f: f.update({b"interests": f[b"interests"][:-4]}), "interest bytes"),
        (lambda f: f.pop(b"window"), "corrupt record"),
        # a window the job would seed and then fail on (a restart loop), or one that json cannot even nest
        (lambda f: f.update({b"last_offset": b"0:bench"}), "is not partition:offset"),
        (lambda f: f.update({b"window": b"[" * 100_000 + b"]" * 100_000}), "corrupt record"),
        # numbers the job's state (orjson: 64 bits) or int() (4,300 digits) cannot take: a restart loop too
        (lambda f: f.update({b"last_offset": b"0:" + b"9" * 5_000}), "is not partition:offset"),
        (lambda f: f.update({b"last_offset": "0:\u0661".encode()}), "is not partition:offset"),  # a digit, to int(), but no Kafka offset
        (lambda f: f.update({b"last_event_ms": str(2**70).encode()}), "last_event_ms .* is no 64-bit time"),
        (lambda f: f.update({b"vouched_ms": str(2**63).encode()}), "vouched_ms .* is no 64-bit time"),
        (lambda f: f.update({b"updated_ms": str(-(2**64)).encode()}), "updated_ms .* is no 64-bit time"),
        (lambda f: f.update({b"profile_ms": b'{"age": 1180591620717411303424}'}), "profile_ms must be"),
        # a lone surrogate: json decodes it, the window state (orjson) cannot encode it: every event of the user failed
        (lambda f: f.update({b"window": b'["a", "\\ud800"]'}), "corrupt record"),
        (lambda f: f.update({b"profile": b'{"gender": "\\udc00"}'}), "corrupt record"),
    ],
)
def test_foreign_or_corrupt_records_are_refused(mutate, message):
    fields = stored_fields(_record())
    mutate(fields)
    with pytest.raises(RecordError, match=message):
        decode("u1", fields)


def test_empty_interests_cannot_be_written():
    with pytest.raises(RecordError):
        encode(dataclasses.replace(_record(), interests=np.zeros((0, 8), np.float32)))


def test_in_memory_store_follows_the_contract():
    store = InMemoryFeatureStore()
    assert store.put_many([_record("a"), _record("b", k=1)]) == 2
    a, missing, b = store.get_many(["a", "nobody", "b"])
    assert missing is None and a.k == 3 and b.k == 1
    store.delete("a")
    assert store.get_many(["a"]) == [None]


def _seen_contract(store, ttl_checked) -> None:
    """What a store keeping 3 seen items per user does (the same for Redis and the in-memory one)."""
    store.put_many([_record("a"), _record("b")], seen={"a": [(10, "x"), (20, "y")], "nobody": [(1, "z")]})
    a, b, nobody = store.get_many(["a", "b", "nobody"])
    assert a.seen == {"x", "y"} and b.seen == frozenset()
    assert nobody == SeenOnly("nobody", frozenset({"z"}))  # a seen set alone makes no record, but is read
    store.put_many([], seen={"a": [(30, "w"), (5, "y"), (40, "v")]})  # y keeps its newer time (GT) ...
    assert store.get_many(["a"])[0].seen == {"y", "w", "v"}  # ... so x, the oldest, is the one trimmed
    store.put_many([], seen={"a": [(40, "u"), (25, "x")]})  # x comes back, older than what is kept
    assert store.get_many(["a"])[0].seen == {"w", "v", "u"}
    assert ttl_checked("a")
    store.delete("a")
    store.put_many([_record("a")])
    assert store.get_many(["a"])[0].seen == frozenset()  # a deleted user's seen set went with the record


def test_in_memory_store_keeps_seen_sets_like_redis():
    _seen_contract(InMemoryFeatureStore(seen_items=3), lambda user: True)  # no expiry in memory
    off = InMemoryFeatureStore()
    off.put_many([_record("a")], seen={"a": [(1, "x")]})
    assert off.get_many(["a"])[0].seen == frozenset()


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_real_redis_keeps_trims_and_reads_seen_sets(tmp_path, cluster):
    server_class = EmbeddedRedisCluster if cluster else EmbeddedRedis
    with server_class(tmp_path / "redis") as server:
        config = RedisConfig(uri=server.uri, cluster=cluster)
        store = RedisFeatureStore.from_config(config, prefix="test", ttl_seconds=600, seen_items=3)
        _seen_contract(store, lambda user: 0 < store.client.ttl(f"test:seen:{user}") <= 600)
        # a behaviour only the seen set took is activity: the record's time to live starts again with its set's
        store.put_many([_record("c")])
        store.client.expire("test:user:c", 5)
        store.put_many([], seen={"c": [(1, "x")]})
        assert 5 < store.client.ttl("test:user:c") <= 600 and store.client.ttl("test:seen:c") <= 600
        # also in a store that keeps no seen sets ([streaming].seen_items = 0): the record expired under an active user
        no_sets = RedisFeatureStore.from_config(config, prefix="test", ttl_seconds=600)
        no_sets.put_many([_record("d")])
        no_sets.client.expire("test:user:d", 5)
        no_sets.put_many([], seen={"d": [(1, "x")]})
        assert 5 < no_sets.client.ttl("test:user:d") <= 600 and not no_sets.client.exists("test:seen:d")
        # a store that keeps none neither writes nor reads them; the job's writes but does not read them
        store.put_many([], seen={"b": [(1, "x")]})
        plain = RedisFeatureStore.from_config(config, prefix="test")
        plain.put_many([], seen={"b": [(2, "y")]})
        job = RedisFeatureStore.from_config(config, prefix="test", seen_items=3, read_seen=False)
        assert store.get_many(["b"])[0].seen == {"x"} and plain.get_many(["b"])[0].seen == frozenset() == job.get_many(["b"])[0].seen
        assert job.get_many(["nobody"]) == [None] == plain.get_many(["nobody"])  # no record, and no seen set read
        # a store told to keep fewer reads the newest of a set not yet trimmed to its size
        store.put_many([], seen={"b": [(3, "z"), (4, "w")]})
        assert RedisFeatureStore.from_config(config, prefix="test", seen_items=2).get_many(["b"])[0].seen == {"z", "w"}
        # a stray key under a seen name: the record is read without it, and the next write replaces it
        store.client.set("test:seen:stray", "not a set")
        store.put_many([_record("stray")])
        for users in (["stray"], ["a", "stray"]):
            assert store.get_many(users)[-1].seen == frozenset()
        store.put_many([_record("stray")], seen={"stray": [(1, "x")], "b": [(5, "v")]})
        assert store.get_many(["stray", "b"])[0].seen == {"x"} and store.get_many(["b"])[0].seen == {"z", "w", "v"}
        # with record_ttl_s off, a write takes the TTL off a set written while it was on (as off the record)
        plain_seen = RedisFeatureStore.from_config(config, prefix="test", seen_items=3)
        plain_seen.put_many([_record("b")], seen={"b": [(6, "u")]})
        assert store.client.ttl("test:seen:b") == -1 == store.client.ttl("test:user:b")
        # a member that is not UTF-8 (not the job's write) neither fails the read nor names an item
        store.client.zadd("test:seen:stray", {b"\xff\xfe": 9})
        assert "x" in store.get_many(["a", "stray"])[-1].seen


def test_a_reader_never_finds_a_record_missing_while_it_is_replaced(tmp_path):
    """A record is replaced in one step on the server: a DEL and an HSET sent apart left a gap in
    which a recall read found no record and fell back."""
    import threading

    with EmbeddedRedis(tmp_path / "redis") as server:
        config = RedisConfig(uri=server.uri)
        writer = RedisFeatureStore.from_config(config, prefix="test", ttl_seconds=600)
        reader = RedisFeatureStore.from_config(config, prefix="test")
        records = [_record(f"user-{i}", seed=i) for i in range(256)]  # a pipeline the server reads in several pieces
        writer.put_many(records)
        done, missing = threading.Event(), []

        def read():
            while not done.is_set():
                missing.extend(r for r in reader.get_many([r.user_id for r in records]) if r is None)

        thread = threading.Thread(target=read)
        thread.start()
        try:
            for _ in range(40):
                writer.put_many(records)
        finally:
            done.set()
            thread.join()
        assert missing == []


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_real_redis_round_trip_replace_ttl_and_auth(tmp_path, cluster):
    server_class = EmbeddedRedisCluster if cluster else EmbeddedRedis
    with server_class(tmp_path / "redis", password="pw") as server:
        for node in (server.nodes if cluster else [server]):  # not on a command line every local user can read
            assert b"pw" not in Path(f"/proc/{node.pid}/cmdline").read_bytes().split(b"\0")
        store = RedisFeatureStore.from_config(RedisConfig(uri=server.uri, password="pw", cluster=cluster), prefix="test", ttl_seconds=3600)
        records = [_record(f"user-{i}", k=1 + i % 4, seed=i) for i in range(200)]
        assert store.put_many(records) == 200
        back = store.get_many([r.user_id for r in records] + ["unknown"])
        assert back[-1] is None
        assert all(_same(a, b) for a, b in zip(records, back[:-1]))
        assert store.get_windows(["user-1", "unknown"]) == [records[1].window, None]  # the window alone (the fault harness polls it)
        assert 0 < store.client.ttl("test:user:user-0") <= 3600
        # a newer record replaces the old one whole (fewer interests, new version)
        newer = dataclasses.replace(_record("user-3", k=1, seed=9), model_version="ml-1m-mind-v2")
        store.put_many([newer])
        assert _same(store.get_many(["user-3"])[0], newer)
        # the backfill's scan and conditional replace (a Lua script on the server)
        assert sorted(u for chunk in store.user_ids(batch=64) for u in chunk) == sorted(r.user_id for r in records)
        current = store.get_many(["user-5"])[0]
        moved = dataclasses.replace(current, model_version="v3", updated_ms=current.updated_ms + 1)
        assert store.replace_if_unchanged([moved, moved], [current, current]) == 1  # the 2nd saw a newer write
        assert _same(store.get_many(["user-5"])[0], moved) and 0 < store.client.ttl("test:user:user-5") <= 3600
        # a replaced record keeps the time it had left (its seen set expires with it); one without gets the ttl
        store.client.expire("test:user:user-6", 50)
        store.client.persist("test:user:user-7")
        for user in ("user-6", "user-7"):
            current = store.get_many([user])[0]
            assert store.replace_if_unchanged([dataclasses.replace(current, model_version="v3", updated_ms=current.updated_ms + 1)], [current]) == 1
        assert 0 < store.client.ttl("test:user:user-6") <= 50 and 50 < store.client.ttl("test:user:user-7") <= 3600
        # without the password the server refuses
        from redis.exceptions import AuthenticationError, RedisClusterException, ResponseError

        anonymous = RedisFeatureStore.from_config(RedisConfig(uri=server.uri, cluster=cluster), prefix="test")  # connects on first use
        with pytest.raises((AuthenticationError, ResponseError, RedisClusterException)):
            anonymous.get_many(["user-0"])
        if cluster:  # the users' keys really are spread over the primaries
            holding = [node for node in server.nodes if redis.Redis(node.host, node.port, password="pw").dbsize() > 0]
            assert len(holding) == len(server.nodes)


@pytest.mark.parametrize("cluster", [False, True], ids=["standalone", "cluster"])
def test_a_key_of_another_type_is_an_unreadable_record_not_an_outage(tmp_path, cluster):
    """A stray key under a user's record name: the job counts the window as unreadable (it starts
    empty) instead of retrying the read for ever, and its next write replaces the key."""
    from prometheus_client import REGISTRY

    from streaming.interest_writer import FixedTower, InterestWriter
    from streaming.window import UserWindow

    def unreadable() -> float:
        return REGISTRY.get_sample_value("mindstream_stream_window_seeds_total", {"result": "unreadable"}) or 0.0

    server_class = EmbeddedRedisCluster if cluster else EmbeddedRedis
    with server_class(tmp_path / "redis") as server:
        store = RedisFeatureStore.from_config(RedisConfig(uri=server.uri, cluster=cluster), prefix="test")
        store.put_many([_record("u1")])
        store.client.set("test:user:stray", "not a hash")
        for users in (["stray"], ["u1", "stray"]):  # one read, and the pipelined one
            with pytest.raises(RecordError, match="another Redis type"):
                store.get_many(users)
        slept, before = [], unreadable()
        assert InterestWriter(FixedTower(None), store, sleep=slept.append).stored_window("stray") == UserWindow()
        assert slept == [] and unreadable() == before + 1
        store.put_many([_record("stray")])
        assert _same(store.get_many(["stray"])[0], _record("stray"))


@pytest.mark.parametrize("backend", ["memory", "redis"])
def test_a_replace_never_overwrites_a_write_of_the_same_millisecond(tmp_path, backend):
    """The backfill reads a record, the job writes a newer window within the same millisecond: the
    backfill's replacement (built from the window it read) must not land."""
    with contextlib.ExitStack() as stack:
        if backend == "redis":
            server = stack.enter_context(EmbeddedRedis(tmp_path / "redis"))
            store = RedisFeatureStore.from_config(RedisConfig(uri=server.uri), prefix="test")
        else:
            store = InMemoryFeatureStore()
        first = dataclasses.replace(_record("u1"), window=("a",), last_offset="0:1", updated_ms=1_700_000_000_000)
        store.put_many([first])
        read = store.get_many(["u1"])[0]
        store.put_many([dataclasses.replace(first, window=("a", "b"), last_offset="0:2")])  # the job, same updated_ms
        assert store.replace_if_unchanged([dataclasses.replace(read, model_version="v2", updated_ms=read.updated_ms + 9)], [read]) == 0
        assert store.get_many(["u1"])[0].window == ("a", "b")
        read = store.get_many(["u1"])[0]  # unchanged since this read: replaced
        assert store.replace_if_unchanged([dataclasses.replace(read, model_version="v2", updated_ms=read.updated_ms + 9)], [read]) == 1
        assert store.get_many(["u1"])[0].model_version == "v2"


def test_stray_keys_under_the_user_prefix_do_not_stop_a_backfill(tmp_path):
    """A key that is no UTF-8 text, and a record replaced by another Redis type between the backfill's
    read and its rewrite: skipped and left as they are, not an error of every pass (and not an error
    message holding a whole record)."""
    from streaming.backfill import backfill, stored_versions

    class OneVector:
        version = "v2"

        def interests(self, windows, profiles=None):
            return [np.ones((1, 8), np.float32) for _ in windows]

    with EmbeddedRedis(tmp_path / "redis") as server:
        store = RedisFeatureStore.from_config(RedisConfig(uri=server.uri), prefix="test")
        store.put_many([_record(f"u{i}") for i in range(3)])
        store.client.set(b"test:user:\xff\xfe", b"junk")
        assert sorted(u for chunk in store.user_ids() for u in chunk) == ["u0", "u1", "u2"]
        assert stored_versions(store) == {"ml-1m-mind-v1": 3}
        read = store.get_many(["u0", "u1"])
        store.client.delete("test:user:u0")
        store.client.set("test:user:u0", "not a hash any more")
        fresh = [dataclasses.replace(r, model_version="v2") for r in read]
        assert store.replace_if_unchanged(fresh, read) == 1
        assert store.get_many(["u1"])[0].model_version == "v2" and store.client.get("test:user:u0") == b"not a hash any more"
        report = backfill(store, OneVector(), batch=2)
        assert (report.users_seen, report.skipped_unreadable, report.stale_in_last_pass) == (3, 1, 0)
        assert stored_versions(store) == {"v2": 2}


@pytest.mark.parametrize("password", ["", "pass word"])
def test_redis_is_ready_when_it_answers_ping_not_when_it_listens(tmp_path, password):
    """Redis listens before it has loaded its append-only file, and answers -LOADING until then."""
    import socket
    import threading

    replies = [b"-LOADING Redis is loading the dataset in memory\r\n", b"+PONG\r\n"]

    def serve(listener):
        for reply in replies:
            connection, _ = listener.accept()
            with connection:
                connection.recv(1024)
                connection.sendall((b"+OK\r\n" if password else b"") + reply)

    with socket.create_server(("127.0.0.1", 0)) as listener:
        threading.Thread(target=serve, args=(listener,), daemon=True).start()
        redis_process = EmbeddedRedis(tmp_path, port=listener.getsockname()[1], password=password)
        assert not redis_process.ready()  # listening, still loading
        assert redis_process.ready()


def test_redis_down_fails_fast(tmp_path):
    from redis.exceptions import ConnectionError as RedisConnectionError

    from infra.redis_server import free_port

    store = RedisFeatureStore.from_config(RedisConfig(uri=f"redis://127.0.0.1:{free_port()}/0"), timeout_s=0.5)
    with pytest.raises(RedisConnectionError):
        store.get_many(["u1"])


def test_a_cluster_that_is_down_fails_the_calls_not_the_start():
    from infra.redis_server import free_port
    from recall_service.backends import FeatureStoreReader
    from recall_service.recaller import BackendUnavailable

    config = RedisConfig(uri=f"redis://127.0.0.1:{free_port()}/0", cluster=True)
    reader = FeatureStoreReader.redis(config, timeout_s=0.5)  # a service starts without the cluster
    with pytest.raises(BackendUnavailable):  # and answers UNAVAILABLE for as long as it is down
        reader.get_many(["u1"])
    with pytest.raises(BackendUnavailable):
        reader.ping()
