from pathlib import Path

import pytest

from infra.config import ConfigError, load_config


def test_defaults_are_local_and_loopback(tmp_path):
    config = load_config(environ={"MINDSTREAM_CONFIG": str(tmp_path / "absent.toml")})
    assert config.kafka.bootstrap_servers.startswith("127.0.0.1:")
    assert config.redis.uri.startswith("redis://127.0.0.1")
    assert config.recall.host == config.recall.metrics_host == "127.0.0.1"
    assert config.streaming.metrics_host == config.monitoring.exporter_host == "127.0.0.1"
    assert config.milvus.uri.endswith(".db")  # Milvus Lite file by default


def test_file_then_environment_take_precedence(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[kafka]\nbootstrap_servers = "k1:9093"\nsecurity_protocol = "SASL_SSL"\n[recall]\nport = 6000\n')
    config = load_config(f, environ={"MINDSTREAM_RECALL__PORT": "7000", "MINDSTREAM_MILVUS__URI": "http://milvus:19530",
                                     "MINDSTREAM_RECALL__METRICS_HOST": "0.0.0.0", "MINDSTREAM_MONITORING__EXPORTER_HOST": "0.0.0.0"})
    assert config.kafka.bootstrap_servers == "k1:9093"
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.recall.port == 7000  # environment beats the file
    assert config.milvus.uri == "http://milvus:19530"
    assert config.recall.metrics_host == config.monitoring.exporter_host == "0.0.0.0"
    assert isinstance(config.paths.data_dir, Path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[kafka]\nbrokers = 'x'\n", "unknown keys"),
        ("[nosuch]\na = 1\n", "unknown sections"),
        ("[recall]\nport = 'abc'\n", "expected an integer"),
        ("[kafka\n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_named(tmp_path, text, message):
    f = tmp_path / "m.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f, environ={})


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_config_command_prints_effective_values_with_secrets_masked(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, MINDSTREAM_REDIS__PASSWORD="s3cret", MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS="kafka-1:9093", MINDSTREAM_CONFIG=str(tmp_path / "none.toml"))
    out = subprocess.run([sys.executable, "-m", "infra", "config"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    printed = json.loads(out)
    assert printed["kafka"]["bootstrap_servers"] == "kafka-1:9093"
    assert printed["redis"]["password"] == "***" and "s3cret" not in out
    bad = subprocess.run([sys.executable, "-m", "infra", "config", "--file", str(tmp_path / "missing.toml")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr
