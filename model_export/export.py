"""Export a trained run: ONNX user tower, item vectors, vocabulary and the manifest (see manifest.py).

The ONNX graph is the model in eval mode, so routing starts from the fixed, seeded logits and the
same window always gives the same interests. Batch and sequence axes are dynamic (sequence up to
`maxlen`). Every export is checked against PyTorch on held-out users, 1- and 2-item histories
included, at full width and at a window of SHORT_WINDOW (empty histories included), and refused if
any output differs by more than PARITY_TOLERANCE.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from infra.cli import UserError
from infra.files import sha256_of
from model_export.data import EvalCases, SequenceDataset, evaluation_cases
from model_export.evaluate import evaluate_model
from model_export.manifest import MANIFEST_FILE, ArtifactFile, Manifest
from model_export.onnx_runtime import UserTowerSession
from model_export.spec import ModelSpec
from model_export.train import check_dataset, load_model, model_from_weights

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4
PARITY_USERS = 1000
SHORT_WINDOW = 3  # the serving path sends windows as wide as the longest in its batch, often under maxlen


class _ServingSignature(torch.nn.Module):
    """Fixes the exported input list: a model without profile fields takes no profile input."""

    def __init__(self, model: torch.nn.Module, with_profile: bool):
        super().__init__()
        self.model, self.with_profile = model, with_profile

    def forward(self, items, lengths, profile=None):
        interests, k_user = self.model(items, lengths, profile if self.with_profile else None)
        return interests, k_user


def parity_inputs(data: SequenceDataset, maxlen: int, n_users: int = PARITY_USERS, seed: int = 0):
    """Held-out users' evaluation windows; a fifth of them cut to 1 item, a fifth to 2 items and a
    fifth to 3..15 items, so that every K_u below 4 is checked (full windows of ML-1M's held-out
    users are 16+ items: K_u = 4 only)."""
    users = np.concatenate([data.test_users, data.valid_users])[:n_users]
    cases = evaluation_cases(data, users, maxlen)
    items, lengths = cases.history.copy(), cases.lengths.copy()
    rng = np.random.default_rng(seed)
    fifths = np.array_split(rng.permutation(len(users)), 5)
    for short, rows in ((1, fifths[0]), (2, fifths[1]), (3 + np.arange(len(fifths[2])) % 13, fifths[2])):
        lengths[rows] = np.minimum(lengths[rows], short)
        items[rows] = np.where(np.arange(maxlen)[None, :] < lengths[rows, None], items[rows], 0)
    return items, lengths, data.user_profile[users]


def parity_batches(data: SequenceDataset, maxlen: int, n_users: int = PARITY_USERS) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """parity_inputs at maxlen wide, and the same users cut to SHORT_WINDOW wide with lengths 0, 1, 2, 3
    in turn: the sequence axis is dynamic (the graph slices its routing logits to the width), and a
    user with no known item yet is an empty history (K_u = 1, the interest of the profile alone)."""
    items, lengths, profile = parity_inputs(data, maxlen, n_users)
    width = min(SHORT_WINDOW, maxlen)
    short_lengths = np.minimum(lengths, np.arange(len(lengths)) % (width + 1))
    short_items = np.where(np.arange(width)[None, :] < short_lengths[:, None], items[:, :width], 0)
    return [(items, lengths, profile), (short_items, short_lengths, profile)]


def check_replaceable(out_dir: Path, model_dir: Path) -> None:
    """An export replaces its folder whole: refuse one that holds the training run, or anything that
    is not an earlier export (a folder with files and no manifest.json), rather than delete it."""
    if model_dir.resolve().is_relative_to(out_dir.resolve()):
        raise UserError(f"--out {out_dir} holds the training run {model_dir}, which the export would replace: "
                        f"export to another folder (default: {model_dir / 'export'})")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).is_file():
        raise UserError(f"--out {out_dir} holds files and no {MANIFEST_FILE}: it is not an earlier export, and an export "
                        "replaces its folder whole; give an empty or new folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file: give a folder")


def export_model(model_dir: Path, data: SequenceDataset, out_dir: Path | None = None, *, source: str | None = None,
                 metrics_cases: tuple[str, EvalCases] | None = None, extra: dict | None = None,
                 progress: bool = False) -> tuple[Path, Manifest]:
    """source: how the dataset is named to `load_dataset` (default: its name), recorded so retraining can
    reload it. metrics_cases: (name, cases) to report instead of the test users (a retrained model is
    scored on its recent holdout). extra: more manifest fields (retraining lineage and offsets).
    progress: a bar while the manifest's metrics are measured."""
    check_dataset(model_dir, data)
    spec, model = load_model(model_dir)
    if spec.kind == "mostpop":
        raise UserError("mostpop has no user tower or item vectors to export; export a youtube_dnn, mind or mind_remi run")
    broken = [name for name, value in model.state_dict().items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if broken:
        raise UserError(f"{model_dir}: weights {', '.join(broken)} hold NaN or inf (the training run diverged); export refused: "
                        "train again, e.g. with a lower --lr")
    out_dir = out_dir or model_dir / "export"
    check_replaceable(out_dir, model_dir)
    staging = out_dir.with_name(out_dir.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)

    with_profile = len(spec.profile_cardinalities) > 0
    signature = _ServingSignature(model, with_profile).eval()
    b, length = 2, spec.maxlen
    example = (torch.ones(b, length, dtype=torch.int64), torch.full((b,), length, dtype=torch.int64))
    input_names = ["items", "lengths"]
    dynamic_axes = {"items": {0: "batch", 1: "sequence"}, "lengths": {0: "batch"}, "interests": {0: "batch"}, "n_interests": {0: "batch"}}
    if with_profile:
        example += (torch.zeros(b, len(spec.profile_cardinalities), dtype=torch.int64),)
        input_names.append("profile")
        dynamic_axes["profile"] = {0: "batch"}
    onnx_path = staging / "user_tower.onnx"
    with torch.no_grad():  # computes the item table outside the trace, so the graph holds it as one constant
        signature(*example)
    torch.onnx.export(
        signature,
        example,
        str(onnx_path),
        input_names=input_names,
        output_names=["interests", "n_interests"],
        dynamic_axes=dynamic_axes,
        opset_version=ONNX_OPSET,
        do_constant_folding=True,
        dynamo=False,
    )

    with torch.no_grad():
        item_vectors = model.item_vectors()[1:].float().numpy()  # row r = item index r + 1
    np.save(staging / "item_vectors.npy", np.ascontiguousarray(item_vectors, dtype=np.float32))
    side_tokens = data.side_vocab[data.item_side[1:]]  # [n_items, S]; index 0 is "<pad>"
    vocab = {
        "items": data.item_ids[1:].tolist(),
        "item_side": [[str(t) for t in row if t != "<pad>"] for row in side_tokens],
        "profile": {str(f): data.profile_vocab_for_field(i).tolist() for i, f in enumerate(data.profile_fields)},
        # training interactions per item: the recall service's popular fallback and the "active" cut
        "popularity": data.item_counts(data.train_users)[1:].astype(int).tolist(),
    }
    (staging / "vocab.json").write_text(json.dumps(vocab))
    # The warm start of the next retraining: the weights loaded above, which the graph, the vectors and
    # the parity check come from (a run still training may have written a newer model.pt since).
    torch.save(model.state_dict(), staging / "weights.pt")

    weights_digest = sha256_of(staging / "weights.pt")
    created = dt.datetime.now(dt.timezone.utc)
    files = {
        role: ArtifactFile(name, sha256_of(staging / name), (staging / name).stat().st_size)
        for role, name in (("user_tower", "user_tower.onnx"), ("item_vectors", "item_vectors.npy"), ("vocab", "vocab.json"), ("weights", "weights.pt"))
    }
    metrics_name, cases = metrics_cases or ("test", evaluation_cases(data, data.test_users, spec.maxlen))
    manifest = Manifest(
        model_version=f"{version_prefix(data.name)}-{spec.kind}-{created:%Y%m%dT%H%M%SZ}-{weights_digest[:8]}",
        model_kind=spec.kind,
        dim=spec.dim,
        n_interests=spec.n_interests,
        maxlen=spec.maxlen,
        n_items=data.n_items,
        dataset={"name": data.name, "fingerprint": data.fingerprint, "source": source or data.name},
        profile_fields=[str(f) for f in data.profile_fields] if with_profile else [],
        inputs=[
            {"name": "items", "dtype": "int64", "shape": ["batch", "sequence<=maxlen"], "note": "item indices, right-padded with 0"},
            {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
            *([{"name": "profile", "dtype": "int64", "shape": ["batch", len(spec.profile_cardinalities)]}] if with_profile else []),
        ],
        outputs=[
            {"name": "interests", "dtype": "float32", "shape": ["batch", spec.n_interests, spec.dim], "note": "rows >= n_interests are zero"},
            {"name": "n_interests", "dtype": "int64", "shape": ["batch"]},
        ],
        metrics={metrics_name: evaluate_model(model, data, cases, progress=progress)},
        files=files,
        created_at=created.isoformat(),
        onnx_opset=ONNX_OPSET,
        extra={"weights_sha256": weights_digest, "spec": dataclasses.asdict(spec), **(extra or {})},
    )
    manifest.extra["onnx_parity_max_abs_diff"] = check_parity(model, staging, manifest, data)
    manifest.write(staging)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    staging.rename(out_dir)
    return out_dir, manifest


def exported_model(export_dir: Path, manifest: Manifest) -> tuple[ModelSpec, torch.nn.Module]:
    """The PyTorch model of an export (wherever it was copied: the registry's too), from the weights and
    spec it carries, in eval mode."""
    if "weights" not in manifest.files:
        raise UserError(f"{export_dir} has no weights.pt (exported by an older version): re-export the run with `python -m model_export export`")
    spec = ModelSpec(**manifest.extra["spec"])
    return spec, model_from_weights(spec, manifest.file(export_dir, "weights"))


def version_prefix(dataset_name: str) -> str:
    """The dataset's part of a model version (a user-brought file's stem may hold any character)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", dataset_name).lstrip("._-")[:64] or "data"


def check_parity(model: torch.nn.Module, export_dir: Path, manifest: Manifest, data: SequenceDataset) -> float:
    """Max |ONNX - PyTorch| over the outputs of every parity batch (PARITY_USERS held-out users); raises above tolerance."""
    session = UserTowerSession(export_dir, manifest, prefer_gpu=False)
    max_diff = 0.0
    for items, lengths, profile in parity_batches(data, manifest.maxlen):
        onnx_interests, onnx_k = session.run(items, lengths, profile)
        with torch.no_grad():
            torch_interests, torch_k = model(torch.as_tensor(items), torch.as_tensor(lengths), torch.as_tensor(profile))
        if not np.array_equal(onnx_k, torch_k.numpy()):
            raise RuntimeError(f"ONNX and PyTorch disagree on the number of interests K_u at window {items.shape[1]}; export refused "
                               f"(a bug or an onnxruntime / torch version mismatch: report it with `pip list | grep -e onnx -e torch`)")
        diff = float(np.abs(onnx_interests - torch_interests.numpy()).max())
        if not diff <= PARITY_TOLERANCE:  # NaN included
            raise RuntimeError(f"ONNX user tower differs from PyTorch by {diff:.2e} > {PARITY_TOLERANCE:.0e} at window "
                               f"{items.shape[1]}; export refused (a bug or an onnxruntime / torch version mismatch: report it with "
                               "`pip list | grep -e onnx -e torch`)")
        max_diff = max(max_diff, diff)
    return max_diff
