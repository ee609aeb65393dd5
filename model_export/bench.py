"""User-tower speed: ONNX Runtime against PyTorch eager on the same weights, same inputs.

Prints batch throughput (users/s) at a given batch size, single-user latency percentiles, and the
ratios, all measured in the same run. Inputs are full windows of random items with the user
profile set, i.e. the worst case the streaming job sends. On the CPU by default; with `gpu`, the
session the job uses on a GPU (CUDA provider, I/O binding: inputs from and interests back to host
memory, as served) against eager PyTorch on the same GPU, given and returning host arrays too,
plus the session's parity with the CPU's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from infra.cli import UserError
from infra.config import DISABLE_GPU_VARIABLE, gpu_disabled
from model_export.manifest import Manifest
from model_export.onnx_runtime import UserTowerSession
from model_export.export import exported_model


def _throughput(fn, users_per_call: int, seconds: float) -> float:
    fn()  # warm-up
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls * users_per_call / (time.perf_counter() - started)


def _latencies_ms(fn, calls: int) -> np.ndarray:
    for _ in range(20):
        fn()
    out = np.empty(calls)
    for i in range(calls):
        t = time.perf_counter()
        fn()
        out[i] = (time.perf_counter() - t) * 1e3
    return out


def _alternating(measure, sides: dict, rounds: int = 6) -> dict:
    """measure(fn, share) for each side in `rounds` alternating slices: load that comes and goes on a
    small machine (another process, a noisy neighbour) then falls on both sides alike instead of
    skewing their ratio. Returns each side's slices' results, in order."""
    results = {name: [] for name in sides}
    for _ in range(rounds):
        for name, fn in sides.items():
            results[name].append(measure(fn, 1 / rounds))
    return results


def check_gpu_sides(provider: str) -> None:
    """--gpu needs both sides on the GPU: ONNX Runtime's CUDA provider and a CUDA build of torch."""
    if gpu_disabled():
        raise UserError(f"--gpu: {DISABLE_GPU_VARIABLE} is set, which keeps ONNX Runtime on the CPU; unset it, or run without --gpu")
    if provider != "CUDAExecutionProvider":
        raise UserError("--gpu: no usable CUDA GPU for onnxruntime-gpu (driver, CUDA 13 and cuDNN 9 libraries); run without --gpu")
    if not torch.cuda.is_available():
        raise UserError(f"--gpu: ONNX Runtime has the GPU but torch {torch.__version__} is a CPU build, so eager cannot run there: "
                        "install a CUDA build of the pinned torch version (https://pytorch.org/get-started/locally/), or run without --gpu")


def bench_user_tower(export_dir: Path, batch: int = 256, seconds: float = 3.0, single_calls: int = 2000, gpu: bool = False) -> dict:
    manifest = Manifest.load(export_dir)
    _, model = exported_model(export_dir, manifest)
    session = UserTowerSession(export_dir, manifest, prefer_gpu=gpu)
    if gpu:
        check_gpu_sides(session.provider)
    device = "cuda" if gpu else "cpu"
    model = model.to(device)
    rng = np.random.default_rng(0)
    n_fields = len(manifest.profile_fields)
    # the first known value of every field (id 1), or "unknown" (0) for a field no training user filled in
    known_profile = np.minimum(1, session.largest_profile_ids.astype(np.int64))

    def inputs(b: int):
        items = rng.integers(1, manifest.n_items + 1, size=(b, manifest.maxlen), dtype=np.int64)
        lengths = np.full(b, manifest.maxlen, dtype=np.int64)
        profile = np.broadcast_to(known_profile, (b, n_fields)).copy()
        return items, lengths, profile

    @torch.no_grad()
    def eager(items: np.ndarray, lengths: np.ndarray, profile: np.ndarray) -> None:
        """Both sides as served: host arrays in, host arrays out (on a GPU the copies both ways, as
        ONNX Runtime's I/O binding makes them; the copy back also waits for the kernels)."""
        t_items, t_lengths, t_profile = (torch.as_tensor(a, device=device) for a in (items, lengths, profile))
        for output in model(t_items, t_lengths, t_profile if n_fields else None):
            output.cpu()

    batch_inputs, one = inputs(batch), inputs(1)

    def torch_batch():
        eager(*batch_inputs)

    def onnx_batch():
        session.run_encoded(*batch_inputs)  # as serving calls it: inputs valid by construction

    def torch_single():
        eager(*one)

    def onnx_single():
        session.run_encoded(*one)

    # median slice throughput; latencies of all slices together
    tput = _alternating(lambda fn, share: _throughput(fn, batch, seconds * share), {"torch": torch_batch, "onnx": onnx_batch})
    torch_tput, onnx_tput = (float(np.median(tput[side])) for side in ("torch", "onnx"))
    lat = _alternating(lambda fn, share: _latencies_ms(fn, max(1, round(single_calls * share))), {"torch": torch_single, "onnx": onnx_single})
    torch_lat, onnx_lat = (np.concatenate(lat[side]) for side in ("torch", "onnx"))
    report = {
        "model_version": manifest.model_version,
        "provider": session.provider,
        "torch_device": device,
        "torch_threads": torch.get_num_threads(),
        "batch": batch,
        "throughput_users_per_s": {"onnxruntime": round(onnx_tput), "torch_eager": round(torch_tput), "ratio": round(onnx_tput / torch_tput, 2)},
        "single_user_ms": {
            "onnxruntime": {"p50": round(float(np.percentile(onnx_lat, 50)), 3), "p99": round(float(np.percentile(onnx_lat, 99)), 3)},
            "torch_eager": {"p50": round(float(np.percentile(torch_lat, 50)), 3), "p99": round(float(np.percentile(torch_lat, 99)), 3)},
        },
    }
    if gpu:  # the GPU session against the CPU's, on users of every window length
        cpu = UserTowerSession(export_dir, manifest, prefer_gpu=False)
        items, lengths, profile = inputs(1000)
        lengths = rng.integers(1, manifest.maxlen + 1, size=len(lengths)).astype(np.int64)
        items = np.where(np.arange(manifest.maxlen)[None, :] < lengths[:, None], items, 0)
        report["gpu_vs_cpu_max_abs_diff"] = float(np.abs(session.run(items, lengths, profile)[0] - cpu.run(items, lengths, profile)[0]).max())
    print(f"user tower {manifest.model_version} ({manifest.model_kind}, K={manifest.n_interests}, D={manifest.dim}, window {manifest.maxlen}), ONNX on {session.provider}")
    target = "" if gpu else "  (target >= 3x)"
    print(f"  batch {batch}: onnxruntime {onnx_tput:,.0f} users/s, torch eager ({device}) {torch_tput:,.0f} users/s -> {onnx_tput / torch_tput:.2f}x{target}")
    if gpu:
        print(f"  interests on the GPU vs the CPU session: max abs diff {report['gpu_vs_cpu_max_abs_diff']:.2e} over 1,000 users (export tolerance 1e-4)")
    print(
        f"  single user: onnxruntime p50 {report['single_user_ms']['onnxruntime']['p50']} ms, p99 {report['single_user_ms']['onnxruntime']['p99']} ms (target p99 <= 2 ms); "
        f"torch eager p50 {report['single_user_ms']['torch_eager']['p50']} ms, p99 {report['single_user_ms']['torch_eager']['p99']} ms"
    )
    print(json.dumps(report))
    return report
