"""The recall service as a supervised process: `python -m recall_service serve`, ready when its gRPC
health service answers SERVING (it does once Redis and Milvus are reachable; a model need not be
published yet)."""

from __future__ import annotations

from pathlib import Path

from infra.config import RecallServiceConfig
from infra.process import PythonModuleProcess


def health_status(recall: RecallServiceConfig, target: str, timeout_s: float = 0.5, service: str = "") -> str | None:
    """The health of `service` ("": the service's overall health) as the standard gRPC health service
    says it (SERVING, NOT_SERVING, ...), through TLS and with the token as the configuration says;
    None when it does not answer."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from recall_service.channel import recall_channel

    with recall_channel(recall, target, options=[("grpc.enable_http_proxy", 0)]) as channel:  # a loopback probe: never via a proxy
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError:
            return None
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class RecallServiceProcess(PythonModuleProcess):
    name = "recall service"
    module_args = ("recall_service", "serve")
    start_timeout_s = 90.0

    def __init__(self, env: dict[str, str], recall: RecallServiceConfig, target: str, log_path: Path):
        super().__init__(log_path, env)
        self.recall, self.target = recall, target

    def ready(self) -> bool:
        return health_status(self.recall, self.target) == "SERVING"
