"""The one way this project's own clients (the container health check, the stack's readiness probe,
`python -m recall_service recall`, the demo, the soak and the load harness) reach the recall
service: over TLS when the configuration turns TLS on, with its bearer token on every call, so that
turning either on in [recall] does not cut them off.

TLS is on when [recall].tls_certfile (the server's) or tls_cafile is set. The server's certificate
is verified against tls_cafile, else against tls_certfile itself (right for a self-signed
certificate); either way it must name the host the client dials.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Sequence

import grpc

from infra.config import ConfigError, RecallServiceConfig
from streaming.events import MAX_ID_CHARS


class _CallDetails(collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")),
                   grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (an interceptor rather than call
    credentials, which gRPC sends over TLS only: the server also accepts a token without TLS)."""

    def __init__(self, token: str):
        self.header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(details.method, details.timeout, [*(details.metadata or ()), self.header], details.credentials,
                            details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._with_token(details), request_iterator)


def grpc_address(host: str, port: int) -> str:
    """host:port as gRPC takes it, to bind a server or dial one: an IPv6 host ("::1") in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def largest_answer_bytes(recall: RecallServiceConfig) -> int:
    """A bound on the size of an answer within [recall]'s limits: a BatchRecall of max_batch requests
    of max_n items, each with an id of MAX_ID_CHARS characters of up to 4 UTF-8 bytes, a score, an
    interest index of -1 (10 bytes as a varint), tags and lengths, and per answer its model version.
    gRPC's default receive limit (4 MiB) is below what the default limits allow (64 x 1,000 items
    of 64-character ids already pass it), which the client would refuse after the server answered."""
    return min(2**31 - 1, recall.max_batch * (recall.max_n * (4 * MAX_ID_CHARS + 32) + 1024))


def recall_channel(recall: RecallServiceConfig, target: str | None = None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to `target` (default [recall].host:port) as the configuration says to reach it,
    taking any answer within its limits (largest_answer_bytes)."""
    target = target or grpc_address(recall.host, recall.port)
    options = [("grpc.max_receive_message_length", largest_answer_bytes(recall)), *options]
    trusted = recall.tls_cafile or recall.tls_certfile
    if trusted:
        try:
            roots = Path(trusted).read_bytes()
        except OSError as exc:
            raise ConfigError(f"[recall].tls_cafile / tls_certfile: cannot read {trusted} ({exc.strerror}); "
                                    "set MINDSTREAM_RECALL__TLS_CAFILE to the CA certificate (PEM) of the recall server") from None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    return grpc.intercept_channel(channel, _BearerToken(recall.auth_token)) if recall.auth_token else channel
