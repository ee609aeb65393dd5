"""The model artifact manifest: the one contract between training and everything downstream.

An export directory holds
    manifest.json       this record
    user_tower.onnx     behaviour ids (+ lengths, profile) -> K interest vectors and K_u
    item_vectors.npy    float32 [n_items, dim]; row r is the item with index r + 1
    vocab.json          raw item ids and side tokens by index (the stable id mapping: retraining only
                        appends), item popularity, and the user-profile vocabulary by field
    weights.pt          the PyTorch weights (state dict; torch.load(weights_only=True)): retraining's warm start
Downstream code (streaming job, recall service, publisher) opens an export only through
`Manifest.load`, which checks every file against its SHA-256 before anything is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from infra.cli import UserError
from infra.files import sha256_of, write_text_atomically

MANIFEST_SCHEMA = 1
MANIFEST_FILE = "manifest.json"
# A model version names a registry folder, a Milvus collection and a metric label: no path separators,
# no leading dot (the registry's own files and staging folders start with one).
MODEL_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ManifestError(UserError, ValueError):
    """The export is incomplete, tampered with, or of an unknown schema."""


REQUIRED_ROLES = ("user_tower", "item_vectors", "vocab")  # weights.pt: only exports since retraining began carry it


@dataclass
class ArtifactFile:
    path: str  # relative to the export directory
    sha256: str
    bytes: int


@dataclass
class Manifest:
    model_version: str  # unique per export; travels with every interest and item vector
    model_kind: str
    dim: int
    n_interests: int  # K
    maxlen: int  # longest behaviour window the user tower accepts
    n_items: int
    dataset: dict  # name, fingerprint, source (the load_dataset argument); retrained: base_fingerprint
    profile_fields: list[str]  # order of the user tower's profile input; [] = no profile input
    inputs: list[dict]  # ONNX inputs: name, dtype, shape
    outputs: list[dict]
    metrics: dict  # test metrics at export time
    files: dict[str, ArtifactFile]  # role -> file: user_tower, item_vectors, vocab, weights
    created_at: str
    onnx_opset: int
    schema: int = MANIFEST_SCHEMA
    extra: dict = field(default_factory=dict)

    def write(self, directory: Path) -> Path:
        # the manifest appears last and atomically: its presence means "complete"
        return write_text_atomically(directory / MANIFEST_FILE, json.dumps(asdict(self), indent=2, sort_keys=True))

    def file(self, directory: Path, role: str) -> Path:
        return directory / self.files[role].path

    @classmethod
    def load(cls, directory: Path, verify: bool = True) -> "Manifest":
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise ManifestError(f"{path} not found: run `python -m model_export export --model-dir DIR` first")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:  # JSON is UTF-8 text, as `write` writes it
            raise ManifestError(f"{path}: not valid JSON ({exc})") from None
        schema = raw.get("schema") if isinstance(raw, dict) else None
        if schema != MANIFEST_SCHEMA:
            raise ManifestError(f"{path}: manifest schema {schema!r}, this code reads {MANIFEST_SCHEMA}: export the model again")
        try:
            raw["files"] = {role: ArtifactFile(**f) for role, f in raw["files"].items()}
            manifest = cls(**raw)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ManifestError(f"{path}: not a complete manifest ({type(exc).__name__}: {exc}): export the model again") from None
        if not isinstance(manifest.model_version, str) or not MODEL_VERSION.fullmatch(manifest.model_version):
            raise ManifestError(f"{path}: model version {manifest.model_version!r} is not a plain name "
                                f"({MODEL_VERSION.pattern}); export the model again")
        for name in ("dim", "n_interests", "maxlen", "n_items"):  # sizes every reader allocates by: 50.0 or true fail far from here
            value = getattr(manifest, name)
            if type(value) is not int or value < 1:
                raise ManifestError(f"{path}: {name} is {value!r}, not a positive whole number: export the model again")
        missing = [role for role in REQUIRED_ROLES if role not in manifest.files]
        if missing:
            raise ManifestError(f"{path}: lists no {', '.join(missing)} file: export the model again")
        for role, listed in manifest.files.items():
            # a file of the export lives in it: a registry copy must not depend on files elsewhere
            if not isinstance(listed.path, str) or Path(listed.path).is_absolute() or ".." in Path(listed.path).parts:
                raise ManifestError(f"{path}: the {role} file {listed.path!r} is not inside the export: export the model again")
        if verify:
            for role in manifest.files:
                manifest.verified_file(directory, role)
        return manifest

    def verified_file(self, directory: Path, role: str) -> Path:
        """The file of `role`, checked against the manifest's SHA-256 (for a reader of one file of an
        export, which need not hash the others)."""
        p = self.file(Path(directory), role)
        if not p.is_file():
            raise ManifestError(f"{p} ({role}) is listed in the manifest but missing")
        if sha256_of(p) != self.files[role].sha256:
            raise ManifestError(f"{p} ({role}) does not match the manifest's SHA-256; refusing to load it")
        return p
