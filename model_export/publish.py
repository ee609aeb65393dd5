"""Publish an export's item vectors to Milvus: one collection per model version, then an atomic alias swap.

    <prefix>_<model version>   item_id (INT64, primary: the item index), raw_id, category (the item's
                               side tokens joined by '|'), categories (the same tokens, ARRAY<VARCHAR>),
                               active (BOOL: false for the registry's inactive items), model_version,
                               vector (FLOAT_VECTOR, IP)
    <prefix>                   an alias of the current version's collection, for readers of "the
                               current items" (the recall service searches each stored interest's
                               own version by name); it moves to a new version only once that
                               collection is complete, indexed and loaded

Older collections stay: the interests already in the feature store carry their model version and
are answered from the collection of that version until they are re-extracted. The index is HNSW
(inner product) by default and FLAT for small catalogs, where exact search costs nothing.
Milvus Lite (a local file) is the default; MILVUS_URI / [milvus].uri points at a server.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infra.cli import UserError
from infra.config import ConfigError
from model_export.manifest import Manifest
from model_export.registry import CurrentMovedError, CurrentUnreadableError

log = logging.getLogger(__name__)

FLAT_BELOW_ITEMS = 20_000  # exact search is cheap below this many items
HNSW_PARAMS = {"M": 16, "efConstruction": 200}
INSERT_BATCH = 5_000
INSERT_STREAMS = 3
ROW_FIELDS = ("item_id", "raw_id", "category", "categories", "active", "model_version", "vector")
MAX_RAW_ID_BYTES = 1024
MAX_CATEGORY_BYTES = 2048  # the joined string
MAX_CATEGORIES, MAX_TOKEN_BYTES = 64, 256  # the array
IDS_PER_QUERY = 1_000
INDEX_BUILD_TIMEOUT_S = 6 * 3600.0  # far beyond an HNSW build of 10M x 64 floats on one index node


@dataclass
class Published:
    collection: str
    alias: str
    model_version: str
    items: int
    index_type: str
    seconds: float


def collection_name(prefix: str, model_version: str) -> str:
    """Milvus names allow letters, digits and underscores only."""
    return f"{prefix}_{re.sub(r'[^0-9A-Za-z_]', '_', model_version)}"


def milvus_string(value: str) -> str:
    """A Milvus string literal (Milvus 2.3 and Milvus Lite both read these two escapes)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def fit(text: str, max_bytes: int) -> str:
    """Cut to a Milvus VARCHAR's max_length, which counts UTF-8 bytes, on a character boundary."""
    return text.encode()[:max_bytes].decode("utf-8", "ignore")


def category_fields(side_tokens) -> tuple[str, tuple[str, ...]]:
    """An item's side tokens as its two category fields, cut to their Milvus sizes; the recall
    service's popular fallback filters on the same values."""
    return fit("|".join(side_tokens), MAX_CATEGORY_BYTES), tuple(fit(t, MAX_TOKEN_BYTES) for t in side_tokens[:MAX_CATEGORIES])


def client_options(milvus) -> dict:
    """pymilvus keyword arguments from [milvus] (an infra.config.MilvusConfig) besides the URI: the
    token, and the CA and server name of TLS to a server whose certificate no system root signs."""
    options: dict = {"token": milvus.token} if milvus.token else {}
    if milvus.tls_cafile:
        if not os.access(milvus.tls_cafile, os.R_OK):  # pymilvus would fail later with "illegal connection params"
            raise ConfigError(f"[milvus].tls_cafile (MINDSTREAM_MILVUS__TLS_CAFILE) = {milvus.tls_cafile!r} cannot be read: "
                              "point it at the PEM of the CA that signed the Milvus server's certificate")
        options["server_pem_path"] = milvus.tls_cafile
    if milvus.tls_server_name:
        options["server_name"] = milvus.tls_server_name
    return options


def connect(uri: str, **options):
    """A pymilvus client of `uri` (a Milvus Lite file or a server); `options`: client_options(...)."""
    from pymilvus import MilvusClient

    if "://" not in uri:  # a Milvus Lite file: its folder must exist
        Path(uri).parent.mkdir(parents=True, exist_ok=True)
    return MilvusClient(uri=uri, **options)


def alias_target(client, alias: str) -> str | None:
    """The collection an alias points at, or None when the alias does not exist yet."""
    from pymilvus.exceptions import MilvusException

    quiet = logging.getLogger("pymilvus")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # pymilvus logs a missing alias as an ERROR before raising
    try:
        return client.describe_alias(alias=alias)["collection_name"]
    except MilvusException as exc:
        if _missing(exc):
            return None
        raise  # Milvus unreachable or overloaded: "no alias" would lift the guards that read it
    finally:
        quiet.setLevel(level)


def _missing(exc) -> bool:
    """Whether a Milvus error says the thing asked for does not exist (Milvus Lite: "alias 'x' does
    not exist"; Milvus 2.3: "alias not found[...]"), as opposed to a server that did not answer."""
    message = str(getattr(exc, "message", exc)).lower()
    return "not exist" in message or "not found" in message


def wait_for_index(client, name: str, rows: int, progress=print, poll_s: float = 1.0, timeout_s: float = INDEX_BUILD_TIMEOUT_S) -> None:
    """A Milvus server builds the index of sealed segments after the load returns; until it is done,
    searches scan raw segments (slow, and exact where HNSW is approximate). The alias moves only
    once every row is indexed; the collection is then reloaded with its index. (Milvus Lite
    indexes synchronously and reports no pending rows.) A build Milvus reports failed, or one
    still unfinished after `timeout_s`, stops the publication: it holds the registry's lock."""
    started = time.perf_counter()
    waited, said = False, started
    while True:
        info = client.describe_index(name, "vector")
        if "pending_index_rows" not in info or (info.get("indexed_rows", 0) >= rows and info["pending_index_rows"] == 0):
            break
        if str(info.get("state", "")).lower() == "failed":
            reason = info.get("index_state_fail_reason") or "its reason is in Milvus' log"
            raise UserError(f"Milvus failed to build the index of {name} ({reason}); the alias was not moved: fix the cause, "
                            "then publish again (a collection whose index failed is filled again)")
        now = time.perf_counter()
        if now - started > timeout_s:
            raise UserError(f"the index of {name} is still being built after {timeout_s:.0f}s ({info.get('indexed_rows', 0):,} of {rows:,} "
                            "rows); the alias was not moved: publish again to go on waiting (the collection is kept)")
        if now - said >= 60:
            progress(f"  {info.get('indexed_rows', 0):,} of {rows:,} rows of {name} indexed")
            said = now
        waited = True
        time.sleep(poll_s)
    if waited:
        client.release_collection(name)
        client.load_collection(name)
        progress(f"  index of {name} built after {time.perf_counter() - started:.0f}s more")


def published_collections(client, prefix: str, versions) -> list[str]:
    """The collections of these model versions (the registry's) that exist in Milvus."""
    return [name for name in (collection_name(prefix, v) for v in versions) if client.has_collection(name)]


def set_active(client, collections: Iterable[str], raw_item_ids: Iterable[str], active: bool) -> dict[str, int]:
    """Sets the active flag of these items in these collections; returns the rows changed per collection.
    Milvus 2.3 updates a row only whole, so the rows are read back and upserted. A released
    collection (Milvus Lite does not keep loads across processes) is loaded for it and released after."""
    wanted = sorted(set(raw_item_ids))
    changed = {}
    for name in collections:
        changed[name] = 0
        released = "NotLoad" in str(client.get_load_state(collection_name=name).get("state", ""))
        if released:
            client.load_collection(collection_name=name)
        for start in range(0, len(wanted), IDS_PER_QUERY):
            listed = ", ".join(milvus_string(r) for r in wanted[start:start + IDS_PER_QUERY])
            rows = client.query(collection_name=name, filter=f"raw_id in [{listed}]", output_fields=list(ROW_FIELDS))
            rows = [{f: row[f] for f in ROW_FIELDS} | {"active": active} for row in rows if row["active"] != active]
            if rows:
                client.upsert(collection_name=name, data=rows)
                changed[name] += len(rows)
        if released:
            client.release_collection(collection_name=name)
    return changed


def _complete_index(client, name: str, manifest: Manifest, index_type: str | None) -> str | None:
    """The index type of an existing collection that is already complete (every item of this version
    inserted, indexed as asked; any index when none is asked: a rollback keeps the index its version
    was published with), None when it is not. One a publish killed between creating and indexing it
    has no index (a Milvus server would refuse to load it): incomplete. One holding another version's
    rows (collection names fold '.' and '-' into '_': "v-1.0" and "v_1_0" share one) is refused, as
    is any other Milvus error, never read as "incomplete": the caller would drop a collection that
    may be serving."""
    if "vector" not in client.list_indexes(collection_name=name):
        log.warning("%s has no index (a publication stopped before it was built): it is filled again", name)
        return None
    index = client.describe_index(name, "vector") or {}
    if str(index.get("state", "")).lower() == "failed":  # waiting on it again would fail again
        log.warning("the index of %s failed to build: it is filled again", name)
        return None
    client.load_collection(collection_name=name)  # Milvus Lite does not keep loads across processes
    held = client.query(collection_name=name, filter="item_id >= 0", output_fields=["model_version"], limit=1)
    if held and held[0]["model_version"] != manifest.model_version:
        raise UserError(f"{name} holds the item vectors of model version {held[0]['model_version']}, not {manifest.model_version}: both "
                        "names map to this collection name; publish this model under another version (export it again)")
    found = index.get("index_type")
    return found if (index_type is None or found == index_type) and _row_count(client, name) == manifest.n_items else None


def _row_count(client, name: str) -> int:
    return int(client.query(collection_name=name, filter="item_id >= 0", output_fields=["count(*)"])[0]["count(*)"])


def _fill(client, name: str, manifest: Manifest, vectors: np.ndarray, raw_ids: list[str], categories, index_type: str,
          inactive_items: Callable[[], frozenset[str]], progress) -> int:
    """Creates the collection, inserts every item, waits for its index and loads it; returns the row count."""
    from pymilvus import DataType, MilvusClient

    inactive = inactive_items()
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False, description=f"mindstream item vectors {manifest.model_version}")
    schema.add_field("item_id", DataType.INT64, is_primary=True)
    schema.add_field("raw_id", DataType.VARCHAR, max_length=MAX_RAW_ID_BYTES)
    schema.add_field("category", DataType.VARCHAR, max_length=MAX_CATEGORY_BYTES)
    schema.add_field("categories", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_CATEGORIES, max_length=MAX_TOKEN_BYTES)
    schema.add_field("active", DataType.BOOL)
    schema.add_field("model_version", DataType.VARCHAR, max_length=256)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=manifest.dim)
    index = client.prepare_index_params()
    index.add_index(field_name="vector", index_type=index_type, metric_type="IP", params=HNSW_PARAMS if index_type == "HNSW" else {})
    client.create_collection(collection_name=name, schema=schema, index_params=index)

    def rows(start: int) -> list[dict]:
        stop = min(start + INSERT_BATCH, manifest.n_items)
        return [
            {
                "item_id": i + 1,
                "raw_id": fit(raw_ids[i], MAX_RAW_ID_BYTES),
                "category": categories[i][0],
                "categories": list(categories[i][1]),
                "active": raw_ids[i] not in inactive,
                "model_version": manifest.model_version,
                "vector": vectors[i].tolist(),
            }
            for i in range(start, stop)
        ]

    # Batches go out INSERT_STREAMS at a time: the client builds the next while the server ingests.
    with ThreadPoolExecutor(INSERT_STREAMS) as pool:
        batches = range(0, manifest.n_items, INSERT_BATCH)
        for done in pool.map(lambda start: client.insert(collection_name=name, data=rows(start)) and min(start + INSERT_BATCH, manifest.n_items), batches):
            progress(f"  {done:,}/{manifest.n_items:,} item vectors inserted into {name}")
    client.flush(collection_name=name)
    client.load_collection(collection_name=name)
    wait_for_index(client, name, manifest.n_items, progress)
    count = _row_count(client, name)
    if count != manifest.n_items:
        raise UserError(f"{name} holds {count} items, expected {manifest.n_items}; the alias was not moved")
    return count


def _match_active(client, name: str, inactive: frozenset[str]) -> None:
    """Makes the collection's active flags the registry's: an item (de)activated while the rows went
    in (`items` marks only collections whose rows it finds), or while a kept collection was not
    being published (a publish stopped after its rows, a registry restored or replaced over the same
    Milvus), is marked before the alias moves."""
    flagged = {row["raw_id"] for row in client.query(collection_name=name, filter="active == false", output_fields=["raw_id"])}
    set_active(client, [name], flagged - inactive, True)
    set_active(client, [name], inactive - flagged, False)


def publish(export_dir: Path, client, prefix: str, index_type: str | None = None, progress=print,
            inactive_items: Callable[[], frozenset[str]] = frozenset, live_version: str | None = None) -> Published:
    """Create, fill, index and load the collection of this export's version, then point the alias at it.
    A version already published whole (same items; the index asked for, or any when none is) keeps
    its collection. `inactive_items` is read twice: for the rows, and again once they are all in (or
    the collection is kept), so the flags are the registry's when the alias moves (_match_active).
    `live_version`: the version recall answers with (the registry's CURRENT), whose collection is
    never dropped to be filled again, as is the one the alias points at."""
    started = time.perf_counter()
    manifest = Manifest.load(export_dir)
    vectors = np.load(manifest.file(export_dir, "item_vectors"), allow_pickle=False)
    vocab = json.loads(manifest.file(export_dir, "vocab").read_text())
    raw_ids, item_side = vocab["items"], vocab["item_side"]
    if vectors.shape != (manifest.n_items, manifest.dim) or len(raw_ids) != manifest.n_items or len(item_side) != manifest.n_items:
        raise UserError(f"{export_dir}: item vectors {vectors.shape} / vocabulary {len(raw_ids)} items, {len(item_side)} side lists "
                        f"disagree with the manifest ({manifest.n_items} items of dim {manifest.dim}): export the model again")
    if vectors.dtype.kind != "f" or not np.isfinite(vectors).all():  # Milvus Lite would store NaN; a server refuses it mid-insert
        raise UserError(f"{export_dir}: the item vectors are not all finite floats ({vectors.dtype}): the model diverged; train it again")
    categories = [category_fields(tokens) for tokens in item_side]
    name = collection_name(prefix, manifest.model_version)

    kept_index = _complete_index(client, name, manifest, index_type) if client.has_collection(name) else None
    if kept_index:
        # A version's item vectors never change (the manifest's hashes), so publishing it again - the live
        # version included - reuses its collection: dropping and refilling it would take recall offline.
        progress(f"  {name} already holds the {manifest.n_items:,} item vectors of {manifest.model_version}")
        wait_for_index(client, name, manifest.n_items, progress)  # an earlier attempt may have stopped while it was built
        count, index_type = manifest.n_items, kept_index
    else:
        index_type = index_type or ("FLAT" if manifest.n_items < FLAT_BELOW_ITEMS else "HNSW")
        if client.has_collection(name):  # a half-written earlier attempt, or another index type asked for
            if name in {alias_target(client, prefix), live_version and collection_name(prefix, live_version)}:
                raise UserError(
                    f"{name} is live (recall answers with {manifest.model_version}) but is not this export with a {index_type} index; "
                    "rebuilding it would take recall offline: publish a new model version instead"
                )
            client.drop_collection(name)
        count = _fill(client, name, manifest, vectors, raw_ids, categories, index_type, inactive_items, progress)
    _match_active(client, name, inactive_items())

    current = alias_target(client, prefix)
    if current is None:
        client.create_alias(collection_name=name, alias=prefix)
    elif current != name:
        client.alter_alias(collection_name=name, alias=prefix)  # atomic: readers see old or new, never neither
    return Published(name, prefix, manifest.model_version, count, index_type, time.perf_counter() - started)


def publish_version(export_dir: Path, registry, client, prefix: str, index_type: str | None = None, progress=print,
                    expect_current: str | None = None) -> Published:
    """The whole publication: install in the registry, fill + index + load the collection, swap the
    alias, and only then move the registry's CURRENT (the streaming job hot-reloads on that). One
    publication or retirement at a time per registry (registry.publishing). With `expect_current`,
    CurrentMovedError unless CURRENT still names that version (a retraining's parent)."""
    with registry.publishing(progress):
        try:
            current = registry.current_version()
        except CurrentUnreadableError as exc:
            if expect_current is not None:  # a retraining cannot tell whether its parent is still current
                raise CurrentMovedError(f"{exc}; this candidate was not published") from None
            progress(f"  {exc}: this publication rewrites it")  # an operator's publish repairs it
            current = None
        if expect_current is not None and current != expect_current:
            raise CurrentMovedError(f"the registry's current version is {current}, no longer {expect_current}, which this candidate "
                                    "was judged against: not published (the next retraining starts from the current version)")
        manifest = registry.install(export_dir)
        done = publish(registry.path(manifest.model_version), client, prefix, index_type, progress, lambda: registry.inactive_items().items,
                       live_version=current)
        registry.set_current(manifest.model_version)
    return done


def retire_unreferenced(registry, client, prefix: str, referenced: set[str], keep_previous: int = 0) -> list[str]:
    """Drops the collection and the registry copy of every version that is neither current nor
    referenced by a stored interest, nor one of the `keep_previous` other versions current most
    recently (registry.previous_versions: a rollback target that needs no re-publication, and what
    a recall service that could not load the current version still answers with); returns the
    retired versions. Under registry.publishing(): a version another process is installing and
    filling is not current yet, and must not be taken for an unreferenced one."""
    retired = []
    with registry.publishing():
        aliased = alias_target(client, prefix)
        for version in registry.previous_versions()[keep_previous:]:
            if version in referenced:
                continue
            name = collection_name(prefix, version)
            if name == aliased:
                continue  # never drop what the alias points at (a CURRENT moved by hand, say)
            if client.has_collection(name):
                client.drop_collection(name)
            registry.remove(version)
            retired.append(version)
    return retired
