import ipaddress
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def pytest_configure(config):
    """The suite runs on the built-in defaults whatever the shell exports: the README's
    `export MINDSTREAM_CONFIG=$PWD/var/stack/mindstream.toml` would otherwise point tests (and the
    services they start with the environment) at a running stack's Redis, Milvus and broker."""
    for name in [n for n in os.environ if n == "MINDSTREAM_CONFIG" or (n.startswith("MINDSTREAM_") and "__" in n)]:
        del os.environ[name]  # configuration only: switches such as MINDSTREAM_DISABLE_GPU stay


def synthetic_interactions(n_users: int = 120, n_items: int = 60, seed: int = 0) -> pd.DataFrame:
    """A small CSV-shaped table with clustered tastes, item genres and a user profile field."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        tastes = rng.choice(4, size=2, replace=False)  # each user likes two of four item clusters
        length = int(rng.integers(6, 25))
        for t in range(length):
            cluster = tastes[t % 2]
            item = int(cluster * (n_items // 4) + rng.integers(0, n_items // 4))
            rows.append({"user": f"u{u}", "item": f"i{item}", "timestamp": 1_000 * t + u, "item_genre": f"g{cluster}|gx", "user_gender": "MF"[u % 2]})
    return pd.DataFrame(rows)


def self_signed_certificate(directory: Path, name: str = "server", host: str = "localhost") -> tuple[Path, Path]:
    """(certificate, key) PEM files of a self-signed certificate for `host` (localhost: and 127.0.0.1),
    made with the openssl command (the test is skipped without it)."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    names = "DNS:localhost,IP:127.0.0.1" if host == "localhost" else f"DNS:{host}"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", f"/CN={host}",
                    "-addext", f"subjectAltName={names}", "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class FakeTopicConsumer:
    """A KafkaConsumer over one partition for model_export.event_log's reads: `records[offset]` is a
    (key, value, Kafka timestamp) or None (an offset without a record: a transaction marker); each poll
    hands out up to `per_poll` records and takes `poll_s`."""

    def __init__(self, records, per_poll: int | None = None, poll_s: float = 0.0):
        from kafka import TopicPartition

        self.tp, self.records, self.per_poll, self.poll_s, self.at = TopicPartition("events", 0), records, per_poll, poll_s, 0

    def partitions_for_topic(self, topic):
        return {0}

    def beginning_offsets(self, partitions):
        return {self.tp: 0}

    def end_offsets(self, partitions):
        return {self.tp: len(self.records)}

    def assign(self, partitions):
        pass

    def seek(self, tp, offset):
        self.at = offset

    def position(self, tp):
        return self.at

    def close(self):
        pass

    def poll(self, timeout_ms, max_records):
        from types import SimpleNamespace

        time.sleep(self.poll_s)
        batch = []
        while self.at < len(self.records) and len(batch) < (self.per_poll or len(self.records)):
            if self.records[self.at] is not None:
                key, value, timestamp = self.records[self.at]
                batch.append(SimpleNamespace(offset=self.at, key=key, value=value, timestamp=timestamp))
            self.at += 1
        return {self.tp: batch} if batch else {}


def wait_for(condition, timeout_s: float = 60.0, what: str = "condition"):
    """Polls `condition` until it returns something truthy (returned) or fails the test after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def synthetic_csv(tmp_path) -> Path:
    path = tmp_path / "interactions.csv"
    synthetic_interactions().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def two_exports(tmp_path_factory) -> list[Path]:
    """Two exports (two model versions) of a small MIND trained for one epoch on the synthetic CSV."""
    root = tmp_path_factory.mktemp("exports")
    csv = root / "interactions.csv"
    synthetic_interactions().to_csv(csv, index=False)
    exports = []
    for seed in ("1", "2"):
        run = root / f"run{seed}"
        for args in (
            ["train", "--dataset", str(csv), "--model", "mind", "--out", str(run), "--epochs", "1", "--seed", seed, "--quiet"],
            ["export", "--model-dir", str(run), "--dataset", str(csv)],
        ):
            subprocess.run([sys.executable, "-m", "model_export", *args], cwd=REPO, check=True, capture_output=True)
        exports.append(run / "export")
    return exports


@pytest.fixture(scope="module")
def stack(two_exports, tmp_path_factory):
    """The recall service on real Redis and Milvus Lite with two published versions (tests/recall_stack.py)."""
    from recall_stack import running_stack  # grpc, Milvus and the model stack load only for the modules that need them

    with running_stack(two_exports, tmp_path_factory.mktemp("recall")) as running:
        yield running


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def listening_addresses(process: psutil.Process) -> set[str]:
    """Every TCP address the process and its children listen on."""
    addresses = set()
    for proc in [process, *process.children(recursive=True)]:
        try:
            addresses |= {f"{c.laddr.ip}:{c.laddr.port}" for c in proc.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return addresses
