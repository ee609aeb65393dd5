"""Publishing item vectors to a real Milvus Lite database: versioned collections and the alias swap."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from infra.cli import UserError
from model_export.manifest import Manifest, ManifestError
from model_export.publish import alias_target, collection_name, connect, publish, publish_version, retire_unreferenced
from model_export.registry import CurrentMovedError, ModelRegistry

from conftest import REPO, wait_for

PREFIX = "mindstream_items"


def _exact_top(vectors: np.ndarray, query: np.ndarray, n: int) -> list[int]:
    return (np.argsort(-(vectors @ query), kind="stable")[:n] + 1).tolist()


def test_publish_then_search_through_the_alias(two_exports, tmp_path):
    client = connect(str(tmp_path / "milvus.db"))
    first = publish(two_exports[0], client, PREFIX, progress=lambda m: None)
    manifest = Manifest.load(two_exports[0])
    assert first.items == manifest.n_items and first.index_type == "FLAT"
    assert alias_target(client, PREFIX) == collection_name(PREFIX, manifest.model_version)

    vectors = np.load(manifest.file(two_exports[0], "item_vectors"))
    query = vectors[3] + 0.5 * vectors[10]
    hits = client.search(PREFIX, data=[query.tolist()], limit=10, filter="active == true", output_fields=["raw_id", "category", "model_version"])[0]
    assert [h["item_id"] for h in hits] == _exact_top(vectors, query, 10)  # FLAT = exact inner-product search
    vocab = json.loads(manifest.file(two_exports[0], "vocab").read_text())
    top = hits[0]
    assert top["entity"]["raw_id"] == vocab["items"][top["item_id"] - 1]
    assert top["entity"]["model_version"] == manifest.model_version
    assert "item_genre=" in top["entity"]["category"]


def test_a_new_version_moves_the_alias_and_keeps_the_old_collection(two_exports, tmp_path):
    client = connect(str(tmp_path / "milvus.db"))
    old = publish(two_exports[0], client, PREFIX, progress=lambda m: None)
    new = publish(two_exports[1], client, PREFIX, progress=lambda m: None)
    assert new.collection != old.collection
    assert alias_target(client, PREFIX) == new.collection
    assert client.has_collection(old.collection)  # interests of the old version are still served
    hit = client.search(old.collection, data=[[0.1] * 64], limit=1, output_fields=["model_version"])[0][0]
    assert hit["entity"]["model_version"] == old.model_version
    # publishing the live version again is idempotent and never takes it offline
    searches = []
    live = lambda message: searches.append(len(client.search(PREFIX, data=[[0.1] * 64], limit=3)[0]))
    again = publish(two_exports[1], client, PREFIX, progress=live)
    assert again.collection == new.collection and again.items == new.items
    assert alias_target(client, PREFIX) == new.collection
    assert searches == [3]  # reported once: the collection already holds the version
    # ... and it is not rebuilt under the alias with another index
    with pytest.raises(UserError, match="publish a new model version"):
        publish(two_exports[1], client, PREFIX, index_type="HNSW", progress=live)
    assert searches == [3] and len(client.search(PREFIX, data=[[0.1] * 64], limit=3)[0]) == 3
    # a version that is not live is rebuilt with the index asked for
    rebuilt = publish(two_exports[0], client, PREFIX, index_type="HNSW", progress=lambda m: None)
    assert rebuilt.index_type == "HNSW" and client.describe_index(old.collection, "vector")["index_type"] == "HNSW"


def test_a_retire_waits_for_a_publication_in_progress_and_a_moved_current_is_not_overwritten(two_exports, tmp_path):
    import functools
    import threading

    registry, client, quiet = ModelRegistry(tmp_path / "models"), connect(str(tmp_path / "milvus.db")), lambda m: None
    old = publish_version(two_exports[0], registry, client, PREFIX, progress=quiet).model_version
    # a retraining judged its candidate against another version than CURRENT: nothing is installed or published
    with pytest.raises(CurrentMovedError, match=f"current version is {old}, no longer v-parent"):
        publish_version(two_exports[1], registry, client, PREFIX, progress=quiet, expect_current="v-parent")
    assert registry.versions() == [old] and registry.current_version() == old and alias_target(client, PREFIX) == collection_name(PREFIX, old)
    # another process's publication: installed and being filled, not current yet; a retire meanwhile waits for it
    retired, retire_said = [], []
    retiring = ModelRegistry(registry.root)  # the same registry, whose lock says when the retire waits for it
    retiring.publishing = functools.partial(ModelRegistry.publishing, retiring, say=retire_said.append)
    with registry.publishing():
        new = registry.install(two_exports[1]).model_version
        retire = threading.Thread(target=lambda: retired.extend(retire_unreferenced(retiring, client, PREFIX, set())))
        retire.start()
        wait_for(lambda: retire_said, 30, "the retire to wait for the publication")
        assert retire.is_alive() and new in registry.versions()
        registry.set_current(new)
    retire.join(30)
    assert retired == [] and sorted(registry.versions()) == sorted([old, new])  # old: the alias still points at it
    # a publication waits for another one, and says so
    said = []
    with registry.publishing():
        second = threading.Thread(target=lambda: publish_version(two_exports[1], registry, client, PREFIX, progress=said.append))
        second.start()
        wait_for(lambda: any("waiting for another publication" in m for m in said), 30, "the second publication to wait")
        assert second.is_alive()
    second.join(60)
    assert registry.current_version() == new and alias_target(client, PREFIX) == collection_name(PREFIX, new)


def test_a_retire_keeps_the_versions_current_most_recently(two_exports, tmp_path):
    import shutil

    registry, client, quiet = ModelRegistry(tmp_path / "models"), connect(str(tmp_path / "milvus.db")), lambda m: None
    good = publish_version(two_exports[0], registry, client, PREFIX, progress=quiet).model_version
    bad = publish_version(two_exports[1], registry, client, PREFIX, progress=quiet).model_version  # exported after good
    said = []  # the operator rolls back: the kept version is published from its registry folder, its collection as it is
    publish_version(registry.path(good), registry, client, PREFIX, progress=said.append)
    assert registry.current_version() == good and alias_target(client, PREFIX) == collection_name(PREFIX, good)
    assert not any("inserted" in m for m in said), said
    fixed = tmp_path / "fixed"  # the next version (a copy under another name, exported before both: order is by publication)
    shutil.copytree(two_exports[0], fixed)
    manifest = json.loads((fixed / "manifest.json").read_text())
    manifest.update(model_version="v-fixed", created_at="2000-01-01T00:00:00+00:00")
    (fixed / "manifest.json").write_text(json.dumps(manifest))
    publish_version(fixed, registry, client, PREFIX, progress=quiet)
    unpublished = tmp_path / "unpublished"
    shutil.copytree(fixed, unpublished)
    (unpublished / "manifest.json").write_text(json.dumps({**manifest, "model_version": "v-never", "created_at": "2030-01-01T00:00:00+00:00"}))
    registry.install(unpublished)
    (registry.path(bad) / "manifest.json").write_bytes(b"\xff not a manifest")  # an unreadable one orders, never fails
    # good served until now (and is where a rollback goes): kept; bad, and a version never current, are retired
    assert sorted(retire_unreferenced(registry, client, PREFIX, set(), keep_previous=1)) == sorted([bad, "v-never"])
    assert sorted(registry.versions()) == sorted([good, "v-fixed"]) and client.has_collection(collection_name(PREFIX, good))
    assert retire_unreferenced(registry, client, PREFIX, set(), keep_previous=1) == []
    assert retire_unreferenced(registry, client, PREFIX, {good}, keep_previous=0) == []  # a stored interest still names it
    assert retire_unreferenced(registry, client, PREFIX, set(), keep_previous=0) == [good]
    assert registry.versions() == ["v-fixed"] and not client.has_collection(collection_name(PREFIX, good))


def test_a_collection_left_without_its_index_by_a_killed_publish_is_filled_again(two_exports, tmp_path):
    from pymilvus import DataType, MilvusClient

    client = connect(str(tmp_path / "milvus.db"))
    name = collection_name(PREFIX, Manifest.load(two_exports[0]).model_version)
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("item_id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=64)
    client.create_collection(collection_name=name, schema=schema)  # killed before create_index and the inserts
    published = publish(two_exports[0], client, PREFIX, progress=lambda m: None)
    assert published.collection == name and published.items == Manifest.load(two_exports[0]).n_items
    assert client.describe_index(name, "vector")["index_type"] == published.index_type


class Flaky:
    """A Milvus client whose named calls fail once each with a transient error (a server restarting)."""

    def __init__(self, client, *failing: str):
        self.client, self.failing = client, set(failing)

    def __getattr__(self, name):
        from pymilvus.exceptions import MilvusException

        call = getattr(self.client, name)
        if name not in self.failing:
            return call

        def fail_once(*args, **kwargs):
            self.failing.discard(name)
            raise MilvusException(2, "fail connecting to server on 127.0.0.1:19530, illegal connection params or server unavailable")

        return fail_once


def test_a_transient_milvus_error_never_drops_a_published_collection(two_exports, tmp_path):
    """A failed load or alias lookup read as "incomplete" / "no alias": the live version's collection
    was dropped and filled again under the readers (they search it by name)."""
    registry, client, quiet = ModelRegistry(tmp_path / "models"), connect(str(tmp_path / "milvus.db")), lambda m: None
    live = publish_version(two_exports[0], registry, client, PREFIX, progress=quiet)
    said = []
    for failing in ("load_collection", "describe_alias"):
        flaky = Flaky(client, failing, "describe_alias")
        with pytest.raises(Exception, match="server unavailable"):
            publish_version(registry.path(live.model_version), registry, flaky, PREFIX, progress=said.append)
        assert not any("inserted" in m for m in said)
    again = publish_version(registry.path(live.model_version), registry, client, PREFIX, progress=said.append)
    assert again.collection == live.collection and not any("inserted" in m for m in said)
    # a collection the alias no longer points at, but recall answers with (CURRENT), is not rebuilt either
    client.drop_alias(alias=PREFIX)
    with pytest.raises(UserError, match="is live"):
        publish_version(registry.path(live.model_version), registry, client, PREFIX, index_type="HNSW", progress=quiet)


def test_a_rollback_keeps_the_index_its_version_was_published_with(two_exports, tmp_path):
    registry, client, quiet = ModelRegistry(tmp_path / "models"), connect(str(tmp_path / "milvus.db")), lambda m: None
    old = publish_version(two_exports[0], registry, client, PREFIX, index_type="HNSW", progress=quiet)
    publish_version(two_exports[1], registry, client, PREFIX, progress=quiet)
    said = []
    back = publish_version(registry.path(old.model_version), registry, client, PREFIX, progress=said.append)  # no --index
    assert back.index_type == "HNSW" and not any("inserted" in m for m in said)
    assert registry.current_version() == old.model_version


def test_a_damaged_current_record_names_the_repair_and_an_operators_publish_rewrites_it(two_exports, tmp_path):
    from model_export.registry import CurrentUnreadableError

    registry, client, quiet = ModelRegistry(tmp_path / "models"), connect(str(tmp_path / "milvus.db")), lambda m: None
    version = publish_version(two_exports[0], registry, client, PREFIX, progress=quiet).model_version
    for damaged in ('{"model_version": "v', "{}", "[]", '{"model_version": "../etc"}'):
        (registry.root / "CURRENT.json").write_text(damaged)
        with pytest.raises(CurrentUnreadableError, match=f"model_export publish --export-dir .*installed: {version}"):
            registry.current_version()
    # a retraining cannot tell whether its parent is still current: not published
    with pytest.raises(CurrentMovedError):
        publish_version(two_exports[1], registry, client, PREFIX, progress=quiet, expect_current=version)
    said = []
    publish_version(registry.path(version), registry, client, PREFIX, progress=said.append)
    assert registry.current_version() == version and any("rewrites it" in m for m in said)


def test_an_index_build_milvus_reports_failed_stops_the_publication():
    from model_export.publish import wait_for_index

    class Building:
        def __init__(self, state):
            self.state = state

        def describe_index(self, name, field):
            return {"indexed_rows": 10, "pending_index_rows": 90, "state": self.state, "index_state_fail_reason": "disk full"}

    with pytest.raises(UserError, match="failed to build the index of c .disk full"):
        wait_for_index(Building("Failed"), "c", 100, progress=lambda m: None, poll_s=0.0)
    # and the next publish does not wait on it again: the collection counts as incomplete (filled again)
    from model_export.publish import _complete_index

    failed = Building("Failed")
    failed.list_indexes = lambda collection_name: ["vector"]
    assert not _complete_index(failed, "c", 100, None)
    with pytest.raises(UserError, match="still being built after 0s .10 of 100 rows"):
        wait_for_index(Building("InProgress"), "c", 100, progress=lambda m: None, poll_s=0.0, timeout_s=0.0)


def test_a_damaged_installed_copy_is_repaired_and_an_export_changed_mid_copy_is_refused(two_exports, tmp_path, monkeypatch):
    import shutil

    from model_export.registry import RegistryError

    registry = ModelRegistry(tmp_path / "models")
    version = registry.install(two_exports[0]).model_version
    vectors = Manifest.load(registry.path(version)).file(registry.path(version), "item_vectors")
    vectors.unlink()  # a removal or a copy cut short
    registry.install(two_exports[0])
    Manifest.load(registry.path(version))  # whole again
    # removing renames the folder out of sight first: one cut short leaves no installed-looking version
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(shutil, "rmtree", lambda path, ignore_errors=False: None if ".removing" in str(path) else real_rmtree(path, ignore_errors))
    registry.set_current(registry.install(two_exports[1]).model_version)
    registry.remove(version)
    assert registry.versions() == [Manifest.load(two_exports[1]).model_version]
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    # the export is exported again (another version) while it is copied: not installed under the old name
    real_copytree = shutil.copytree

    def copy_then_reexport(src, dst, **kwargs):
        real_copytree(two_exports[1], dst, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copy_then_reexport)
    with pytest.raises(RegistryError, match="changed while it was installed"):
        registry.install(two_exports[0])
    assert version not in registry.versions()


def test_publish_command_installs_publishes_and_makes_current(two_exports, tmp_path):
    import os

    from model_export.artifact import UserTower
    from model_export.registry import ModelRegistry

    uri = str(tmp_path / "cli.db")
    env = {**os.environ, "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models")}
    result = subprocess.run(
        [sys.executable, "-m", "model_export", "publish", "--export-dir", str(two_exports[0]), "--milvus-uri", uri],
        cwd=REPO, capture_output=True, text=True, check=True, env=env,
    )
    report = json.loads(result.stdout)
    manifest = Manifest.load(two_exports[0])
    assert report["milvus"] == uri and report["items"] == manifest.n_items
    assert "item vectors inserted" in result.stderr  # progress
    registry = ModelRegistry(tmp_path / "models")
    assert registry.current_version() == manifest.model_version == report["model_version"]
    tower = UserTower.load(registry.current(), prefer_gpu=False)
    alone = tower.interests([["i1", "i2", "i3"]])[0]
    # a user's interests do not depend on who shares the batch (padding is masked) or on unknown ids
    batched = tower.interests([["i1", "i2", "i3"], ["i5"] * 9, ["never-seen"]])
    np.testing.assert_allclose(batched[0], alone, atol=1e-5)
    assert batched[2] is None and alone.shape[1] == manifest.dim

    # going back (what the OnlineHitRateDropped alert tells operators): a newer version, then the
    # previous one published again from its registry folder: current again, its collection reused
    publish_cli = lambda export: subprocess.run([sys.executable, "-m", "model_export", "publish", "--export-dir", str(export), "--milvus-uri", uri],
                                            cwd=REPO, capture_output=True, text=True, check=True, env=env)
    newer = json.loads(publish_cli(two_exports[1]).stdout)["model_version"]
    assert registry.current_version() == newer != manifest.model_version
    back = publish_cli(registry.path(manifest.model_version))
    assert registry.current_version() == manifest.model_version and "item vectors inserted" not in back.stderr
    assert alias_target(connect(uri), PREFIX) == collection_name(PREFIX, manifest.model_version)


def test_a_tampered_export_is_not_published(two_exports, tmp_path):
    import shutil

    broken = tmp_path / "export"
    shutil.copytree(two_exports[0], broken)
    vocab = broken / "vocab.json"
    vocab.write_text(vocab.read_text().replace("i1", "i1x", 1))
    client = connect(str(tmp_path / "milvus.db"))
    with pytest.raises(Exception, match="does not match the manifest"):
        publish(broken, client, PREFIX, progress=lambda m: None)
    assert alias_target(client, PREFIX) is None


@pytest.mark.parametrize("content, says", [
    pytest.param(b"\xff\xfe{}", "manifest.json: not valid JSON", id="not UTF-8"),  # was a UnicodeDecodeError
    pytest.param(json.dumps({
        "schema": 1, "model_version": "v1", "model_kind": "mind", "dim": 4, "n_interests": 2, "maxlen": 5, "n_items": 3, "dataset": {},
        "profile_fields": [], "inputs": [], "outputs": [], "metrics": {}, "created_at": "", "onnx_opset": 17,
        "files": {role: {"path": 5 if role == "user_tower" else role, "sha256": "x", "bytes": 1} for role in ("user_tower", "item_vectors", "vocab")},
    }).encode(), "the user_tower file 5 is not inside the export", id="a file path that is no string"),  # was a TypeError
    pytest.param(json.dumps({
        "schema": 1, "model_version": "v1", "model_kind": "mind", "dim": 4, "n_interests": 2, "maxlen": 5, "n_items": 3.0, "dataset": {},
        "profile_fields": [], "inputs": [], "outputs": [], "metrics": {}, "created_at": "", "onnx_opset": 17,
        "files": {role: {"path": role, "sha256": "x", "bytes": 1} for role in ("user_tower", "item_vectors", "vocab")},
    }).encode(), "n_items is 3.0, not a positive whole number", id="a size that is no int"),  # was a TypeError after the collection was made
])
def test_a_manifest_that_is_no_utf8_or_lists_a_path_that_is_no_string_is_the_manifests_own_error(tmp_path, content, says):
    (tmp_path / "manifest.json").write_bytes(content)
    with pytest.raises(ManifestError, match=says):
        Manifest.load(tmp_path)


def test_items_command_deactivates_in_every_version_and_later_publishes_keep_it(two_exports, tmp_path):
    """`items deactivate` marks the rows of the versions already published; a version published
    after it starts with them inactive (the registry, not the collection, holds availability)."""
    env = {**os.environ, "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"), "MINDSTREAM_MILVUS__URI": str(tmp_path / "items.db")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "model_export", *args], cwd=REPO, capture_output=True, text=True, check=True, env=env)

    cli("publish", "--export-dir", str(two_exports[0]))
    report = json.loads(cli("items", "deactivate", "i3", "i5", "no-such-item").stdout)
    old = collection_name(PREFIX, Manifest.load(two_exports[0]).model_version)
    assert report["revision"] == 1 and report["inactive"] == 3 and report["rows_changed"] == {old: 2}
    cli("publish", "--export-dir", str(two_exports[1]))
    assert json.loads(cli("items", "list").stdout) == {"revision": 1, "inactive": ["i3", "i5", "no-such-item"]}
    # `items activate --file` puts some back, in every version (before this process opens the Lite file: one process at a time)
    listed = tmp_path / "back.txt"
    listed.write_text("i3\nno-such-item\n")
    report = json.loads(cli("items", "activate", "--file", str(listed)).stdout)
    assert report["revision"] == 2 and report["inactive"] == 1 and sum(report["rows_changed"].values()) == 2  # i3 in both versions
    assert json.loads(cli("items", "list").stdout) == {"revision": 2, "inactive": ["i5"]}

    client = connect(env["MINDSTREAM_MILVUS__URI"])
    for name in (old, collection_name(PREFIX, Manifest.load(two_exports[1]).model_version)):
        client.load_collection(name)  # Milvus Lite keeps no load across processes
        rows = client.query(name, filter='active == false', output_fields=["raw_id", "categories", "category"])
        assert sorted(r["raw_id"] for r in rows) == ["i5"], name
        assert all(list(r["categories"]) == r["category"].split("|") for r in rows)


def test_items_changed_while_a_version_is_published_are_marked_before_the_alias_moves(two_exports, tmp_path):
    client = connect(str(tmp_path / "milvus.db"))
    reads = iter([frozenset({"i3"}), frozenset({"i5"})])  # i3 put back and i5 taken out during the publish
    done = publish(two_exports[0], client, PREFIX, progress=lambda m: None, inactive_items=lambda: next(reads))
    rows = client.query(done.collection, filter='raw_id in ["i3", "i5", "i7"]', output_fields=["raw_id", "active"])
    assert {r["raw_id"]: r["active"] for r in rows} == {"i3": True, "i5": False, "i7": True}


@pytest.mark.parametrize("indent", [None, 2])
def test_the_piecewise_vocabulary_reader_equals_json_loads(tmp_path, indent):
    """read_vocab parses values and array elements one at a time (no GIL stall for a large vocabulary): same result as json.loads."""
    from model_export.artifact import read_vocab

    documents = [{"items": ["a", 'b"c', "é\n", ""], "item_side": [["x"], [], ["y", "z"]], "profile": {"items": ["nested"]}, "popularity": [1, 2, 3]},
                 {"profile": {"items": [1]}, "n": None, "items": []}, {}, {"items": [[1, [2]], {"a": [3]}, True, -1.5e3, None]}]
    path = tmp_path / "vocab.json"
    for document in documents:
        path.write_text(json.dumps(document, indent=indent, ensure_ascii=indent is None))
        assert read_vocab(path) == document
        if "items" in document:
            assert read_vocab(path, only="items") == {"items": document["items"]}  # the top-level key, not profile's
    path.write_text(json.dumps({"profile": {"items": [1]}}))
    with pytest.raises(KeyError, match="no 'items'"):
        read_vocab(path, only="items")
    for broken in ('{"items": [1, 2', '{"items" [1]}', "[1]", '{"items": [1,]}', ""):
        path.write_text(broken)
        with pytest.raises(ValueError, match=str(path)):
            read_vocab(path)


def _edited_export(source: Path, to: Path, version: str | None = None, vectors: np.ndarray | None = None, vocab=None) -> Path:
    """A copy of an export with another version name, item vectors or vocabulary, its manifest's hashes
    made to match (an export as a buggy or hand-edited exporter could write it)."""
    import shutil

    from infra.files import sha256_of

    shutil.copytree(source, to)
    manifest = json.loads((to / "manifest.json").read_text())
    if version is not None:
        manifest["model_version"] = version
    for role, content in (("item_vectors", vectors), ("vocab", vocab)):
        if content is None:
            continue
        path = to / manifest["files"][role]["path"]
        np.save(path, content) if role == "item_vectors" else path.write_text(json.dumps(content))
        manifest["files"][role].update(sha256=sha256_of(path), bytes=path.stat().st_size)
    (to / "manifest.json").write_text(json.dumps(manifest))
    return to


def test_a_kept_collection_takes_the_registrys_active_flags(two_exports, tmp_path):
    """Flags a publish stopped before it could correct them, or a registry restored over the same
    Milvus, are made the registry's when the version is published again (its collection kept)."""
    client = connect(str(tmp_path / "milvus.db"))
    publish(two_exports[0], client, PREFIX, progress=lambda m: None, inactive_items=lambda: frozenset({"i3"}))
    done = publish(two_exports[0], client, PREFIX, progress=lambda m: None, inactive_items=lambda: frozenset({"i5"}))
    rows = client.query(done.collection, filter='raw_id in ["i3", "i5", "i7"]', output_fields=["raw_id", "active"])
    assert {r["raw_id"]: r["active"] for r in rows} == {"i3": True, "i5": False, "i7": True}


def test_versions_whose_names_share_a_collection_are_refused(two_exports, tmp_path):
    client = connect(str(tmp_path / "milvus.db"))
    first = publish(two_exports[0], client, PREFIX, progress=lambda m: None)
    twin = first.model_version.replace("-", "_").replace(".", "_")
    assert twin != first.model_version and collection_name(PREFIX, twin) == first.collection
    other = _edited_export(two_exports[1], tmp_path / "twin", version=twin)
    with pytest.raises(UserError, match=f"holds the item vectors of model version {first.model_version}, not {twin}"):
        publish(other, client, PREFIX, progress=lambda m: None)
    assert alias_target(client, PREFIX) == first.collection


def test_another_export_under_an_installed_version_is_refused(two_exports, tmp_path):
    from model_export.registry import RegistryError

    registry = ModelRegistry(tmp_path / "models")
    installed = registry.install(two_exports[0])
    impostor = _edited_export(two_exports[1], tmp_path / "impostor", version=installed.model_version)
    with pytest.raises(RegistryError, match="is installed .* with other files"):
        registry.install(impostor)
    assert registry.install(two_exports[0]) == installed  # the same export again: a no-op


@pytest.mark.parametrize("damage, says", [
    ("nan", "the item vectors are not all finite floats"),
    ("short side", "side lists disagree with the manifest"),
])
def test_export_content_publish_cannot_serve_is_refused_before_any_collection(two_exports, tmp_path, damage, says):
    manifest = Manifest.load(two_exports[0])
    vectors = np.load(manifest.file(two_exports[0], "item_vectors"))
    vocab = json.loads(manifest.file(two_exports[0], "vocab").read_text())
    if damage == "nan":
        vectors[4, 1] = np.nan
        edited = _edited_export(two_exports[0], tmp_path / "export", vectors=vectors)
    else:
        vocab["item_side"] = vocab["item_side"][:-1]
        edited = _edited_export(two_exports[0], tmp_path / "export", vocab=vocab)
    client = connect(str(tmp_path / "milvus.db"))
    with pytest.raises(UserError, match=says):
        publish(edited, client, PREFIX, progress=lambda m: None)
    assert not client.has_collection(collection_name(PREFIX, manifest.model_version))
