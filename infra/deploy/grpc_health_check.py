"""Container healthcheck: exit 0 when the standard gRPC health service at ADDRESS says SERVING.

docker-compose has no native gRPC probe (Kubernetes does: k8s/recall.yaml uses `grpc:`), so the
recall container asks its own health service with the grpcio-health-checking it already ships,
through TLS when the container's configuration turns it on (recall_service/channel.py).
Usage: python grpc_health_check.py [HOST:PORT] [SERVICE]   (default localhost:50051, overall "")
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from infra.config import load_config
from recall_service.channel import recall_channel


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "localhost:50051"
    service = argv[2] if len(argv) > 2 else ""
    with recall_channel(load_config().recall, address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
