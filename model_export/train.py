"""Training: sampled target positions -> sampled softmax, Adam, early stopping on validation Recall@50.

A model directory holds everything about one run:
    spec.json        the model (kind, dims, K, maxlen, knobs)
    train.json       the training configuration and the dataset fingerprint it was trained on
    checkpoint.pt    the latest state (weights, optimizer, epoch, RNG, history) to resume from
    model.pt         the best weights by validation Recall@50
    history.json     per-epoch loss, validation metrics and seconds (a copy of the checkpoint's)
    popularity.npy   MostPop only: the training item counts
Weights are loaded with torch.load(weights_only=True): no pickle from disk.
"""

from __future__ import annotations

import dataclasses
import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from infra.cli import UserError
from infra.config import SPARSE_ITEM_ROWS
from infra.files import write_atomically, write_text_atomically
from model_export import distributed
from model_export.data import SequenceDataset, evaluation_cases, gather_histories, training_positions
from model_export.evaluate import evaluate_model, evaluate_popularity
from model_export.mind import MIND
from model_export.sampled_softmax import NegativeSampler
from model_export.spec import ModelSpec
from model_export.youtube_dnn import YouTubeDNN

SELECTION_METRIC = "recall@50"

# Per-dataset defaults that reach the README's targets without extra flags.
DATASET_DEFAULTS = {
    "ml-1m": {"maxlen": 50, "epochs": 10, "batch_size": 1024},
    "beauty": {"maxlen": 20, "epochs": 30, "batch_size": 256},
}
FALLBACK_DEFAULTS = {"maxlen": 20, "epochs": 30, "batch_size": 256}
# REMI's knobs. The hard-negative beta was chosen per dataset on validation Recall@50 (3 seeds,
# README): harder negatives pay on ML-1M (long histories, a small catalog) and cost on Beauty.
REMI_DEFAULTS = {"hard_negative_beta": 1.0, "routing_regularization": 1.0}
REMI_DATASET_DEFAULTS = {"ml-1m": {"hard_negative_beta": 16.0}}


@dataclass
class TrainConfig:
    dataset: str
    model: str
    seed: int = 2019
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    patience: int = 3  # epochs without a better validation Recall@50 before stopping
    batch_size: int = 256
    lr: float = 1e-3
    n_negatives: int = 1280
    sampler_alpha: float = 0.75  # negatives ∝ popularity^alpha
    min_history: int = 1  # a training target needs at least this many earlier items
    # "position": an epoch visits every (user, target position) pair once, so a user weighs by their
    # sequence's length; "user": ComiRec's draw, a training user uniformly, then one of their positions
    # (as many draws as there are pairs), so every user weighs alike, as in the evaluation.
    sample_by: str = "position"
    max_steps_per_epoch: int = 0  # 0 = a full pass over all training positions
    # Item-id (or side-token) tables of at least this many rows are updated lazily (sparse gradients, only the
    # rows a step touched; see LazyItemAdam); 0 = never. Below ~100k rows plain Adam over every row is faster.
    sparse_item_rows: int = SPARSE_ITEM_ROWS
    device: str = "cpu"
    dataset_fingerprint: str = ""


def build_model(spec: ModelSpec, item_side: torch.Tensor) -> torch.nn.Module:
    """item_side [n_items + 1, S]: side-token ids per item (a placeholder when weights are loaded next)."""
    if spec.kind in ("mind", "mind_remi"):
        return MIND(spec, item_side)
    if spec.kind == "youtube_dnn":
        return YouTubeDNN(spec, item_side)
    raise ValueError(f"{spec.kind} has no neural model")


class LazyItemAdam:
    """Adam for a model whose item embedding tables are too large to update whole on every step.

    Plain Adam moves every row of a table on every step (the moment estimates of rows the batch never
    touched still decay and still move them): work and memory traffic that grow with the catalog, ~0.5 s
    a step at a million items on 2 CPU cores. Here the large tables (the item ids, and the side tokens
    when their vocabulary is as large) take sparse gradients and SparseAdam ("lazy Adam", as TF's
    LazyAdam) updates only the rows a step touched: those of the batch's items, its targets and its
    negatives; every other weight keeps plain Adam. A row touched on every step gets plain Adam's update
    (but for where SparseAdam adds epsilon); a row left out keeps its value and moments until a step
    touches it again. A batch of at least as many behaviours as the catalog has items embeds the whole
    catalog (embedding.embed_each_item_once), so it touches every row: such a step is plain Adam's.
    """

    def __init__(self, model: torch.nn.Module, tables: list[torch.Tensor], lr: float):
        """tables: the weights that take sparse gradients; every other parameter of `model` keeps Adam."""
        self.item_tables = torch.optim.SparseAdam(tables, lr=lr)
        self.dense = torch.optim.Adam([p for p in model.parameters() if not any(p is t for t in tables)], lr=lr)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.item_tables.zero_grad(set_to_none)
        self.dense.zero_grad(set_to_none)

    def step(self) -> None:
        self.item_tables.step()
        self.dense.step()

    def state_dict(self) -> dict:
        return {"item_tables": self.item_tables.state_dict(), "dense": self.dense.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.item_tables.load_state_dict(state["item_tables"])
        self.dense.load_state_dict(state["dense"])


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer | LazyItemAdam:
    """Adam, or LazyItemAdam when the item-id table or the side-token table has at least
    `config.sparse_item_rows` rows, switching those tables to sparse gradients. Call it before the
    model is wrapped for DDP, which reads which of its tables take sparse gradients when it is built.
    Workers joined over NCCL (GPUs) keep plain Adam: NCCL has no sparse all-reduce."""
    large = [table for table in (model.items.ids, model.items.side)
             if table is not None and config.sparse_item_rows and table.num_embeddings - 1 >= config.sparse_item_rows]
    if large and distributed.reduces_sparse_gradients():
        for table in large:
            table.sparse = True
        return LazyItemAdam(model, [table.weight for table in large], config.lr)
    if large and distributed.world().is_writer:
        print(f"tables of {', '.join(f'{t.num_embeddings - 1:,}' for t in large)} rows: plain Adam over every row, not LazyItemAdam: "
              "NCCL cannot average sparse gradients across the workers", file=sys.stderr, flush=True)
    return torch.optim.Adam(model.parameters(), lr=config.lr)


def dataset_defaults(dataset: str) -> dict:
    """maxlen, epochs and batch size for `dataset`, the name or path the data is loaded by: a built-in's by
    its exact name, FALLBACK_DEFAULTS for any file (one named ml-1m.csv, whose dataset is named `ml-1m`
    after it, is no MovieLens)."""
    return DATASET_DEFAULTS.get(dataset, FALLBACK_DEFAULTS)


def default_spec(kind: str, data: SequenceDataset, dataset: str, **overrides) -> ModelSpec:
    """The model trained on `data` by default; `dataset`: the name or path whose defaults apply
    (dataset_defaults; REMI's beta of a built-in); `overrides`: fields set by flags (None: not given)."""
    ModelSpec.refuse_unread_knobs(kind, overrides)
    base = dataset_defaults(dataset)
    fields = {
        "kind": kind,
        "n_items": data.n_items,
        "maxlen": base["maxlen"],
        "n_side_tokens": len(data.side_vocab) - 1,
        "profile_cardinalities": [int(c) for c in data.profile_cardinalities],
        "n_interests": 1 if kind == "youtube_dnn" else 4,
    }
    if kind == "mind_remi":
        fields.update(REMI_DEFAULTS)
        fields.update(REMI_DATASET_DEFAULTS.get(dataset, {}))
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return ModelSpec(**fields)


class RunDirError(UserError, ValueError):
    """A folder is not the training run a command needs; the message says what to do next."""


def _run_file(model_dir: Path, name: str) -> Path:
    path = Path(model_dir) / name
    if not path.is_file():
        what = "not a training run" if not (Path(model_dir) / "train.json").is_file() else "a training run that has not finished an epoch"
        raise RunDirError(f"{model_dir} is {what} (no {name}): train it with `python -m model_export train --out {model_dir} ...` "
                          "(--resume continues a stopped run)")
    return path


# Settings added since runs were first saved, with the value every run saved before them used.
# (Not sparse_item_rows: runs before it trained with plain Adam, which its default no longer means.)
SETTINGS_ADDED = {"sample_by": "position"}


def with_default_settings(saved: dict) -> dict:
    """A saved TrainConfig (train.json, a quality result's settings) with the settings added since
    it was written at the value that run used."""
    return {**SETTINGS_ADDED, **saved}


def run_settings(model_dir: Path) -> dict:
    """The TrainConfig a run was started with (train.json), as saved (later fields at their defaults)."""
    path = _run_file(model_dir, "train.json")
    try:
        saved = json.loads(path.read_text())
        missing = [key for key in ("dataset", "dataset_fingerprint") if key not in saved]
    except (ValueError, TypeError) as exc:
        raise RunDirError(f"{path} is damaged ({exc}): train the run again") from None
    if missing:
        raise RunDirError(f"{path} lacks {', '.join(missing)}: train the run again")
    return with_default_settings(saved)


def run_spec(model_dir: Path) -> ModelSpec:
    """The model a run trains (spec.json), as saved."""
    path = _run_file(model_dir, "spec.json")
    try:
        return ModelSpec.load(path)
    except (ValueError, TypeError) as exc:  # not JSON, or not a spec (unknown or missing fields, contradicting settings)
        raise RunDirError(f"{path} is damaged ({exc}): train the run again") from None


def load_model(model_dir: Path, device: str = "cpu") -> tuple[ModelSpec, torch.nn.Module | np.ndarray]:
    """The best model of a run: the module (or MostPop's popularity array) and its spec."""
    spec = run_spec(model_dir)
    if spec.kind == "mostpop":
        return spec, np.load(_run_file(model_dir, "popularity.npy"), allow_pickle=False)
    return spec, model_from_weights(spec, _run_file(model_dir, "model.pt"), device)


def model_from_weights(spec: ModelSpec, weights: Path, device: str = "cpu") -> torch.nn.Module:
    """A model of `spec` with the state dict in `weights` (no pickle), in eval mode."""
    placeholder_side = torch.zeros(spec.n_items + 1, 1, dtype=torch.int64)  # real tables come from the weights
    model = build_model(spec, placeholder_side).to(device)
    model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    return model.eval()


def check_dataset(model_dir: Path, data: SequenceDataset) -> None:
    trained = run_settings(model_dir)
    if trained["dataset_fingerprint"] != data.fingerprint:
        raise RunDirError(
            f"{model_dir} was trained on dataset {trained['dataset']!r} (fingerprint {trained['dataset_fingerprint']}), "
            f"not on {data.name!r} ({data.fingerprint}): pass the dataset it was trained on (--dataset {trained['dataset']})"
        )


# What a resumed run may change; everything else must match the run it continues (the data by fingerprint).
RESUMABLE_CHANGES = ("dataset", "epochs", "patience", "device")


def check_resumable(out: Path, spec: ModelSpec, config: TrainConfig) -> None:
    """Refuses to resume a run with another model or other training settings than it was started with:
    the checkpoint's optimizer and weights would continue under settings that history.json does not show."""
    saved_spec = dataclasses.asdict(run_spec(out))
    saved_config = run_settings(out)
    differs = [f"{k} {v!r} -> {getattr(spec, k)!r}" for k, v in saved_spec.items() if getattr(spec, k) != v]
    differs += [f"{k} {v!r} -> {getattr(config, k)!r}" for k, v in saved_config.items() if k not in RESUMABLE_CHANGES and getattr(config, k) != v]
    if differs:
        raise RunDirError(
            f"{out} was started with other settings ({'; '.join(differs)}): resume it with the flags and data it was "
            "started with (only --epochs, --patience and --device may change), or train into a new --out"
        )


def _save_atomically(state, path: Path) -> None:
    """torch.save through a temporary file: a run killed mid-write keeps its previous checkpoint."""
    write_atomically(path, lambda fh: torch.save(state, fh))


def _write_json_atomically(value, path: Path) -> None:
    """A reader, or a run killed mid-write, finds the previous file or this one whole. A file that holds
    this JSON already is left alone: a resumed run rewrites only the settings it changed."""
    text = json.dumps(value, indent=2)
    if not (path.is_file() and path.read_bytes() == text.encode()):
        write_text_atomically(path, text)


def _rng_states(rng: np.random.Generator, device: str) -> dict:
    states = {"numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        # The negatives and the training routing logits are drawn on the GPU. The state of the device this
        # process trains on, not of every device: under torchrun each worker restores it onto its own GPU.
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def _restore_rng_states(state: dict, rng: np.random.Generator, device: str) -> None:
    rng.bit_generator.state = state["numpy_rng"]
    torch.set_rng_state(state["torch_rng"])
    if torch.device(device).type == "cuda" and "cuda_rng" in state:  # absent: a checkpoint of a CPU run or of an earlier version
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def _checkpoint_history(out: Path, state: dict) -> dict:
    """The history up to the checkpoint's epoch. The checkpoint holds its own; one of an earlier version
    does not, and takes history.json, written after it: only if that reached the same epoch."""
    if "history_json" in state:
        return json.loads(state["history_json"])
    path = out / "history.json"
    history = json.loads(path.read_text()) if path.is_file() else {"epochs": []}
    recorded = history["epochs"][-1]["epoch"] if history["epochs"] else 0
    if recorded != state["epoch"]:
        raise RunDirError(f"{out}/checkpoint.pt is of epoch {state['epoch']} but history.json ends at epoch {recorded} "
                          "(the run was stopped between the two writes, by an earlier version): the best epoch so far is "
                          "unknown, so it cannot be resumed; train into a new --out")
    return history


def epoch_order(users: np.ndarray, sample_by: str, rng: np.random.Generator) -> np.ndarray:
    """Indices into the (user, position) pairs for one epoch, as many as there are pairs: a shuffle
    ("position"), or draws of a user uniformly then one of their pairs ("user": P(pair) = 1 / (users x
    that user's pairs)). A user's pairs are contiguous in `users` (training_positions)."""
    if sample_by == "position":
        return rng.permutation(len(users))
    if sample_by != "user":
        raise ValueError(f"sample_by {sample_by!r}: use 'position' or 'user'")
    _, first, pairs = np.unique(users, return_index=True, return_counts=True)
    drawn = rng.integers(len(first), size=len(users))
    return first[drawn] + (rng.random(len(users)) * pairs[drawn]).astype(np.int64)


def worker_batches(order: np.ndarray, batch_size: int, max_steps: int, workers: distributed.World) -> list[np.ndarray]:
    """This worker's samples for each step of a pass over `order`: its slice of each batch of `batch_size`
    (all of it in a single process), at most `max_steps` steps (0 = no cap).

    Under torchrun a last batch with fewer samples than workers is left out of the pass: a worker with
    no sample of it would have nothing to compute a loss on, and DDP needs every worker at every step.
    A single process keeps every batch, the last one however small.
    """
    full, rest = divmod(len(order), batch_size)
    steps = full + (rest >= workers.size)  # the last, partial batch where every worker has a sample of it
    if max_steps:
        steps = min(steps, max_steps)
    return [order[step * batch_size : (step + 1) * batch_size][workers.rank :: workers.size] for step in range(steps)]


def run_epoch(model: torch.nn.Module, optimizer: torch.optim.Optimizer | LazyItemAdam, sampler: NegativeSampler, data: SequenceDataset,
              users: np.ndarray, positions: np.ndarray, config: TrainConfig, rng: np.random.Generator, maxlen: int,
              loss_fn: Callable[..., torch.Tensor] | None = None, desc: str = "epoch", progress: bool = True) -> tuple[float, int]:
    """One shuffled pass over (user, target position) samples (or as many draws of them, user first:
    config.sample_by); returns (mean loss over all workers, steps).

    Each sample's history is the `maxlen` items before its target. Under torchrun (WORLD_SIZE > 1)
    every worker draws the same permutation and takes its own slice of each batch (worker_batches); DDP
    averages the gradients, so N workers step through the data N times faster with the same batch size.
    """
    ddp = distributed.world()
    loss_fn = loss_fn or model.loss
    model.train()
    batches = worker_batches(epoch_order(users, config.sample_by, rng), config.batch_size, config.max_steps_per_epoch, ddp)
    device = config.device
    total = 0.0
    bar = tqdm(batches, desc=desc, disable=not progress or ddp.rank != 0, leave=False, mininterval=2)
    for step, batch in enumerate(bar):
        u, pos = users[batch], positions[batch]
        hist, lengths = gather_histories(data, u, pos, maxlen)
        targets = data.seq_items[data.seq_offsets[u] + pos]
        loss = loss_fn(
            torch.as_tensor(hist, device=device),
            torch.as_tensor(lengths, device=device),
            torch.as_tensor(data.user_profile[u], device=device),
            torch.as_tensor(targets, device=device),
            sampler,
            config.n_negatives,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = total + loss.detach()  # summed where it lives: reading it every step would make a GPU wait on each one
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(total) / (step + 1):.4f}")
    return distributed.mean_over_workers(float(total) / max(len(batches), 1)), len(batches)


def train(config: TrainConfig, spec: ModelSpec, data: SequenceDataset, out: Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a run in `out`; returns the history dict (also written to history.json)."""
    out.mkdir(parents=True, exist_ok=True)
    config = dataclasses.replace(config, dataset_fingerprint=data.fingerprint)
    valid_cases = evaluation_cases(data, data.valid_users, spec.maxlen)
    popularity = data.item_counts(data.train_users)

    if spec.kind == "mostpop":
        np.save(out / "popularity.npy", popularity)
        _write_json_atomically(dataclasses.asdict(spec), out / "spec.json")
        _write_json_atomically(dataclasses.asdict(config), out / "train.json")
        history = {"epochs": [], "best": {"epoch": 0, "valid": evaluate_popularity(popularity, valid_cases)}}
        _write_json_atomically(history, out / "history.json")
        return history

    config = dataclasses.replace(config, device=distributed.worker_device(config.device))
    device = config.device
    workers = distributed.init_from_env(device)
    torch.manual_seed(config.seed)
    model = build_model(spec, torch.as_tensor(data.item_side)).to(device)
    optimizer = build_optimizer(model, config)
    loss_fn = distributed.loss_function(model)
    sampler = NegativeSampler(torch.as_tensor(popularity), config.sampler_alpha, device)
    rng = np.random.default_rng(config.seed)
    history: dict = {"epochs": [], "best": {"epoch": 0, SELECTION_METRIC: -1.0}}
    start_epoch = 1

    if resume and (out / "checkpoint.pt").is_file():
        check_resumable(out, spec, config)
        # Loaded on the CPU: RNG states must stay CPU tensors; the optimizer moves its own to its parameters' device.
        state = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError) as exc:  # a run of an earlier version, before a large catalog took LazyItemAdam
            raise RunDirError(f"{out}/checkpoint.pt holds the state of another optimizer ({type(exc).__name__}: {exc}): "
                              f"resume it with --sparse-item-rows 0 (plain Adam), or train into a new --out") from None
        _restore_rng_states(state, rng, device)
        history = _checkpoint_history(out, state)
        start_epoch = state["epoch"] + 1
        if workers.is_writer:  # the run may have stopped after checkpoint.pt, before the files written after it
            if history["best"]["epoch"] == state["epoch"]:
                _save_atomically(state["model"], out / "model.pt")
            _write_json_atomically(history, out / "history.json")
        print(f"resuming {out} at epoch {start_epoch}", flush=True)
    if workers.is_writer:  # a resume may change the epochs, the patience, the device and the data's path, never the spec
        _write_json_atomically(dataclasses.asdict(spec), out / "spec.json")
        _write_json_atomically(dataclasses.asdict(config), out / "train.json")

    users, positions = training_positions(data, data.train_users, config.min_history)
    epochs_without_gain = sum(1 for e in history["epochs"] if e["epoch"] > history["best"]["epoch"])

    for epoch in range(start_epoch, config.epochs + 1):
        if epochs_without_gain >= config.patience:
            break
        started = time.perf_counter()
        mean_loss, steps = run_epoch(model, optimizer, sampler, data, users, positions, config, rng, spec.maxlen,
                                     loss_fn, desc=f"{spec.kind} epoch {epoch}", progress=progress and workers.is_writer)
        seconds = time.perf_counter() - started
        valid = evaluate_model(model, data, valid_cases, device)
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
        record = {"epoch": epoch, "loss": mean_loss, "seconds": seconds, "steps": steps, "valid": valid, "peak_rss_mb": round(peak_rss_mb)}
        history["epochs"].append(record)
        improved = valid[SELECTION_METRIC] > history["best"][SELECTION_METRIC]
        if improved:
            history["best"] = {"epoch": epoch, SELECTION_METRIC: valid[SELECTION_METRIC], "valid": valid}
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
        if not workers.is_writer:
            continue
        # The checkpoint first, holding the history: a run stopped between these writes resumes from it alone
        # (model.pt and history.json are mended from it), so its best-so-far is never that of an earlier epoch.
        _save_atomically(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history_json": json.dumps(history),  # JSON text: weights_only loading takes no numpy scalars
                **_rng_states(rng, device),
            },
            out / "checkpoint.pt",
        )
        if improved:
            _save_atomically(model.state_dict(), out / "model.pt")
        _write_json_atomically(history, out / "history.json")
        if progress:
            print(
                f"{spec.kind} epoch {epoch}: loss {record['loss']:.4f}, {seconds:.1f}s, valid recall@50 {valid['recall@50']:.4f} "
                f"hitrate@50 {valid['hitrate@50']:.4f}{' *' if improved else ''}",
                flush=True,
            )
    return history
