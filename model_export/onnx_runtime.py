"""An ONNX Runtime session for the exported user tower: CUDA with I/O binding on a GPU, else CPU.

onnxruntime-gpu asked for the CUDA provider on a machine without a usable GPU logs an error and
silently runs on the CPU, so the GPU is probed first and the provider actually in use is logged
and exposed as `UserTowerSession.provider`.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort

from infra.config import gpu_disabled
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
        if prefer_gpu and not gpu_disabled() and gpu_available():
            # Full fp32, not the provider's default TF32 matmuls: with TF32 the interests were 1.7e-4 from
            # the CPU's on an H100, outside the export's parity tolerance (1e-4) that stored interests keep.
            providers.insert(0, ("CUDAExecutionProvider", {"use_tf32": "0"}))
        path = self.manifest.file(Path(export_dir), "user_tower")
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
        self.provider = self.session.get_providers()[0]
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.largest_profile_ids = np.array(self.manifest.extra["spec"]["profile_cardinalities"], dtype=np.uint64) - 1
        log.info("user tower %s runs on %s", self.manifest.model_version, self.provider)

    def run(self, items: np.ndarray, lengths: np.ndarray, profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """items [B, L<=maxlen] int64 right-padded with 0, lengths [B] int64, profile [B, F] int64 ->
        (interests [B, K, D], K_u [B]). Raises ValueError for inputs the tower would misread (check_inputs)."""
        items, lengths = np.asarray(items), np.asarray(lengths)
        profile = None if profile is None else np.asarray(profile)
        self.check_inputs(items, lengths, profile if "profile" in self.input_names else None)
        return self.run_encoded(items, lengths, profile)

    def run_encoded(self, items: np.ndarray, lengths: np.ndarray, profile: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """`run` without the input check, for inputs valid by construction (ModelArtifact.encode_windows
        and encode_profiles make them): the serving path, where the check would add ~40 us to a
        single user's ~60 us call."""
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

    def check_inputs(self, items: np.ndarray, lengths: np.ndarray, profile: np.ndarray | None = None) -> None:
        """Raises ValueError, saying what to pass instead, for what ONNX Runtime would misread or fail on
        obscurely: a negative id wraps around to the last item (Gather), a window wider than maxlen fails
        on a broadcast, a length beyond the window inflates K_u. Shapes and one max per array: ~10 us, ~40 us
        at batch 1 right after a session run (its working set evicts numpy's)."""
        maxlen, n_items = self.manifest.maxlen, self.manifest.n_items
        if items.ndim != 2 or items.dtype.kind not in "iu":
            raise ValueError(f"items is {items.dtype} of shape {items.shape}, not integer [batch, window]: pass one row of "
                             "item indices per user, right-padded with 0 (ModelArtifact.encode_windows makes them)")
        batch, window = items.shape
        if window > maxlen:
            raise ValueError(f"items is {window} wide, over this model's maxlen {maxlen}: keep each user's newest {maxlen} items")
        if _as_unsigned(items).max(initial=0) > n_items:
            raise ValueError(f"items holds ids from {items.min()} to {items.max()}, outside [0, {n_items}] (0 pads, 1..{n_items} "
                             "are this model's items): map raw ids with ModelArtifact.encode_windows")
        if lengths.shape != (batch,) or lengths.dtype.kind not in "iu":
            raise ValueError(f"lengths is {lengths.dtype} of shape {lengths.shape}, not integer [{batch}]: pass one history "
                             "length per row of items")
        if _as_unsigned(lengths).max(initial=0) > window:
            raise ValueError(f"lengths run from {lengths.min()} to {lengths.max()}, outside [0, {window}] (the window's width): "
                             "pass each row's number of real items, the padding not counted")
        misplaced = (items != 0) != (np.arange(window) < lengths[:, None])  # padding read as behaviours changes K_u and the interests
        if misplaced.any():
            row = int(np.flatnonzero(misplaced.any(axis=1))[0])
            raise ValueError(f"row {row} has length {lengths[row]} but items {items[row].tolist()}: pass each row's items first, "
                             "right-padded with 0, and its number of real items (ModelArtifact.encode_windows makes both)")
        if profile is None:
            return
        fields = len(self.manifest.profile_fields)
        if profile.shape != (batch, fields) or profile.dtype.kind not in "iu":
            raise ValueError(f"profile is {profile.dtype} of shape {profile.shape}, not integer [{batch}, {fields}] (fields "
                             f"{self.manifest.profile_fields}): encode it with ModelArtifact.encode_profiles")
        if np.greater(_as_unsigned(profile), self.largest_profile_ids).any():
            raise ValueError(f"profile holds ids outside its fields' vocabularies (largest ids {self.largest_profile_ids.tolist()}, "
                             "0 is unknown): encode it with ModelArtifact.encode_profiles")


def _as_unsigned(ids: np.ndarray) -> np.ndarray:
    """The integers read as unsigned, without a copy: a negative one reads as a huge one, so a single max
    (or comparison) finds values below 0 and above a bound at once."""
    return ids.view(ids.dtype.str.replace("i", "u"))
