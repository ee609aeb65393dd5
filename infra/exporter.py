"""A Prometheus exporter for what neither the broker nor the Flink job exports here: the streaming
job's consumer lag, the age and measured quality of the current model, and the online hit rate
(`python -m infra exporter`, run by the stack).

Read at every scrape:
    mindstream_kafka_consumer_lag{group, topic, partition}   end offset - the group's committed offset
    mindstream_kafka_up                                       1 when the broker answered this scrape
    mindstream_model_created_timestamp_seconds{model_version} the current model's export time
    mindstream_model_published_timestamp_seconds{model_version}  when it was made current
    mindstream_model_offline_metric{model_version, split, metric} the current model's quality as its
        export measured it (split "test": the held-out test users of an offline training run;
        "holdout": the recent holdout a retraining was judged on), e.g. metric="recall@50"

Counted by a thread reading the events topic (recall_service/online_quality.py; when
[recall].served_log_ttl_s > 0):
    mindstream_online_recall_events_total{model_version, path, event_type, outcome}  events judged
        against the answers the recall service served their user before them: hit, miss or unjudged
    mindstream_online_recall_errors_total{reason}   events and records left out (invalid_event,
        unreadable_record) and failed reads of the broker or Redis (unavailable)

Flink commits the group's offsets when a checkpoint completes, so the lag is up to one checkpoint
interval ([streaming].checkpoint_interval_ms) behind what the job has actually read. A partition
the group has never committed counts from its earliest offset (all of it is still to be read).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from infra.cli import UserError
from infra.config import Config

log = logging.getLogger(__name__)


def _timestamp(iso: str) -> float:
    return dt.datetime.fromisoformat(iso).timestamp()


class StackCollector(Collector):
    def __init__(self, config: Config, timeout_s: float = 3.0):
        self.config, self.timeout_s = config, timeout_s
        self._admin = self._consumer = None
        self._lock = threading.Lock()  # the HTTP server scrapes from several threads
        self._online_stop = threading.Event()
        self._online: threading.Thread | None = None

    def start_online_quality(self, registry) -> None:
        """Runs the online-quality judge on a thread, its counters in `registry`; close() stops it."""
        from prometheus_client import Counter

        from recall_service.online_quality import ONLINE_ERROR_REASONS, OnlineQualityJudge
        from recall_service.served_log import RedisServedLog

        events = Counter("mindstream_online_recall_events_total", "Events judged against the answers served to their user before them",
                         ["model_version", "path", "event_type", "outcome"], registry=registry)
        errors = Counter("mindstream_online_recall_errors_total", "Events and served records left out of the online hit rate, "
                         "and failed reads", ["reason"], registry=registry)
        for reason in ONLINE_ERROR_REASONS:  # at 0 from the start: the first failure is an increase Prometheus sees
            errors.labels(reason)
        judge = OnlineQualityJudge(self._online_consumer, RedisServedLog.for_config(self.config),
                                   lambda labels, n: events.labels(*labels).inc(n), lambda reason, n: errors.labels(reason).inc(n),
                                   self.config.recall.served_log_ttl_s, self.config.streaming.max_event_bytes, self.config.recall.served_log_answers)
        self._online = threading.Thread(target=judge.run, args=(self._online_stop,), name="online-quality", daemon=True)
        self._online.start()

    def _online_consumer(self):
        from kafka import ConsumerRebalanceListener, KafkaConsumer, TopicPartition

        from recall_service.online_quality import is_new_group
        from streaming.kafka_clients import python_client_options

        class StartAtTheEnd(ConsumerRebalanceListener):
            """A new group's first assignment starts at the end of its partitions, before the first fetch
            (a listener may only seek here: kafka-python runs it on its I/O thread, which must not block)."""

            armed = True

            def on_partitions_revoked(self, revoked):
                pass

            def on_partitions_assigned(self, assigned):
                if self.armed and assigned:
                    consumer.seek_to_end(*assigned)
                    self.armed = False

        # "earliest" for a partition without a usable committed offset in a group that has others (added to
        # the topic, or its offset deleted by retention): "latest" would skip its waiting events unjudged.
        # (The Redis client is not needed to start: the judge counts a Redis outage and reads again.)
        topic = self.config.kafka.events_topic
        consumer = KafkaConsumer(group_id=self.config.monitoring.online_quality_group, enable_auto_commit=False,
                                 auto_offset_reset="earliest", **python_client_options(self.config.kafka))
        try:
            partitions = consumer.partitions_for_topic(topic) or ()
            new_group = is_new_group({p: consumer.committed(TopicPartition(topic, p)) for p in partitions})
            consumer.subscribe([topic], listener=StartAtTheEnd() if new_group else None)
        except BaseException:  # the judge makes another every retry_s: each left open kept its I/O thread and connections
            consumer.close()
            raise
        return consumer

    def collect(self):
        with self._lock:
            yield from self._kafka_metrics()
            yield from self._model_metrics()

    def _clients(self):
        from kafka import KafkaAdminClient, KafkaConsumer

        from streaming.kafka_clients import python_client_options

        if self._admin is None:
            options = python_client_options(self.config.kafka)
            timeout_ms = int(self.timeout_s * 1000)
            self._admin = KafkaAdminClient(**options, request_timeout_ms=timeout_ms)
            self._consumer = KafkaConsumer(**options, request_timeout_ms=timeout_ms + 1000, enable_auto_commit=False)
        return self._admin, self._consumer

    def consumer_lag(self, group: str | None = None) -> dict[tuple[str, int], int]:
        """(topic, partition) -> messages `group` (default: the streaming job's) has not committed
        yet, for the events topic."""
        from kafka import TopicPartition

        admin, consumer = self._clients()
        topic = self.config.kafka.events_topic
        partitions = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        if not partitions:
            return {}
        group = group or self.config.streaming.consumer_group
        committed = admin.list_group_offsets({group: partitions}).get(group, {})
        ends = consumer.end_offsets(partitions)
        starts = consumer.beginning_offsets(partitions)
        lag = {}
        for tp in partitions:
            done = committed.get(tp)
            # Records retention deleted are no longer waiting: the group's next read starts after them.
            position = max(done.offset, starts[tp]) if done is not None and done.offset >= 0 else starts[tp]
            lag[(tp.topic, tp.partition)] = max(0, ends[tp] - position)
        return lag

    def _kafka_metrics(self):
        group = self.config.streaming.consumer_group
        lag = GaugeMetricFamily("mindstream_kafka_consumer_lag", "Events not yet committed by the streaming job's consumer group",
                                labels=["group", "topic", "partition"])
        up = GaugeMetricFamily("mindstream_kafka_up", "1 when the broker answered the exporter's last scrape")
        try:
            for (topic, partition), value in self.consumer_lag().items():
                lag.add_metric([group, topic, str(partition)], value)
            up.add_metric([], 1)
        except Exception as exc:  # an unreachable broker is a value (kafka_up 0), never a failed scrape
            log.warning("consumer lag unavailable: %s", exc)
            self._close_clients()
            up.add_metric([], 0)
        yield lag
        yield up

    def _model_metrics(self):
        from model_export.registry import CURRENT_FILE

        created = GaugeMetricFamily("mindstream_model_created_timestamp_seconds", "Export time of the current model",
                                    labels=["model_version"])
        published = GaugeMetricFamily("mindstream_model_published_timestamp_seconds", "When the current model was made current",
                                      labels=["model_version"])
        quality = GaugeMetricFamily("mindstream_model_offline_metric", "The current model's quality as its export measured it "
                                    "(split: test users of offline training, or the holdout a retraining was judged on)",
                                    labels=["model_version", "split", "metric"])
        models_dir = self.config.paths.models_dir
        try:
            current = json.loads((models_dir / CURRENT_FILE).read_text())
            version = current["model_version"]
            manifest = json.loads((models_dir / version / "manifest.json").read_text())
            created.add_metric([version], _timestamp(manifest["created_at"]))
            published.add_metric([version], _timestamp(current["published_at"]))
            for split, values in manifest.get("metrics", {}).items():
                for name, value in values.items():
                    quality.add_metric([version, split, name], float(value))
        except FileNotFoundError:
            pass  # nothing published yet: no series
        except Exception as exc:  # an unreadable registry record is logged, never a failed scrape (the lag series go on)
            log.warning("current model record unreadable, its series left out: %r", exc)
        yield created
        yield published
        yield quality

    def close(self) -> None:
        if self._online is not None:
            self._online_stop.set()
            self._online.join(timeout=10)
            self._online = None
        self._close_clients()

    def _close_clients(self) -> None:
        for client in (self._admin, self._consumer):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing a broken client must not hide the original error
                    pass
        self._admin = self._consumer = None


def serve(config: Config, port: int | None = None, host: str | None = None) -> tuple[object, StackCollector]:
    """Serves the collector on host:port, by default [monitoring].exporter_host:exporter_port (a
    registry of its own: no process metrics). Returns (HTTP server, collector): after
    `server.shutdown()`, `collector.close()` stops the online-quality judge and its Kafka clients,
    whose I/O threads would otherwise keep reconnecting for the life of the process."""
    from prometheus_client import CollectorRegistry, start_http_server

    collector = StackCollector(config)
    registry = CollectorRegistry()
    registry.register(collector)
    port = config.monitoring.exporter_port if port is None else port
    host = host or config.monitoring.exporter_host
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        collector.close()
        raise UserError(f"cannot serve the exporter's metrics on {host}:{port} ({exc.strerror}): free the port, or pass --port / set "
                        "[monitoring].exporter_port and exporter_host (MINDSTREAM_MONITORING__EXPORTER_PORT / _HOST)") from None
    if config.recall.served_log_ttl_s:
        try:
            collector.start_online_quality(registry)
        except BaseException:
            server.shutdown()
            server.server_close()
            raise
    return server, collector
