"""The gRPC recall server: RecallService (recall.proto), the standard health and reflection services,
optional TLS and bearer-token auth, Prometheus metrics, and the served log (each answer kept for
[recall].served_log_ttl_s, recall_service/served_log.py: what the online hit rate is judged against).

The servicer only translates: proto -> `validate` -> `Recaller` -> proto, and exceptions -> status
codes by one table (`_status_of`): InvalidRequest -> INVALID_ARGUMENT, DeadlineExceeded ->
DEADLINE_EXCEEDED, BackendUnavailable -> UNAVAILABLE. Anything else is a bug: logged with its
traceback, counted in mindstream_recall_unexpected_errors_total and returned as INTERNAL; no input
is meant to get there (tests/test_recall_fuzz.py sends malformed requests of every kind, down to
arbitrary bytes, and expects none). Requests are deserialized by `_lenient_parser`, not by gRPC,
which would answer bytes that are not a valid message with INTERNAL and count them nowhere.

The request's deadline (context.time_remaining(), else [recall].default_deadline_ms) bounds every
vector search and is checked before the feature-store read, each per-user re-read and every later
stage; the store read itself is bounded by [recall].feature_store_timeout_ms (redis-py has no
per-call timeout). Health, set by a probe every health_interval_ms: the overall status ("": the
stack's readiness wait, start-up probes) is SERVING while the last probe reached both Redis and
Milvus; the RecallService's (readiness probes) while, besides, a model can answer (the current
one loaded, or the one loaded before it): with none, every user without stored interests gets
UNAVAILABLE. Both are NOT_SERVING before the first probe. Requests are answered whatever the status
(fallback paths; stored users need no model), so a replica a client still reaches degrades rather
than fails. The service starts without a published model (the stack may start it first): only
the RecallService's status waits for one.
"""

from __future__ import annotations

import hmac
import logging
import threading
import time
from concurrent import futures

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from infra.cli import UserError
from infra.config import Config, ConfigError
from recall_service.channel import grpc_address
from recall_service.coalesce import CoalescingSearch
from recall_service.metrics import BACKENDS, STORES, RecallMetrics
from recall_service.query import FallbackReason, InvalidRequest, Limits, validate
from recall_service.recaller import BackendUnavailable, Deadline, DeadlineExceeded, Recaller, RecallResult
from recall_service.served_log import ServedLog, ServedRecord
from recall_service.stubs import SERVICE_NAME, recall_pb2, recall_pb2_grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"  # probes (load balancers, kubelet) carry no token
HEALTH_CHECK = HEALTH_PREFIX + "Check"
NO_PATH = "none"  # the path label of a failed request's latency: it took no recall path
HEALTH_PROBE = "health_probe"  # the method label of a failed health probe in the unexpected errors' count


class ServeError(UserError, RuntimeError):
    """The server cannot start; the message says what to do next."""


_STATUS_OF = ((InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT), (DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
              (BackendUnavailable, grpc.StatusCode.UNAVAILABLE))
# Every code a RecallService RPC ends with: answered, failed by an error of _STATUS_OF or by a bug
# (INTERNAL), or refused by an interceptor (the concurrency limit, the token check).
RPC_CODES = (grpc.StatusCode.OK, *(code for _, code in _STATUS_OF), grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED,
             grpc.StatusCode.UNAUTHENTICATED)
# The RPCs of the RecallService: name -> (request, response) message classes
RPCS = {"Recall": (recall_pb2.RecallRequest, recall_pb2.RecallResponse), "BatchRecall": (recall_pb2.BatchRecallRequest, recall_pb2.BatchRecallResponse)}


def _status_of(exc: Exception) -> grpc.StatusCode | None:
    return next((code for kind, code in _STATUS_OF if isinstance(exc, kind)), None)


def _timed(code: grpc.StatusCode) -> bool:
    """Whether a failed RPC's latency is observed: not a request the client got wrong, which says nothing of the service's speed."""
    return code is not grpc.StatusCode.INVALID_ARGUMENT


class UnreadableRequest:
    """Handed to the servicer instead of a request whose bytes are not a valid message."""

    def __init__(self, type_name: str, error: DecodeError):
        self.error = InvalidRequest(f"request: not a valid {type_name} ({error}); build it with stubs generated from recall.proto")


def _lenient_parser(message_class):
    """A request deserializer that never raises (see the module docstring)."""
    def parse(serialized: bytes):
        try:
            return message_class.FromString(serialized)
        except DecodeError as exc:  # truncated records, wrong wire types, strings that are not UTF-8
            return UnreadableRequest(message_class.DESCRIPTOR.full_name, exc)

    return parse


class RecallServicer(recall_pb2_grpc.RecallServiceServicer):
    def __init__(self, recaller: Recaller, limits: Limits, metrics: RecallMetrics, default_deadline_s: float, max_request_bytes: int,
                 served_log: ServedLog | None = None):
        self.recaller, self.limits, self.metrics = recaller, limits, metrics
        self.default_deadline_s, self.max_request_bytes = default_deadline_s, max_request_bytes
        self.served_log = served_log

    def Recall(self, request, context):
        responses = self._serve("Recall", request, context)
        return responses[0] if responses else recall_pb2.RecallResponse()

    def BatchRecall(self, request, context):
        return recall_pb2.BatchRecallResponse(responses=self._serve("BatchRecall", request, context) or [])

    def _serve(self, method: str, message, context) -> list | None:
        """The responses, or None when the request failed (its status is set on `context`). Every
        recall is timed (stage "total"), failed ones too: a deadline missed is the slowest answer of
        all. Not a request the client got wrong (INVALID_ARGUMENT): it says nothing of the service's speed."""
        started = time.perf_counter()
        requests = [message]
        try:
            if isinstance(message, UnreadableRequest):
                raise message.error
            # both limits before the requests are listed: 4 MiB of empty requests are 2 million wrappers (~1 s, ~200 MB)
            if method == "BatchRecall" and len(message.requests) > self.limits.max_batch:
                raise InvalidRequest(f"requests: {len(message.requests)} in one batch, at most {self.limits.max_batch}")
            if message.ByteSize() > self.max_request_bytes:
                raise InvalidRequest(f"request: {message.ByteSize()} bytes, at most {self.max_request_bytes}; split it")
            requests = list(message.requests) if method == "BatchRecall" else [message]
            queries = [self._query(r, i if method == "BatchRecall" else None) for i, r in enumerate(requests)]
            remaining = context.time_remaining()
            budget = remaining if remaining is not None and remaining < 1e6 else self.default_deadline_s
            try:
                results = self.recaller.recall_many(queries, Deadline(budget))
            except InvalidRequest as exc:
                if method == "BatchRecall" and exc.requests:  # as validation names a request: by its index
                    # a filter the vector store rejected: every request of the batch that has it, not only
                    # those of the group whose search came first
                    rejected = {queries[i].item_filter.milvus_expr for i in exc.requests if queries[i].item_filter is not None}
                    named = [i for i, q in enumerate(queries) if i in exc.requests or (q.item_filter is not None and q.item_filter.milvus_expr in rejected)]
                    raise InvalidRequest(f"{', '.join(f'requests[{i}]' for i in named)}.{exc}") from None
                raise
            responses = [self._response(r) for r in results]
        except Exception as exc:  # every exception ends as a status code here, never escapes to gRPC
            self._fail(method, context, exc, time.perf_counter() - started, max(len(requests), 1))
            return None
        total = time.perf_counter() - started
        for result in results:
            path = result.path.name.lower()
            for stage, seconds in result.stages.items():
                self.metrics.latency.labels(path, stage, "OK").observe(seconds)
            self.metrics.latency.labels(path, "total", "OK").observe(total)
            self.metrics.result_items.observe(len(result.items))
            if result.reason is not FallbackReason.NONE:
                self.metrics.fallbacks.labels(result.reason.name.lower()).inc()
        self.metrics.requests.labels(method, "OK").inc()
        if self.served_log is not None:
            served_ms = int(time.time() * 1000)
            try:
                self.served_log.record([ServedRecord(query.user_id, result.model_version, result.path.name.lower(), served_ms,
                                                     tuple(raw for raw, _, _ in result.items)) for query, result in zip(queries, results)])
            except Exception:  # the answer is computed and counted OK: its monitoring must not fail it
                log.exception("served log: answers not recorded")
                self.metrics.served_log_dropped.labels("error").inc(len(results))
        return responses

    def _query(self, request, index: int | None):
        try:
            return validate(request.user_id, request.n, request.exclude_item_ids, request.recent_item_ids, request.filter,
                            request.per_interest_n, request.merge_policy, self.limits)
        except InvalidRequest as exc:
            raise InvalidRequest(f"requests[{index}].{exc}" if index is not None else str(exc)) from None

    def _fail(self, method: str, context, exc: Exception, seconds: float, recalls: int) -> None:
        code = _status_of(exc)
        if code is None:
            log.exception("unexpected error in %s", method, exc_info=exc)
            self.metrics.unexpected.labels(method).inc()
            code, message = grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); it is logged and counted"
        else:
            message = str(exc)
        self.metrics.requests.labels(method, code.name).inc()
        if _timed(code):
            total = self.metrics.latency.labels(NO_PATH, "total", code.name)
            for _ in range(recalls):  # as an answered batch: one observation per recall
                total.observe(seconds)
        context.set_code(code)
        context.set_details(message)

    def add_to_server(self, server: grpc.Server) -> None:
        """As recall_pb2_grpc.add_RecallServiceServicer_to_server, with `_lenient_parser` deserializers."""
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(getattr(self, name), request_deserializer=_lenient_parser(request_class),
                                                      response_serializer=response_class.SerializeToString)
            for name, (request_class, response_class) in RPCS.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
        server.add_registered_method_handlers(SERVICE_NAME, handlers)

    @staticmethod
    def _response(result: RecallResult):
        response = recall_pb2.RecallResponse(model_version=result.model_version, path=result.path.value, fallback_reason=result.reason.value)
        add = response.items.add  # ~1.5x faster than building RecalledItem messages and passing the list
        for raw, score, interest in result.items:
            add(item_id=raw, score=score, interest_index=interest)
        return response


class _InPlace(futures.ThreadPoolExecutor):
    """Runs each task at once in the thread that submits it, which for a behaviour's
    `experimental_thread_pool` is gRPC's own: no thread, no queue. Only for behaviours that never
    block: refusals, which read no request (gRPC reads a unary request inside the task, and the
    thread that would deliver it is the one running it)."""

    def __init__(self):
        super().__init__(max_workers=1)  # gRPC accepts a ThreadPoolExecutor only; this one never starts its thread

    def submit(self, fn, /, *args, **kwargs):
        future: futures.Future = futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - the future carries it, as a pool's would
            future.set_exception(exc)
        return future


IN_PLACE = _InPlace()


def _run_on(pool: futures.ThreadPoolExecutor, behaviour, make=grpc.unary_unary_rpc_method_handler,
            like: grpc.RpcMethodHandler | None = None) -> grpc.RpcMethodHandler:
    """A method handler of `make`'s kind whose `behaviour` gRPC runs on `pool` (a behaviour's
    `experimental_thread_pool`, instead of the server's), with the (de)serializers of `like`."""
    behaviour.experimental_thread_pool = pool
    return make(behaviour, request_deserializer=like.request_deserializer if like else None,
                response_serializer=like.response_serializer if like else None)


def _refusal(code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler that answers `code` in place (IN_PLACE) and never calls the servicer. It takes the
    request as a stream it never reads, so it serves an RPC of any kind (a unary request read
    would block gRPC's own thread) and a refusal costs no read of what the client sends."""
    def refuse(requests, context):
        context.abort(code, details)

    refuse.refusal = True  # see _is_refusal
    return _run_on(IN_PLACE, refuse, grpc.stream_unary_rpc_method_handler)


def _is_refusal(handler: grpc.RpcMethodHandler) -> bool:
    """Whether an inner interceptor already refused this RPC (and counted it)."""
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    return getattr(behaviour, "refusal", False)


def _method_name(details) -> str:
    return details.method.rsplit("/", 1)[-1]


class BearerTokenAuth(grpc.ServerInterceptor):
    """Every RPC but the health check must carry `authorization: Bearer <token>`. Refusals are
    answered in place (`_refusal`): a flood of calls without a token neither waits behind nor fills
    the queue of authorised work."""

    def __init__(self, token: str, metrics: RecallMetrics):
        self.expected = f"Bearer {token}".encode()
        self.metrics = metrics

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        sent = dict(details.invocation_metadata).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self.expected):
            return handler
        self.metrics.requests.labels(_method_name(details), "UNAUTHENTICATED").inc()
        return _refusal(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token: send metadata `authorization: Bearer <token>`")


class TaskCountingExecutor(futures.ThreadPoolExecutor):
    """The server's thread pool, knowing how many of its tasks are queued or running: gRPC gives it
    one task per RPC it accepts, done when the RPC ends (whether or not the servicer was reached)."""

    def __init__(self, max_workers: int, thread_name_prefix: str):
        super().__init__(max_workers=max_workers, thread_name_prefix=thread_name_prefix)
        self._count_lock = threading.Lock()
        self.tasks = 0

    def submit(self, fn, /, *args, **kwargs):
        with self._count_lock:
            self.tasks += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._task_done(None)
            raise
        future.add_done_callback(self._task_done)
        return future

    def _task_done(self, _future) -> None:
        with self._count_lock:
            self.tasks -= 1


class ConcurrencyLimit(grpc.ServerInterceptor):
    """At most `limit` RPCs queued or running on the server's pool; beyond, RESOURCE_EXHAUSTED
    without running the servicer, counted in mindstream_recall_requests_total. It is the server's
    only limit: gRPC's own `maximum_concurrent_rpcs` stays off, as it counts every RPC in flight
    (refusals and health checks too) and refuses past it after the interceptors have run, so during
    a flood of refused calls it refused health checks and authorised calls alike, uncounted or
    counted under another code than the one sent. Refusals, this limit's and the token check's, are
    answered in place by gRPC's own thread (`_refusal`): they never wait behind the queue they
    protect, and queue nothing however many come. Health checks are never refused and run on a
    lane of their own (one thread: a probe is quick): a busy replica is still healthy, and refusing
    its readiness probe would take every replica of an overloaded fleet out of its load balancer at
    once. (Health's Watch stays in the server's pool and under the limit: it is non-blocking, it
    registers its stream and frees its thread at once, and probes use Check.)"""

    def __init__(self, limit: int, executor: TaskCountingExecutor, metrics: RecallMetrics):
        self.limit, self.executor, self.metrics = limit, executor, metrics
        self.health_lane = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="recall-health-check")

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is not None and details.method == HEALTH_CHECK:
            return _run_on(self.health_lane, lambda request, context: handler.unary_unary(request, context), like=handler)
        # an RPC the token check refused is counted there, once, and answered UNAUTHENTICATED in place
        if handler is None or self.executor.tasks < self.limit or _is_refusal(handler):
            return handler
        self.metrics.requests.labels(_method_name(details), "RESOURCE_EXHAUSTED").inc()
        return _refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server has {self.limit} RPCs in flight ([recall].max_concurrent_rpcs): retry later, with backoff")


class RecallServer:
    """The server and what it owns: adapters (from config unless given), health prober, metrics."""

    def __init__(self, config: Config, *, reader=None, search=None, models=None, availability=None, metrics: RecallMetrics | None = None,
                 served_log: ServedLog | None = None):
        from model_export.publish import client_options
        from model_export.registry import ModelRegistry
        from recall_service.backends import (FeatureStoreReader, InstalledVersions, MilvusItemSearch, RegistryAvailability, RegistryModels,
                                             RegistryVocabularies, default_popular_depth)
        from recall_service.served_log import RedisServedLog

        rc = config.recall
        self.config = config
        self.limits = Limits.from_config(rc)
        self.reader = reader or FeatureStoreReader.redis(config.redis, rc.feature_store_timeout_ms / 1e3, config.streaming.seen_items)
        self._owned = [] if reader else [self.reader]  # the clients made here, closed by stop()
        registry = ModelRegistry(config.paths.models_dir)
        installed = InstalledVersions(registry)  # one listing of the registry for the shapes of versions and their vocabularies
        self.models = models or RegistryModels(registry, popular_depth=default_popular_depth(config), installed=installed)
        loaded_vocabulary = self.models.raw_ids if isinstance(self.models, RegistryModels) else (lambda version: None)
        self.search = search or MilvusItemSearch(config.milvus.uri, client_options(config.milvus), config.milvus.collection_prefix, ef=rc.search_ef,
                                                 vocabularies=RegistryVocabularies(registry, loaded=loaded_vocabulary, installed=installed))
        if search is None:
            self._owned.append(self.search)
        self.availability = availability or RegistryAvailability(registry)
        self.metrics = metrics or RecallMetrics()
        self._export_at_zero()
        if served_log is None and rc.served_log_ttl_s:
            served_log = RedisServedLog.for_config(config, dropped=lambda reason, n: self.metrics.served_log_dropped.labels(reason).inc(n))
        self.served_log = served_log
        searcher = CoalescingSearch(self.search, rc.search_batch_vectors) if rc.search_batch_vectors else self.search
        self.recaller = Recaller(self.reader, searcher, self.models, availability=self.availability, search_timeout_s=rc.vector_search_timeout_ms / 1e3,
                                 max_per_interest_n=rc.max_per_interest_n, fallback_on_outage=rc.fallback_on_outage,
                                 cooldown_s=rc.outage_cooldown_ms / 1e3)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.port = 0
        self.metrics_port = 0
        self._grpc: grpc.Server | None = None
        self._executor: TaskCountingExecutor | None = None
        self._limit: ConcurrencyLimit | None = None
        self._metrics_http = None
        self._stop = threading.Event()
        self._prober: threading.Thread | None = None
        self._load_problem = ""  # the current version's failure to load, said while an older one answers
        self._failing: set[str] = set()  # the backends the last probe found down

    def start(self) -> "RecallServer":
        try:
            return self._start()
        except BaseException:  # a port taken, a bad certificate: what was made so far is let go
            self.stop(0)
            raise

    def _start(self) -> "RecallServer":
        rc = self.config.recall
        if bool(rc.tls_certfile) != bool(rc.tls_keyfile):
            raise ConfigError("[recall].tls_certfile and tls_keyfile: set both for TLS, or neither "
                              "(MINDSTREAM_RECALL__TLS_CERTFILE / MINDSTREAM_RECALL__TLS_KEYFILE)")
        if rc.tls_cafile and not rc.tls_certfile:  # fine behind a proxy that ends TLS; else its clients fail (infra up refuses it)
            log.warning("[recall].tls_cafile is set but tls_certfile is not: the service serves plain text while clients of this "
                        "configuration speak TLS to it; set [recall].tls_certfile and tls_keyfile, or unset tls_cafile")
        if rc.auth_token and not rc.tls_certfile:
            log.warning("[recall].auth_token is set without TLS: the token crosses the network in clear text; "
                        "set [recall].tls_certfile and tls_keyfile")
        self._executor = TaskCountingExecutor(rc.workers, "recall")  # gRPC leaves its executor to its owner
        self._limit = ConcurrencyLimit(rc.max_concurrent_rpcs, self._executor, self.metrics)
        interceptors = [self._limit, *([BearerTokenAuth(rc.auth_token, self.metrics)] if rc.auth_token else [])]
        self._grpc = grpc.server(self._executor, interceptors=interceptors,  # no maximum_concurrent_rpcs: ConcurrencyLimit is the limit
                                 options=[("grpc.max_receive_message_length", 4 * rc.max_request_bytes), ("grpc.so_reuseport", 0)])
        RecallServicer(self.recaller, self.limits, self.metrics, rc.default_deadline_ms / 1e3, rc.max_request_bytes,
                       self.served_log).add_to_server(self._grpc)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._grpc)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._grpc)
        address = grpc_address(rc.host, rc.port)
        try:
            if rc.tls_certfile:
                with open(rc.tls_keyfile, "rb") as key, open(rc.tls_certfile, "rb") as cert:
                    credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
                self.port = self._grpc.add_secure_port(address, credentials)
            else:
                self.port = self._grpc.add_insecure_port(address)
        except OSError as exc:
            raise ConfigError(f"[recall].tls_certfile / tls_keyfile: {exc}") from None
        except RuntimeError as exc:  # gRPC's "Failed to bind to address ...", for a bad certificate too
            self.port, said = 0, f" ({exc})"
        else:
            said = ""
        if not self.port:
            tls = " or the TLS certificate and key ([recall].tls_certfile / tls_keyfile) are not a valid PEM pair;" if rc.tls_certfile else ""
            raise ServeError(f"cannot listen on {address}{said}: another process holds the port, or the address is not this host's,{tls} "
                             "free the port or set [recall].port / host (MINDSTREAM_RECALL__PORT / MINDSTREAM_RECALL__HOST)")
        self._set_health(overall=False, recall=False)
        self.probe()  # connects the backends before the first request
        self._grpc.start()
        try:
            self._metrics_http, _ = self.metrics.serve(rc.metrics_port, rc.metrics_host)
        except OSError as exc:
            raise ServeError(f"cannot serve metrics on {rc.metrics_host}:{rc.metrics_port} ({exc.strerror}): free the port or set "
                             "[recall].metrics_host / metrics_port (MINDSTREAM_RECALL__METRICS_HOST / MINDSTREAM_RECALL__METRICS_PORT)") from None
        self.metrics_port = self._metrics_http.server_port
        self._prober = threading.Thread(target=self._probe_loop, name="recall-health", daemon=True)
        self._prober.start()
        return self

    def _export_at_zero(self) -> None:
        """The labelled series the alerts and dashboards read, at 0 before their first increment (a
        series born at 1 has no increase for Prometheus: a first failure of a kind would fire nothing)."""
        self.metrics.unexpected.labels(HEALTH_PROBE)
        for method in RPCS:
            self.metrics.unexpected.labels(method)
            for code in RPC_CODES:
                self.metrics.requests.labels(method, code.name)
        for code in (*(code for _, code in _STATUS_OF), grpc.StatusCode.INTERNAL):
            if _timed(code):
                self.metrics.latency.labels(NO_PATH, "total", code.name)

    def _set_health(self, overall: bool, recall: bool) -> None:
        for service, serving in (("", overall), (SERVICE_NAME, recall)):
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING)

    def probe(self) -> bool:
        """One health probe (see the module docstring); True when the RecallService is SERVING."""
        problems = {}  # backend label -> what is wrong
        for label, backend in zip(STORES, (self.reader, self.search)):
            try:
                backend.ping()
            except Exception as exc:  # a probe reports, it never raises
                name = label.replace("_", " ")
                problems[label] = str(exc) if isinstance(exc, BackendUnavailable) else f"{name}: {exc}"  # ours name their backend
        version, without_model = self._prepare_model()
        if without_model:
            problems["model"] = without_model
        for label in BACKENDS:  # exported: NOT_SERVING takes a replica out of rotation, where it answers (and alerts on) nothing
            self.metrics.backend_up.labels(label).set(0 if label in problems else 1)
        self._set_health(overall=not problems.keys() & set(STORES), recall=not problems)
        if problems.keys() != self._failing:  # which backends fail: logged when it changes, not every probe of an outage
            if problems:
                log.warning("not serving: %s", "; ".join(problems.values()))
            else:
                log.info("serving again: both stores reachable, a model loaded")
            self._failing = set(problems)
        self.metrics.set_model_version(version)
        self.metrics.inactive_items.set(len(self.availability.inactive().items))
        return not problems

    def _prepare_model(self) -> tuple[str | None, str]:
        """Loads a newly published version (here, not on a request). Returns the version that
        answers and, when none does, why ("" while one does)."""
        try:
            self.models.prepare()
            problem = ""
        except Exception as exc:  # a probe reports, it never raises
            problem = str(exc)
        version = self._serving_version()
        if version is None:
            return None, problem or (f"no model is published in {self.config.paths.models_dir}: users without stored interests get UNAVAILABLE "
                                     "(stored users are still answered) until `python -m model_export publish --export-dir DIR` installs one")
        if problem != self._load_problem:  # said once per change, not every probe
            if problem:
                log.warning("%s; requests go on with model %s", problem, version)
            self._load_problem = problem
        return version, ""

    def _serving_version(self) -> str | None:
        """The version that answers: CURRENT's once loaded, the one loaded before while CURRENT's is
        not loaded yet or fails to load (not CURRENT itself: the dashboards would name a model that
        answers nothing)."""
        try:
            model = self.models.current()
        except Exception:  # nothing loaded and CURRENT's does not load: prepare's failure says why
            return None
        return model.version if model is not None else None

    def _probe_loop(self) -> None:
        while not self._stop.wait(self.config.recall.health_interval_ms / 1e3):
            try:
                self.probe()
            except Exception:  # a bug in one probe must not end the probing: health would freeze at its last status
                log.exception("health probe failed; probing again in %d ms", self.config.recall.health_interval_ms)
                self.metrics.unexpected.labels(HEALTH_PROBE).inc()

    def stop(self, grace_s: float = 2.0) -> None:
        self._stop.set()
        if self._grpc is not None:
            self.health.enter_graceful_shutdown()
            self._grpc.stop(grace_s).wait()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        if self._prober is not None:
            self._prober.join(timeout=5)
        if self._limit is not None:
            self._limit.health_lane.shutdown(wait=False)
        if self._executor is not None:
            self._executor.shutdown(wait=False)
        if self.served_log is not None:
            self.served_log.close(timeout_s=grace_s)  # the last answers' records too, unless Redis is gone
        for client in self._owned:  # the connections to Redis and Milvus: a process may start many servers (tests, benches)
            try:
                client.close()
            except Exception as exc:  # noqa: BLE001 - stopping goes on
                log.warning("closing %s: %s", type(client).__name__, exc)

    def wait(self) -> None:
        self._grpc.wait_for_termination()

    def __enter__(self) -> "RecallServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
