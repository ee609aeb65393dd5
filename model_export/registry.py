"""The model registry: published exports by version, and which one is current.

    <models_dir>/<model version>/   a verified copy of an export (manifest.json, user_tower.onnx, ...)
    <models_dir>/CURRENT.json       {"model_version": ..., "published_at": ...}, replaced atomically
    <models_dir>/PUBLISHED.json     {model version: when it last became current}, replaced atomically
    <models_dir>/INACTIVE.json      {"revision": n, "items": [raw item id, ...], "updated_at": ...}: items
                                    taken out of recall (withdrawn, out of stock) in every version

`python -m model_export publish` installs an export here, fills its Milvus collection, swaps
the alias, and only then moves CURRENT. The streaming job polls CURRENT to hot-reload its user
tower; the recall service opens any installed version by name, because each stored interest is
answered with the model version that produced it. In production the folder is a shared volume.

Item availability is not a property of a model version: an item withdrawn today stays withdrawn
when tomorrow's retraining publishes a version that still knows it. So the inactive set lives here,
beside CURRENT, and `python -m model_export items` changes it (then marks the rows of every
published collection); `publish` reads it when it fills a collection, and the recall service
re-reads it to filter its answers.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from infra.cli import UserError
from infra.files import write_text_atomically
from model_export.manifest import MODEL_VERSION, Manifest

CURRENT_FILE = "CURRENT.json"
PUBLISHED_FILE = "PUBLISHED.json"
INACTIVE_FILE = "INACTIVE.json"
_REPAIR_INACTIVE = "restore it from a backup, or delete it (every item active again) and run `python -m model_export items deactivate` again"


@dataclass(frozen=True)
class InactiveItems:
    """Raw item ids never to be recalled; `revision` grows with every change, so readers cache by it."""

    revision: int
    items: frozenset[str]


NO_INACTIVE_ITEMS = InactiveItems(0, frozenset())


class RegistryError(UserError, LookupError):
    """The registry has no current model, or not the version asked for."""


class CurrentMovedError(RegistryError):
    """CURRENT is no longer the version a publication was decided against (a retraining judged its
    candidate against one version while an operator published or rolled back to another)."""


class CurrentUnreadableError(RegistryError, ValueError):
    """CURRENT.json is not the record set_current writes (cut short by a full disk, edited by hand)."""


class InactiveFileError(UserError, ValueError):
    """INACTIVE.json is not the record `set_active` writes (edited by hand, written by another tool)."""


class ModelRegistry:
    def __init__(self, root: Path):
        self.root = Path(root)

    def install(self, export_dir: Path) -> Manifest:
        """Copies an export in under its version (verified first); installing a version again is a no-op
        when its copy is intact, and repairs it when it is not (a copy a crash left incomplete)."""
        manifest = Manifest.load(export_dir)
        target = self._folder(manifest.model_version)
        if (target / "manifest.json").is_file():
            try:
                installed = Manifest.load(target)
            except UserError:  # files missing or changed: copied again below
                pass
            else:
                if installed.files != manifest.files:  # a version names one export: what serves it must be what was published
                    raise RegistryError(f"version {manifest.model_version} is installed in {self.root} with other files than {export_dir}: "
                                        "a model version names one export; export the model again (a new version)")
                return manifest
        staging = self.root / f".{manifest.model_version}.staging"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(export_dir, staging)
        copied = Manifest.load(staging)  # the copy is complete and intact ...
        if copied.model_version != manifest.model_version:  # ... and of the version checked above
            shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"{export_dir} changed while it was installed (now {copied.model_version}, was {manifest.model_version}): install it again")
        self._discard(target)
        staging.rename(target)
        return manifest

    @contextlib.contextmanager
    def publishing(self, say=lambda message: None):
        """Held by whatever moves CURRENT or deletes versions (publish, retire), across every process
        that shares the registry: without it a retire could drop a version another process is still
        filling, or a retraining move CURRENT over an operator's rollback. An exclusive flock on
        `.publish.lock` (on a shared volume: NFSv4 or another filesystem with POSIX locks)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".publish.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                say(f"  waiting for another publication or retirement in {self.root} to finish")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def set_current(self, model_version: str) -> None:
        """Moves CURRENT (call it within `publishing()`, as publish does), and notes when in PUBLISHED."""
        self.path(model_version)  # refuses a version that is not installed
        now = dt.datetime.now(dt.timezone.utc).isoformat()
        self._replace(PUBLISHED_FILE, {**self.last_published(), model_version: now})
        self._replace(CURRENT_FILE, {"model_version": model_version, "published_at": now})

    def last_published(self) -> dict[str, str]:
        """Installed version -> when it last became current (ISO 8601, UTC); a version never current,
        or a registry older than this record, has no entry. An unreadable record reads as empty: it
        only orders what a retirement keeps."""
        try:
            record = json.loads((self.root / PUBLISHED_FILE).read_text())
        except (OSError, ValueError):
            return {}
        installed = set(self.versions())
        return {v: t for v, t in record.items() if v in installed and isinstance(t, str)} if isinstance(record, dict) else {}

    def previous_versions(self) -> list[str]:
        """The installed versions other than CURRENT, those current most recently first; then the
        ones never current, newest export first (an unreadable manifest last)."""
        published, current = self.last_published(), self.current_version()
        return sorted((v for v in self.versions() if v != current), key=lambda v: (published.get(v, ""), self._exported_at(v), v), reverse=True)

    def _exported_at(self, version: str) -> str:
        """The manifest's creation time (ISO 8601, UTC: sorts as text); "" for an unreadable one."""
        try:
            created = Manifest.load(self._folder(version), verify=False).created_at
        except Exception:  # noqa: BLE001 - not UTF-8, not JSON, no manifest: it only orders versions
            return ""
        return created if isinstance(created, str) else ""

    def current_version(self) -> str | None:
        """The current version; None before the first publication, CurrentUnreadableError when the
        record is damaged (publishing any installed version rewrites it)."""
        path = self.root / CURRENT_FILE
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except ValueError as exc:  # not JSON, or not UTF-8
            raise CurrentUnreadableError(f"{path} is not JSON ({exc}); {self._repair_current()}") from None
        version = record.get("model_version") if isinstance(record, dict) else None
        if not isinstance(version, str) or not MODEL_VERSION.fullmatch(version):
            raise CurrentUnreadableError(f"{path} names no model version; {self._repair_current()}")
        return version

    def _repair_current(self) -> str:
        installed = self.versions()
        listed = ", ".join(installed[-5:]) if installed else "none"
        return (f"publish the version that should be current again (`python -m model_export publish --export-dir {self.root}/<version>`; "
                f"installed: {listed}), which rewrites it")

    def current(self) -> Path:
        version = self.current_version()
        if version is None:
            raise RegistryError(f"no model published in {self.root}: run `python -m model_export publish --export-dir DIR`")
        return self.path(version)

    def path(self, model_version: str) -> Path:
        path = self._folder(model_version)
        if not (path / "manifest.json").is_file():
            raise RegistryError(f"model version {model_version!r} is not installed in {self.root}")
        return path

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "manifest.json").is_file() and not p.name.startswith("."))

    @property
    def inactive_path(self) -> Path:
        return self.root / INACTIVE_FILE

    def inactive_items(self) -> InactiveItems:
        """The inactive set; InactiveFileError when the file is not JSON of the shape set_active writes
        (a wrong shape would otherwise surface as a TypeError far from the file)."""
        try:
            record = json.loads(self.inactive_path.read_bytes())
        except FileNotFoundError:
            return NO_INACTIVE_ITEMS
        except ValueError as exc:  # not JSON, or not UTF-8
            raise InactiveFileError(f"{self.inactive_path} is not JSON ({exc}); {_REPAIR_INACTIVE}") from None
        revision, items = (record.get("revision"), record.get("items")) if isinstance(record, dict) else (None, None)
        if type(revision) is not int or not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise InactiveFileError(f"{self.inactive_path} is not {{\"revision\": integer, \"items\": [raw item id, ...]}}; {_REPAIR_INACTIVE}")
        return InactiveItems(revision, frozenset(items))

    def set_active(self, raw_item_ids: Iterable[str], active: bool) -> InactiveItems:
        """Takes items out of recall (active=False) or puts them back; concurrent callers are serialised."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{INACTIVE_FILE}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # read-modify-write: two operators must not lose an update
            current = self.inactive_items()
            wanted = set(raw_item_ids)
            items = current.items - wanted if active else current.items | wanted
            if items == current.items:
                return current
            updated = InactiveItems(current.revision + 1, frozenset(items))
            self._replace(INACTIVE_FILE, {"revision": updated.revision, "items": sorted(items), "updated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
            return updated

    def _replace(self, name: str, record: dict) -> None:
        """Writes a registry record whole: readers see the old file or the new one, never a part."""
        write_text_atomically(self.root / name, json.dumps(record))

    def remove(self, model_version: str) -> None:
        if model_version == self.current_version():
            raise RegistryError(f"{model_version} is the current model; publish another one first")
        self._discard(self._folder(model_version))

    def _discard(self, folder: Path) -> None:
        """Removes a version's folder: renamed out of sight first, so a removal cut short leaves no
        folder that looks installed (versions() skips dot names) with files missing."""
        if not folder.exists():
            return
        doomed = folder.with_name(f".{folder.name}.removing")
        shutil.rmtree(doomed, ignore_errors=True)
        folder.rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)

    def _folder(self, model_version: str) -> Path:
        """The folder of a version; a name that could lead out of the registry (a path) is refused."""
        if not MODEL_VERSION.fullmatch(model_version):
            raise RegistryError(f"{model_version!r} is not a model version name")
        return self.root / model_version
