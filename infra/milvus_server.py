"""Milvus servers started by the project: on loopback ports, with everything in a folder of ours.

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

import functools
import json
import os
import shutil
import signal
import sys
from pathlib import Path

from infra.files import write_text_atomically
from infra.process import ManagedProcess, bind_loopback, free_port, open_direct, port_open

GRACEFUL_STOP_S = 5  # Milvus' own forced-quit deadline after SIGINT
# Components whose advertised address must be loopback (the `ip:` key of each section).
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexCoord", "indexNode", "dataCoord", "dataNode")


class MilvusServer(ManagedProcess):
    """The standalone binary as a service of ours: the stack's supervisor starts, adopts,
    restarts and stops it like any other (`[milvus].embedded_server = "server"`); benchmarks use
    it as a context manager. The internal ports (etcd, the components, metrics) are chosen once
    per data folder and kept in ports.json, so a restart on the same data finds etcd where its
    data says it is."""

    name = "milvus"
    stop_signal = signal.SIGINT  # Milvus' clean shutdown
    stop_grace_s = GRACEFUL_STOP_S + 10.0
    start_timeout_s = 180.0

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None,
                 reserved: frozenset[int] = frozenset(), tls: tuple[Path, Path] | None = None):
        """reserved: ports other servers will bind later (the stack's, started after Milvus): never taken for Milvus' own.
        tls: (certificate, key) PEM files: clients reach the proxy over TLS only (Milvus' one-way TLS)."""
        self.data_dir, self.port, self.host, self.reserved = Path(data_dir).resolve(), port or free_port(), host, reserved
        self.tls = tuple(Path(p).resolve() for p in tls) if tls else None
        super().__init__(log_path or self.data_dir / "logs" / "milvus.log", cwd=self.data_dir)

    @property
    def uri(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @property
    def ports_path(self) -> Path:
        return self.data_dir / "ports.json"

    def _internal_ports(self, milvus) -> dict[str, int]:
        """Ports of etcd, the components and metrics: those of the last start on this data when free."""
        try:
            kept = json.loads(self.ports_path.read_text())
        except (OSError, ValueError):
            kept = {}
        keys = [key for key in milvus.MilvusServerConfig().configurable_items if key.endswith("_port") and key != "proxy_port"]
        ports: dict[str, int] = {}
        for key in [*keys, "etcd_peer_port", "metrics_port"]:
            port = kept.get(key)
            while not port or port == self.port or port in ports.values() or port in self.reserved or port_open("127.0.0.1", port):
                port = free_port()
            ports[key] = port
        write_text_atomically(self.ports_path, json.dumps(ports))
        return ports

    def prepare(self) -> None:
        try:
            import milvus
        except ImportError:
            raise RuntimeError("the Milvus server is the PyPI package `milvus`: pip install milvus==2.3.5") from None

        ports = self._internal_ports(milvus)
        config = milvus.MilvusServerConfig(data_dir=str(self.data_dir), proxy_port=self.port,
                                           **{k: v for k, v in ports.items() if k not in ("etcd_peer_port", "metrics_port")})
        for component in COMPONENTS:
            config.set(f"{component}.ip", self.host)
        if self.tls:
            config.set("common.security.tlsMode", 1)
            config.set("tls.serverPemPath", str(self.tls[0]))
            config.set("tls.serverKeyPath", str(self.tls[1]))
        # The wrapper's check that a port is free, with SO_REUSEADDR as Milvus (Go) binds: without it the
        # check fails on the ports of a server stopped a moment ago (connections in TIME_WAIT).
        config.try_bind_port = functools.partial(bind_loopback, reuse_address=True)
        config.resolve()  # writes <data_dir>/configs/milvus.yaml
        self._embed_etcd_on_loopback(ports["etcd_port"], ports["etcd_peer_port"])
        milvus._initialize_data_files(str(self.data_dir))  # unpacks the binary and its libraries once
        binary_dir = self.data_dir / "bin"
        self.env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(ports["metrics_port"]),
            "MILVUS_RUN_DIR": str(self.data_dir / "run"),
            "LD_LIBRARY_PATH": f"{binary_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}",
        }

    def _embed_etcd_on_loopback(self, client_port: int, peer_port: int) -> None:
        """The embedded etcd listens on 2379/2380 unless given its own configuration file."""
        peer = f"http://{self.host}:{peer_port}"
        client = f"http://{self.host}:{client_port}"
        etcd_yaml = self.data_dir / "configs" / "embed_etcd.yaml"
        etcd_yaml.write_text(
            f"name: default\ndata-dir: {self.data_dir / 'data' / 'etcd.data'}\n"
            f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
            f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n"
        )
        milvus_yaml = self.data_dir / "configs" / "milvus.yaml"
        text = milvus_yaml.read_text().replace("\netcd:\n", f"\netcd:\n  config:\n    path: {etcd_yaml}\n", 1)
        # A standalone query node waits out its graceful stop (30 min by default) for segment
        # hand-offs that have nowhere to go; what Milvus accepted is in its WAL and etcd already.
        text = text.replace("gracefulStopTimeout: 1800", f"gracefulStopTimeout: {GRACEFUL_STOP_S}", 1)
        milvus_yaml.write_text(text)

    def command(self) -> list[str]:
        return [str(self.data_dir / "bin" / "milvus"), "run", "standalone"]

    def ready(self) -> bool:
        """Milvus' own health endpoint (on its metrics port) says OK and the proxy accepts."""
        try:
            metrics_port = json.loads(self.ports_path.read_text())["metrics_port"]
            with open_direct(f"http://127.0.0.1:{metrics_port}/healthz", 1) as response:
                return b"OK" in response.read() and port_open(self.host, self.port)
        except (OSError, ValueError, KeyError):
            return False


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
