"""An ONNX Runtime session for the exported user tower: CUDA with I/O binding on a GPU, else CPU.

onnxruntime-gpu asked for the CUDA provider on a machine without a usable GPU logs an error and
silently runs on the CPU, so the GPU is probed first and the provider actually in use is logged
and exposed as `UserTowerSession.provider`.
"""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from model_export.manifest import Manifest

log = logging.getLogger(__name__)


def gpu_available() -> bool:
    """True when the CUDA driver loads and reports at least one device."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


class UserTowerSession:
    """Runs the user tower of one export: interests [B, K, D] float32 and K_u [B] int64."""

    def __init__(self, export_dir: Path, manifest: Manifest | None = None, prefer_gpu: bool = True, threads: int = 0):
        self.manifest = manifest or Manifest.load(export_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        providers: list = ["CPUExecutionProvider"]
        if prefer_gpu and os.environ.get("MINDSTREAM_DISABLE_GPU") != "1" and gpu_available():
            # Full fp32, not the provider's default TF32 matmuls: with TF32 the interests were 1.7e-4 from
            # the CPU's on an H100, outside the export's parity tolerance (1e-4) that stored interests keep.
            providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
        path = self.manifest.file(Path(export_dir), "user_tower")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        log.info("user tower %s runs on %s", self.manifest.model_version, self.provider)

    def run(self, items: np.ndarray, lengths: np.ndarray, profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """items [B, L<=maxlen] int64 right-padded with 0, lengths [B] int64, profile [B, F] int64."""
        feeds = {"items": np.ascontiguousarray(items, dtype=np.int64), "lengths": np.ascontiguousarray(lengths, dtype=np.int64)}
        if "profile" in self.input_names:
            if profile is None:
                profile = np.zeros((len(items), len(self.manifest.profile_fields)), dtype=np.int64)  # all "unknown"
            feeds["profile"] = np.ascontiguousarray(profile, dtype=np.int64)
        if self.provider == "CUDAExecutionProvider":
            binding = self.session.io_binding()
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            for name in self.output_names:
                binding.bind_output(name, "cuda")
            self.session.run_with_iobinding(binding)
            interests, k_user = binding.copy_outputs_to_cpu()
            return interests, k_user
        interests, k_user = self.session.run(self.output_names, feeds)
        return interests, k_user
