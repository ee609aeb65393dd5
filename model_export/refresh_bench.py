"""python -m model_export refresh-bench: refreshing the model with zero downtime, measured. Prints
figures and asserts nothing.

--part load (default): the whole stack (infra/harness.py: broker, Redis, Milvus (the server
    unless --milvus lite), the PyFlink job, the recall service) with the model trained on the
    earlier weeks of MovieLens-1M (`python -m model_export timesplit` trains it), the later weeks
    replayed as the event stream and an open-loop Recall load. After a warm-up and a baseline, `python -m model_export retrain` runs
    as its own process (niced, one thread: on 2 shared cores it must not starve the services; in
    production it runs on its own machine). Printed: failed requests, responses that mix versions,
    recall p99 before / during the refresh and their ratio, the time to a fully refreshed system
    (retrain's stages), and whether the stream-only items are retrievable afterwards.
    Mixed versions: a response names the version of the interests it used. For the users that send
    no event during the run (their window is the same before and after), every returned score must
    be the inner product of that version's interest and that version's item vector: a response
    that searched another version's collection fails this check.
--part scale: the refresh alone at catalog scale: 100k item vectors (recall_service.bench's
    catalog) and the interests of all 6,040 ML-1M users in Redis at the old version; timed:
    publish (insert, index, load, alias) + backfill of every user + retire of the old version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from infra.config import REPO_ROOT, load_config

TIMESPLIT_BASE = Path("timesplit") / "base-mind_remi"  # under [paths].var_dir: `python -m model_export timesplit`'s base model
SCORE_TOLERANCE = 1e-3  # float32 inner products computed by Milvus and by numpy


def add_arguments(p) -> None:
    from infra.cli import at_least
    from infra.load_options import add_load_arguments

    p.add_argument("--part", choices=("load", "scale"), default="load",
                   help="load: a retraining published under stream and recall load (the load flags below apply); scale: a refresh "
                        "of an --items catalog, no load (default: %(default)s)")
    # The targets are about the system, so the Milvus server by default (Lite: ~10 searches/s). The
    # exports are resolved from the configuration's paths when the command runs.
    add_load_arguments(p, start_note="; -1: the first event on --stream-from's date",
                       export_note=f"the timesplit base model's, [paths].var_dir/{TIMESPLIT_BASE}/export, exported from it if need be",
                       start=-1, qps=30.0, rate=300.0, work_dir=REPO_ROOT / "var" / "refresh", milvus="server")
    p.add_argument("--stream-from", default="2000-11-22", help="--part load: replay ML-1M from this date (the base model's training data ends there)")
    p.add_argument("--warmup-s", type=at_least(0, float), default=20.0)
    p.add_argument("--baseline-s", type=at_least(1, float), default=30.0, help="load measured before the refresh")
    p.add_argument("--settle-s", type=at_least(0, float), default=15.0, help="load measured after the refresh")
    p.add_argument("--items", type=at_least(1), default=100_000, help="--part scale: catalog size")
    p.add_argument("--scale-export", type=Path, default=None,
                   help="--part scale: the export whose vectors seed the catalog (default: the main command's, under [paths].artifacts_dir)")


def run(args) -> dict:
    paths = load_config().paths
    args.export_dir = args.export_dir or paths.var_dir / TIMESPLIT_BASE / "export"
    args.scale_export = args.scale_export or paths.main_export_dir
    if args.part == "load" and args.dataset != "ml-1m":  # the base model is ML-1M's, trained up to --stream-from
        raise SystemExit(f"--dataset {args.dataset}: the refresh bench replays ML-1M after the timesplit base model's training "
                         "data (`python -m model_export timesplit`); leave --dataset out")
    return run_load(args) if args.part == "load" else run_scale(args)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- part 1: under load


def ensure_timesplit_export(export_dir: Path) -> None:
    if (export_dir / "manifest.json").is_file():
        return
    run_dir = export_dir.parent
    if not (run_dir / "model.pt").is_file():
        raise SystemExit(f"no model in {run_dir}: train it first with `python -m model_export timesplit` (about 10 minutes on 2 cores)")
    train = json.loads((run_dir / "train.json").read_text())
    say(f"exporting {run_dir} (trained on {train['dataset']})")
    subprocess.run([sys.executable, "-m", "model_export", "export", "--model-dir", str(run_dir), "--dataset", train["dataset"], "--out", str(export_dir)],
                   cwd=REPO_ROOT, check=True)


def first_event_at(date: str) -> int:
    import pandas as pd

    from streaming.producer import ReplayEvents

    paths = load_config().paths
    events = ReplayEvents.from_dataset("ml-1m", paths.data_dir, paths.shared_data_dir)
    return int(np.searchsorted(events.times_ms, pd.Timestamp(date, tz="UTC").value // 1_000_000))


class ResponseLog:
    """Every answer of the load: (sent_at, user, model version, path, [(item, score, interest)])."""

    def __init__(self):
        self.rows: list[tuple] = []

    def record(self, sent_at: float, request, response) -> None:
        self.rows.append((sent_at, request.user_id, response.model_version, response.path,
                          [(i.item_id, i.score, i.interest_index) for i in response.items]))


def snapshot(config) -> dict:
    from streaming.feature_store import RedisFeatureStore

    store = RedisFeatureStore.from_config(config.redis, timeout_s=10.0)
    records = {}
    try:
        for ids in store.user_ids(2000):
            records.update({r.user_id: r for r in store.get_many(ids) if r is not None})
    finally:
        store.close()
    return records


def version_violations(rows, before: dict, after: dict, vectors: dict, index: dict) -> tuple[int, int, int]:
    """(responses checked, responses inconsistent with their version, responses naming an unknown version)."""
    checked = bad = unknown = 0
    from recall_service.stubs import recall_pb2

    for _, user, version, path, items in rows:
        if path != recall_pb2.RECALL_PATH_STORED_INTERESTS:
            continue  # a fallback (popular items, or interests computed on the fly) is not searched with stored interests
        if version not in vectors:
            unknown += 1
            continue
        b, a = before.get(user), after.get(user)
        if b is None or a is None or list(b.window) != list(a.window):
            continue  # the user's window changed during the run: its interests at each version are unknown here
        interests = {b.model_version: b.interests, a.model_version: a.interests}.get(version)
        if interests is None or not items:
            continue
        checked += 1
        for item, score, k in items:
            row = index[version].get(item)
            if row is None or k < 0 or k >= len(interests) or abs(float(interests[k] @ vectors[version][row - 1]) - score) > SCORE_TOLERANCE:
                bad += 1
                break
    return checked, bad, unknown


def run_load(args) -> dict:
    from infra.harness import system_under_load
    from model_export.artifact import ModelArtifact

    ensure_timesplit_export(args.export_dir)
    if args.start < 0:
        args.start = first_event_at(args.stream_from)
    with system_under_load(args, "refresh", say, start_load=False) as loaded:
        sut = loaded.sut
        responses = ResponseLog()
        load = loaded.load
        load.on_answer = responses.record
        started = time.monotonic()
        load.start()
        say(f"warming up {args.warmup_s:.0f}s, then a {args.baseline_s:.0f}s baseline")
        time.sleep(args.warmup_s)
        t_base = time.monotonic()
        time.sleep(args.baseline_s)
        t_refresh = time.monotonic()
        before = snapshot(sut.config)
        first = ModelArtifact.load(args.export_dir).version
        say(f"==> retraining ({len(before):,} users stored) while the load goes on")
        # The bench measures the refresh itself, so the quality gate only reports (tolerance 1.0): a
        # minute of stream is a small update, which the gate may rightly refuse (its verdict is printed).
        env = {**sut.stack.env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MINDSTREAM_RETRAIN__TOLERANCE": "1.0"}
        done = subprocess.run([sys.executable, "-m", "model_export", "retrain"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              preexec_fn=lambda: os.nice(19))
        t_refreshed = time.monotonic()
        if done.returncode not in (0, 1):  # 1: published, the backfill or retirement stopped (measured all the same)
            raise SystemExit(f"retrain failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout)
        if report["status"] != "published":
            raise SystemExit(f"retrain published no version ({report['status']}: {report.get('reason', '')}), so there was no refresh "
                             "to measure: replay more events (an earlier --stream-from, a longer --warmup-s / --baseline-s)")
        time.sleep(args.settle_s)
        after = snapshot(sut.config)
        load.stop()
        outcome = loaded.finish(args.drain_timeout_s)

        second = report["model_version"]
        artifacts = {first: ModelArtifact.load(args.export_dir), second: ModelArtifact.load(sut.stack.layout.models_dir / second)}
        vectors = {v: a.item_vectors() for v, a in artifacts.items()}
        index = {v: a.item_index for v, a in artifacts.items()}
        # Checked: answers sent after the first snapshot (an earlier one may predate a quiet user's last event).
        checked, mixed, unknown = version_violations([r for r in responses.rows if r[0] >= t_refresh], before, after, vectors, index)
        samples = load.samples

        def window(a, b):
            return window_latency([s for s in samples if a <= s.sent_at < b], args.deadline_ms / 1e3)

        new_items = [raw for raw in artifacts[second].raw_items[artifacts[first].manifest.n_items:]]
        ranks = _retrievable(sut.config, second, new_items)
        result = {
            "part": "load", "base_version": first, "new_version": second, "qps": args.qps, "event_rate": args.rate,
            "before": window(t_base, t_refresh), "during": window(t_refresh, t_refreshed), "after": window(t_refreshed, t_refreshed + args.settle_s),
            "failed_requests": sum(1 for s in samples if s.code != "OK"), "requests": len(samples),
            "responses_checked_for_versions": checked, "responses_mixing_versions": mixed, "responses_of_unknown_versions": unknown,
            "versions_served": sorted({r[2] for r in responses.rows}),
            "refresh_seconds": round(t_refreshed - t_refresh, 1), "retrain_stages_s": report["seconds"],
            "retrain": {k: report[k] for k in ("new_events", "new_items", "holdout", "verdict", "retired", "stored_versions") if k in report},
            "stream_only_items": len(new_items), "stream_only_item_ranks": ranks, "catalog_items": artifacts[second].manifest.n_items,
            "stream": outcome, "seconds": round(time.monotonic() - started, 1),
        }
    during, before = result["during"]["p99_ms"], result["before"]["p99_ms"]
    result["p99_during_over_before"] = None if during is None or not before else round(during / before, 2)  # None: no call in a window
    _print_load(result)
    _save(args.work_dir, "refresh_bench_load.json", result)
    return result


def _retrievable(config, version: str, raw_items: list[str], n: int = 1000) -> list[int | None]:
    """For each stream-only item, its rank (1 = first) in a Recall of n items (on-the-fly path, the
    new version) for a window of the items that preceded its first occurrence in the stream; None
    when it is not among the n. The old version cannot return these items at all."""
    from model_export.event_log import EventLog
    from recall_service.channel import recall_channel
    from recall_service.stubs import recall_pb2, recall_pb2_grpc

    log = EventLog.load(config.retrain.state_dir)
    order = np.lexsort((log.times_ms, log.users))
    users, items = log.users[order], log.items[order]
    wanted = set(raw_items)
    contexts = {}
    for i, (user, item) in enumerate(zip(users.tolist(), items.tolist())):
        if item in wanted and item not in contexts:
            before = [x for u, x in zip(users[max(0, i - 10):i].tolist(), items[max(0, i - 10):i].tolist()) if u == user]
            if before:
                contexts[item] = before
    ranks = []
    with recall_channel(config.recall) as channel:
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        for item, context in list(contexts.items())[:200]:
            response = stub.Recall(recall_pb2.RecallRequest(user_id=f"probe-{item}", n=n, recent_item_ids=context), timeout=10)
            returned = [i.item_id for i in response.items] if response.model_version == version else []
            ranks.append(returned.index(item) + 1 if item in returned else None)
    return ranks


def window_latency(samples, deadline_s: float) -> dict:
    """Requests, failures and latency p50 / p99 of a window's calls. A failed call counts as at least
    the deadline: it gave its client no answer, so leaving it out would let a refresh that fails
    calls look faster than one that answers them late."""
    from infra.fault_report import percentile

    latencies = [s.latency_s if s.code == "OK" else max(s.latency_s, deadline_s) for s in samples]
    return {"requests": len(samples), "failed": sum(1 for s in samples if s.code != "OK"),
            "p50_ms": _ms(percentile(latencies, 50)), "p99_ms": _ms(percentile(latencies, 99))}


def _ms(seconds):
    return None if seconds is None else round(seconds * 1000, 1)


def _print_load(r: dict) -> None:
    print(f"\nrefresh under load: {r['qps']:.0f} Recall calls/s (open loop), {r['event_rate']:.0f} events/s; {r['base_version']} -> {r['new_version']}")
    print(f"{'window':<8} {'requests':>9} {'failed':>7} {'p50 ms':>8} {'p99 ms':>8}   (a failed call counts as the deadline)")
    for name in ("before", "during", "after"):
        w = r[name]
        print(f"{name:<8} {w['requests']:>9,} {w['failed']:>7} {_figure(w['p50_ms']):>8} {_figure(w['p99_ms']):>8}")
    print(f"failed requests: {r['failed_requests']} of {r['requests']:,}")
    print(f"responses mixing versions: {r['responses_mixing_versions']} of {r['responses_checked_for_versions']:,} checked "
          f"(+{r['responses_of_unknown_versions']} naming an unknown version); versions served {r['versions_served']}")
    ratio = r["p99_during_over_before"]
    print(f"recall p99 during / before the refresh: {'n/a (a window without calls)' if ratio is None else f'{ratio:.2f}x'} (target <= 2)")
    print(f"time to a fully refreshed system: {r['refresh_seconds']:.1f} s; stages {r['retrain_stages_s']}")
    print(f"quality gate (reporting only in this bench): {r['retrain'].get('verdict')}")
    ranks = r["stream_only_item_ranks"]
    found = [x for x in ranks if x is not None]
    print(f"stream-only items: {r['stream_only_items']}; returned by the new version for a window of the items that preceded them: "
          f"{len(found)} of {len(ranks)} probed (ranks {sorted(found)} of {r['catalog_items']:,} items; asked for 1,000)")
    print(f"events: lost {r['stream']['events_lost']}, doubled {r['stream']['doubled_behaviours']}")


def _figure(ms: float | None) -> str:
    return "–" if ms is None else f"{ms:.1f}"


def _save(work_dir: Path, name: str, result: dict) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / name).write_text(json.dumps(result, indent=2, default=str))


# ----------------------------------------------------------------------------- part 2: at scale


def run_scale(args) -> dict:
    from infra.milvus_server import MilvusLiteServer, MilvusServer
    from infra.redis_server import EmbeddedRedis
    from model_export.artifact import UserTower
    from model_export.publish import client_options, connect, publish_version
    from model_export.registry import ModelRegistry
    from model_export.retrain import Stages, refresh
    from recall_service.bench import build_catalog, user_windows
    from streaming.feature_store import InterestRecord, RedisFeatureStore

    root = Path(args.work_dir) / "scale"
    catalogs = [build_catalog(args.scale_export, args.items, Path(args.work_dir) / "catalogs", seed=s) for s in (0, 1)]
    for sub in ("redis", "milvus", "models"):
        shutil.rmtree(root / sub, ignore_errors=True)
    milvus_server = MilvusServer(root / "milvus") if args.milvus == "server" else MilvusLiteServer(root / "milvus")
    say(f"starting Redis and {'the Milvus server' if args.milvus == 'server' else 'Milvus Lite'} in {root}")
    with EmbeddedRedis(root / "redis") as redis_server, milvus_server as milvus:
        env = {**os.environ, "MINDSTREAM_REDIS__URI": redis_server.uri, "MINDSTREAM_MILVUS__URI": milvus.uri, "MINDSTREAM_PATHS__MODELS_DIR": str(root / "models")}
        config = load_config(environ=env)
        registry = ModelRegistry(config.paths.models_dir)
        client = connect(config.milvus.uri, **client_options(config.milvus))
        say(f"publishing the old version ({args.items:,} items)")
        began = time.perf_counter()
        old = publish_version(catalogs[0], registry, client, config.milvus.collection_prefix, progress=lambda m: None)
        say(f"  published in {time.perf_counter() - began:.0f}s")
        tower = UserTower.load(registry.path(old.model_version), prefer_gpu=True)
        windows = user_windows(tower.artifact.manifest.maxlen)
        store = RedisFeatureStore.from_config(config.redis, timeout_s=10.0)
        for start in range(0, len(windows), 1000):
            chunk = windows[start : start + 1000]
            vectors = tower.interests([w for _, w in chunk])
            store.put_many([InterestRecord(u, old.model_version, v, w, 1, "0:0") for (u, w), v in zip(chunk, vectors) if v is not None])
        say(f"{len(windows):,} users stored at {old.model_version}; refreshing to the new version")
        stages = Stages()
        started = time.perf_counter()
        report = refresh(config, catalogs[1], say, stages)
        total = time.perf_counter() - started
    backend = "Milvus 2.3.5 server" if args.milvus == "server" else "Milvus Lite (server over gRPC)"
    result = {"part": "scale", "items": args.items, "users": len(windows), "milvus": backend, "index": report["index"],
              "seconds": {**report["seconds"], "total": round(total, 1)}, "rewritten": report["backfill"]["rewritten"], "retired": report["retired"]}
    print(f"\nrefresh at scale: {args.items:,} item vectors + {len(windows):,} users' interests on {result['milvus']} ({report['index']})")
    seconds = stages.seconds
    print(f"publish {seconds['publish']:.1f} s, backfill {seconds['backfill']:.1f} s ({report['backfill']['rewritten']:,} users), "
          f"retire {seconds['retire']:.1f} s: total {total:.1f} s (target <= 60 s)")
    _save(args.work_dir, "refresh_bench_scale.json", result)
    return result
