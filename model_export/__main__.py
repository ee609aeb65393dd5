"""python -m model_export: the model's life (train -> evaluate -> export -> publish, items, retrain) and its benchmarks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import traceback
from pathlib import Path

from infra.cli import UserError, at_least, run_command, user_error
from infra.config import SPARSE_ITEM_ROWS, ConfigError, load_config, printable_uri, warn_plain_text_credentials
from model_export.spec import MAX_ATTENTION_POWER, MODEL_KINDS


def _dataset_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="ml-1m, beauty, or a path: one-user-per-line .txt, or .csv/.tsv/.parquet with user, item, timestamp columns")


def _date(text: str) -> str:
    """An argparse type: a date, as the YYYY-MM-DD text the benchmark reads."""
    import datetime as dt

    try:
        return dt.date.fromisoformat(text).isoformat()  # as YYYY-MM-DD, so that the dates compare as text
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write YYYY-MM-DD") from None


def _out(args, name: str) -> Path:
    """A benchmark's --out, by default [paths].var_dir/<name> (not relative to where the command runs)."""
    return Path(args.out) if args.out else load_config().paths.var_dir / name


def _load(dataset: str):
    from model_export.data import load_dataset

    paths = load_config().paths
    return load_dataset(dataset, paths.data_dir, paths.cache_dir, paths.shared_data_dir)


def _training_device(requested: str | None) -> str:
    """--device, or CUDA where there is a GPU. Checked before the data loads: torch refuses an unknown
    device, or CUDA without a GPU, only when training starts, and with a traceback."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {requested!r}: training runs on cpu or cuda (cuda:N: the GPU numbered N); use one of those")
    if device.type == "cuda" and not (device.index or 0) < torch.cuda.device_count():
        raise UserError(f"--device {requested}: this machine has {torch.cuda.device_count()} usable CUDA GPU(s): "
                        "use --device cpu, or leave --device out to train on a GPU when there is one")
    return requested


def cmd_train(args) -> int:
    from model_export.data import describe
    from model_export.distributed import world
    from model_export.train import RunDirError, TrainConfig, dataset_defaults, default_spec, train

    out = Path(args.out)
    if not args.resume and (out / "train.json").is_file():
        raise RunDirError(f"{args.out} already holds a training run: continue it with --resume, or train into another --out "
                          "(delete the folder to start it again)")
    blocking = next(p for p in (out, *out.absolute().parents) if p.exists())
    if not blocking.is_dir():
        raise RunDirError(f"--out {args.out}: {blocking} is a file, not a folder: name a folder for the run")
    device = _training_device(args.device)
    data = _load(args.dataset)
    print(describe(data), file=sys.stderr)
    defaults = dataset_defaults(args.dataset)
    config = TrainConfig(
        dataset=args.dataset,
        model=args.model,
        seed=args.seed,
        epochs=args.epochs or defaults["epochs"],
        patience=args.patience,
        batch_size=args.batch_size or defaults["batch_size"],
        lr=args.lr,
        n_negatives=args.negatives,
        max_steps_per_epoch=args.max_steps_per_epoch,
        device=device,
        sparse_item_rows=args.sparse_item_rows,
        min_history=args.min_history,
        sample_by=args.sample_by,
    )
    spec = default_spec(
        args.model,
        data,
        args.dataset,
        dim=args.dim,
        n_interests=args.interests,
        maxlen=args.maxlen,
        attention_power=args.power,
        hard_negative_beta=args.beta,
        routing_regularization=args.rr_lambda,
    )
    history = train(config, spec, data, out, resume=args.resume, progress=not args.quiet)
    if world().is_writer:  # under torchrun, one report
        print(json.dumps({"model_dir": args.out, "best": history["best"]}, indent=2))
    return 0


def cmd_evaluate(args) -> int:
    from model_export.data import evaluation_cases
    from model_export.evaluate import evaluate_model, evaluate_popularity, interest_diversity
    from model_export.train import check_dataset, load_model

    data = _load(args.dataset)
    model_dir = Path(args.model_dir)
    check_dataset(model_dir, data)
    spec, model = load_model(model_dir)
    users = data.test_users if args.split == "test" else data.valid_users
    cases = evaluation_cases(data, users, spec.maxlen)
    metrics = evaluate_popularity(model, cases) if spec.kind == "mostpop" else evaluate_model(model, data, cases, progress=not args.quiet)
    report = {"model_dir": str(model_dir), "model": spec.kind, "dataset": data.name, "split": args.split, "users": len(users), "metrics": metrics}
    if spec.is_multi_interest:
        report["interest_cosine"] = interest_diversity(model, data, cases)
    (model_dir / f"evaluation_{args.split}.json").write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{spec.kind} on {data.name} ({args.split}, {len(users)} users): " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0


def cmd_export(args) -> int:
    from model_export.export import export_model

    data = _load(args.dataset)
    out, manifest = export_model(Path(args.model_dir), data, Path(args.out) if args.out else None, source=args.dataset, progress=not args.quiet)
    print(json.dumps({"export_dir": str(out), "model_version": manifest.model_version, "parity_max_abs_diff": manifest.extra["onnx_parity_max_abs_diff"], "test": manifest.metrics["test"]}, indent=2))
    return 0


def cmd_publish(args) -> int:
    from model_export.manifest import Manifest
    from model_export.publish import client_options, connect, publish_version
    from model_export.registry import ModelRegistry

    config = load_config()
    milvus = config.milvus
    if args.milvus_uri:  # another Milvus: the configured server's TLS CA and name are not its own (an https:// one keeps the CA)
        tls = {"tls_server_name": ""} if args.milvus_uri.startswith("https://") else {"tls_cafile": "", "tls_server_name": ""}
        try:
            milvus = dataclasses.replace(config.milvus, uri=args.milvus_uri, **tls)
        except ConfigError as exc:
            raise ConfigError(f"--milvus-uri {printable_uri(args.milvus_uri)!r}: {exc}") from None
        warn_plain_text_credentials(dataclasses.replace(config, milvus=milvus))
    registry = ModelRegistry(config.paths.models_dir)
    Manifest.load(Path(args.export_dir), verify=False)  # a wrong folder is said before Milvus (Lite: a database file) is touched
    client = connect(milvus.uri, **client_options(milvus))
    done = publish_version(Path(args.export_dir), registry, client, config.milvus.collection_prefix, args.index, progress=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"milvus": printable_uri(milvus.uri), "registry": str(registry.root), **done.__dict__}, indent=2))
    return 0


def cmd_items(args) -> int:
    from model_export.publish import client_options, connect, published_collections, set_active
    from model_export.registry import ModelRegistry

    config = load_config()
    registry = ModelRegistry(config.paths.models_dir)
    if args.action == "list":
        inactive = registry.inactive_items()
        print(json.dumps({"revision": inactive.revision, "inactive": sorted(inactive.items)}, indent=2))
        return 0
    ids = list(args.ids)
    if args.file:
        try:
            ids += [line.strip() for line in Path(args.file).read_text().splitlines() if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"--file {args.file}: cannot read it ({exc}): name a text file of item ids, one per line") from None
    if not ids:
        print("error: name the items: python -m model_export items deactivate ID [ID ...] (or --file FILE)", file=sys.stderr)
        return 2
    active = args.action == "activate"
    inactive = registry.set_active(ids, active)
    report = {"action": args.action, "items": len(set(ids)), "revision": inactive.revision, "inactive": len(inactive.items)}
    try:  # the registry is the source of truth: the recall service filters on it within seconds
        client = connect(config.milvus.uri, **client_options(config.milvus))
        report["rows_changed"] = set_active(client, published_collections(client, config.milvus.collection_prefix, registry.versions()), ids, active)
    except Exception as exc:  # noqa: BLE001 - any client or server failure: say what holds and how to finish
        print(json.dumps(report, indent=2))
        print(f"error: the registry is updated (the recall service drops these items within seconds), but the Milvus rows "
              f"were not marked: {exc}. Run the same command again once Milvus ({printable_uri(config.milvus.uri)}) answers.", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


def cmd_retrain(args) -> int:
    from model_export.retrain import RetrainError, retrain_once, run_schedule

    config = load_config()
    try:
        if args.schedule:  # each run's report is printed as it ends; the exit status is the last one's (with --runs)
            report = run_schedule(config, publish_model=not args.no_publish, poll_s=args.poll, runs=args.runs, progress=not args.quiet)
            if report.get("status") == "failed":
                return 2
        else:
            report = retrain_once(config, publish_model=not args.no_publish, progress=not args.quiet)
            print(json.dumps(report, indent=2, default=str))
    except RetrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failure after the publish is a report (incomplete), so nothing was published
        if user_error(exc) is not None:
            raise
        traceback.print_exc()
        print(f"error: the retraining failed before publishing anything ({type(exc).__name__}: {exc}); "
              "the traceback above says where", file=sys.stderr)
        return 2
    if report.get("status") == "refused":
        print(f"refused: {report['reason']}", file=sys.stderr)
        return 3
    if report.get("incomplete"):
        print(f"warning: {report['incomplete']}", file=sys.stderr)
        return 1
    return 0


def cmd_timesplit(args) -> int:
    from model_export.timesplit import timesplit_benchmark

    if not args.train_until < args.later_until < args.test_until:  # ISO dates order as text
        raise UserError(f"the weeks must follow each other: --train-until {args.train_until} < --later-until {args.later_until} "
                        f"< --test-until {args.test_until}")
    timesplit_benchmark(args.model, args.train_until, args.later_until, args.test_until, _out(args, "timesplit"), epochs=args.epochs)
    return 0


def cmd_refresh_bench(args) -> int:
    from model_export.refresh_bench import run

    run(args)
    return 0


def cmd_bench(args) -> int:
    from model_export.bench import bench_user_tower

    bench_user_tower(Path(args.export_dir), batch=args.batch, seconds=args.seconds, gpu=args.gpu)
    return 0


def cmd_catalog_bench(args) -> int:
    from model_export.catalog_bench import run

    run(args.items, args.side_vocabulary, args.tokens_per_item, args.steps, args.users, args.sparse_item_rows)
    return 0


def cmd_quality(args) -> int:
    from model_export.quality import quality_benchmark

    for flag, values in (("--datasets", args.datasets), ("--models", args.models), ("--seeds", args.seeds)):
        if len(set(values)) < len(values):  # one run would be summarised as two
            raise UserError(f"{flag} names {', '.join(sorted({str(v) for v in values if values.count(v) > 1}))} more than once: name each once")
    quality_benchmark(args.datasets, args.models, args.seeds, _out(args, "quality"), max_steps_per_epoch=args.max_steps_per_epoch, epochs=args.epochs)
    return 0


def cmd_peer(args) -> int:
    from model_export.peer import compare_with_rechub

    compare_with_rechub(args.dataset, _out(args, "peer"), epochs=args.epochs, max_steps_per_epoch=args.max_steps_per_epoch, device=_training_device(args.device))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model_export", description="Train, evaluate and export MIND / MIND+REMI and baselines.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (progress bar, checkpoints, early stopping, --resume)")
    _dataset_arg(p)
    p.add_argument("--model", choices=MODEL_KINDS, required=True)
    p.add_argument("--out", required=True, help="run directory (checkpoints, best weights, history)")
    p.add_argument("--seed", type=int, default=2019)
    p.add_argument("--epochs", type=at_least(0), default=0, help="maximum epochs (default, or 0: the dataset's)")
    p.add_argument("--patience", type=at_least(1), default=3, help="epochs without a better validation Recall@50 before stopping")
    p.add_argument("--batch-size", type=at_least(0), default=0, help="default: per dataset")
    p.add_argument("--lr", type=at_least(0.0, float), default=1e-3)
    p.add_argument("--negatives", type=at_least(1), default=1280, help="sampled negatives per batch")
    p.add_argument("--dim", type=at_least(1), default=None)
    p.add_argument("--interests", type=at_least(1), default=None, help="K, the most interests per user")
    p.add_argument("--maxlen", type=at_least(1), default=None, help="behaviours read by the user tower (default: per dataset)")
    p.add_argument("--power", type=at_least(0.0, float, at_most=MAX_ATTENTION_POWER), default=None,
                   help=f"p of the label-aware attention (default 2; 0: the plain average; at most {MAX_ATTENTION_POWER:g}: hard attention)")
    p.add_argument("--beta", type=at_least(0.0, float), default=None, help="REMI hard-negative beta (mind_remi only; default 1.0, on ml-1m 16.0)")
    p.add_argument("--rr-lambda", type=at_least(0.0, float), default=None, help="REMI routing-regularisation lambda (mind_remi only; default 1.0)")
    p.add_argument("--max-steps-per-epoch", type=at_least(0), default=0, help="cap steps per epoch (0 = full pass); for smoke runs")
    p.add_argument("--sample-by", choices=("position", "user"), default="position",
                   help="position: every (user, target position) pair once an epoch (a user weighs by their length); "
                        "user: ComiRec's draw, a user uniformly then one of their positions (every user weighs alike)")
    p.add_argument("--min-history", type=at_least(1), default=1, help="earlier items a training target needs (ComiRec: 4)")
    p.add_argument("--sparse-item-rows", type=at_least(0), default=SPARSE_ITEM_ROWS, metavar="N",
                   help=f"a catalog of at least N items (default {SPARSE_ITEM_ROWS:,}) updates only the item rows each step touches (lazy Adam; 0 = never)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test Recall/HitRate/NDCG@20,50 of a trained run")
    p.add_argument("--model-dir", required=True)
    _dataset_arg(p)
    p.add_argument("--split", choices=("test", "valid"), default="test")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    p.add_argument("--quiet", action="store_true", help="no progress output (a bar per batch of users, on stderr)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="ONNX user tower + item vectors + manifest, parity-checked")
    p.add_argument("--model-dir", required=True)
    _dataset_arg(p)
    p.add_argument("--out", default=None, help="export directory (default MODEL_DIR/export)")
    p.add_argument("--quiet", action="store_true", help="no progress output while the test metrics are measured")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("publish", help="install an export in the model registry, fill its Milvus collection, swap the alias, make it current",
                       description="Installs the export in the model registry ([paths].models_dir), creates and fills the Milvus collection "
                                   "of its version (kept when it already holds the version whole), moves the alias, and only then the "
                                   "registry's CURRENT, which the streaming job hot-reloads. A rollback is a publish of a kept version: "
                                   "--export-dir <models_dir>/<version> (its collection and index are reused). Stored interests of other "
                                   "versions go on being answered from their own collections until they are re-extracted.")
    p.add_argument("--export-dir", required=True, help="an export directory (with manifest.json), or a version's folder in the registry")
    p.add_argument("--milvus-uri", default=None, help="default: [milvus].uri of the configuration (a file = Milvus Lite); "
                   "another server keeps [milvus].token, and tls_cafile only when it is https://")
    p.add_argument("--index", choices=("FLAT", "HNSW"), default=None,
                   help="default: the index of the version's existing collection; for a new one FLAT below 20,000 items, else HNSW. "
                        "Another index than the existing one rebuilds that collection (refused for the live version)")
    p.set_defaults(func=cmd_publish)

    p = sub.add_parser("items", help="take items out of recall (withdrawn, out of stock) or put them back, in every model version",
                       description="deactivate / activate: updates the model registry's inactive set (the recall service re-reads it "
                                   "within seconds; later publishes keep it), then the `active` flag of the items' rows in every "
                                   "published Milvus collection. list: the inactive items. Ids are raw item ids as in the events.")
    p.add_argument("action", choices=("deactivate", "activate", "list"))
    p.add_argument("ids", nargs="*", help="raw item ids")
    p.add_argument("--file", default=None, help="more ids, one per line")
    p.set_defaults(func=cmd_items)

    p = sub.add_parser("retrain", help="fine-tune the current model on the events since its offsets; publish it if it is not worse",
                       description="Reads the events topic from the offsets the current model was trained to (own consumer group), grows "
                                   "the item vocabulary, fine-tunes from the current weights, compares holdout Recall@50 with the current "
                                   "model ([retrain].tolerance), then publishes, backfills the feature store and retires unreferenced "
                                   "versions. Settings: the [retrain] section (MINDSTREAM_RETRAIN__*). Prints a JSON report whose status "
                                   "is published, refused, trained (--no-publish) or skipped (too few new events: exit 0). Exit 1 = "
                                   "published, but the backfill or retirement stopped (the report says how to finish); 2 = an error, "
                                   "nothing published; 3 = refused by the gate or CURRENT moved meanwhile (--schedule --runs N: the last run's).")
    p.add_argument("--schedule", action="store_true", help="keep running: retrain every [retrain].every_minutes / every_events")
    p.add_argument("--poll", type=at_least(0.1, float), default=10.0, help="scheduled mode: seconds between looks at the topic")
    p.add_argument("--runs", type=at_least(0), default=0, help="scheduled mode: stop after this many retrainings (0 = never)")
    p.add_argument("--no-publish", action="store_true", help="train, judge and export only")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("timesplit", help="ML-1M by time: the model retrained on later weeks vs the one trained on earlier weeks, on the last weeks")
    p.add_argument("--model", choices=MODEL_KINDS[1:], default="mind_remi")
    p.add_argument("--train-until", type=_date, default="2000-11-22", help="earlier weeks end (UTC date; ~70%% of ML-1M's interactions)")
    p.add_argument("--later-until", type=_date, default="2000-12-10", help="later weeks end: the stream the model is retrained on")
    p.add_argument("--test-until", type=_date, default="2000-12-31", help="last weeks end: where both models are evaluated")
    p.add_argument("--epochs", type=at_least(0), default=0, help="base model's maximum epochs (default, or 0: the dataset's)")
    p.add_argument("--out", default=None, help="the runs and the report (default: [paths].var_dir/timesplit, where refresh-bench looks)")
    p.set_defaults(func=cmd_timesplit)

    from model_export.refresh_bench import __doc__ as refresh_doc, add_arguments as refresh_arguments

    p = sub.add_parser("refresh-bench", help="a model refresh under recall load and an event stream; the refresh alone at 100k items",
                       description=refresh_doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    refresh_arguments(p)
    p.set_defaults(func=cmd_refresh_bench)

    p = sub.add_parser("bench", help="user-tower speed: ONNX Runtime vs PyTorch eager")
    p.add_argument("--export-dir", required=True, help="an export directory (with manifest.json)")
    p.add_argument("--batch", type=at_least(1), default=256)
    p.add_argument("--seconds", type=at_least(0.1, float), default=3.0, help="time budget per measurement")
    p.add_argument("--gpu", action="store_true", help="the CUDA session (I/O binding) vs PyTorch eager on the GPU, and its parity with the CPU session")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("catalog-bench", help="training step and evaluation on large synthetic catalogs: lazy item updates vs Adam over every row",
                       description="MIND on synthetic Zipf catalogs of millions of items with side features: ms per training step of the "
                                   "optimizer `train` picks vs plain Adam over every row (same batches, alternating), top-50 retrieval "
                                   "over the catalog, peak RSS (model_export/catalog_bench.py says more)")
    p.add_argument("--items", nargs="+", type=at_least(1), default=[100_000, 1_000_000], help="catalog sizes")
    p.add_argument("--side-vocabulary", type=at_least(1), default=10_000, help="distinct side tokens (e.g. brands)")
    p.add_argument("--tokens-per-item", type=at_least(1), default=2)
    p.add_argument("--steps", type=at_least(2), default=20, help="training steps per optimizer (the first fifth, at least one, is warm-up)")
    p.add_argument("--users", type=at_least(1), default=1024, help="users whose top 50 are retrieved over the catalog")
    p.add_argument("--sparse-item-rows", type=at_least(0), default=SPARSE_ITEM_ROWS, metavar="N", help=f"as train's (default {SPARSE_ITEM_ROWS:,})")
    p.set_defaults(func=cmd_catalog_bench)

    p = sub.add_parser("quality", help="quality table: models x datasets x seeds, mean and spread, ratios")
    p.add_argument("--datasets", nargs="+", default=["ml-1m", "beauty"])
    p.add_argument("--models", nargs="+", choices=MODEL_KINDS, default=list(MODEL_KINDS))
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3], help="distinct seeds (a seed named twice would count its run twice)")
    p.add_argument("--epochs", type=at_least(0), default=0, help="maximum epochs (default, or 0: the dataset's)")
    p.add_argument("--max-steps-per-epoch", type=at_least(0), default=0, help="cap every model's steps per epoch (0 = full)")
    p.add_argument("--out", default=None, help="run directories and quality-<datasets>.json (default: [paths].var_dir/quality)")
    p.set_defaults(func=cmd_quality)

    p = sub.add_parser("peer", help="torch-rechub MIND vs ours on the same split: quality and time per epoch")
    _dataset_arg(p)
    p.add_argument("--epochs", type=at_least(1), default=1)
    p.add_argument("--max-steps-per-epoch", type=at_least(0), default=0, help="cap both models' steps per epoch (0 = full)")
    p.add_argument("--out", default=None, help="both runs (default: [paths].var_dir/peer)")
    p.add_argument("--device", default="cpu", help="where both models train: cpu or cuda (both scored on the CPU)")
    p.set_defaults(func=cmd_peer)

    args = parser.parse_args(argv)
    from model_export.heap import retain_freed_memory

    retain_freed_memory()  # PyTorch on the CPU: steady step times (see heap.py)
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
