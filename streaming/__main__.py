"""python -m streaming: the event contract, topics, the producer, the PyFlink job, the backfill and their benchmarks."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from infra.cli import UserError, at_least, run_command
from infra.config import load_config
from streaming.events import DEAD_LETTER_REASONS, INTERNAL
from streaming.redrive import DEFAULT_GROUP, RedriveError, redrive


def cmd_schema(args) -> int:
    from streaming.events import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def cmd_topics(args) -> int:
    from infra.broker import ensure_configured_topics

    config = load_config()
    created = ensure_configured_topics(config)
    print(json.dumps({"bootstrap_servers": config.kafka.bootstrap_servers, "created": created}))
    return 0


def cmd_produce(args) -> int:
    from tqdm import tqdm

    from streaming.producer import EventProducer, ReplayError, ReplayEvents, replay

    config = load_config()
    events = ReplayEvents.from_dataset(args.dataset, config.paths.data_dir, config.paths.shared_data_dir)
    stop = len(events) if args.limit is None else min(len(events), args.start + args.limit)
    if args.start > stop:
        raise UserError(f"--start {args.start} is past the dataset's {len(events)} interactions")
    with EventProducer.for_config(config) as producer, tqdm(total=stop - args.start, unit="ev", desc=f"replaying {args.dataset}", disable=args.quiet) as bar:
        last = [0]

        def progress(sent: int) -> None:
            bar.update(sent - last[0])
            last[0] = sent

        try:
            sent = replay(events.events(args.start, stop), producer, rate=args.rate, speedup=args.speedup, on_progress=progress)
        except ReplayError as exc:
            # what came before the first failure is in Kafka; from there on it is sent again (copies are dropped by event id)
            next_start = args.start + exc.first_failed
            print(json.dumps({"topic": config.kafka.events_topic, "sent": exc.sent, "not_acknowledged": exc.failed, "next_start": next_start}))
            pace = f" --rate {args.rate:g}" if args.rate else f" --speedup {args.speedup:g}" if args.speedup else ""
            raise UserError(f"{exc}; resend from there: python -m streaming produce --dataset {args.dataset} --start {next_start}"
                            f"{'' if args.limit is None else f' --limit {stop - next_start}'}{pace}") from None
    print(json.dumps({"topic": config.kafka.events_topic, "sent": sent, "next_start": args.start + sent}))
    return 0


def cmd_run(args) -> int:
    from streaming.job import STATE_LAYOUT, is_uri, latest_checkpoint, run_job, unrestorable_checkpoints

    config = load_config()
    restore = None
    if args.restore == "latest":
        if is_uri(config.streaming.checkpoint_dir):
            raise UserError(f"--restore latest looks in a local folder, and [streaming].checkpoint_dir is {config.streaming.checkpoint_dir}: "
                            f"name the checkpoint, --restore {config.streaming.checkpoint_dir.rstrip('/')}/{STATE_LAYOUT}/<job id>/chk-<n> "
                            "(on Kubernetes the Flink operator restores the last state itself)")
        restore = latest_checkpoint(config.streaming.checkpoint_dir)
        if restore is None:
            print(f"no checkpoint under {config.streaming.checkpoint_dir}/{STATE_LAYOUT}: starting from the committed Kafka offsets", file=sys.stderr)
            stale = unrestorable_checkpoints(config.streaming.checkpoint_dir)
            if stale:
                print(f"  {len(stale)} checkpoint(s) of an older state layout (e.g. {stale[0]}) cannot be restored by this version: "
                      "users' windows continue from their stored records ([streaming].seed_windows_from_store); delete them once this job has checkpointed", file=sys.stderr)
    elif args.restore:
        if not is_uri(args.restore) and not (Path(args.restore) / "_metadata").is_file():
            raise UserError(f"--restore {args.restore}: no checkpoint there (a chk-N folder holds _metadata): name one, or "
                            "--restore latest for this job's newest")
        restore = args.restore  # a folder or a URI: the job makes it the URI Flink reads (storage_uri)
    run_job(config, restore)
    return 0


def cmd_backfill(args) -> int:
    from tqdm import tqdm

    from model_export.artifact import UserTower
    from model_export.registry import ModelRegistry
    from streaming.backfill import backfill, current_moved_on, job_settle_s
    from streaming.feature_store import RedisFeatureStore

    config = load_config()
    registry = ModelRegistry(config.paths.models_dir)
    current = registry.current_version()
    if args.model_version and args.model_version != current:
        # the job keeps writing the current version's interests: the two would overwrite each other's records
        raise UserError(f"model version {args.model_version} is not the current one ({current}): the streaming job writes the "
                        f"current version's interests, which a backfill of another would overwrite while it runs; make it current "
                        f"first (python -m model_export publish --export-dir {registry.path(args.model_version)}), or leave out --model-version")
    tower = UserTower.load(registry.path(args.model_version) if args.model_version else registry.current())
    superseded = current_moved_on(registry, tower.version)  # the version written, not CURRENT read before the tower loaded
    store = RedisFeatureStore.from_config(config.redis, ttl_seconds=config.streaming.record_ttl_s, timeout_s=10.0)
    settle_s = job_settle_s(config.streaming.model_poll_s) if args.settle_s is None else args.settle_s
    with tqdm(unit="user", desc=f"re-extracting interests with {tower.version}", disable=args.quiet) as bar:
        report = backfill(store, tower, batch=args.batch, settle_s=settle_s, progress=bar.update, superseded=superseded)
    print(json.dumps(report.__dict__, indent=2))
    if report.superseded:
        print(f"stopped: {tower.version} is no longer the registry's current version; the newer version's "
              "backfill re-extracts the users (python -m streaming backfill)", file=sys.stderr)
    elif report.stale_in_last_pass:
        raise UserError(f"the last pass, {report.seconds:.0f} s after the start, still found {report.stale_in_last_pass} records of another "
                        "model version: the streaming job goes on writing with its old user tower (a failed reload: its log and "
                        f"mindstream_stream_model_reloads_total say why); run the backfill again once the job runs {tower.version}")
    return 0


def cmd_bench(args) -> int:
    from streaming.bench import run_bench

    return run_bench(args)


def cmd_redrive(args) -> int:
    config = load_config()
    failure = None
    try:
        report = redrive(config, set(args.reason or [INTERNAL]), args.group, args.dry_run, args.timeout_s, progress=not args.quiet)
    except RedriveError as exc:  # what the run did is printed all the same: most letters may have gone through
        report, failure = exc.report, exc
    print(json.dumps({"dry_run": args.dry_run, **report.summary()}, indent=2))
    if not report.complete:
        print(f"warning: the dead-letter topic was not read to its end in {args.timeout_s:.0f} s: run redrive again for the rest", file=sys.stderr)
    if failure is not None:
        raise failure
    return 0


def cmd_poison(args) -> int:
    from streaming.bench import run_poison

    return run_poison(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)  # kafka-python narrates every connection at INFO
    parser = argparse.ArgumentParser(prog="python -m streaming", description="Behaviour events -> PyFlink per-user windows -> ONNX user tower -> feature store.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("schema", help="print the behaviour-event contract as a JSON Schema document")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("topics", help="create the events and dead-letter topics on [kafka].bootstrap_servers if missing")
    p.set_defaults(func=cmd_topics)

    p = sub.add_parser("produce", help="replay a dataset's interactions into Kafka in event-time order")
    p.add_argument("--dataset", default="ml-1m", help="ml-1m, beauty or a path (as in model_export train)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=at_least(0, float), default=0.0, help="events per second (default: as fast as possible)")
    pace.add_argument("--speedup", type=at_least(0, float), default=0.0, help="or: replay the real event-time gaps this many times faster")
    p.add_argument("--start", type=at_least(0), default=0, help="index of the first interaction to send (resume a replay: the next_start "
                   "an earlier run printed)")
    p.add_argument("--limit", type=at_least(0), default=None, help="send at most this many events")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_produce)

    p = sub.add_parser("run", help="run the PyFlink job (blocks; Ctrl-C or SIGTERM stops it, checkpoints are kept)")
    p.add_argument("--restore", default=None, help="'latest' or a checkpoint folder (chk-N) to restore state and offsets from")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("backfill", help="re-extract every stored user's interests with a model version (default: the current one)")
    p.add_argument("--model-version", default=None, help="the version to write, which must be CURRENT (the default): the job writes "
                   "CURRENT's interests, so a backfill of another version is refused")
    p.add_argument("--batch", type=at_least(1), default=512, help="users per user-tower call and per store round trip")
    p.add_argument("--settle-s", type=at_least(0, float), default=None,
                   help="keep passing this long after the start, while the job may still write with the old tower (default: 2 x [streaming].model_poll_s + 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_backfill)

    p = sub.add_parser("redrive", help="send dead letters of chosen reasons (default: internal) back to the events topic once their cause is fixed",
                       description="Reads [kafka].dead_letter_topic up to its end offsets seen at the start, from the committed offsets "
                       "of the chosen reasons' consumer groups (one per reason: <group>.<reason>), and sends the original value of each "
                       "letter of a chosen reason after its group's offset to [kafka].events_topic again, keyed by its user id, if the job's "
                       "rule takes it now (counted as still_invalid otherwise); then commits each group's offsets. One run at a time per "
                       "group: two would both send the same letters.")
    p.add_argument("--reason", action="append", choices=DEAD_LETTER_REASONS, default=None,
                   help="a dead-letter reason to send again; repeat for more (default: internal, the events the job failed to apply)")
    p.add_argument("--group", default=DEFAULT_GROUP, help="prefix of the consumer groups that keep the redrive's progress, one per reason: "
                   f"<group>.<reason> (default: {DEFAULT_GROUP}, so {DEFAULT_GROUP}.{INTERNAL})")
    p.add_argument("--dry-run", action="store_true", help="count what would be sent; send and commit nothing")
    p.add_argument("--timeout-s", type=at_least(1, float), default=600.0, help="stop reading after this long (the next run goes on)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_redrive)

    p = sub.add_parser("bench", help="throughput, memory, freshness vs the bare broker, and parity with offline ONNX (starts its own stack)")
    p.add_argument("--export-dir", default=None, help="user tower to serve (default: the registry's current model, else the main command's export under [paths].artifacts_dir)")
    p.add_argument("--events", type=int, default=200_000, help="ML-1M events for the throughput phase")
    p.add_argument("--freshness-rate", type=float, default=1000.0, help="events per second in the freshness phase")
    p.add_argument("--freshness-seconds", type=float, default=30.0)
    p.add_argument("--broker", choices=("noida", "tansu"), default="noida")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("poison", help="a stream with poison records mixed in: the job stays up, dead letters = exactly the poison, valid events all reflected")
    p.add_argument("--export-dir", default=None, help="user tower to serve (default: as for bench)")
    p.add_argument("--rate", type=float, default=2000.0, help="records per second")
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--poison", type=float, default=0.1, help="fraction of poison records (malformed, oversized, unknown field, invalid)")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.set_defaults(func=cmd_poison)

    args = parser.parse_args(argv)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
