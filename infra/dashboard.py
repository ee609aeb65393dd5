"""The Grafana dashboard of mindstream, built with grafana-foundation-sdk and written as JSON to
infra/grafana/mindstream.json (`python -m infra dashboard`; the file is committed, and a test checks
that regenerating it changes nothing and that every panel's query returns data from a real
Prometheus).

The queries read the raw series (rate windows of $__rate_interval, which Grafana sizes to the
scrape interval), so the dashboard works on any Prometheus scraping the services, with or without
the recording rules of infra/prometheus/. A data-source variable picks the Prometheus on import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from infra.config import REPO_ROOT

DASHBOARD_PATH = REPO_ROOT / "infra" / "grafana" / "mindstream.json"
DATASOURCE = "${datasource}"
SERVER_ERROR_CODES = "INTERNAL|UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|UNKNOWN"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # or "stat"


def _quantiles(metric: str, by: str, legend: str) -> tuple[Query, ...]:
    grouping = f"le, {by}" if by else "le"
    return tuple(
        Query(f"histogram_quantile({q}, sum by ({grouping}) (rate({metric}_bucket[$__rate_interval])))", f"p{int(q * 100)} {legend}")
        for q in (0.5, 0.99)
    )


# One list of rows of panels: the dashboard and the test both read it.
ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    ("Recall service", (
        PanelSpec("Recall latency by stage (p50, p99)", "Per recall: feature-store read, user tower (on-the-fly path), "
                  "vector search, merge, and the total. SLO: 99% of recalls within 30 ms.", "s",
                  _quantiles("mindstream_recall_latency_seconds", "stage", "{{stage}}")),
        PanelSpec("Requests per second", "RPCs by method and gRPC status code.", "reqps",
                  (Query("sum by (method, code) (rate(mindstream_recall_requests_total[$__rate_interval]))", "{{method}} {{code}}"),)),
        PanelSpec("Error rate", "Share of RPCs that did not end OK: server-side codes (alerted above 1%) and all non-OK codes "
                  "(client errors such as INVALID_ARGUMENT included).", "percentunit",
                  # `or vector(0)`: no failed RPC yet is a rate of 0, not "no data"
                  (Query(f'(sum(rate(mindstream_recall_requests_total{{code=~"{SERVER_ERROR_CODES}"}}[$__rate_interval])) or vector(0)) '
                         "/ sum(rate(mindstream_recall_requests_total[$__rate_interval]))", "server errors"),
                   Query('(sum(rate(mindstream_recall_requests_total{code!="OK"}[$__rate_interval])) or vector(0)) '
                         "/ sum(rate(mindstream_recall_requests_total[$__rate_interval]))", "all non-OK"))),
        PanelSpec("Fallback rate by reason", "Share of recalls not served from stored interests (unknown users are "
                  "expected; outage reasons are alerted above 1%).", "percentunit",
                  (Query("sum by (reason) (rate(mindstream_recall_fallbacks_total[$__rate_interval])) / scalar(sum("
                         'rate(mindstream_recall_latency_seconds_count{stage="total", code="OK"}[$__rate_interval])))', "{{reason}}"),)),
        PanelSpec("Replicas reaching each backend", "Recall replicas whose last health probe reached the feature store, "
                  "the vector search and a loaded model; without the stores a replica reports NOT_SERVING, without a model its "
                  "RecallService does (alerted when none reaches one).",
                  "short", (Query("sum by (backend) (mindstream_recall_backend_up)", "{{backend}}"),), kind="stat"),
    )),
    ("Streaming job", (
        PanelSpec("Events per second", "Kafka records read by the job, and valid events by what they did to the user's window.", "ops",
                  (Query("sum(rate(mindstream_stream_events_in_total[$__rate_interval]))", "read"),
                   Query("sum by (outcome) (rate(mindstream_stream_events_applied_total[$__rate_interval]))", "{{outcome}}"))),
        PanelSpec("Event freshness (p50, p99)", "Event produce time (Kafka timestamp) to feature-store write. SLO: 99% within 1 s.", "s",
                  _quantiles("mindstream_stream_freshness_seconds", "", "freshness")),
        PanelSpec("Dead letters per second by reason", "Records sent to the dead-letter topic: malformed JSON, unknown or missing fields, "
                  "invalid values, oversized, dated too far ahead (future) or late.", "ops",
                  (Query("sum by (reason) (rate(mindstream_stream_dead_letters_total[$__rate_interval]))", "{{reason}}"),)),
        PanelSpec("Consumer lag", "Events of the events topic not committed yet by the job's consumer group (commits follow "
                  "checkpoints, so the lag is up to one checkpoint interval behind).", "short",
                  (Query("sum by (topic, partition) (mindstream_kafka_consumer_lag)", "{{topic}}/{{partition}}"),)),
        PanelSpec("User tower and store write (p99)", "Per micro-batch: ONNX user-tower latency and the pipelined Redis write.", "s",
                  (Query("histogram_quantile(0.99, sum by (le) (rate(mindstream_stream_tower_seconds_bucket[$__rate_interval])))", "user tower"),
                   Query("histogram_quantile(0.99, sum by (le) (rate(mindstream_stream_store_write_seconds_bucket[$__rate_interval])))", "store write"))),
    )),
    ("Model", (
        PanelSpec("Model version in use", "The user tower of the streaming job and the current model of the recall service (value 1).",
                  "none", (Query("max by (model_version) (mindstream_stream_model_info)", "job {{model_version}}"),
                           Query("max by (model_version) (mindstream_recall_model_info)", "recall {{model_version}}")), kind="stat"),
        PanelSpec("Model version age", "Time since the current model was exported (alerted after a week).", "s",
                  (Query("time() - max by (model_version) (mindstream_model_created_timestamp_seconds)", "{{model_version}}"),), kind="stat"),
        PanelSpec("Offline quality of the current model", "Recall@50 and HitRate@50 as the current model's export measured them: "
                  "on the held-out test users (offline training) or on the recent holdout a retraining was judged on.", "percentunit",
                  (Query('max by (model_version, split, metric) (mindstream_model_offline_metric{metric=~"recall@50|hitrate@50"})',
                         "{{metric}} ({{split}})"),), kind="stat"),
        PanelSpec("Items taken out of recall", "Inactive items (`python -m model_export items deactivate`) as the recall service "
                  "last read them from the registry.", "short", (Query("max(mindstream_recall_inactive_items)", "inactive items"),), kind="stat"),
        PanelSpec("Online hit rate by model version and recall path", "Share of the judged events whose item was in an answer "
                  "served to their user before them (recall_service/online_quality.py): the online HitRate, per version and path; and the "
                  "share of all events that could be judged (their user was served within [recall].served_log_ttl_s before).",
                  "percentunit",
                  # `or ... * 0`: a version with misses only has no hit series, and is a rate of 0, not "no data"
                  (Query('(sum by (model_version, path) (rate(mindstream_online_recall_events_total{outcome="hit"}[$__rate_interval])) '
                         'or 0 * sum by (model_version, path) (rate(mindstream_online_recall_events_total{outcome="miss"}[$__rate_interval]))) '
                         '/ sum by (model_version, path) (rate(mindstream_online_recall_events_total{outcome=~"hit|miss"}[$__rate_interval]))',
                         "{{model_version}} {{path}}"),
                   Query('sum(rate(mindstream_online_recall_events_total{outcome!="unjudged"}[$__rate_interval])) '
                         "/ sum(rate(mindstream_online_recall_events_total[$__rate_interval]))", "events judged"))),
    )),
)


def build_dashboard() -> dict:
    from grafana_foundation_sdk.builders import dashboard, prometheus, stat, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import DataSourceRef

    source = DataSourceRef(type_val="prometheus", uid=DATASOURCE)
    board = (
        dashboard.Dashboard("mindstream")
        .uid("mindstream")
        .description("Streaming multi-interest recall: recall service, streaming job, model. Generated by `python -m infra dashboard`.")
        .tags(["mindstream"])
        .refresh("10s")
        .time("now-30m", "now")
        .with_variable(dashboard.DatasourceVariable("datasource").label("Prometheus").type("prometheus"))
    )
    for row_title, panels in ROWS:
        board = board.with_row(dashboard.Row(row_title))
        for spec in panels:
            panel = (stat.Panel() if spec.kind == "stat" else timeseries.Panel()).title(spec.title).description(spec.description)
            panel = panel.unit(spec.unit).datasource(source).height(8).span(12 if spec.kind == "timeseries" else 6)
            for ref, query in zip("ABCDEFGH", spec.queries):
                panel = panel.with_target(prometheus.Dataquery().ref_id(ref).expr(query.expr).legend_format(query.legend).datasource(source))
            board = board.with_panel(panel)
    return json.loads(json.dumps(board.build(), cls=JSONEncoder))


def render_dashboard() -> str:
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def panel_queries(board: dict) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a dashboard's JSON."""
    return [(panel["title"], target["expr"]) for panel in board["panels"] if panel.get("type") != "row" for target in panel.get("targets", [])]


def write_dashboard(path: Path = DASHBOARD_PATH) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_dashboard())
    return path
