"""An export opened for serving: the manifest, the raw-id vocabularies and the user tower behind one object.

The streaming job, the recall service (interests computed on the fly) and the backfill all turn
raw item ids into interests through `UserTower.interests`, so they agree to the last bit with
each other and with the offline parity check of the export.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from model_export.manifest import Manifest
from model_export.onnx_runtime import UserTowerSession
from streaming.events import value_text


_BLANK = re.compile(r"[ \t\n\r]*")


def read_vocab(path: Path, only: str | None = None) -> dict:
    """vocab.json (a JSON object), parsed a value at a time, its arrays an element at a time:
    json.loads of a 1M-item vocabulary holds the GIL for ~1 s, so a service loading a model version
    beside its request threads would stall them all that long; piecewise, the interpreter switches
    threads between elements (1M ids: 0.4 s, no stall over ~7 ms). `only`: that key alone
    (KeyError if absent); the reading stops there."""
    text = path.read_text()
    scan = json.JSONDecoder().scan_once

    def at(pos: int, char: str) -> int:  # past `char` and the blanks around it
        pos = _BLANK.match(text, pos).end()
        if text[pos:pos + 1] != char:
            raise ValueError(f"{path}: expected {char!r} at character {pos}")
        return _BLANK.match(text, pos + 1).end()

    def value(pos: int):
        if text[pos:pos + 1] != "[":
            return scan(text, pos)
        pos, items = _BLANK.match(text, pos + 1).end(), []
        if text[pos:pos + 1] == "]":
            return items, pos + 1
        while True:
            item, pos = scan(text, pos)
            items.append(item)
            pos = _BLANK.match(text, pos).end()
            if text[pos:pos + 1] == "]":
                return items, pos + 1
            pos = at(pos, ",")

    out: dict = {}
    try:
        pos = at(0, "{")
        while text[pos:pos + 1] != "}":
            key, pos = scan(text, pos)
            out[key], pos = value(at(pos, ":"))
            if key == only:
                return {key: out[key]}
            pos = _BLANK.match(text, pos).end()
            if text[pos:pos + 1] != "}":
                pos = at(pos, ",")
    except StopIteration as exc:  # scan_once's word for "no JSON value here"
        raise ValueError(f"{path}: not JSON at character {exc.value}") from None
    if only is not None:
        raise KeyError(f"{path} has no {only!r}")
    return out


@dataclass
class ModelArtifact:
    directory: Path
    manifest: Manifest
    raw_items: list[str]  # raw item id of index i + 1
    item_side: list[list[str]]  # side tokens (e.g. genres) of index i + 1
    popularity: np.ndarray  # [n_items] training interactions of index i + 1
    profile_tokens: dict[str, list[str]]  # field -> "field=value" tokens by id (0 = unknown)

    @classmethod
    def load(cls, directory: Path) -> "ModelArtifact":
        """Opens an export; refuses files whose hashes differ from the manifest's."""
        directory = Path(directory)
        manifest = Manifest.load(directory)
        vocab = read_vocab(manifest.file(directory, "vocab"))
        popularity = np.asarray(vocab.get("popularity") or np.zeros(manifest.n_items), dtype=np.int64)
        return cls(directory, manifest, vocab["items"], vocab["item_side"], popularity, vocab["profile"])

    @property
    def version(self) -> str:
        return self.manifest.model_version

    @cached_property
    def item_index(self) -> dict[str, int]:
        return {raw: i + 1 for i, raw in enumerate(self.raw_items)}

    @cached_property
    def profile_index(self) -> dict[str, dict[str, int]]:
        return {f: {token.split("=", 1)[1]: i for i, token in enumerate(tokens)} for f, tokens in self.profile_tokens.items()}

    def item_vectors(self) -> np.ndarray:
        return np.load(self.manifest.file(self.directory, "item_vectors"), allow_pickle=False)

    def encode_windows(self, windows: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Raw ids, oldest first -> (items [B, L] int64 right-padded with 0, lengths [B]).

        Ids this model has never seen are skipped (they get vectors at the next retraining); the
        newest `maxlen` known ids are kept, as in training.
        """
        maxlen = self.manifest.maxlen
        encoded = [[self.item_index[r] for r in window if r in self.item_index][-maxlen:] for window in windows]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)
        items = np.zeros((len(encoded), max(1, int(lengths.max(initial=0)))), dtype=np.int64)
        for row, e in enumerate(encoded):
            items[row, : len(e)] = e
        return items, lengths

    @cached_property
    def profile_keys(self) -> list[tuple[str, str]]:
        """(field, the event's profile key that also gives it). Exports of a CSV / Parquet dataset
        made before preprocessing version 4 name a field by its column, `user_gender`, where events
        send `gender`: both are read."""
        return [(f, f[len("user_"):] if f.startswith("user_") else f) for f in self.manifest.profile_fields]

    def encode_profiles(self, profiles: Sequence[Mapping[str, str] | None]) -> np.ndarray:
        """Profile field values (e.g. {"gender": "F"}) -> [B, n_fields] ids; absent or unseen values -> 0.
        A value is read as training read it (streaming.events.value_text: " F" is "F", 25.0 is "25")."""
        out = np.zeros((len(profiles), len(self.profile_keys)), dtype=np.int64)
        for row, profile in enumerate(profiles):
            if not profile:
                continue
            for col, (f, short) in enumerate(self.profile_keys):
                value = profile.get(f, profile.get(short))
                if value is not None:
                    out[row, col] = self.profile_index[f].get(value_text(value), 0)
        return out


class UserTower:
    """Raw behaviour windows -> each user's K_u interest vectors, with the export's ONNX user tower."""

    def __init__(self, artifact: ModelArtifact, prefer_gpu: bool = True, threads: int = 0):
        self.artifact = artifact
        self.session = UserTowerSession(artifact.directory, artifact.manifest, prefer_gpu=prefer_gpu, threads=threads)

    @classmethod
    def load(cls, directory: Path, prefer_gpu: bool = True, threads: int = 0) -> "UserTower":
        return cls(ModelArtifact.load(directory), prefer_gpu, threads)

    @property
    def version(self) -> str:
        return self.artifact.version

    def interests(self, windows: Sequence[Sequence[str]], profiles: Sequence[Mapping[str, str] | None] | None = None) -> list[np.ndarray | None]:
        """One [K_u, dim] float32 array per user; None for a window with no item this model knows."""
        items, lengths = self.artifact.encode_windows(windows)
        out: list[np.ndarray | None] = [None] * len(windows)
        known = np.flatnonzero(lengths > 0)
        if len(known) == 0:
            return out
        profile = self.artifact.encode_profiles(profiles if profiles is not None else [None] * len(windows))
        vectors, k_user = self.session.run_encoded(items[known], lengths[known], profile[known])  # valid by construction
        for row, user in enumerate(known):
            out[user] = np.ascontiguousarray(vectors[row, : int(k_user[row])], dtype=np.float32)
        return out
