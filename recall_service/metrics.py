"""Prometheus metrics of the recall service (prefix mindstream_recall_), on their own registry so
several servers can live in one process (tests); `serve` exports it on [recall].metrics_host:metrics_port.

    mindstream_recall_latency_seconds{path, stage, code}   stage: feature_store, user_tower, vector_search,
                                                      merge, total (one observation per recall answered OK, and
                                                      per recall of an RPC the service failed, with path "none"
                                                      and its status code; a client's INVALID_ARGUMENT and the
                                                      interceptors' refusals are counted below, not timed)
    mindstream_recall_requests_total{method, code}   gRPC status code names; RESOURCE_EXHAUSTED counts the RPCs
                                                      refused over [recall].max_concurrent_rpcs, UNAUTHENTICATED
                                                      those refused for their token (each RPC once, under the
                                                      code its client got)
    mindstream_recall_fallbacks_total{reason}        requests not served from stored interests
    mindstream_recall_result_items                   items per response
    mindstream_recall_unexpected_errors_total{method} exceptions no rule maps (returned as INTERNAL; method
                                                      "health_probe": a probe that failed, probing goes on)
    mindstream_recall_model_info{model_version}      1 for the current model
    mindstream_recall_inactive_items                 items taken out of recall (`model_export items`)
    mindstream_recall_served_log_dropped_total{reason} answers not kept in the served log (queue_full,
                                                      unavailable, closed: left queued at stop, error: a bug
                                                      in keeping them): their users' next events go unjudged
    mindstream_recall_backend_up{backend}            1 when the last health probe reached it (feature_store,
                                                      vector_search; model: a model answers, the current one
                                                      or the one loaded before); a replica's RecallService
                                                      reports NOT_SERVING while one is 0

The labelled counters start with every known label value at 0, so the first failure of a kind is an
increase Prometheus sees (a series born at 1 has no increase to alert on): the fallback reasons and
served-log drop reasons here; the RPCs' codes, their unexpected errors and the failed recalls'
latency (path "none") where the server knows them (RecallServer._export_at_zero).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from recall_service.query import FallbackReason

# Around the targets: p99 overhead <= 3 ms over a search of 5-20 ms, p99 <= 30 ms at scale. Between
# 10 and 30 ms (a search at scale) 2.5 ms apart: histogram_quantile interpolates inside a bucket,
# and with 5-10 ms wide ones a true p99 of 24 ms read as 30 (and a stage's difference as noise).
LATENCY_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.0175, 0.02, 0.0225, 0.025, 0.0275, 0.03,
                   0.04, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0)
STORES = ("feature_store", "vector_search")  # the backends the health probe pings, in that order
BACKENDS = (*STORES, "model")  # the backend label: the stores, and a model to answer with
SERVED_LOG_DROP_REASONS = ("queue_full", "unavailable", "closed", "error")
SIZE_BUCKETS = (0, 1, 5, 10, 20, 50, 100, 200, 500, 1000)


class RecallMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.latency = Histogram("mindstream_recall_latency_seconds", "Recall latency by path, stage and status code", ["path", "stage", "code"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.requests = Counter("mindstream_recall_requests_total", "RPCs by method and gRPC status code", ["method", "code"], registry=self.registry)
        self.fallbacks = Counter("mindstream_recall_fallbacks_total", "Requests not served from stored interests, by reason", ["reason"], registry=self.registry)
        self.result_items = Histogram("mindstream_recall_result_items", "Items per response", buckets=SIZE_BUCKETS, registry=self.registry)
        self.unexpected = Counter("mindstream_recall_unexpected_errors_total", "Exceptions no rule maps to a status code", ["method"], registry=self.registry)
        self.model_info = Gauge("mindstream_recall_model_info", "The current model version (value 1)", ["model_version"], registry=self.registry)
        self.inactive_items = Gauge("mindstream_recall_inactive_items", "Items taken out of recall, as this service last read them",
                                    registry=self.registry)
        self.served_log_dropped = Counter("mindstream_recall_served_log_dropped_total", "Answers not kept in the served log, by reason",
                                          ["reason"], registry=self.registry)
        self.backend_up = Gauge("mindstream_recall_backend_up", "1 when the last health probe reached the backend", ["backend"],
                                registry=self.registry)
        for reason in FallbackReason:
            if reason is not FallbackReason.NONE:
                self.fallbacks.labels(reason.name.lower())
        for reason in SERVED_LOG_DROP_REASONS:
            self.served_log_dropped.labels(reason)
        self._model_version: str | None = None

    def set_model_version(self, version: str | None) -> None:
        if version == self._model_version:
            return
        if self._model_version is not None:
            self.model_info.remove(self._model_version)
        if version is not None:
            self.model_info.labels(model_version=version).set(1)
        self._model_version = version

    def serve(self, port: int, host: str = "127.0.0.1"):
        """The /metrics HTTP endpoint; returns (server, thread) so it can be shut down."""
        return start_http_server(port, addr=host, registry=self.registry)
