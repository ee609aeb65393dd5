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


def recall_channel(recall: RecallServiceConfig, target: str | None = None, options: Sequence[tuple[str, object]] = ()) -> grpc.Channel:
    """A channel to `target` (default [recall].host:port) as the configuration says to reach it."""
    target = target or grpc_address(recall.host, recall.port)
    trusted = recall.tls_cafile or recall.tls_certfile
    if trusted:
        try:
            roots = Path(trusted).read_bytes()
        except OSError as exc:
            raise ConfigError(f"[recall].tls_cafile / tls_certfile: cannot read {trusted} ({exc.strerror}); "
                                    "set MINDSTREAM_RECALL__TLS_CAFILE to the CA certificate (PEM) of the recall server") from None
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(roots), options=list(options))
    else:
        channel = grpc.insecure_channel(target, options=list(options))
    return grpc.intercept_channel(channel, _BearerToken(recall.auth_token)) if recall.auth_token else channel
