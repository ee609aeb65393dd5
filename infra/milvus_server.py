"""Milvus servers for benchmarks, started on free ports with everything in a folder of ours.

MilvusServer: the standalone Milvus 2.3.5 binary of the PyPI package `milvus`. Not through its
`milvus-server` command: that wrapper, stopped with SIGTERM, leaves the milvus child holding the
ports. Here the binary is our direct child in its own process group, stopped with SIGINT (Milvus'
clean shutdown) and killed with its group if it lingers. Its embedded etcd is configured to listen
on loopback only and every component advertises loopback; the components' gRPC listeners
themselves bind all interfaces (Milvus 2.3 has no setting for that), so run it on a host whose
firewall closes those ports.

MilvusLiteServer: Milvus Lite served over gRPC, so several processes share one data directory.

Production points [milvus].uri at a real deployment instead.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from infra.process import ManagedProcess, free_port, port_open

# Components whose advertised address must be loopback (the `ip:` key of each section).
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


class MilvusServer:
    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1"):
        self.data_dir, self.port, self.host = Path(data_dir).resolve(), port or free_port(), host
        self.metrics_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _write_config(self):
        try:
            import milvus
        except ImportError:
            raise RuntimeError("the Milvus server is the PyPI package `milvus`: pip install milvus==2.3.5") from None

        ports = {key: free_port() for key in milvus.MilvusServerConfig().configurable_items if key.endswith("_port")}
        ports["proxy_port"] = self.port
        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir), **ports)
        for component in COMPONENTS:
            config.set(f"{component}.ip", self.host)
        config.resolve()  # writes <data_dir>/configs/milvus.yaml
        self._embed_etcd_on_loopback(ports["etcd_port"])
        milvus._initialize_data_files(str(self.data_dir))  # unpacks the binary and its libraries once
        return self.data_dir / "bin" / "milvus"

    def _embed_etcd_on_loopback(self, client_port: int) -> None:
        """The embedded etcd listens on 2379/2380 unless given its own configuration file."""
        peer = f"http://{self.host}:{free_port()}"
        client = f"http://{self.host}:{client_port}"
        etcd_yaml = self.data_dir / "configs" / "embed_etcd.yaml"
        etcd_yaml.write_text(
            f"name: default\ndata-dir: {self.data_dir / 'data' / 'etcd.data'}\n"
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n"
        )
        milvus_yaml = self.data_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text()
        milvus_yaml.write_text(text.replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1))

    def start(self, timeout_s: float = 180.0) -> "MilvusServer":
        binary = self._write_config()
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.metrics_port),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        }
        log = open(self.data_dir / "logs" / "milvus.log", "ab")
        self.process = subprocess.Popen([str(binary), "run", "standalone"], cwd=self.data_dir, env=env, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"milvus exited with {self.process.returncode}; see {self.data_dir / 'logs'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/healthz", timeout=1) as resp:
                    if b"OK" in resp.read():
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"milvus did not become healthy within {timeout_s:.0f}s; see {self.data_dir / 'logs'}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)  # SIGTERM leaves children holding the ports
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> "MilvusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class MilvusLiteServer(ManagedProcess):
    """Milvus Lite (the pure-Python engine of milvus-lite) served over gRPC on a loopback port, so
    several processes can share one data directory (a file URI allows one process only)."""

    name = "milvus-lite"
    stop_signal = signal.SIGINT
    start_timeout_s = 60.0

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None):
        self.data_dir, self.port, self.host = Path(data_dir).resolve(), port or free_port(), host
        super().__init__(log_path or self.data_dir / "milvus-lite.log")

    @property
    def uri(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        binary = shutil.which("milvus-lite", path=str(Path(sys.executable).parent)) or "milvus-lite"
        return [binary, "server", "--data-dir", str(self.data_dir), "--host", self.host, "--port", str(self.port)]

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def ready(self) -> bool:
        return port_open(self.host, self.port)
