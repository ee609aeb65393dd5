"""Monitoring: the generated Prometheus configuration and the rules pass promtool, the alert rules'
unit tests pass, the committed dashboard is what its builder writes, and a real Prometheus (the
Debian binary of infra/install_prometheus.sh) scraping the real exporters answers every panel's
query, and every recording rule, with data.

The exporters run in this process with the services' own metric definitions (streaming.metrics,
recall_service.metrics.RecallMetrics) fed by a traffic thread, and the stack's exporter reads a
real broker and a real Redis (events of a user with a served answer feed its online judge): no
Flink job or recall server has to start, so the test takes seconds.
"""

import datetime as dt
import json
import math
import random
import subprocess
import threading
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from infra.broker import EmbeddedBroker, ensure_topics
from infra.config import load_config
from infra.dashboard import DASHBOARD_PATH, panel_queries, render_dashboard
from infra.exporter import serve as serve_exporter
from infra.monitoring import RULE_FILES, RULES_DIR, PrometheusProcess, prometheus_tool, write_prometheus_config
from infra.process import free_port
from infra.redis_server import EmbeddedRedis


def tool(name: str) -> str:
    path = prometheus_tool(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run infra/install_prometheus.sh (infra/bootstrap.sh does)")
    return str(path)


def test_generated_config_and_rules_pass_promtool(tmp_path):
    config = load_config(environ={"MINDSTREAM_CONFIG": ""})
    path = write_prometheus_config(config, tmp_path / "prometheus.yml")
    checked = subprocess.run([tool("promtool"), "check", "config", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(RULE_FILES)} rule files found" in checked.stdout  # the config finds the rules (and checks them)
    checked = subprocess.run([tool("promtool"), "check", "rules", *map(str, RULE_FILES)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_clusters_rule_groups_pass_promtool_as_one_file(tmp_path):
    # The PrometheusRule puts both rule files' groups in one list: group names must be unique across them.
    import yaml

    from infra.k8s_rules import K8S_RULES_PATH

    merged = tmp_path / "merged.yml"
    merged.write_text(yaml.safe_dump({"groups": yaml.safe_load(K8S_RULES_PATH.read_text())["spec"]["groups"]}))
    checked = subprocess.run([tool("promtool"), "check", "rules", str(merged)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_alert_rules_fire_as_their_unit_tests_say():
    tested = subprocess.run([tool("promtool"), "test", "rules", str(RULES_DIR / "rules_test.yml")], capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_committed_dashboard_is_what_the_builder_writes():
    assert DASHBOARD_PATH.read_text() == render_dashboard(), "run `python -m infra dashboard` and commit infra/grafana/mindstream.json"


def feed_events(config, stop: threading.Event) -> None:
    """A served answer and events of its user, hits and misses, for the exporter's online judge."""
    from kafka import KafkaProducer

    from recall_service.served_log import RedisServedLog, ServedRecord
    from streaming.events import BehaviourEvent, encode_event

    log = RedisServedLog.for_config(config)
    log.record([ServedRecord("fan", "v1", "stored_interests", int(time.time() * 1000), ("i1", "i2"))])
    log.flush()
    producer = KafkaProducer(bootstrap_servers=config.kafka.bootstrap_servers)
    while not stop.wait(0.2):
        for item in ("i1", "i3"):
            producer.send(config.kafka.events_topic, key=b"fan", value=encode_event(BehaviourEvent("fan", item, "click", 1)))
    producer.close()


def feed_traffic(recall_metrics, stop: threading.Event) -> None:
    """Observations of every series the dashboard reads, as a running stack would make them."""
    from recall_service.metrics import BACKENDS
    from streaming import metrics as stream

    rng = random.Random(0)
    stream.MODEL_INFO.labels("v1").set(1)
    recall_metrics.set_model_version("v1")
    recall_metrics.inactive_items.set(2)
    for backend in BACKENDS:
        recall_metrics.backend_up.labels(backend).set(1)
    while not stop.wait(0.1):
        stream.EVENTS_IN.inc(20)
        stream.EVENTS_APPLIED.labels("added").inc(18)
        stream.EVENTS_APPLIED.labels("duplicate").inc(1)
        stream.DEAD_LETTERS.labels("invalid").inc(1)
        stream.FRESHNESS_SECONDS.observe(rng.uniform(0.02, 0.4))
        stream.TOWER_SECONDS.observe(rng.uniform(0.001, 0.004))
        stream.STORE_WRITE_SECONDS.observe(rng.uniform(0.0005, 0.002))
        stream.BATCH_USERS.observe(rng.randint(1, 64))
        stream.LAST_WRITE.set(time.time())
        for stage in ("feature_store", "vector_search", "merge", "total"):
            recall_metrics.latency.labels("stored_interests", stage, "OK").observe(rng.uniform(0.0005, 0.02))
        recall_metrics.latency.labels("none", "total", "DEADLINE_EXCEEDED").observe(0.2)
        recall_metrics.requests.labels("Recall", "OK").inc(10)
        recall_metrics.requests.labels("Recall", "INVALID_ARGUMENT").inc(1)
        recall_metrics.requests.labels("Recall", "UNAVAILABLE").inc(1)
        recall_metrics.fallbacks.labels("unknown_user").inc(1)
        recall_metrics.result_items.observe(20)


def write_registry(models_dir, version: str) -> None:
    """A model registry's current-version record and manifest timestamps and metrics (the exporter reads nothing else)."""
    (models_dir / version).mkdir(parents=True)
    now = dt.datetime.now(dt.timezone.utc)
    manifest = {"created_at": (now - dt.timedelta(hours=3)).isoformat(), "metrics": {"test": {"recall@50": 0.2550, "hitrate@50": 0.8825}}}
    (models_dir / version / "manifest.json").write_text(json.dumps(manifest))
    (models_dir / "CURRENT.json").write_text(json.dumps({"model_version": version, "published_at": now.isoformat()}))


def instant_query(url: str, expr: str) -> list:
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}", timeout=5) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def has_data(result: list) -> bool:
    return any(not math.isnan(float(series["value"][1])) for series in result)


def test_every_panel_query_and_recording_rule_returns_data_from_real_prometheus(tmp_path):
    from prometheus_client import start_http_server

    from recall_service.metrics import RecallMetrics

    write_registry(tmp_path / "models", "v1")
    with EmbeddedBroker(tmp_path / "broker") as broker, EmbeddedRedis(tmp_path / "redis") as redis_server:
        ports = {name: free_port() for name in ("stream", "recall", "exporter", "prometheus")}
        config = load_config(environ={
            "MINDSTREAM_CONFIG": "",
            "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "MINDSTREAM_REDIS__URI": redis_server.uri,
            "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"),
            "MINDSTREAM_STREAMING__METRICS_PORT": str(ports["stream"]),
            "MINDSTREAM_RECALL__METRICS_PORT": str(ports["recall"]),
            "MINDSTREAM_MONITORING__EXPORTER_PORT": str(ports["exporter"]),
            "MINDSTREAM_MONITORING__PROMETHEUS_PORT": str(ports["prometheus"]),
            "MINDSTREAM_MONITORING__SCRAPE_INTERVAL_S": "1",
        })
        ensure_topics(config.kafka, partitions=2, retention_ms=3_600_000)
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)
        for i in range(50):  # no consumer commits: all of it is lag
            producer.send(config.kafka.events_topic, key=f"u{i}".encode(), value=b"{}")
        producer.close()

        stream_server, _ = start_http_server(ports["stream"], addr="127.0.0.1")  # the default registry: streaming.metrics
        recall_metrics = RecallMetrics()
        recall_server, _ = recall_metrics.serve(ports["recall"])
        exporter_server, exporter_collector = serve_exporter(config, ports["exporter"])
        stop = threading.Event()
        traffic = threading.Thread(target=feed_traffic, args=(recall_metrics, stop), daemon=True)
        traffic.start()
        events = threading.Thread(target=feed_events, args=(config, stop), daemon=True)
        events.start()
        prometheus = PrometheusProcess(write_prometheus_config(config, tmp_path / "prometheus.yml"), tmp_path / "tsdb",
                                       ports["prometheus"], tmp_path / "prometheus.log")
        try:
            prometheus.start()
            queries = [(title, expr.replace("$__rate_interval", "5s")) for title, expr in panel_queries(json.loads(DASHBOARD_PATH.read_text()))]
            rules = [rule["record"] for f in RULE_FILES for group in yaml.safe_load(f.read_text())["groups"] for rule in group["rules"] if "record" in rule]
            assert len(queries) >= 15 and len(rules) >= 15
            checks = queries + [(f"recording rule {name}", name) for name in rules]
            deadline = time.monotonic() + 30
            missing = checks
            while missing and time.monotonic() < deadline:
                time.sleep(1)
                missing = [(what, expr) for what, expr in missing if not has_data(instant_query(prometheus.url, expr))]
            assert not missing, f"no data from Prometheus for: {missing}"
            with urllib.request.urlopen(f"{prometheus.url}/api/v1/rules", timeout=5) as response:
                rule_health = [(r["name"], r["health"], r.get("lastError")) for g in json.load(response)["data"]["groups"] for r in g["rules"]]
            assert rule_health and all(health == "ok" for _, health, _ in rule_health), rule_health
        finally:
            stop.set()
            prometheus.stop()
            for server in (stream_server, recall_server, exporter_server):
                server.shutdown()
                server.server_close()
            exporter_collector.close()


def test_consumer_lag_leaves_out_records_retention_deleted():
    from types import SimpleNamespace

    from kafka import TopicPartition

    from infra.exporter import StackCollector

    class Broker:  # partition 0: records up to 100 deleted, end 130, group committed at 10 (before the deletion)
        def partitions_for_topic(self, topic):
            return {0, 1}

        def end_offsets(self, partitions):
            return {tp: 130 for tp in partitions}

        def beginning_offsets(self, partitions):
            return {tp: (100 if tp.partition == 0 else 0) for tp in partitions}

        def list_group_offsets(self, wanted):
            (group, partitions), = wanted.items()
            return {group: {TopicPartition("events", 0): SimpleNamespace(offset=10), TopicPartition("events", 1): SimpleNamespace(offset=125)}}

    collector = StackCollector(load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_KAFKA__EVENTS_TOPIC": "events"}))
    collector._admin = collector._consumer = Broker()
    assert collector.consumer_lag() == {("events", 0): 30, ("events", 1): 5}


def test_the_current_models_offline_metrics_are_exported_with_its_version(tmp_path):
    from infra.exporter import StackCollector

    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path)})
    collector = StackCollector(config)
    assert {s.name: s.samples for s in collector._model_metrics()}["mindstream_model_offline_metric"] == []  # nothing published yet
    write_registry(tmp_path, "v1")
    families = {family.name: family for family in collector._model_metrics()}
    samples = {(s.labels["model_version"], s.labels["split"], s.labels["metric"]): s.value for s in families["mindstream_model_offline_metric"].samples}
    assert samples == {("v1", "test", "recall@50"): 0.2550, ("v1", "test", "hitrate@50"): 0.8825}
    assert [s.labels for s in families["mindstream_model_created_timestamp_seconds"].samples] == [{"model_version": "v1"}]


@pytest.mark.parametrize("metrics", [None, {"test": None}, {"test": {"recall@50": "n/a"}}])
def test_a_malformed_model_record_leaves_its_series_out_and_the_scrape_standing(tmp_path, metrics):
    from prometheus_client import CollectorRegistry, generate_latest

    from infra.exporter import StackCollector

    write_registry(tmp_path, "v1")
    manifest_path = tmp_path / "v1" / "manifest.json"
    manifest_path.write_text(json.dumps({**json.loads(manifest_path.read_text()), "metrics": metrics}))
    collector = StackCollector(load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path)}))
    families = {family.name: family for family in collector._model_metrics()}
    assert families["mindstream_model_offline_metric"].samples == []
    assert [s.labels for s in families["mindstream_model_created_timestamp_seconds"].samples] == [{"model_version": "v1"}]
    (tmp_path / "CURRENT.json").write_text("{not json")
    registry = CollectorRegistry()
    registry.register(type("ModelOnly", (), {"collect": collector._model_metrics})())
    assert b"mindstream_model_created_timestamp_seconds" in generate_latest(registry)  # the scrape answers, without series
