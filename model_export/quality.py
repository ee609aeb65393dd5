"""Quality benchmark: every model on every dataset with several seeds, test metrics mean ± spread.

Each (dataset, model, seed) is a full `train` with the defaults (the seed changes initialisation,
sampling and routing noise; the user split stays the papers' fixed split), then a test
evaluation. Prints a Markdown table and the target ratios, and writes OUT/quality-<datasets>.json.
Runs already finished in OUT are reused, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from infra.config import load_config
from model_export.data import evaluation_cases, load_dataset
from model_export.evaluate import evaluate_model, evaluate_popularity
from model_export.train import DATASET_DEFAULTS, FALLBACK_DEFAULTS, TrainConfig, default_spec, load_model, train

REPORTED = ("recall@20", "recall@50", "hitrate@20", "hitrate@50", "ndcg@50")


def run_one(dataset: str, model: str, seed: int, run_dir: Path, epochs: int = 0, max_steps_per_epoch: int = 0) -> dict:
    result_file = run_dir / "result.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    paths = load_config().paths
    data = load_dataset(dataset, paths.data_dir, paths.cache_dir, paths.shared_data_dir)
    defaults = DATASET_DEFAULTS.get(data.name, FALLBACK_DEFAULTS)
    config = TrainConfig(
        dataset=dataset, model=model, seed=seed, epochs=epochs or defaults["epochs"], batch_size=defaults["batch_size"], max_steps_per_epoch=max_steps_per_epoch
    )
    spec = default_spec(model, data)
    started = time.perf_counter()
    history = train(config, spec, data, run_dir, progress=False)
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
    }
    result_file.write_text(json.dumps(result, indent=2))
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
                r = run_one(dataset, model, seed, out / f"{dataset}-{model}-seed{seed}", epochs, max_steps_per_epoch)
                results.append(r)
                print(
                    f"[{len(results)}/{total}] {dataset} {model} seed {seed}: test recall@50 {r['test']['recall@50']:.4f} "
                    f"hitrate@50 {r['test']['hitrate@50']:.4f} (best epoch {r['best_epoch']}, {time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    summary = summarise(results)
    report = {"summary": summary, "ratios": ratios(summary), "runs": results}
    (out / f"quality-{'+'.join(datasets)}.json").write_text(json.dumps(report, indent=2))
    print(markdown(summary))
    for dataset, rs in report["ratios"].items():
        if rs:  # a run of one model has nothing to compare
            print(f"{dataset}: " + ", ".join(f"{k} = {v}" for k, v in rs.items()))
    return report
