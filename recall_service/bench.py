"""python -m recall_service bench: closed-loop load on the recall service, with the raw Milvus
search measured in the same run. It prints figures and asserts nothing.

What it builds (cached under var/bench/, keyed by the source export and the size):
  catalog  the trained ML-1M item vectors of --export-dir plus perturbed copies up to --items:
           copy j of a uniformly drawn real item v is v + 0.5 L z, z ~ N(0, I), L the Cholesky
           factor of the covariance of the real vectors (a Gaussian kernel-density sample, bandwidth
           0.5); a copy keeps its source's category. It is an export of its own model version,
           published with model_export.publish (HNSW M 16 / efConstruction 200, inner product).
  users    every ML-1M user's last `maxlen` behaviours (raw ids) through the export's ONNX user
           tower: the interest records stored in Redis under the catalog's model version, with
           the user's seen set (the newest --seen-items of the whole history, as the streaming
           job keeps it): the service leaves both out, so its searches fetch n + |window ∪ seen|.
What it starts, on free loopback ports: embedded Redis, Milvus (the server of the PyPI package
`milvus`, or Milvus Lite over gRPC), the recall server in a subprocess (`python -m recall_service
serve`, default configuration otherwise) on a model registry holding the catalog (var/bench/models:
raw ids come from its vocabulary, as in production).
What it measures at each concurrency c, each phase --seconds long after a warm-up:
  raw  c threads calling the search the service makes (MilvusItemSearch: same vectors, limit,
       filter and ef), straight to Milvus
  e2e  c threads calling Recall(user, n) over gRPC: feature store + search + merge + gRPC
  overhead = p99 e2e - p99 raw (target <= 3 ms).
--scale: 1M items on the Milvus server. HNSW ef is tuned first: ANN recall@200 of the interests of
250 users against exact inner-product search (numpy) for each --efs value; the smallest ef that
reaches --target-recall serves the load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from infra.cli import at_least, comma_list
from infra.config import REPO_ROOT, load_config

BANDWIDTH = 0.5  # of the kernel-density copies, in units of the real vectors' covariance
PREFIX = "bench_items"  # the bench's collections and alias, apart from the service's


def add_arguments(p) -> None:
    p.add_argument("--export-dir", default=str(REPO_ROOT / "var" / "artifacts" / "ml-1m-mind_remi" / "export"),
                   help="the trained ML-1M export whose item vectors and user tower the bench uses")
    p.add_argument("--milvus", type=comma_list(choices=("server", "lite")), default="server,lite", help="comma-separated backends: server (Milvus 2.3.5 of `pip install milvus`), lite (Milvus Lite)")
    p.add_argument("--items", type=at_least(1), default=100_000, help="catalog size")
    p.add_argument("--scale", action="store_true", help="1M items on the Milvus server, HNSW ef tuned for --target-recall first")
    p.add_argument("--efs", type=comma_list(at_least(1)), default="200,256,384,512,768,1024", help="--scale: HNSW ef values to try (an ef below the limit, 200, is raised to it)")
    p.add_argument("--target-recall", type=at_least(0, float, at_most=1), default=0.95, help="--scale: ANN recall@200 the chosen ef must reach")
    p.add_argument("--ef", type=at_least(0), default=0, help="HNSW ef of the service (default: [recall].search_ef; --scale: tuned)")
    p.add_argument("--concurrency", type=comma_list(at_least(1)), default="1,8,32,50", help="comma-separated closed-loop concurrencies")
    p.add_argument("--seconds", type=at_least(0.1, float), default=10.0, help="measured seconds per phase")
    p.add_argument("--warmup", type=at_least(0, float), default=2.0, help="unmeasured seconds before each phase")
    p.add_argument("--n", type=at_least(1), default=50, help="items per Recall (the per-interest limit is n + |window ∪ seen set|)")
    p.add_argument("--seen-items", type=at_least(0), default=None,
                   help="seen set kept per user (default: [streaming].seen_items; 0 = none, only the window is left out)")
    p.add_argument("--work-dir", default="", help="where catalogs, Milvus and Redis data live (default: var/bench)")
    p.add_argument("--out", default="", help="write the figures as JSON here too")


# -- what the bench serves ----------------------------------------------------------------------


def build_catalog(export_dir: Path, n_items: int, out_root: Path, seed: int = 0) -> Path:
    """An export whose item vectors are the real ones plus kernel-density copies (see the module
    docstring); the user tower is the source's. Built once, then reused."""
    from infra.files import sha256_of
    from model_export.manifest import ArtifactFile, Manifest

    source = Manifest.load(export_dir)
    version = f"bench-{n_items}-s{seed}-{source.model_version[-8:]}"
    out = out_root / version
    if (out / "manifest.json").is_file():
        return out
    vectors = np.load(source.file(export_dir, "item_vectors"))
    vocab = json.loads(source.file(export_dir, "vocab").read_text())
    if n_items < len(vectors):
        raise SystemExit(f"--items {n_items} is smaller than the {len(vectors)} real items; ask for at least that many")
    rng = np.random.default_rng(seed)
    copies = n_items - len(vectors)
    origin = rng.integers(0, len(vectors), copies)
    chol = np.linalg.cholesky(np.cov(vectors, rowvar=False) + 1e-6 * np.eye(vectors.shape[1]))
    noise = (rng.standard_normal((copies, vectors.shape[1])) @ chol.T * BANDWIDTH).astype(np.float32)
    catalog = np.concatenate([vectors, vectors[origin] + noise]).astype(np.float32)
    vocab["items"] = vocab["items"] + [f"synthetic-{j}" for j in range(copies)]
    vocab["item_side"] = vocab["item_side"] + [vocab["item_side"][i] for i in origin.tolist()]
    vocab["popularity"] = list(vocab.get("popularity") or [0] * len(vectors)) + [0] * copies
    staging = out_root / f".{version}.staging"
    staging.mkdir(parents=True, exist_ok=True)
    np.save(staging / "item_vectors.npy", catalog)
    (staging / "vocab.json").write_text(json.dumps(vocab))
    (staging / "user_tower.onnx").write_bytes(source.file(export_dir, "user_tower").read_bytes())
    # What serving reads; not the source's training weights (a catalog is never retrained, and its
    # items are not the weights' items).
    served = ("user_tower", "item_vectors", "vocab")
    files = {role: ArtifactFile(f.path, sha256_of(staging / f.path), (staging / f.path).stat().st_size)
             for role, f in source.files.items() if role in served}
    extra = {**source.extra, "bench_catalog": {"source": source.model_version, "real_items": len(vectors), "bandwidth": BANDWIDTH, "seed": seed}}
    dataclasses.replace(source, model_version=version, n_items=n_items, files=files, extra=extra).write(staging)
    staging.rename(out)
    return out


def user_windows(maxlen: int) -> list[tuple[str, list[str]]]:
    """(user id, last `maxlen` raw item ids, oldest first) of every ML-1M user."""
    from model_export.data import load_dataset

    paths = load_config().paths
    data = load_dataset("ml-1m", paths.data_dir, paths.cache_dir, paths.shared_data_dir)
    out = []
    for u, user in enumerate(data.user_ids.tolist()):
        items = data.seq_items[data.seq_offsets[u]:data.seq_offsets[u + 1]][-maxlen:]
        out.append((f"ml-{user}", data.item_ids[items].tolist()))
    return out


def user_seen(seen_items: int) -> dict[str, list[tuple[int, str]]]:
    """(event time ms, raw item id) of the newest `seen_items` behaviours of every ML-1M user: the
    seen sets the streaming job would have written for them."""
    from model_export.data import load_dataset

    if not seen_items:
        return {}
    paths = load_config().paths
    data = load_dataset("ml-1m", paths.data_dir, paths.cache_dir, paths.shared_data_dir)  # cached: loaded in ~0.1 s
    out = {}
    for u, user in enumerate(data.user_ids.tolist()):
        start, end = data.seq_offsets[u], data.seq_offsets[u + 1]
        start = max(start, end - seen_items)
        out[f"ml-{user}"] = list(zip(data.seq_times[start:end].tolist(), data.item_ids[data.seq_items[start:end]].tolist()))
    return out


def ensure_published(client, catalog_dir: Path, log) -> str:
    """Publishes the catalog (HNSW, index built before the alias moves) unless its collection is complete."""
    from model_export.manifest import Manifest
    from model_export.publish import collection_name, publish, wait_for_index

    manifest = Manifest.load(catalog_dir, verify=False)
    name = collection_name(PREFIX, manifest.model_version)
    complete = False
    if client.has_collection(name):
        client.load_collection(name)
        count = client.query(name, filter="item_id >= 0", output_fields=["count(*)"])[0]["count(*)"]
        complete = count == manifest.n_items
    if complete:
        wait_for_index(client, name, manifest.n_items, log)
    else:
        started = time.perf_counter()
        step = max(manifest.n_items // 10, 5_000)
        publish(catalog_dir, client, PREFIX, index_type="HNSW",
                progress=lambda m: log(m) if "inserted" not in m or int(m.split("/")[0].split()[-1].replace(",", "")) % step < 5_000 else None)
        log(f"published {manifest.n_items:,} items in {time.perf_counter() - started:.0f}s")
    return manifest.model_version


# -- load ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Phase:
    concurrency: int
    calls: int
    errors: int
    qps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_call: dict  # process -> CPU milliseconds per measured call; "other" = the rest of the machine


def _cpu_seconds(processes: dict) -> dict[str, float]:
    import psutil

    out = {}
    for name, process in processes.items():
        try:
            times = process.cpu_times()
            out[name] = times.user + times.system
        except psutil.Error:
            out[name] = 0.0
    busy = psutil.cpu_times()
    out["machine"] = busy.user + busy.system + busy.nice + getattr(busy, "irq", 0) + getattr(busy, "softirq", 0)
    return out


def closed_loop(call, concurrency: int, seconds: float, warmup_s: float, processes: dict | None = None) -> Phase:
    """`concurrency` threads each calling `call(rng)` back to back; calls that start inside the
    measured window count. Errors are counted, not timed. CPU time of `processes` (psutil) and of
    the whole machine is taken over the measured window."""
    processes = processes or {}
    begin = time.perf_counter() + warmup_s
    end = begin + seconds
    cpu: list[dict] = []

    def sample_cpu() -> None:
        for moment in (begin, end):
            time.sleep(max(0.0, moment - time.perf_counter()))
            cpu.append(_cpu_seconds(processes))
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency

    def worker(t: int) -> None:
        rng = random.Random(t)
        while True:
            started = time.perf_counter()
            if started >= end:
                return
            try:
                call(rng)
            except Exception:
                if started >= begin:
                    errors[t] += 1
                continue
            if started >= begin:
                latencies[t].append(time.perf_counter() - started)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(concurrency)] + [threading.Thread(target=sample_cpu)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    times = np.concatenate([np.asarray(x) for x in latencies]) * 1e3 if any(latencies) else np.array([np.nan])
    calls = sum(len(x) for x in latencies)
    used = {name: cpu[1][name] - cpu[0][name] for name in cpu[0]}
    used["other"] = used.pop("machine") - sum(used.values())
    per_call = {name: round(seconds_used / max(calls, 1) * 1e3, 3) for name, seconds_used in used.items()}
    return Phase(concurrency, calls, sum(errors), calls / seconds, float(np.percentile(times, 50)), float(np.percentile(times, 99)), per_call)


class ServiceProcess:
    """`python -m recall_service serve` in a subprocess, configured by environment variables."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.port = int(env["MINDSTREAM_RECALL__PORT"])
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "ServiceProcess":
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        log = open(self.log_path, "ab")
        self.process = subprocess.Popen([sys.executable, "-m", "recall_service", "serve"], cwd=REPO_ROOT, env={**os.environ, **self.env},
                                        stdout=log, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the recall server exited with {self.process.returncode}; see {self.log_path}")
            try:
                status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    channel.close()
                    return self
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the recall server did not become SERVING within 120 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Item ids (index + 1) of the exact top k by inner product, per query (unordered)."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 32):
        scores = queries[start:start + 32] @ vectors.T
        out[start:start + 32] = np.argpartition(-scores, k, axis=1)[:, :k] + 1
    return out


def source_maxlen(catalog_dir: Path) -> int:
    from model_export.manifest import Manifest

    return Manifest.load(catalog_dir, verify=False).maxlen


def tune_ef(search, version: str, vectors: np.ndarray, queries: np.ndarray, efs: list[int], target: float, log, k: int = 200) -> tuple[int, list[dict]]:
    """ANN recall@k against exact search for each ef; the smallest ef reaching `target` (else the best)."""
    exact = exact_top(vectors, queries, k)
    table = []
    for ef in sorted({max(ef, k) for ef in efs}):
        search.ef = ef
        found, started = [], time.perf_counter()
        for start in range(0, len(queries), 16):
            found.append(search.search(version, queries[start:start + 16], k, "active == true", 60.0).item_ids)
        seconds = time.perf_counter() - started
        found = np.concatenate(found)
        recall = float(np.mean([len(set(f.tolist()) & set(e.tolist())) / k for f, e in zip(found, exact)]))
        table.append({"ef": ef, "k": k, "recall": round(recall, 4), "ms_per_query_vector": round(seconds / len(queries) * 1e3, 3)})
        log(f"  ef {ef:4d}: ANN recall@{k} {recall:.4f} over {len(queries)} interest vectors ({seconds / len(queries) * 1e3:.2f} ms per vector, batches of 16)")
    good = [row for row in table if row["recall"] >= target]
    chosen = min(good, key=lambda row: row["ef"]) if good else max(table, key=lambda row: row["recall"])
    return chosen["ef"], table


def bench_backend(backend: str, catalog_dir: Path, users, interests, args, root: Path, log) -> dict:
    import grpc
    from pymilvus import MilvusClient

    from infra.milvus_server import MilvusLiteServer, MilvusServer
    from infra.redis_server import EmbeddedRedis, free_port
    from model_export.manifest import Manifest
    from model_export.registry import ModelRegistry
    from recall_service.backends import MilvusItemSearch, RegistryVocabularies
    from recall_service.query import Limits, validate
    from recall_service.stubs import recall_pb2, recall_pb2_grpc
    from streaming.feature_store import InterestRecord, RedisFeatureStore

    manifest = Manifest.load(catalog_dir, verify=False)
    recall_config = load_config().recall
    seen_items = load_config().streaming.seen_items if args.seen_items is None else args.seen_items
    report: dict = {"backend": backend, "items": manifest.n_items, "users": len(users), "n": args.n, "seen_items": seen_items}
    with contextlib.ExitStack() as stack:
        data_dir = root / f"milvus-{backend}-{manifest.n_items}"
        milvus = stack.enter_context(MilvusServer(data_dir) if backend == "server" else MilvusLiteServer(data_dir))
        log(f"[{backend}] Milvus at {milvus.uri} ({data_dir})")
        client = MilvusClient(uri=milvus.uri)
        version = ensure_published(client, catalog_dir, log)

        # the catalog installed in a registry of the bench's: the service (and the raw phase) read raw ids from its vocabulary
        registry = ModelRegistry(root / "models")
        registry.install(catalog_dir)
        vocabularies = RegistryVocabularies(registry)
        search = MilvusItemSearch(milvus.uri, prefix=PREFIX, ef=args.ef or recall_config.search_ef, connect_timeout_s=30, vocabularies=vocabularies)
        search.connect()
        read_by = time.monotonic() + 60
        while vocabularies.raw_ids(version) is None:
            if time.monotonic() > read_by:
                raise RuntimeError(f"the vocabulary of {version} in {registry.root} was not read within 60 s (see the log above)")
            time.sleep(0.05)
        sample = random.Random(0).sample(range(len(interests)), 250)
        queries = np.concatenate([interests[i] for i in sample])
        vectors = np.load(catalog_dir / "item_vectors.npy", mmap_mode="r")
        if args.scale:
            log(f"[{backend}] tuning HNSW ef for ANN recall@200 >= {args.target_recall}")
            search.ef, report["ef_tuning"] = tune_ef(search, version, vectors, queries, args.efs, args.target_recall, log)
        else:  # the quality of what is served: recall@n+window (100 by default) at the service's ef
            k = min(recall_config.max_per_interest_n, args.n + source_maxlen(catalog_dir))
            log(f"[{backend}] ANN recall@{k} at the service's ef against exact search")
            report["ann_recall"] = tune_ef(search, version, vectors, queries, [search.ef], 0.0, log, k=k)[1]
        report["ef"] = search.ef

        shutil.rmtree(root / f"redis-{backend}", ignore_errors=True)  # records are rewritten: no old file to load
        redis_server = stack.enter_context(EmbeddedRedis(root / f"redis-{backend}"))
        store = RedisFeatureStore.from_config(dataclasses.replace(load_config().redis, uri=redis_server.uri), seen_items=seen_items)
        seen = user_seen(seen_items)
        for start in range(0, len(users), 1000):
            chunk = users[start:start + 1000]
            store.put_many((InterestRecord(u, version, v, tuple(w), 0, "0:0") for (u, w), v in zip(chunk, interests[start:start + 1000])),
                           seen={u: seen[u] for u, _ in chunk if u in seen})
        env = {"MINDSTREAM_CONFIG": "", "MINDSTREAM_REDIS__URI": redis_server.uri, "MINDSTREAM_MILVUS__URI": milvus.uri,
               "MINDSTREAM_MILVUS__COLLECTION_PREFIX": PREFIX, "MINDSTREAM_PATHS__MODELS_DIR": str(registry.root),
               "MINDSTREAM_RECALL__PORT": str(free_port()), "MINDSTREAM_RECALL__METRICS_PORT": str(free_port()),
               "MINDSTREAM_RECALL__SEARCH_EF": str(search.ef), "MINDSTREAM_RECALL__VECTOR_SEARCH_TIMEOUT_MS": "5000",
               "MINDSTREAM_RECALL__DEFAULT_DEADLINE_MS": "10000", "MINDSTREAM_STREAMING__SEEN_ITEMS": str(seen_items), "OMP_NUM_THREADS": "1"}
        service = stack.enter_context(ServiceProcess(env, root / f"recall-{backend}.log"))
        channel = grpc.insecure_channel(f"127.0.0.1:{service.port}")
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        # the service's own rule: n + |window ∪ seen set|, capped
        queries = [validate(u, args.n, limits=Limits.from_config(recall_config)) for u, _ in users]
        limits = [q.per_interest_limit(q.left_out(w, (item for _, item in seen.get(q.user_id, ()))), recall_config.max_per_interest_n)
                  for q, (_, w) in zip(queries, users)]
        log(f"[{backend}] per-interest limit: mean {np.mean(limits):.0f}, max {max(limits)} (n {args.n} + window ∪ seen set of {seen_items})")
        import psutil

        processes = {"bench": psutil.Process(), "recall": psutil.Process(service.process.pid), "milvus": psutil.Process(milvus.process.pid),
                     "redis": psutil.Process(redis_server.process.pid)}

        def raw(rng: random.Random) -> None:
            u = rng.randrange(len(users))
            search.search(version, interests[u], limits[u], "active == true", 10.0)

        def e2e(rng: random.Random) -> None:
            response = stub.Recall(recall_pb2.RecallRequest(user_id=users[rng.randrange(len(users))][0], n=args.n), timeout=10)
            if response.path != recall_pb2.RECALL_PATH_STORED_INTERESTS:
                raise RuntimeError(f"served by {recall_pb2.RecallPath.Name(response.path)}")

        report["levels"] = []
        log(f"[{backend}] {manifest.n_items:,} items, {len(users):,} users, n={args.n}, seen sets of {seen_items}, ef={search.ef}, "
            f"{args.seconds:.0f}s per phase; load average {os.getloadavg()[0]:.2f}")
        log(f"{'backend':8} {'items':>9} {'conc':>4} | {'e2e QPS':>8} {'p50 ms':>7} {'p99 ms':>7} {'err':>4} | {'raw QPS':>8} {'p50 ms':>7} {'p99 ms':>7} | {'overhead p99 ms':>15} | e2e CPU ms per call")
        for c in args.concurrency:
            raw_phase = closed_loop(raw, c, args.seconds, args.warmup, processes)
            e2e_phase = closed_loop(e2e, c, args.seconds, args.warmup, processes)
            overhead = e2e_phase.p99_ms - raw_phase.p99_ms
            log(f"{backend:8} {manifest.n_items:>9,} {c:>4} | {e2e_phase.qps:>8.1f} {e2e_phase.p50_ms:>7.2f} {e2e_phase.p99_ms:>7.2f} {e2e_phase.errors:>4} | "
                f"{raw_phase.qps:>8.1f} {raw_phase.p50_ms:>7.2f} {raw_phase.p99_ms:>7.2f} | {overhead:>15.2f} | "
                + " ".join(f"{k} {v:.2f}" for k, v in e2e_phase.cpu_ms_per_call.items()))
            report["levels"].append({"e2e": dataclasses.asdict(e2e_phase), "raw": dataclasses.asdict(raw_phase), "overhead_p99_ms": round(overhead, 3)})
        report["load_average_end"] = os.getloadavg()[0]
        channel.close()
    return report


def run_bench(args) -> int:
    from model_export.artifact import ModelArtifact, UserTower

    def log(message: str) -> None:
        print(message, flush=True)

    root = Path(args.work_dir) if args.work_dir else load_config().paths.var_dir / "bench"
    root.mkdir(parents=True, exist_ok=True)
    export_dir = Path(args.export_dir)
    if not (export_dir / "manifest.json").is_file():
        raise SystemExit(f"{export_dir} is not an export: run infra/run.sh (or model_export train + export) first, or pass --export-dir")
    n_items = 1_000_000 if args.scale else args.items
    backends = ["server"] if args.scale else args.milvus
    source = ModelArtifact.load(export_dir)
    users = user_windows(source.manifest.maxlen)
    started = time.perf_counter()
    interests = UserTower(source, prefer_gpu=False).interests([w for _, w in users])
    log(f"{len(users):,} ML-1M users' interests from their last {source.manifest.maxlen} items in {time.perf_counter() - started:.1f}s "
        f"(K_u mean {np.mean([len(v) for v in interests]):.2f}); {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    keep = [i for i, v in enumerate(interests) if v is not None]
    users, interests = [users[i] for i in keep], [interests[i] for i in keep]
    started = time.perf_counter()
    catalog_dir = build_catalog(export_dir, n_items, root / "catalogs")
    log(f"catalog {catalog_dir.name}: {n_items:,} items ({time.perf_counter() - started:.1f}s)")
    reports = [bench_backend(backend, catalog_dir, users, interests, args, root, log) for backend in backends]
    out = Path(args.out) if args.out else root / f"results-{'scale' if args.scale else n_items}.json"
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "reports": reports}, indent=2, default=str))
    log(f"figures written to {out}")
    return 0
