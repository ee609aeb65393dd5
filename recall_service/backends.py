"""The I/O adapters behind the interfaces of recaller.py: Redis, Milvus and the model registry.

MilvusItemSearch sends the search request of pymilvus (a template built by its own `Prepare`, so
the wire format is the pinned client's, copied with new vectors per call) through the client's
gRPC stub and reads the reply with numpy: pymilvus' `SearchResult` builds a Python object per
hit, which cost ~13 ms for 4 x 250 hits with an output field, several times the search itself.
It asks Milvus for ids and scores only and reads the raw ids from the version's vocabulary in the
model registry (RegistryVocabularies): fetching the `raw_id` field cost Milvus ~12% more CPU per
search (3.52 vs 3.14 ms at limit 136 on the 100k bench catalog). Until a version's vocabulary is
read (in the background, on its first search), or for a version not installed here, the search
asks for `raw_id` as well. Which versions are installed, and the shape of each (width, K: what a
stored record must fit), is InstalledVersions' listing of the registry.
The client is created by the first health probe, so the service starts and answers (fallback)
while Milvus is down; a collection found released is loaded in the background.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from infra.config import Config, printable_uri
from model_export.publish import category_fields, collection_name, connect
from model_export.registry import NO_INACTIVE_ITEMS, CurrentUnreadableError, InactiveFileError, InactiveItems
from recall_service.filters import ItemFilter
from recall_service.merge import MISSING_ITEM
from recall_service.recaller import (BackendUnavailable, DeadlineExceeded, ExpressionRejected, SearchHits, SearchRejected, VersionRetired,
                                     VersionShape)
from streaming.feature_store import InterestRecord, RecordError, SeenOnly

log = logging.getLogger(__name__)


class FeatureStoreReader:
    """A FeatureStore whose connection errors become BackendUnavailable (RecordError passes)."""

    def __init__(self, store, unavailable: tuple[type[BaseException], ...]):
        self.store, self.unavailable = store, unavailable

    @classmethod
    def redis(cls, redis_config, timeout_s: float, seen_items: int = 0) -> "FeatureStoreReader":
        """seen_items > 0: the records come with their users' seen sets (in the same pipeline)."""
        import redis

        from streaming.feature_store import RedisFeatureStore

        store = RedisFeatureStore.from_config(redis_config, timeout_s=timeout_s, seen_items=seen_items)
        return cls(store, (redis.RedisError, redis.exceptions.RedisClusterException, OSError))

    def get_many(self, user_ids: list[str]) -> list[InterestRecord | SeenOnly | None]:
        try:
            return self.store.get_many(user_ids)
        except self.unavailable as exc:
            raise BackendUnavailable(f"feature store: {exc}") from None

    def ping(self) -> None:
        """Reachability: a read of one key. Any user id may name a real user, so a record stored
        under it, corrupt or not, is an answer and the store is up."""
        try:
            self.get_many(["__health__"])
        except RecordError:
            pass

    def close(self) -> None:
        self.store.close()


class MilvusItemSearch:
    """Searches the collection `<prefix>_<model version>` (never the alias: the version must be
    the one that produced the interests) with inner product and HNSW `ef` (raised to the limit,
    which HNSW requires)."""

    def __init__(self, uri: str, client_options: Mapping[str, object] | None = None, prefix: str = "mindstream_items", ef: int = 128,
                 connect_timeout_s: float = 2.0, vocabularies: "RegistryVocabularies | None" = None):
        """client_options: the token and TLS settings, model_export.publish.client_options([milvus])."""
        self.uri, self.client_options, self.prefix, self.ef, self.connect_timeout_s = uri, dict(client_options or {}), prefix, ef, connect_timeout_s
        self.shown_uri = printable_uri(uri)  # in messages, which reach the logs
        self.vocabularies = vocabularies
        self._client = None
        self._lock = threading.Lock()
        self._templates: dict[tuple, object] = {}  # (collection, limit, ef, filter, with raw_id) -> SearchRequest
        self._loading: set[str] = set()  # collections being loaded in the background

    def connect(self):
        """The pymilvus client, created by the first call (the server's health probe, so no request
        waits on a connection); BackendUnavailable while Milvus is unreachable."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    try:
                        self._client = connect(self.uri, **self.client_options, timeout=self.connect_timeout_s)
                    except Exception as exc:  # pymilvus raises MilvusException or its own connect errors
                        raise BackendUnavailable(f"Milvus at {self.shown_uri}: {exc}") from None
                    # pymilvus imports scipy.sparse (~1 s) when it builds its first search request;
                    # building one here keeps that import off the first requests' latency.
                    self._request("warm_up", np.zeros((1, 1), np.float32), 1, "", True)
        return self._client

    def collection(self, model_version: str) -> str:
        return collection_name(self.prefix, model_version)

    def _request(self, name: str, vectors: np.ndarray, limit: int, expr: str, with_raw_ids: bool):
        """The SearchRequest pymilvus would send. Its fixed part is built by pymilvus once per
        (collection, limit, ef, filter, output field) and copied; only the vectors change per call."""
        from pymilvus.client.prepare import Prepare
        from pymilvus.grpc_gen import common_pb2, milvus_pb2

        key = (name, limit, max(self.ef, limit), expr, with_raw_ids)
        template = self._templates.get(key)
        if template is None:
            template = Prepare.search_requests_with_expr(name, [np.zeros(vectors.shape[1], np.float32)], "vector",
                                                         {"metric_type": "IP", "params": {"ef": key[2]}}, limit, expr,
                                                         output_fields=["raw_id"] if with_raw_ids else [], consistency_level="Bounded")
            if len(self._templates) >= 512:
                self._templates.clear()
            self._templates[key] = template
        request = milvus_pb2.SearchRequest()
        request.CopyFrom(template)
        vectors = np.ascontiguousarray(vectors, dtype="<f4")
        request.nq = len(vectors)
        request.placeholder_group = common_pb2.PlaceholderGroup(placeholders=[common_pb2.PlaceholderValue(
            tag="$0", type=common_pb2.PlaceholderType.FloatVector, values=[row.tobytes() for row in vectors])]).SerializeToString()
        return request

    def search(self, model_version: str, vectors: np.ndarray, limit: int, expr: str, timeout_s: float) -> SearchHits:
        import grpc

        client = self._client
        if client is None:
            raise BackendUnavailable(f"not connected to Milvus at {self.shown_uri} yet; the health probe reconnects")
        name = self.collection(model_version)
        vocabulary = self.vocabularies.raw_ids(model_version) if self.vocabularies is not None else None
        request = self._request(name, vectors, limit, expr, vocabulary is None)
        started = time.monotonic()
        try:
            response = client._get_connection()._stub.Search(request, timeout=timeout_s)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceeded(f"vector search did not answer within {timeout_s * 1e3:.0f} ms") from None
            raise BackendUnavailable(f"Milvus at {self.shown_uri}: {exc.code().name} {exc.details()}") from None
        status = response.status
        if status.code != 0 or status.error_code != 0:
            reason = status.reason
            lowered = reason.lower()
            if "collection not found" in lowered or "does not exist" in lowered:  # Milvus server / Milvus Lite
                raise VersionRetired(f"model version {model_version}: {reason}")
            if "not loaded" in lowered or "call load()" in lowered:  # e.g. Milvus Lite after a restart
                self._load_in_background(client, name)
                raise SearchRejected(f"{name} is not loaded; loading it now (requests fall back meanwhile)")
            if "expression" in lowered or "query plan" in lowered or "unknown field" in lowered:  # Recaller knows whether the client sent a filter
                raise ExpressionRejected(f"Milvus refused the search's expression in {name}: {reason}")
            raise SearchRejected(f"Milvus search in {name} failed after {time.monotonic() - started:.3f}s: {reason}")
        return _hits(response.results, len(vectors), limit, vocabulary)

    def _load_in_background(self, client, name: str) -> None:
        """Loads a released collection without holding up requests (a large one takes minutes)."""
        with self._lock:
            if name in self._loading:
                return
            self._loading.add(name)

        def load() -> None:
            try:
                client.load_collection(name, timeout=600)
                log.info("loaded %s", name)
            except Exception as exc:  # the next search that needs it tries again
                log.warning("cannot load %s: %s", name, exc)
            finally:
                with self._lock:
                    self._loading.discard(name)

        threading.Thread(target=load, name=f"load-{name}", daemon=True).start()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def ping(self) -> None:
        client = self.connect()
        try:
            # a whole number of seconds: pymilvus bounds its retries only by an int timeout (with a float
            # it retried 75 times, ~211 s, while the health probe reported Milvus up)
            client.get_server_version(timeout=max(1, math.ceil(self.connect_timeout_s)))
        except Exception as exc:  # pymilvus wraps transport errors in several exception types
            raise BackendUnavailable(f"Milvus at {self.shown_uri}: {exc}") from None


def _hits(results, nq: int, limit: int, vocabulary: np.ndarray | None = None) -> SearchHits:
    """SearchResultData -> [nq, limit] arrays; query q's hits follow those of the queries before it.
    Raw ids: vocabulary[item id] when given, else the reply's raw_id field. Vectorised (no loop over
    queries): it runs on every request."""
    counts = np.asarray(results.topks, dtype=np.int64) if len(results.topks) else np.zeros(nq, dtype=np.int64)
    ids = np.asarray(results.ids.int_id.data, dtype=np.int64)
    scores = np.asarray(results.scores, dtype=np.float32)
    if vocabulary is not None:
        known = (ids > 0) & (ids < len(vocabulary))
        raw = vocabulary[np.where(known, ids, 0)]
        # an id the vocabulary lacks is no item: a padding hit (-inf), which the merges skip, never an answer ""
        ids, scores = np.where(known, ids, MISSING_ITEM), np.where(known, scores, np.float32(-np.inf))
    else:
        raw = next((f.scalars.string_data.data for f in results.fields_data if f.field_name == "raw_id"), None)
        raw = np.array(raw, dtype=object) if raw is not None else np.full(len(ids), "", dtype=object)
    if len(counts) == nq and (counts == limit).all():  # every query found `limit` items: the common case, one reshape
        return SearchHits(ids.reshape(nq, limit), scores.reshape(nq, limit), raw.reshape(nq, limit))
    query = np.repeat(np.arange(nq), counts)  # the query of each hit
    rank = np.arange(len(ids)) - np.repeat(np.cumsum(counts) - counts, counts)  # its rank within the query
    keep = rank < limit
    out_ids = np.full((nq, limit), MISSING_ITEM, dtype=np.int64)
    out_scores = np.full((nq, limit), -np.inf, dtype=np.float32)
    out_raw = np.full((nq, limit), "", dtype=object)
    for out, values in ((out_ids, ids), (out_scores, scores), (out_raw, raw)):
        out[query[keep], rank[keep]] = values[keep]
    return SearchHits(out_ids, out_scores, out_raw)


class _Every:
    """When something kept from the registry is due a fresh read: at the first call, then at most
    once every `period_s`, for one caller (the others go on with what was read before)."""

    def __init__(self, period_s: float, clock):
        self.period_s, self.clock = period_s, clock
        self._last = -float("inf")
        self._lock = threading.Lock()

    def due(self) -> bool:
        if self.clock() - self._last < self.period_s:  # the common case, without the lock
            return False
        with self._lock:
            now = self.clock()
            if now - self._last < self.period_s:
                return False
            self._last = now
            return True


class InstalledVersions:
    """The versions installed in the registry and the shape of each (its manifest's width and K),
    listed again at most every `refresh_s`; each manifest is read once, when its version appears.
    A version not installed here is unknown at the cost of a lookup: a stored record may name any
    version (a corrupt one, on every request), and none of them reads a file or starts a thread."""

    def __init__(self, registry, refresh_s: float = 2.0, clock=time.monotonic):
        self.registry = registry
        self._relist = _Every(refresh_s, clock)
        self._shapes: dict[str, VersionShape] = {}
        self._unreadable: set[str] = set()  # installed versions whose manifest could not be read (said once each)

    def shape(self, version: str) -> VersionShape | None:
        if self._relist.due():
            self._list()
        return self._shapes.get(version)

    def __contains__(self, version: str) -> bool:
        return self.shape(version) is not None

    def _list(self) -> None:
        from model_export.manifest import Manifest

        try:
            versions = self.registry.versions()
        except OSError as exc:  # a shared volume's hiccup: looked at again after refresh_s
            log.warning("keeping %d installed model versions: the registry cannot be listed: %s", len(self._shapes), exc)
            return
        shapes = {}
        for version in versions:
            shape = self._shapes.get(version)
            if shape is None:
                try:
                    manifest = Manifest.load(self.registry.path(version), verify=False)
                    shape = VersionShape(manifest.dim, manifest.n_interests)
                except Exception as exc:  # noqa: BLE001 - tampered with or half removed: treated as not installed
                    if version not in self._unreadable:
                        log.warning("model version %s: its manifest is unreadable (%s); served as a version not installed here", version, exc)
                    self._unreadable.add(version)
                    continue
            shapes[version] = shape
        self._shapes = shapes
        self._unreadable &= set(versions)


class RegistryVocabularies:
    """Raw item id by Milvus item id of each model version installed in the registry: index i + 1
    holds the raw id of the vocabulary's item i, as publish numbers the rows; index 0 is "" (no
    item). A version whose model the service has loaded (`loaded`: RegistryModels.raw_ids) shares
    that model's array, so the current vocabulary is held once. Any other installed version's
    vocabulary (the one older interests were computed with) is read in the background on its first
    use (only its vocab file is hashed, and parsed piecewise, so request threads do not stall: 1M
    ids take ~0.4 s): None until then, and None for a version not installed here, with nothing
    remembered of it. A read that failed is tried again after `retry_s`. The `keep` versions
    searched last are kept; what else is remembered is of installed versions only."""

    def __init__(self, registry, keep: int = 8, retry_s: float = 30.0, clock=time.monotonic,
                 loaded: Callable[[str], np.ndarray | None] = lambda version: None, installed: InstalledVersions | None = None):
        self.registry, self.keep, self.retry_s, self.clock, self.loaded = registry, keep, retry_s, clock, loaded
        self.installed = installed or InstalledVersions(registry, clock=clock)
        self._read: dict[str, np.ndarray] = {}
        self._used: dict[str, float] = {}  # version -> when it was last asked for
        self._pending: dict[str, float] = {}  # version -> when its read started or last failed, within retry_s
        self._lock = threading.Lock()

    def raw_ids(self, model_version: str) -> np.ndarray | None:
        shared = self.loaded(model_version)
        if shared is not None:
            if model_version in self._read:  # read here before its model was loaded: one copy is enough
                with self._lock:
                    self._read.pop(model_version, None)
                    self._used.pop(model_version, None)
            return shared
        if model_version not in self.installed:
            return None
        now = self.clock()
        self._used[model_version] = now
        vocabulary = self._read.get(model_version)
        if vocabulary is not None:
            return vocabulary
        with self._lock:
            if model_version in self._read:
                return self._read[model_version]
            self._pending = {version: since for version, since in self._pending.items() if now - since < self.retry_s}  # the rest are due again
            if model_version in self._pending:
                return None
            self._pending[model_version] = now
        threading.Thread(target=self._load, args=(model_version,), name=f"vocabulary-{model_version}", daemon=True).start()
        return None

    def _load(self, model_version: str) -> None:
        from model_export.artifact import read_vocab
        from model_export.manifest import Manifest

        try:
            directory = self.registry.path(model_version)
            items = read_vocab(Manifest.load(directory, verify=False).verified_file(directory, "vocab"), only="items")["items"]
            vocabulary = np.array([""] + items, dtype=object)
        except Exception as exc:  # removed since, or unreadable: raw ids come from Milvus meanwhile
            log.info("raw ids of %s come from Milvus: its vocabulary is not readable here (%s)", model_version, exc)
            with self._lock:
                self._pending[model_version] = self.clock()
            return
        with self._lock:
            self._read[model_version] = vocabulary
            self._pending.pop(model_version, None)
            while len(self._read) > self.keep:  # the one searched longest ago goes
                oldest = min(self._read, key=lambda v: self._used.get(v, -float("inf")))
                del self._read[oldest]
            for version in [v for v in list(self._used) if v not in self._read and v not in self._pending]:
                del self._used[version]  # only versions kept or being read are remembered
        log.info("raw ids of %s from its vocabulary (%d items)", model_version, len(vocabulary) - 1)


class LoadedModel:
    """One installed model version: its user tower and its popularity ranking."""

    def __init__(self, directory: Path, prefer_gpu: bool, popular_depth: int):
        from model_export.artifact import UserTower

        self.tower = UserTower.load(directory, prefer_gpu=prefer_gpu)
        artifact = self.tower.artifact
        self.version = artifact.version
        self.shape = VersionShape(artifact.manifest.dim, artifact.manifest.n_interests)
        # Items share their category fields (as published to Milvus): a filter is evaluated once per
        # distinct pair, `signature_of` maps every item row to its pair.
        pairs: dict[tuple[str, tuple[str, ...]], int] = {}
        self.signature_of = np.array([pairs.setdefault(category_fields(tokens), len(pairs)) for tokens in artifact.item_side], dtype=np.int32)
        self.signatures = list(pairs)
        self.item_index = artifact.item_index  # raw id -> row + 1, the user tower's own
        self.raw_ids = np.array(["", *artifact.raw_items], dtype=object)  # by Milvus item id (row + 1), as RegistryVocabularies
        self.popularity = artifact.popularity.astype(np.float32)
        self.by_popularity = np.argsort(-artifact.popularity, kind="stable")  # ties: lower index first
        self.popular_depth = popular_depth  # n + items left out at most: deeper is never needed
        self._filtered: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def interests(self, windows: Sequence[Sequence[str]], profiles: Sequence[Mapping[str, str] | None]) -> list[np.ndarray | None]:
        return self.tower.interests(windows, profiles)

    def _ranked(self, item_filter: ItemFilter | None, inactive: InactiveItems) -> np.ndarray:
        """Active item rows by popularity that pass the filter, cut at `popular_depth`; the last 64
        (filter, inactive set) pairs are cached. Keyed by the set's contents (its hash, kept by the
        frozenset once computed), not only its revision: a revision can repeat with other items
        (INACTIVE.json deleted and written anew starts again at 1); and not by the set itself, which
        the cache would keep alive, one per re-read."""
        key = (item_filter.milvus_expr if item_filter else "", inactive.revision, len(inactive.items), hash(inactive.items))
        with self._lock:
            if key in self._filtered:
                self._filtered.move_to_end(key)
                return self._filtered[key]
        if item_filter is None:
            keep = np.ones(len(self.signature_of), dtype=bool)
        else:
            passing = np.array([item_filter.matches(category, categories, True) for category, categories in self.signatures], dtype=bool)
            keep = passing[self.signature_of]
        keep[[self.item_index[raw] - 1 for raw in inactive.items if raw in self.item_index]] = False
        rows = self.by_popularity[keep[self.by_popularity]][: self.popular_depth]
        with self._lock:
            self._filtered[key] = rows
            while len(self._filtered) > 64:
                self._filtered.popitem(last=False)
        return rows

    def popular(self, n: int, item_filter: ItemFilter | None, excluded: frozenset[str], inactive: InactiveItems) -> list[tuple[str, float]]:
        out = []
        for i in self._ranked(item_filter, inactive):
            raw = self.raw_ids[i + 1]
            if raw not in excluded:
                out.append((raw, float(self.popularity[i])))
                if len(out) == n:
                    break
        return out


class RegistryAvailability:
    """The registry's inactive items, looked at at most every `refresh_s` and re-read only when the
    file changed. A file that cannot be read, or is not the record the registry writes, keeps the
    last good set (logged): a recall answer never fails on it."""

    def __init__(self, registry, refresh_s: float = 2.0, clock=time.monotonic):
        self.registry = registry
        self._items, self._stamp = NO_INACTIVE_ITEMS, None
        self._look = _Every(refresh_s, clock)

    def inactive(self) -> InactiveItems:
        if self._look.due():
            self._read_if_changed()
        return self._items

    def _read_if_changed(self) -> None:
        try:
            stat = self.registry.inactive_path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        except OSError as exc:  # a shared volume's hiccup (ESTALE, EACCES): looked at again after refresh_s
            log.warning("keeping %d inactive items: the registry's inactive set cannot be looked at: %s", len(self._items.items), exc)
            return
        if stamp != self._stamp:
            try:
                self._items, self._stamp = self.registry.inactive_items(), stamp
                log.info("inactive items: %d (revision %d)", len(self._items.items), self._items.revision)
            except (OSError, InactiveFileError) as exc:
                log.warning("keeping %d inactive items: the registry's inactive set is unreadable: %s", len(self._items.items), exc)


def default_popular_depth(config: Config) -> int:
    """How deep the popular ranking is kept for this configuration: n past every item a popular
    answer can leave out at once (the exclusions, the recent items, the seen set, and a corrupt
    record's stored window besides)."""
    rc, streaming = config.recall, config.streaming
    return rc.max_n + rc.max_exclusions + rc.max_recent_items + streaming.window_length + streaming.seen_items


class RegistryModels:
    """The registry's current model, re-read at most every `refresh_s` (a registry that cannot be
    read keeps the version read last, logged). A newly published version is loaded by `prepare`,
    which the server's health prober calls, while requests go on with the version loaded before it:
    a publish swaps models without a pause. Only a service with no version loaded yet waits for a
    load on a request. A version that fails to load is tried again after `refresh_s`, not by every
    request. Two loaded versions are kept. The shape of every installed version comes from
    `installed` (InstalledVersions, listed again every `refresh_s` unless given)."""

    def __init__(self, registry, prefer_gpu: bool = True, popular_depth: int | None = None, refresh_s: float = 2.0, clock=time.monotonic,
                 installed: InstalledVersions | None = None):
        """`popular_depth`: see default_popular_depth(); None: the default configuration's."""
        popular_depth = default_popular_depth(Config()) if popular_depth is None else popular_depth
        self.registry, self.prefer_gpu, self.popular_depth, self.refresh_s, self.clock = registry, prefer_gpu, popular_depth, refresh_s, clock
        self.installed = installed or InstalledVersions(registry, refresh_s, clock)
        self._version: str | None = None
        self._look = _Every(refresh_s, clock)  # at CURRENT
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._serving: LoadedModel | None = None  # the version loaded last: it serves until the current one is loaded
        self._failed: dict[str, tuple[float, str]] = {}  # version -> (when, why) its load failed
        self._lock = threading.Lock()  # held while a version loads
        self._switch_lock = threading.Lock()  # held while `_serving` and the order of `_loaded` change

    def raw_ids(self, version: str) -> np.ndarray | None:
        """The raw ids by Milvus item id of `version` while its model is loaded (RegistryVocabularies shares them)."""
        model = self._loaded.get(version)
        return model.raw_ids if model is not None else None

    def shape(self, version: str) -> VersionShape | None:
        model = self._loaded.get(version)
        return model.shape if model is not None else self.installed.shape(version)

    def current_version(self) -> str | None:
        if self._look.due():
            try:
                self._version = self.registry.current_version()
            except (OSError, CurrentUnreadableError) as exc:  # a shared volume's hiccup, a half-edited file
                log.warning("keeping model version %s: the registry's current version is unreadable: %s", self._version, exc)
        return self._version

    def current(self) -> LoadedModel | None:
        version = self.current_version()
        if version is None:
            return None
        model = self._loaded.get(version)
        if model is not None and model is not self._serving:  # CURRENT moved back to a version still loaded (a rollback)
            with self._switch_lock:  # not the load lock: prepare() may hold that for seconds
                if self._serving is not model and self._loaded.get(version) is model:
                    self._loaded.move_to_end(version)  # the one serving is kept when the next version loads
                    self._serving = model
                    log.info("serving model %s again", version)
        if model is None:
            model = self._serving  # prepare() is loading `version`
        if model is None:
            with self._lock:  # nothing loaded yet: this request waits for the load
                model = self._loaded.get(version) or self._load(version)
        return model

    def prepare(self) -> None:
        """Loads the current version unless it is loaded (the health prober's thread calls this)."""
        version = self.current_version()
        if version is not None and version not in self._loaded:
            with self._lock:
                if version not in self._loaded:
                    self._load(version)

    def _load(self, version: str) -> LoadedModel:
        failed = self._failed.get(version)
        if failed is not None and self.clock() - failed[0] < self.refresh_s:
            raise BackendUnavailable(failed[1])
        try:
            model = LoadedModel(self.registry.path(version), self.prefer_gpu, self.popular_depth)
        except Exception as exc:  # missing, tampered with or unreadable
            # The version read up to refresh_s ago may be retired by now: a retirement follows the
            # move of CURRENT, so look again before failing the request.
            newer = self.registry.current_version()
            if newer is not None and newer != version:
                self._version = newer
                return self._loaded.get(newer) or self._load(newer)
            self._failed[version] = (self.clock(), f"current model {version} cannot be loaded: {exc}")
            raise BackendUnavailable(self._failed[version][1]) from None
        self._failed.pop(version, None)
        with self._switch_lock:
            self._loaded[version] = model
            while len(self._loaded) > 2:
                self._loaded.popitem(last=False)
            self._serving = model
        log.info("serving model %s (user tower on %s)", version, model.tower.session.provider)
        return model
