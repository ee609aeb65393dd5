"""How the commands fail (infra/cli.py): what a user can act on is one line with what to do next,
exit 2; a bug keeps its traceback."""

import socket
import subprocess
import sys

import pytest
import redis
from kafka.errors import KafkaTimeoutError

from conftest import REPO
from infra.cli import run_command
from infra.config import ConfigError


def _failing(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, says", [
    (ConfigError("[redis].uri: bad"), "[redis].uri: bad"),
    (KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']"), "no answer from the Kafka brokers"),
    (redis.exceptions.AuthenticationError("invalid password"), "set [redis].password"),
    (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1."), "set [redis].uri to yours"),
])
def test_a_failure_the_user_can_act_on_is_one_line_and_exit_2(exc, says, capsys):
    assert run_command(_failing(exc), None) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1


def test_a_bug_keeps_its_traceback():
    for bug in (KeyError("files"), RuntimeError("mat1 and mat2 shapes cannot be multiplied"), ValueError("operands could not be broadcast")):
        with pytest.raises(type(bug)):
            run_command(_failing(bug), None)


def test_the_recall_server_on_a_port_in_use_says_so(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {"PATH": "/usr/bin:/bin", "MINDSTREAM_CONFIG": "", "MINDSTREAM_RECALL__PORT": str(port), "MINDSTREAM_RECALL__METRICS_PORT": "0",
               "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"), "MINDSTREAM_MILVUS__URI": str(tmp_path / "milvus.db")}
        result = subprocess.run([sys.executable, "-m", "recall_service", "serve"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "MINDSTREAM_RECALL__PORT" in result.stderr
    assert "Traceback" not in result.stderr


def test_restoring_the_latest_checkpoint_of_a_remote_checkpoint_store_asks_for_the_checkpoint():
    # `--restore latest` lists a local folder; s3:// (the Kubernetes configuration's) cannot be listed so
    env = {"PATH": "/usr/bin:/bin", "MINDSTREAM_CONFIG": "", "MINDSTREAM_STREAMING__CHECKPOINT_DIR": "s3://bucket/checkpoints"}
    result = subprocess.run([sys.executable, "-m", "streaming", "run", "--restore", "latest"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "name the checkpoint, --restore s3://bucket/checkpoints/state-" in result.stderr
