"""Container healthcheck: exit 0 when the standard gRPC health service at ADDRESS says SERVING.

docker-compose has no native gRPC probe (Kubernetes does: k8s/recall.yaml uses `grpc:`), so the
recall container asks its own health service through the stack's own probe
(infra.recall_process.health_status: TLS and the token as the container's configuration says),
with the image's venv, where this project is installed.
Usage: python grpc_health_check.py [HOST:PORT] [SERVICE]   (default localhost:50051, overall "")
"""

import logging
import sys

from infra.config import load_config
from infra.recall_process import health_status


def main(argv: list[str]) -> int:
    address = argv[1] if len(argv) > 1 else "localhost:50051"
    service = argv[2] if len(argv) > 2 else ""
    logging.getLogger("infra.config").setLevel(logging.ERROR)  # a probe every 10 s: the service itself warns once
    status = health_status(load_config().recall, address, timeout_s=3, service=service)
    if status is None:
        print(f"{address}: no answer (not listening, another TLS or token setting, or slower than 3 s)", file=sys.stderr)
        return 1
    print(f"{address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
