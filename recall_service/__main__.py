"""python -m recall_service: serve the recall API, call it, benchmark it, generate its stubs."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import os
import signal
import sys
import threading
import time

from infra.cli import UserError, at_least, run_command
from infra.config import load_config, printable_uri

INT32_MAX = 2**31 - 1  # RecallRequest.n and per_interest_n are int32: protobuf refuses more with a traceback


def cmd_serve(args) -> int:
    from recall_service.server import RecallServer

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # Milvus Lite's import narrates each CPU build it tries
    config = load_config()
    server = RecallServer(config).start()
    # What is loaded by now (modules, clients, the model) lives as long as the process: frozen out of
    # the cyclic collector's reach, so its full collections scan only what requests allocate. Without
    # this each one stalled every request thread for ~34 ms (measured under `bench`).
    gc.collect()
    gc.freeze()
    print(f"recall service on {config.recall.host}:{server.port} (TLS {'on' if config.recall.tls_certfile else 'off'}, "
          f"auth {'on' if config.recall.auth_token else 'off'}), metrics on {config.recall.metrics_host}:{server.metrics_port}/metrics, "
          f"Redis {printable_uri(config.redis.uri)}, Milvus {printable_uri(config.milvus.uri)}, models {config.paths.models_dir}", file=sys.stderr)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    server.stop(grace_s=5)
    return 0


def cmd_recall(args) -> int:
    import grpc

    from recall_service.channel import grpc_address, recall_channel
    from recall_service.stubs import recall_pb2, recall_pb2_grpc

    recall = load_config().recall
    if args.tls_ca and not os.access(args.tls_ca, os.R_OK):
        raise UserError(f"--tls-ca {args.tls_ca}: cannot read it: name the recall server's CA certificate (PEM)")
    recall = dataclasses.replace(recall, tls_cafile=args.tls_ca or recall.tls_cafile, auth_token=args.token or recall.auth_token)
    target = args.target or grpc_address(recall.host, recall.port)
    channel = recall_channel(recall, target)
    started = time.monotonic()
    try:  # a service that cannot be reached is the user's to fix (exit 2), an error status is the service's answer (exit 1)
        grpc.channel_ready_future(channel).result(timeout=args.timeout)
    except grpc.FutureTimeoutError:
        raise UserError(f"no connection to the recall service at {target} within {args.timeout:g} s: is it running? (python -m infra "
                        "status shows the stack's; --target picks another; with TLS, does the certificate name that host?)") from None
    request = recall_pb2.RecallRequest(
        user_id=args.user_id, n=args.n, exclude_item_ids=args.exclude, recent_item_ids=args.recent, filter=args.filter,
        per_interest_n=args.per_interest_n, merge_policy=recall_pb2.MergePolicy.Value(f"MERGE_POLICY_{args.policy.upper()}"),
    )
    try:
        response = recall_pb2_grpc.RecallServiceStub(channel).Recall(request, timeout=max(args.timeout - (time.monotonic() - started), 0.001))
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(json.dumps({
        "model_version": response.model_version,
        "path": recall_pb2.RecallPath.Name(response.path),
        "fallback_reason": recall_pb2.FallbackReason.Name(response.fallback_reason),
        "items": [{"item_id": i.item_id, "score": round(i.score, 5), "interest": i.interest_index} for i in response.items],
    }, indent=2))
    return 0


def cmd_stubs(args) -> int:
    from recall_service import stubs

    print(stubs.generate(force=args.force))
    return 0


def cmd_bench(args) -> int:
    from recall_service.bench import run_bench

    return run_bench(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recall_service", description="The gRPC recall service of mindstream.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the server with the configuration ([recall], [redis], [milvus], [paths].models_dir)",
                       description="Serves RecallService, health and reflection on [recall].host:port and metrics on "
                                   "[recall].metrics_host:metrics_port (default 127.0.0.1:9464) until SIGINT / SIGTERM. Redis and Milvus come from the "
                                   "configuration (python -m infra config shows it); publish a model first.")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("recall", help="call Recall once and print the answer as JSON")
    p.add_argument("--user-id", required=True)
    p.add_argument("--n", type=at_least(1, at_most=INT32_MAX), default=20)
    p.add_argument("--recent", nargs="*", default=[], help="recent raw item ids, oldest first (for users the store does not know)")
    p.add_argument("--exclude", nargs="*", default=[], help="raw item ids not to return")
    p.add_argument("--filter", default="", help='e.g. \'category like "Comedy%%" and active == true\'')
    p.add_argument("--per-interest-n", type=at_least(0, at_most=INT32_MAX), default=0)
    p.add_argument("--policy", choices=("max_score", "quota"), default="max_score")
    p.add_argument("--target", default="", help="host:port (default: [recall].host:port)")
    p.add_argument("--token", default="", help="bearer token (default: [recall].auth_token; prefer MINDSTREAM_RECALL__AUTH_TOKEN: "
                                               "a command line is visible to every local user in ps)")
    p.add_argument("--tls-ca", default="", help="CA certificate file: use TLS (default: [recall].tls_cafile, else tls_certfile; neither: no TLS)")
    p.add_argument("--timeout", type=at_least(0.001, float), default=2.0, help="deadline in seconds, connecting included")
    p.set_defaults(func=cmd_recall)

    p = sub.add_parser("stubs", help="generate the Python stubs of recall.proto (done on import when stale)")
    p.add_argument("--force", action="store_true", help="regenerate even when the stamp is current")
    p.set_defaults(func=cmd_stubs)

    p = sub.add_parser("bench", help="closed-loop load: QPS, p50/p99 end to end vs the raw Milvus search; --scale: 1M items",
                       description="Starts what it needs (embedded Redis, Milvus Lite or the Milvus server, the recall server "
                                   "in a subprocess) on free loopback ports, loads a catalog built from the trained ML-1M item "
                                   "vectors and users from real ML-1M windows, and prints the figures.")
    from recall_service.bench import add_arguments

    add_arguments(p)
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
