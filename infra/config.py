"""The one typed configuration of mindstream, shared by every package.

Values come from, in increasing precedence:
  1. the defaults below (a local, loopback-only embedded stack under ./var),
  2. a TOML file: $MINDSTREAM_CONFIG (it must exist; set it empty for none), else ./mindstream.toml
     if it exists,
  3. environment variables MINDSTREAM_<SECTION>__<FIELD>, e.g.
     MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS=broker-1:9093 or MINDSTREAM_MILVUS__URI=http://milvus:19530.

Secrets (passwords, tokens) are read like any other field, so production passes them as
environment variables from its secret store and never writes them into the TOML file.

Besides the fields, two variables are read: MINDSTREAM_CONFIG (the file above) and
MINDSTREAM_DISABLE_GPU (a boolean: the user tower stays on the CPU where a GPU is present). Any
other MINDSTREAM_* name is refused, so a misspelled one never leaves a default in place silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import tomllib
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from infra.cli import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "MINDSTREAM_"
CONFIG_FILE_VARIABLE = f"{ENV_PREFIX}CONFIG"
DISABLE_GPU_VARIABLE = f"{ENV_PREFIX}DISABLE_GPU"
# The MINDSTREAM_* variables that are no MINDSTREAM_<SECTION>__<FIELD>: every other name is refused.
SWITCH_VARIABLES = (CONFIG_FILE_VARIABLE, DISABLE_GPU_VARIABLE)
# A catalog of at least this many items trains its item-id table with sparse gradients and lazy Adam
# (model_export.train.LazyItemAdam): the default of `train --sparse-item-rows` and [retrain].sparse_item_rows.
SPARSE_ITEM_ROWS = 100_000


log = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A configuration value is missing, unknown or of the wrong type."""


@dataclass(frozen=True)
class PathsConfig:
    # Everything the embedded stack writes lives under var/ (git-ignored). The paths below default
    # under it but are set one by one: moving var_dir moves the job's logs and jars and the
    # benchmarks' folders, not them.
    var_dir: Path = REPO_ROOT / "var"
    data_dir: Path = REPO_ROOT / "var" / "data"  # downloaded datasets (never committed)
    cache_dir: Path = REPO_ROOT / "var" / "cache"  # preprocessed, split datasets
    artifacts_dir: Path = REPO_ROOT / "var" / "artifacts"  # trained models and exports
    models_dir: Path = REPO_ROOT / "var" / "models"  # the registry of published versions (a shared volume in production)
    shared_data_dir: Path = REPO_ROOT.parent / "shared" / "data"  # amazon_beauty.txt

    @property
    def main_export_dir(self) -> Path:
        """The export of the main command's model (infra/run.sh): what the benchmarks use by default."""
        return self.artifacts_dir / "ml-1m-mind_remi" / "export"


@dataclass(frozen=True)
class KafkaConfig:
    bootstrap_servers: str = "127.0.0.1:9092"
    events_topic: str = "mindstream.events.v1"
    dead_letter_topic: str = "mindstream.events.dlq.v1"
    # as Kafka spells them: the clients compare them as written ("ssl" would drop the CA and certificates)
    security_protocol: typing.Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: typing.Literal["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = ""
    sasl_username: str = ""
    sasl_password: str = ""
    ssl_cafile: str = ""
    ssl_certfile: str = ""
    ssl_keyfile: str = ""

    def __post_init__(self) -> None:
        _require_text("kafka", self, "bootstrap_servers", "events_topic", "dead_letter_topic")
        if self.events_topic == self.dead_letter_topic:
            raise ConfigError(f"[kafka].events_topic and dead_letter_topic are both {self.events_topic!r}: the job would read its own dead "
                              "letters back as events; give them two names (MINDSTREAM_KAFKA__DEAD_LETTER_TOPIC)")
        # Combinations a client would take without a word, and then send a password in clear,
        # connect without its certificate or without credentials: refused here, where the message can name the fields.
        tls = self.security_protocol in ("SSL", "SASL_SSL")
        if not tls and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise ConfigError(f"[kafka].ssl_cafile / ssl_certfile / ssl_keyfile are set but security_protocol is {self.security_protocol}, "
                              "which ignores them: set MINDSTREAM_KAFKA__SECURITY_PROTOCOL=SSL (or SASL_SSL), or drop the files")
        if bool(self.ssl_certfile) != bool(self.ssl_keyfile):
            raise ConfigError("[kafka].ssl_certfile and ssl_keyfile: a client certificate needs both (the job's Java client reads "
                              "them apart), set both or neither (MINDSTREAM_KAFKA__SSL_CERTFILE / MINDSTREAM_KAFKA__SSL_KEYFILE)")
        if self.ssl_keyfile:
            _require_pkcs8_key(self.ssl_keyfile)
        sasl = self.security_protocol.startswith("SASL_")
        if not sasl and (self.sasl_mechanism or self.sasl_username or self.sasl_password):
            raise ConfigError(f"[kafka].sasl_mechanism / sasl_username / sasl_password are set but security_protocol is {self.security_protocol}, "
                              "which sends no credentials: set MINDSTREAM_KAFKA__SECURITY_PROTOCOL=SASL_SSL (or SASL_PLAINTEXT), or drop them")
        if sasl and not self.sasl_mechanism:
            raise ConfigError(f"[kafka].security_protocol = {self.security_protocol} needs [kafka].sasl_mechanism "
                              "(MINDSTREAM_KAFKA__SASL_MECHANISM: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)")
        # The password is not required here: a process that uses no Kafka (the recall service) reads
        # the same settings without being given the Kafka secret; a client without it fails its login.
        if sasl and not self.sasl_username.strip():
            raise ConfigError(f"[kafka].security_protocol = {self.security_protocol} needs [kafka].sasl_username "
                              "(MINDSTREAM_KAFKA__SASL_USERNAME), and the clients that reach Kafka its sasl_password")


@dataclass(frozen=True)
class StreamingConfig:
    consumer_group: str = "mindstream-streaming"
    window_length: int = 50  # L: behaviours kept per user (the user tower reads the newest maxlen)
    allowed_lateness_ms: int = 60_000  # out-of-orderness accepted behind a user's newest event
    max_event_bytes: int = 4096  # larger records are dead-lettered
    batch_max_users: int = 256  # micro-batch bounds: users per user-tower call ...
    batch_max_delay_ms: int = 20  # ... and the longest an update waits for its batch
    state_ttl_hours: int = 720  # a user idle this long is dropped from the job's state
    record_ttl_s: int = 0  # feature-store record expiry (0 = never)
    # The newest items each user interacted with, kept beside the record (the window's and older
    # ones): the recall service never returns them. 128 keeps each set in Redis's compact encoding
    # (~2.5 KB a user; above it ~90 bytes an item). 0 = none kept, only the window is left out.
    seen_items: int = 128
    # A user the job holds no state for (new, idle past state_ttl_hours, or state lost) starts from
    # the window of its stored record: one store read per such user. Off: such windows start empty.
    seed_windows_from_store: bool = True
    checkpoint_interval_ms: int = 5_000
    # a folder, or a URI of a file system Flink writes to (s3://... in production): a string, since a
    # Path would fold "s3://bucket" into the local folder "s3:/bucket"
    checkpoint_dir: str = str(REPO_ROOT / "var" / "flink" / "checkpoints")
    parallelism: int = 1  # thread mode runs one Python interpreter per TaskManager JVM
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9465
    model_poll_s: float = 2.0  # how often the job looks for a newly published user tower
    # Topics are created with these when missing (the stack, `streaming topics`, the job's start);
    # production sets a replication factor its brokers' min.insync.replicas can meet (acks=all).
    topic_partitions: int = 2
    topic_retention_ms: int = 86_400_000
    topic_replication_factor: int = 1

    def __post_init__(self) -> None:
        _require_text("streaming", self, "consumer_group", "checkpoint_dir", "metrics_host")
        _require_range("streaming", self, "seen_items", 0)
        # not -1 as "never" (topic_retention_ms's convention): Redis takes EXPIRE -1 as "delete now"
        _require_range("streaming", self, "record_ttl_s", 0, REDIS_MAX_TTL_S)
        _require_port("streaming", self, "metrics_port")
        for name in ("window_length", "max_event_bytes", "batch_max_users", "checkpoint_interval_ms", "parallelism", "topic_partitions",
                     "topic_replication_factor", "state_ttl_hours"):
            _require_range("streaming", self, name, 1)
        for name in ("allowed_lateness_ms", "batch_max_delay_ms"):
            _require_range("streaming", self, name, 0)
        _require_range("streaming", self, "model_poll_s", 0.0, open_ends=True)
        _require_range("streaming", self, "topic_retention_ms", -1)  # -1: keep for ever (Kafka's convention)


@dataclass(frozen=True)
class RedisConfig:
    uri: str = "redis://127.0.0.1:6379/0"  # rediss:// for TLS; AUTH via password below or in the URI
    password: str = ""
    ssl_cafile: str = ""
    cluster: bool = False  # a Redis Cluster: uri names any one node (db 0), the client finds the others

    def __post_init__(self) -> None:
        if self.ssl_cafile and not self.uri.startswith("rediss://"):
            raise ConfigError("[redis].ssl_cafile is set but [redis].uri is not rediss://, so the connection would be plain text "
                              "(the password in clear): use a rediss:// URI (MINDSTREAM_REDIS__URI), or drop the CA file")
        example = "e.g. redis://host:6379/0, rediss://host:6380/0 or unix:///path/redis.sock"
        try:
            parts = urllib.parse.urlsplit(self.uri)
            parts.port  # noqa: B018 - raises for a port that is no number
        except ValueError as exc:
            raise ConfigError(f"[redis].uri (MINDSTREAM_REDIS__URI) = {printable_uri(self.uri)!r} is not a URI ({uri_problem(self.uri, exc)}): {example}") from None
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise ConfigError(f"[redis].uri (MINDSTREAM_REDIS__URI) = {printable_uri(self.uri)!r}: a redis://, rediss:// or unix:// URI with a "
                              f"host (or a socket path), {example}")
        if self.cluster and (parts.scheme == "unix" or _redis_db(parts) != 0):
            raise ConfigError(f"[redis].cluster is on but [redis].uri = {printable_uri(self.uri)!r} is a socket path or names a db other "
                              "than 0: a Redis Cluster is reached over TCP and has db 0 only (e.g. redis://node:6379/0)")
        if self.password and (parts.password or "password" in urllib.parse.parse_qs(parts.query)):
            raise ConfigError("[redis].password and a password in [redis].uri are both set, and the URI's would win: keep one "
                              "(MINDSTREAM_REDIS__PASSWORD, or the URI's)")


def _redis_db(parts: urllib.parse.SplitResult) -> int | str:
    """The db a redis:// URI names (its path, or a ?db= parameter, as redis-py reads it): 0 when none."""
    db = urllib.parse.parse_qs(parts.query).get("db", [parts.path.strip("/") or "0"])[0]
    return int(db) if db.isdigit() else db


MilvusServerKind = typing.Literal["lite", "server"]  # what `python -m infra up` can start for [milvus]
# The server URIs pymilvus 2.5 connects to (its unix: sockets aside, which the project's clients would take for a file).
MILVUS_SERVER_SCHEMES = ("http", "https", "tcp", "grpc")
StartOffsets = typing.Literal["earliest", "latest", "committed"]  # where a first retraining reads the topic from


@dataclass(frozen=True)
class MilvusConfig:
    uri: str = str(REPO_ROOT / "var" / "milvus" / "mindstream.db")  # a file = Milvus Lite
    token: str = ""  # "user:password" or an API key for a Milvus server
    # TLS to a server (https:// URIs): the CA certificate (or the server's own, self-signed) its
    # certificate is verified with, empty = the system's trusted roots; and the name its
    # certificate carries when that is not the URI's host (e.g. a service reached by its IP).
    tls_cafile: str = ""
    tls_server_name: str = ""
    collection_prefix: str = "mindstream_items"
    # The server `python -m infra up` starts for the stack: "lite" (Milvus Lite over gRPC, the
    # embedded default) or "server" (the standalone Milvus 2.3.5 binary of the PyPI package
    # `milvus`: HNSW built in the background, the recall load figures). Production sets uri instead.
    embedded_server: MilvusServerKind = "lite"

    def __post_init__(self) -> None:
        _require_text("milvus", self, "uri", "collection_prefix")
        example = "a Milvus Lite file (a path ending in .db) or a server, e.g. http://milvus:19530 (https:// for TLS)"
        shown = printable_uri(self.uri)
        if (self.tls_cafile or self.tls_server_name) and not self.uri.startswith("https://"):
            raise ConfigError(f"[milvus].tls_cafile / tls_server_name (MINDSTREAM_MILVUS__TLS_CAFILE / __TLS_SERVER_NAME) are set but "
                              f"[milvus].uri = {shown!r} is no https:// server URI: use https://HOST:PORT for TLS, or unset them")
        if "://" not in self.uri:  # what model_export.publish.connect and the recall service take for a Milvus Lite file
            if not self.uri.endswith(".db"):  # pymilvus refuses any other local path
                server = f" (a server? http://{shown})" if re.fullmatch(r"[\w.-]+:\d+", self.uri) else ""
                raise ConfigError(f"[milvus].uri (MINDSTREAM_MILVUS__URI) = {shown!r} is neither a Milvus Lite file nor a server URI{server}: {example}")
            return
        try:
            parts = urllib.parse.urlsplit(self.uri)
            parts.port  # noqa: B018 - raises for a port that is no number
        except ValueError as exc:
            raise ConfigError(f"[milvus].uri (MINDSTREAM_MILVUS__URI) = {shown!r} is not a URI ({uri_problem(self.uri, exc)}): {example}") from None
        if parts.scheme not in MILVUS_SERVER_SCHEMES or not parts.hostname:
            raise ConfigError(f"[milvus].uri (MINDSTREAM_MILVUS__URI) = {shown!r}: a server URI starts with "
                              f"{', '.join(scheme + '://' for scheme in MILVUS_SERVER_SCHEMES)} and names a host; {example}")


@dataclass(frozen=True)
class RecallServiceConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 = any free port (tests)
    metrics_host: str = "127.0.0.1"  # the /metrics listener; 0.0.0.0 in a container, so Prometheus in another one can scrape it
    metrics_port: int = 9464  # Prometheus /metrics; 0 = any free port
    tls_certfile: str = ""  # both set = TLS
    tls_keyfile: str = ""
    tls_cafile: str = ""  # what this project's clients verify the server's certificate with; empty = tls_certfile (self-signed)
    auth_token: str = ""  # set = every RPC but health needs `authorization: Bearer <token>`
    # Request limits: beyond them INVALID_ARGUMENT (messages over 4 x max_request_bytes are refused
    # by gRPC itself with RESOURCE_EXHAUSTED).
    max_n: int = 1000
    max_per_interest_n: int = 2000
    max_exclusions: int = 5000
    max_recent_items: int = 500
    max_filter_chars: int = 1024
    max_batch: int = 64
    max_request_bytes: int = 1_048_576
    # Time: the budget of a request without a deadline, and the caps of each backend call.
    default_deadline_ms: int = 1000
    feature_store_timeout_ms: int = 200
    vector_search_timeout_ms: int = 500
    outage_cooldown_ms: int = 1000  # a backend that failed 3 requests in a row is skipped this long (fallback at once)
    health_interval_ms: int = 2000
    fallback_on_outage: bool = True  # False: store / Milvus down -> UNAVAILABLE instead of a fallback path
    search_ef: int = 128  # HNSW ef (raised to the per-interest limit when smaller)
    search_batch_vectors: int = 256  # concurrent searches share one Milvus call up to this many vectors; 0 = never
    workers: int = 32  # gRPC handler threads: more requests in flight = larger shared Milvus searches (32 beat 16 in the bench)
    max_concurrent_rpcs: int = 256  # beyond: RESOURCE_EXHAUSTED at once instead of an unbounded queue
    # The answers to each user are kept in Redis this long, so the user's next events can be judged
    # against them: the online hit rate that `python -m infra exporter` counts. 0 = not kept, not judged.
    served_log_ttl_s: int = 3600
    # Answers kept per user (newest first): an event on an item of any of them within the ttl is a
    # hit, so an application that shows several (a refreshed carousel, a second page) is judged fairly.
    served_log_answers: int = 3

    def __post_init__(self) -> None:
        _require_text("recall", self, "host", "metrics_host")
        if any(not "!" <= ch <= "~" for ch in self.auth_token):  # the value is a secret: never quoted
            raise ConfigError("[recall].auth_token holds a character an HTTP/2 header cannot carry (a space, a line end, a non-ASCII "
                              "letter): no client could send it, so every call would be refused. A token read from a file often "
                              "ends with a newline: strip it (visible ASCII only, as bearer tokens are)")
        # one process listens on both (servers of other processes may share a port number in their own
        # network namespaces, as pods do, so only this pair is checked)
        if self.port and self.port == self.metrics_port and self.host == self.metrics_host:
            raise ConfigError(f"[recall].port and [recall].metrics_port are both {self.port}: the service listens on both; "
                              "give one another (MINDSTREAM_RECALL__METRICS_PORT)")
        _require_range("recall", self, "served_log_ttl_s", 0, REDIS_MAX_TTL_S)
        _require_range("recall", self, "served_log_answers", 1)
        for name in ("port", "metrics_port"):
            _require_port("recall", self, name)
        # 0 would refuse every RPC, health checks included: a service that never becomes ready, with no word why
        for name in ("workers", "max_concurrent_rpcs", "max_n", "max_batch", "default_deadline_ms",
                     "feature_store_timeout_ms", "vector_search_timeout_ms", "health_interval_ms", "search_ef"):
            _require_range("recall", self, name, 1)
        # Milvus answers at most 16,384 hits per query vector (a server refuses more: every such search
        # would fall back to popular items); a filter is parsed per request (the cap bounds that work)
        _require_range("recall", self, "max_per_interest_n", 1, MILVUS_MAX_TOPK)
        _require_range("recall", self, "max_filter_chars", 0, 65_536)
        # gRPC takes its receive limit, 4x this (framing, a batch's worth), as a C int
        _require_range("recall", self, "max_request_bytes", 1, (2**31 - 1) // 4)
        for name in ("outage_cooldown_ms", "max_exclusions", "max_recent_items", "search_batch_vectors"):
            _require_range("recall", self, name, 0)


@dataclass(frozen=True)
class RetrainConfig:
    consumer_group: str = "mindstream-retrain"  # its own group: the job's offsets are never touched
    state_dir: Path = REPO_ROOT / "var" / "retrain"  # the event log since the base dataset, and the runs
    start_offsets: StartOffsets = "earliest"  # first retraining without recorded offsets
    min_new_events: int = 1000  # fewer new events than this: nothing to retrain on yet
    min_new_item_events: int = 2  # an item first seen in the stream gets a vector once it has this many events
    holdout_fraction: float = 0.1  # the newest part of the new events (by event time) judges the candidate
    tolerance: float = 0.02  # refuse a candidate whose holdout Recall@50 is this fraction below the current model's
    epochs: int = 2  # fine-tuning passes over the new events (plus as many replayed older samples)
    replay_ratio: float = 1.0  # older samples replayed per new sample, against forgetting
    lr: float = 5e-4
    batch_size: int = 512
    backfill_batch: int = 512
    sparse_item_rows: int = SPARSE_ITEM_ROWS  # a grown catalog this large fine-tunes with lazy Adam (0 = never)
    every_minutes: float = 0.0  # scheduled mode (retrain --schedule): retrain after this long ...
    every_events: int = 0  # ... or once this many new events wait, whichever comes first
    # versions kept beside the current one when a refresh retires the rest (those current most
    # recently): a rollback without re-publishing; each holds a loaded collection in Milvus
    keep_previous: int = 1

    def __post_init__(self) -> None:
        # Out of these ranges a value fails deep inside a retraining (numpy's quantile) or, worse,
        # runs: a tolerance of 2 (meant as 2%) would publish a model with no recall at all.
        _require_text("retrain", self, "consumer_group")
        _require_range("retrain", self, "min_new_events", 0)
        _require_range("retrain", self, "min_new_item_events", 1)
        _require_range("retrain", self, "holdout_fraction", 0.0, 1.0, open_ends=True)
        _require_range("retrain", self, "tolerance", 0.0, 1.0)
        _require_range("retrain", self, "epochs", 1)
        _require_range("retrain", self, "replay_ratio", 0.0)
        _require_range("retrain", self, "lr", 0.0, open_ends=True)
        _require_range("retrain", self, "batch_size", 1)
        _require_range("retrain", self, "backfill_batch", 1)
        _require_range("retrain", self, "sparse_item_rows", 0)
        _require_range("retrain", self, "every_minutes", 0.0)
        _require_range("retrain", self, "every_events", 0)
        _require_range("retrain", self, "keep_previous", 0)


@dataclass(frozen=True)
class MonitoringConfig:
    prometheus_port: int = 9090  # the embedded stack's Prometheus, on 127.0.0.1
    exporter_host: str = "127.0.0.1"  # python -m infra exporter's listener; 0.0.0.0 in a container (as [recall].metrics_host)
    exporter_port: int = 9466  # python -m infra exporter: consumer lag, model age and quality, online hit rate
    online_quality_group: str = "mindstream-online-quality"  # the exporter's consumer group judging events against what was served
    scrape_interval_s: int = 5
    # Where infra/install_prometheus.sh unpacks prometheus and promtool (bin/) and where the stack looks
    # for them first (then on PATH)
    prometheus_home: Path = REPO_ROOT / "var" / "prometheus"

    def __post_init__(self) -> None:
        _require_text("monitoring", self, "exporter_host", "online_quality_group")
        for name in ("prometheus_port", "exporter_port"):
            _require_port("monitoring", self, name)
        _require_range("monitoring", self, "scrape_interval_s", 1)


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    kafka: KafkaConfig = field(default_factory=KafkaConfig)
    streaming: StreamingConfig = field(default_factory=StreamingConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    milvus: MilvusConfig = field(default_factory=MilvusConfig)
    recall: RecallServiceConfig = field(default_factory=RecallServiceConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)


# user:password in scheme://user:password@host, to the last @ (a password may hold "/", spaces or "@": masking
# a path's "@" as well errs on the safe side)
URI_CREDENTIALS = re.compile(r"(?<=://).*(?=@)")
# ?password=... in a query string (redis-py reads it): the value of a parameter named like a secret
URI_SECRET_PARAMETERS = re.compile(r"(?<=[?&])([^=&#]*(?:password|token|secret)[^=&#]*=)[^&#]*", re.IGNORECASE)


def printable_uri(uri: str) -> str:
    """`uri` with its credentials (user:password@, ?password=...) as ***: for logs and messages."""
    return URI_SECRET_PARAMETERS.sub(lambda m: m.group(1) + "***", URI_CREDENTIALS.sub("***", uri))


def uri_problem(uri: str, error: ValueError) -> str:
    """What urllib found wrong with `uri`, unless the URI holds credentials: a "/" in a password ends the
    host part for urllib, which then quotes a piece of the password as the port."""
    if URI_CREDENTIALS.search(uri):
        return "a /, @, : or space in a user name or password must be percent-encoded, e.g. / as %2F"
    return str(error)


MILVUS_MAX_TOPK = 16_384  # Milvus' cap on one query's top k (and on the hits of one search call)
REDIS_MAX_TTL_S = 2**31 - 1  # ~68 years; Redis refuses expiry times whose milliseconds overflow ("invalid expire time")


def _require_range(section: str, values: object, name: str, low: float, high: float | None = None, open_ends: bool = False) -> None:
    """A field's value within [low, high] (open_ends: (low, high)), else a ConfigError naming it."""
    value = getattr(values, name)
    inside = (low < value if open_ends else low <= value) and (high is None or (value < high if open_ends else value <= high))
    if not inside:
        bounds = f"{'(' if open_ends else '['}{low}, {high if high is not None else 'inf'}{')' if open_ends or high is None else ']'}"
        raise ConfigError(f"[{section}].{name} ({_env_name(section, name)}) = {value!r}: must be in {bounds}")


def _require_text(section: str, values: object, *names: str) -> None:
    """Each field a non-blank string, else a ConfigError naming it: an empty address, topic, group or
    folder would otherwise fail far from the setting (or bind every interface, for a host)."""
    defaults = {f.name: f.default for f in dataclasses.fields(values)}
    for name in names:
        if not str(getattr(values, name)).strip():
            raise ConfigError(f"[{section}].{name} ({_env_name(section, name)}) is empty: set it, or leave it out for the default {defaults[name]!r}")


# The label of a PEM private key: "PRIVATE KEY" (PKCS#8), "ENCRYPTED PRIVATE KEY", "RSA PRIVATE KEY" (PKCS#1), "EC PRIVATE KEY"
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----")


def _require_pkcs8_key(path: str) -> None:
    """[kafka].ssl_keyfile an unencrypted PKCS#8 key, else a ConfigError: kafka-python takes PKCS#1 too,
    but the Flink job's Java client only PKCS#8, and an encrypted key needs a password [kafka] has not.
    A file this process cannot read is left to the clients: one that uses no Kafka (the recall
    service) is given the settings without the key."""
    try:
        pem = Path(path).read_bytes()
    except OSError:
        return
    found = PEM_PRIVATE_KEY.search(pem)
    if found and found.group(1) != b"PRIVATE KEY":
        label = found.group(1).decode()
        raise ConfigError(f"[kafka].ssl_keyfile (MINDSTREAM_KAFKA__SSL_KEYFILE) = {path} holds a PEM key labelled {label!r}, which the Flink job's "
                          "Java Kafka client does not read (it takes an unencrypted PKCS#8 key, 'BEGIN PRIVATE KEY'): convert it with "
                          f"`openssl pkcs8 -topk8 -nocrypt -in {path} -out {path}.pk8` and name the .pk8 file")


def _require_port(section: str, values: object, name: str) -> None:
    _require_range(section, values, name, 0, 65535)  # 0: any free port


def _coerce(value: object, target: type, where: str) -> object:
    """Turn a TOML or environment value into the field's declared type, or say what is wrong."""
    if typing.get_origin(target) is typing.Literal:
        if value not in typing.get_args(target):
            raise ConfigError(f"{where}: expected one of {', '.join(map(repr, typing.get_args(target)))}, got {value!r}")
        return value
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{where}: expected a boolean, got {value!r}")
    if isinstance(value, bool) and target in (int, float):  # int(True) == 1: a TOML `true` is no count
        raise ConfigError(f"{where}: expected a number, got the boolean {value!r}; write a number")
    if target is float:
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # nan compares false with everything: no limit or rate means anything with it
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return number
    if target is int:
        if isinstance(value, float) and not value.is_integer():  # int(50051.9) == 50051: refuse, never truncate
            raise ConfigError(f"{where}: expected an integer, got {value!r}; write a whole number")
        try:
            return int(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}; write a whole number") from None
    if target is Path:
        if str(value).strip() == "":  # Path("") is the current folder: never what an empty setting meant
            raise ConfigError(f"{where}: expected a path, got an empty value")
        return Path(str(value)).expanduser()
    if target is str:
        if not isinstance(value, (str, int, float)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{where}: unsupported field type {target!r}")


def _env_name(section_name: str, field_name: str) -> str:
    return f"{ENV_PREFIX}{section_name.upper()}__{field_name.upper()}"


def _check_variable_names(environ: dict) -> None:
    """A MINDSTREAM_* variable that is neither a field (MINDSTREAM_<SECTION>__<FIELD>) nor one of
    SWITCH_VARIABLES is refused, as an unknown TOML key is: a misspelled secret, address or file
    (MINDSTREAM_CONFG) would otherwise leave the default in place without a word, and so would
    MINDSTREAM_<SECTION>_<FIELD> with one underscore."""
    sections = [section.name for section in dataclasses.fields(Config)]
    fields = {_env_name(section, f.name) for section in sections for f in dataclasses.fields(typing.get_type_hints(Config)[section])}
    known = fields | set(SWITCH_VARIABLES)
    # MINDSTREAM_RECALL_AUTH_TOKEN (one underscore after a section) would leave the API without its token, silently
    one_underscore = tuple(f"{ENV_PREFIX}{section.upper()}_" for section in sections)
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    if unknown:
        def suggestion(name: str) -> list[str]:
            doubled = next((prefix + "_" + name[len(prefix):] for prefix in one_underscore if name.startswith(prefix)), "")
            return [doubled] if doubled in fields else difflib.get_close_matches(name, known, n=1, cutoff=0.8)

        named = [name + "".join(f" (did you mean {match}?)" for match in suggestion(name)) for name in unknown]
        raise ConfigError(f"unknown configuration variables: {', '.join(named)}; MINDSTREAM_<SECTION>__<FIELD> must name a field "
                          f"of infra/config.py (`python -m infra config` lists them), and the others are {' and '.join(SWITCH_VARIABLES)}: "
                          "rename or unset them")


def gpu_disabled(environ: typing.Mapping[str, str] | None = None) -> bool:
    """MINDSTREAM_DISABLE_GPU: true keeps the user tower on the CPU where a GPU is present (unset or
    empty: false); anything but a boolean (1/true/yes/on, 0/false/no/off) is a ConfigError."""
    value = (os.environ if environ is None else environ).get(DISABLE_GPU_VARIABLE, "")
    return value != "" and typing.cast(bool, _coerce(value, bool, DISABLE_GPU_VARIABLE))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_text_credentials(config: Config) -> list[str]:
    """The secrets this configuration sends to another host without TLS: a Kafka SASL PLAIN password
    over SASL_PLAINTEXT, a Redis password over redis:// and a Milvus token (or user:password) over
    http:// (tcp://, grpc://), each as a sentence saying what to do. Loopback, unix sockets and Milvus
    Lite files cross no network."""
    problems = []
    kafka = config.kafka
    # SCRAM sends a proof of the password, never the password: PLAIN alone sends it as it is
    if kafka.security_protocol == "SASL_PLAINTEXT" and kafka.sasl_mechanism == "PLAIN" and kafka.sasl_password:
        brokers = [urllib.parse.urlsplit("//" + server.strip()).hostname or "" for server in kafka.bootstrap_servers.split(",")]
        elsewhere = [host for host in brokers if host and not _is_loopback(host)]
        if elsewhere:
            problems.append(f"the Kafka password goes to {', '.join(elsewhere)} in clear text ([kafka].security_protocol is SASL_PLAINTEXT "
                            "with sasl_mechanism PLAIN): use SASL_SSL (MINDSTREAM_KAFKA__SECURITY_PROTOCOL, with [kafka].ssl_cafile), "
                            "or keep Kafka on a network only this system reaches")
    redis = urllib.parse.urlsplit(config.redis.uri)
    redis_secret = config.redis.password or redis.password or "password" in urllib.parse.parse_qs(redis.query)
    if redis_secret and redis.scheme == "redis" and redis.hostname and not _is_loopback(redis.hostname):
        problems.append(f"the Redis password goes to {redis.hostname} in clear text ([redis].uri is redis://): use rediss:// "
                        "(MINDSTREAM_REDIS__URI, with [redis].ssl_cafile), or keep Redis on a network only this system reaches")
    milvus = urllib.parse.urlsplit(config.milvus.uri) if "://" in config.milvus.uri else None
    if milvus and (config.milvus.token or milvus.password) and milvus.scheme != "https" and milvus.hostname and not _is_loopback(milvus.hostname):
        problems.append(f"the Milvus token goes to {milvus.hostname} in clear text ([milvus].uri is {milvus.scheme}://): use https:// "
                        "(MINDSTREAM_MILVUS__URI, a Milvus with TLS), or keep Milvus on a network only this system reaches")
    return problems


_warned: set[str] = set()  # each warning once per process, however often the configuration is loaded


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        log.warning(message)


def warn_plain_text_credentials(config: Config) -> None:
    """Logs each of plain_text_credentials(config) as a warning, once per process: load_config does,
    and so does a command that replaces an address of the loaded configuration."""
    for problem in plain_text_credentials(config):
        _warn_once(problem)


def _section_overrides(section_name: str, section_cls: type, from_file: dict, environ: dict) -> dict:
    hints = typing.get_type_hints(section_cls)
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(from_file) - known
    if unknown:
        raise ConfigError(f"[{section_name}] has unknown keys {sorted(unknown)}; known: {sorted(known)}")
    values = {}
    for name in known:
        env_name = _env_name(section_name, name)
        if env_name in environ:
            values[name] = _coerce(environ[env_name], hints[name], env_name)
        elif name in from_file:
            values[name] = _coerce(from_file[name], hints[name], f"[{section_name}].{name}")
    return values


def config_file(environ: dict, path: str | os.PathLike | None = None) -> Path | None:
    """The TOML file to read: `path`, else $MINDSTREAM_CONFIG (set but empty: none), else
    ./mindstream.toml when it exists. A file someone named must exist: a mistyped path would
    otherwise run every service on the defaults (127.0.0.1) without a word."""
    named = str(path) if path else environ.get(CONFIG_FILE_VARIABLE)
    if named == "":
        return None
    if named is None:
        return Path("mindstream.toml") if Path("mindstream.toml").is_file() else None
    if not Path(named).is_file():
        raise ConfigError(f"configuration file {named}{'' if path else f' (${CONFIG_FILE_VARIABLE})'} does not exist: fix the path, "
                          f"or set {CONFIG_FILE_VARIABLE}= (empty) for the defaults and variables only")
    return Path(named)


def load_config(path: str | os.PathLike | None = None, environ: dict | None = None) -> Config:
    """Load the configuration: defaults, then the TOML file, then MINDSTREAM_* variables."""
    environ = dict(os.environ if environ is None else environ)
    _check_variable_names(environ)
    gpu_disabled(environ)  # a bad value stops every command at its start, not the first user-tower session
    file_path = config_file(environ, path)
    from_file: dict = {}
    if file_path is not None:
        with open(file_path, "rb") as fh:
            try:
                from_file = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"{file_path}: not valid TOML ({exc})") from None
    sections = {f.name: f for f in dataclasses.fields(Config)}
    unknown = set(from_file) - set(sections)
    if unknown:
        raise ConfigError(f"{file_path}: unknown sections {sorted(unknown)}; known: {sorted(sections)}")
    built = {}
    for name, f in sections.items():
        section_cls = typing.get_type_hints(Config)[name]
        values = from_file.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{file_path}: `{name}` must be a table ([{name}] with key = value lines), not {values!r}")
        try:
            built[name] = section_cls(**_section_overrides(name, section_cls, values, environ))
        except ConfigError as exc:
            if file_path is None:
                raise
            raise ConfigError(f"{file_path}: {exc}") from None  # which file: the user's, or the stack's generated one
    config = Config(**built)
    warn_plain_text_credentials(config)
    return config
