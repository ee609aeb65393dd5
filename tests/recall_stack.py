"""The recall service on real backends, shared by the test modules that call it over gRPC:
real Redis (EmbeddedRedis), Milvus Lite (a file), a model registry with two published versions
and the gRPC server in this process. `tests/conftest.py` turns `running_stack` into the `stack`
fixture; the modules import the constants and `service_config` from here."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Iterator

import grpc

from infra.config import Config, MilvusConfig, PathsConfig, RecallServiceConfig, RedisConfig
from infra.redis_server import EmbeddedRedis
from model_export.artifact import ModelArtifact, UserTower
from model_export.publish import connect, publish
from model_export.registry import ModelRegistry
from recall_service.server import RecallServer
from recall_service.stubs import recall_pb2, recall_pb2_grpc
from streaming.feature_store import InterestRecord, RedisFeatureStore

PREFIX = "mindstream_items"
STORED, ON_THE_FLY, POPULAR = recall_pb2.RECALL_PATH_STORED_INTERESTS, recall_pb2.RECALL_PATH_COMPUTED_ON_THE_FLY, recall_pb2.RECALL_PATH_POPULAR_FALLBACK
WINDOW = ("i1", "i2", "i3", "i16", "i17", "i18", "i31", "i32")  # the stored behaviour window of user-old and user-new


def service_config(root: Path, redis_uri: str, milvus_uri: str, **recall) -> Config:
    return Config(paths=PathsConfig(models_dir=root / "models"), redis=RedisConfig(uri=redis_uri), milvus=MilvusConfig(uri=milvus_uri),
                  recall=RecallServiceConfig(port=0, metrics_port=0, health_interval_ms=200, **recall))


@dataclasses.dataclass
class Stack:
    root: Path
    config: Config
    server: RecallServer
    stub: recall_pb2_grpc.RecallServiceStub
    channel: grpc.Channel
    artifacts: dict  # version -> ModelArtifact
    old: str  # version A: published first, no longer current nor aliased
    new: str  # version B: current, alias target
    store: RedisFeatureStore

    def recall(self, **fields):
        return self.stub.Recall(recall_pb2.RecallRequest(**fields), timeout=10)


@contextlib.contextmanager
def running_stack(exports: list[Path], root: Path) -> Iterator[Stack]:
    """Publishes both exports (the second ends current), stores user-old's interests in the old
    version and user-new's in the new one, and serves them until the block ends."""
    registry = ModelRegistry(root / "models")
    milvus_uri = str(root / "milvus.db")
    client = connect(milvus_uri)
    versions = []
    for export in exports:  # as `python -m model_export publish` does: install, publish, make current
        version = registry.install(export).model_version
        publish(registry.path(version), client, PREFIX, progress=lambda m: None)
        registry.set_current(version)
        versions.append(version)
    artifacts = {v: ModelArtifact.load(registry.path(v)) for v in versions}
    with EmbeddedRedis(root / "redis") as redis_server:
        config = service_config(root, redis_server.uri, milvus_uri)
        store = RedisFeatureStore.from_config(config.redis)
        old, new = versions
        for user, version in (("user-old", old), ("user-new", new)):
            interests = UserTower(artifacts[version], prefer_gpu=False).interests([WINDOW])[0]
            store.put_many([InterestRecord(user, version, interests, WINDOW, 1, "0:1")])
        with RecallServer(config) as server:
            channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
            try:
                yield Stack(root, config, server, recall_pb2_grpc.RecallServiceStub(channel), channel, artifacts, old, new, store)
            finally:
                channel.close()
