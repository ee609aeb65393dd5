"""The streaming job as a supervised process: `python -m streaming run` in its own process group.

Its own process group, because the job is a Python client plus the JVM it launches (the mini
cluster, with the job's Python embedded): stopping or killing the group reaches all of them.
"""

from __future__ import annotations

from pathlib import Path

from infra.process import PythonModuleProcess, open_direct


class StreamingJobProcess(PythonModuleProcess):
    name = "streaming job"
    stop_grace_s = 20.0
    start_timeout_s = 120.0
    slow_start_note = "the Flink mini-cluster and the job take 10-25 s to start"

    def __init__(self, env: dict[str, str], log_path: Path, metrics_url: str, restore: str | None = None):
        super().__init__(log_path, env)
        self.metrics_url, self.restore = metrics_url, restore

    @property
    def module_args(self) -> tuple[str, ...]:
        return ("streaming", "run", *(("--restore", self.restore) if self.restore else ()))

    def start(self, restore: str | None = None, timeout_s: float | None = None) -> "StreamingJobProcess":
        """Starts the job (restoring from a checkpoint: 'latest' or a chk-N folder) and waits until
        its functions are open (their /metrics endpoint answers)."""
        if restore is not None:
            self.restore = restore
        return super().start(timeout_s)

    def ready(self) -> bool:
        return self.metrics() is not None

    def metrics(self) -> str | None:
        try:
            with open_direct(self.metrics_url, 1) as response:
                return response.read().decode()
        except OSError:
            return None

    def metric(self, name: str, labels: str = "") -> float:
        """A metric of the job summed over its series, or the series with exactly these labels:
        metric("mindstream_stream_dead_letters_total", 'reason="late"')."""
        text = self.metrics() or ""
        prefixes = (f"{name}{{{labels}}} ",) if labels else (f"{name} ", f"{name}{{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefixes))
