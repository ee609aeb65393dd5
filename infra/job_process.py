"""The streaming job as a supervised process: `python -m streaming run` in its own process group.

Its own process group, because the job is a Python client plus the JVM it launches (the mini
cluster, with the job's Python embedded): stopping or killing the group reaches all of them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from infra.config import REPO_ROOT


class StreamingJobProcess:
    def __init__(self, env: dict[str, str], log_path: Path, metrics_url: str):
        self.env, self.log_path, self.metrics_url = env, Path(log_path), metrics_url
        self.process: subprocess.Popen | None = None

    def start(self, restore: str | None = None, timeout_s: float = 120.0) -> "StreamingJobProcess":
        """Starts the job and waits until its functions are open (their /metrics endpoint answers)."""
        args = [sys.executable, "-m", "streaming", "run", *(["--restore", restore] if restore else [])]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(args, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the streaming job exited with {self.process.returncode}; see {self.log_path}")
            if self.metrics() is not None:
                return self
            time.sleep(0.5)
        self.kill()
        raise RuntimeError(f"the streaming job did not start within {timeout_s}s; see {self.log_path}")

    def metrics(self) -> str | None:
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=1) as response:
                return response.read().decode()
        except OSError:
            return None

    def metric(self, name: str, labels: str = "") -> float:
        """A metric of the job summed over its series, or the series with exactly these labels:
        metric("mindstream_stream_dead_letters_total", 'reason="late"')."""
        text = self.metrics() or ""
        prefixes = (f"{name}{{{labels}}} ",) if labels else (f"{name} ", f"{name}{{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))

    def rss_bytes(self) -> int:
        """Resident memory of the job: the Python client, its JVM and everything they started."""
        if self.process is None or self.process.poll() is not None:
            return 0
        try:
            root = psutil.Process(self.process.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash, as far as the job can tell."""
        self._signal(signal.SIGKILL)

    def stop(self) -> None:
        self._signal(signal.SIGTERM, grace_s=20)

    def _signal(self, sig: int, grace_s: float = 10) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass
        self.process = None
