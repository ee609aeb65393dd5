"""Quality benchmark: every model on every dataset with several seeds, test metrics mean ± spread.

Each (dataset, model, seed) is a full `train` with the defaults (the seed changes initialisation,
sampling and routing noise; the user split stays the papers' fixed split), then a test
evaluation. Prints a Markdown table and the target ratios, and writes OUT/quality-<datasets>.json.
A run already finished in OUT with the same settings and data is reused, and one stopped on the way
resumes from its checkpoint, so an interrupted benchmark resumes; a run of other settings (a smoke
run's --max-steps-per-epoch) is refused, never reported as this one's nor deleted: another --out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from infra.config import load_config
from infra.files import write_text_atomically
from model_export.data import BUILTIN_DATASETS, evaluation_cases, load_dataset
from model_export.evaluate import evaluate_model, evaluate_popularity
from model_export.train import (RunDirError, TrainConfig, dataset_defaults, default_spec, load_model, run_settings, run_spec, train,
                                 with_default_settings)

REPORTED = ("recall@20", "recall@50", "hitrate@20", "hitrate@50", "ndcg@50")


def dataset_label(dataset: str) -> str:
    """A dataset's part of the run folders' and the report's names: a built-in's name, a file's stem and a
    hash of its absolute path (two files of one name stay apart). Never the argument itself: its folders
    would put the runs outside OUT."""
    if dataset in BUILTIN_DATASETS:
        return dataset
    path = Path(dataset).resolve()
    return f"{path.stem}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _settings(config: dict, spec: dict) -> dict:
    """What a run's numbers depend on: every training setting, the data by its fingerprint (not by the
    path it was read from), and the model."""
    return {"train": {k: v for k, v in config.items() if k != "dataset"}, "model": spec}


def _saved_settings(run_dir: Path) -> dict | None:
    """The settings the run in run_dir was started with; None where it has none readable."""
    try:
        return _settings(run_settings(run_dir), dataclasses.asdict(run_spec(run_dir)))
    except RunDirError:
        return None


def run_one(dataset: str, model: str, seed: int, run_dir: Path, epochs: int = 0, max_steps_per_epoch: int = 0) -> dict:
    paths = load_config().paths
    data = load_dataset(dataset, paths.data_dir, paths.cache_dir, paths.shared_data_dir)
    defaults = dataset_defaults(dataset)
    config = TrainConfig(
        dataset=dataset, model=model, seed=seed, epochs=epochs or defaults["epochs"], batch_size=defaults["batch_size"],
        max_steps_per_epoch=max_steps_per_epoch, dataset_fingerprint=data.fingerprint,
    )
    spec = default_spec(model, data, dataset)
    settings = _settings(dataclasses.asdict(config), dataclasses.asdict(spec))
    result_file = run_dir / "result.json"
    # a result written before results held their settings is judged by its run's saved settings
    saved = (json.loads(result_file.read_text()).get("settings") if result_file.is_file() else None) or _saved_settings(run_dir)
    if saved is not None:  # settings added since the run was made count at the value it used
        saved = {**saved, "train": with_default_settings(saved["train"])}
    if (saved is not None or result_file.is_file()) and saved != settings:
        # hours of training, perhaps: neither reported for these settings nor deleted
        raise RunDirError(f"{run_dir} holds a run of other settings (epochs, steps, data or model) than this benchmark's: "
                          "give the benchmark another --out, or delete that folder to train it again")
    if result_file.is_file():
        return json.loads(result_file.read_text())
    resume = (run_dir / "checkpoint.pt").is_file() and saved == settings
    started = time.perf_counter()
    history = train(config, spec, data, run_dir, resume=resume, progress=False)
    wall = time.perf_counter() - started
    _, trained = load_model(run_dir)
    cases = evaluation_cases(data, data.test_users, spec.maxlen)
    test = evaluate_popularity(trained, cases) if model == "mostpop" else evaluate_model(trained, data, cases)
    epoch_seconds = [e["seconds"] for e in history["epochs"]]
    result = {
        "dataset": dataset,
        "model": model,
        "seed": seed,
        "test": test,
        "best_epoch": history["best"]["epoch"],
        "epochs_run": len(epoch_seconds),
        "seconds_per_epoch": float(np.mean(epoch_seconds)) if epoch_seconds else 0.0,
        "wall_seconds": wall,
        "settings": settings,
    }
    write_text_atomically(result_file, json.dumps(result, indent=2))
    return result


def summarise(results: list[dict]) -> dict:
    """{dataset: {model: {metric: (mean, std)}}} and the target ratios."""
    table: dict = {}
    for r in results:
        table.setdefault(r["dataset"], {}).setdefault(r["model"], []).append(r)
    summary: dict = {}
    for dataset, models in table.items():
        summary[dataset] = {}
        for model, runs in models.items():
            # the spread over seeds is the sample standard deviation (a population one understates it by ~18% at 3 seeds)
            stats = {m: (float(np.mean([x["test"][m] for x in runs])), float(np.std([x["test"][m] for x in runs], ddof=min(1, len(runs) - 1))))
                     for m in REPORTED}
            stats["seconds_per_epoch"] = (float(np.mean([x["seconds_per_epoch"] for x in runs])), 0.0)
            stats["seeds"] = len(runs)
            # where early stopping chose each seed's weights, and the passes run: a best epoch at the
            # cap says the budget, not the model, ended the run
            stats["best_epochs"] = [x["best_epoch"] for x in runs]
            stats["epochs_run"] = [x["epochs_run"] for x in runs]
            summary[dataset][model] = stats
    return summary


def ratios(summary: dict) -> dict:
    out: dict = {}
    for dataset, models in summary.items():
        out[dataset] = {}
        for model in ("mind", "mind_remi"):
            if model not in models:
                continue
            for base in ("youtube_dnn", "mostpop", "mind"):
                if base == model or base not in models:
                    continue
                for metric in ("recall@50", "hitrate@50"):
                    out[dataset][f"{model}/{base} {metric}"] = round(models[model][metric][0] / max(models[base][metric][0], 1e-12), 3)
    return out


def markdown(summary: dict) -> str:
    lines = ["| dataset | model | seeds | " + " | ".join(REPORTED) + " | s/epoch | best epoch (of run) |", "|---|---|---|" + "---|" * (len(REPORTED) + 2)]
    for dataset, models in summary.items():
        for model, stats in models.items():
            cells = " | ".join(f"{stats[m][0]:.4f} ± {stats[m][1]:.4f}" for m in REPORTED)
            trained = any(stats["epochs_run"])  # MostPop is counted, not trained: no epochs
            best = ", ".join(f"{b} ({n})" for b, n in zip(stats["best_epochs"], stats["epochs_run"])) if trained else "-"
            seconds = f"{stats['seconds_per_epoch'][0]:.1f}" if trained else "-"
            lines.append(f"| {dataset} | {model} | {stats['seeds']} | {cells} | {seconds} | {best} |")
    return "\n".join(lines)


def quality_benchmark(datasets: list[str], models: list[str], seeds: list[int], out: Path, epochs: int = 0, max_steps_per_epoch: int = 0) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results = []
    total = len(datasets) * len(models) * len(seeds)
    for dataset in datasets:
        for model in models:
            for seed in seeds:
                started = time.perf_counter()
                r = run_one(dataset, model, seed, out / f"{dataset_label(dataset)}-{model}-seed{seed}", epochs, max_steps_per_epoch)
                results.append(r)
                print(
                    f"[{len(results)}/{total}] {dataset} {model} seed {seed}: test recall@50 {r['test']['recall@50']:.4f} "
                    f"hitrate@50 {r['test']['hitrate@50']:.4f} (best epoch {r['best_epoch']}, {time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    summary = summarise(results)
    report = {"summary": summary, "ratios": ratios(summary), "runs": results}
    (out / f"quality-{'+'.join(map(dataset_label, datasets))}.json").write_text(json.dumps(report, indent=2))
    print(markdown(summary))
    for dataset, rs in report["ratios"].items():
        if rs:  # a run of one model has nothing to compare
            print(f"{dataset}: " + ", ".join(f"{k} = {v}" for k, v in rs.items()))
    return report
