"""The embedded stack's supervisor with real processes: `python -m infra up / status / down` in a
folder of the test's own (the streaming job is left out: it needs a published model and 10-25 s
to start; tests/test_streaming_job.py runs it), the generated configuration, and the process
groups' shutdown."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psutil
import pytest
from conftest import wait_for

from infra.config import load_config
from infra import process
from infra.process import ManagedProcess
from infra.stack import PORTS, SERVICES, StackLayout, ports_of, generated_config, service_environment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTED = [s for s in SERVICES if s != "streaming-job"]


def infra(*args, env=None):
    return subprocess.run([sys.executable, "-m", "infra", *args], cwd=REPO, capture_output=True, text=True, env=env, timeout=180)


def test_generated_config_is_read_back_by_the_typed_config(tmp_path):
    layout = StackLayout(tmp_path)
    ports = {key: 20000 + i for i, key in enumerate(PORTS)}
    user = {"streaming": {"batch_max_users": 64}, "kafka": {"bootstrap_servers": "elsewhere:9092", "security_protocol": "PLAINTEXT"},
            # a container's settings in the user's file: the stack's own listeners stay on loopback all the same
            "recall": {"host": "0.0.0.0", "metrics_host": "0.0.0.0"}, "monitoring": {"exporter_host": "0.0.0.0"},
            # production's Milvus over TLS: the stack's own server speaks plain http://
            "milvus": {"uri": "https://milvus.prod:19530", "tls_cafile": str(tmp_path / "ca.pem"), "tls_server_name": "milvus.prod"}}
    layout.config_path.write_text(generated_config(user, layout, ports))
    config = load_config(layout.config_path, environ={})
    assert ports_of(config) == ports
    assert {config.recall.host, config.recall.metrics_host, config.streaming.metrics_host, config.monitoring.exporter_host} == {"127.0.0.1"}
    assert config.streaming.batch_max_users == 64
    assert config.milvus.uri == f"http://127.0.0.1:{ports['milvus']}"
    assert config.paths.models_dir == layout.models_dir


def test_free_ports_are_drawn_outside_the_ephemeral_range_and_skip_taken_ones(monkeypatch):
    """An outgoing connection gets its local port from the ephemeral range: a server port drawn there
    could be taken between the pick and the server's bind (a flaky "Address already in use")."""
    low, _ = process._ephemeral_range()
    ports = {process.free_port() for _ in range(20)}
    assert all(process.LOWEST_SERVER_PORT <= port < low for port in ports), ports
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        draws = iter([taken.getsockname()[1], 12_345])
        monkeypatch.setattr(process._port_picker, "randrange", lambda a, b: next(draws))
        assert process.free_port() == 12_345


def test_the_generated_configuration_is_readable_by_its_owner_only(tmp_path):
    """It copies the user's settings, the recall service's token and TLS key paths included."""
    from infra.stack import Stack

    stack = Stack(tmp_path, environ={})
    stack._write_config({key: 20000 + i for i, key in enumerate(PORTS)}, "lite")
    assert stack.layout.config_path.stat().st_mode & 0o777 == 0o600


def test_a_mistake_in_the_users_settings_stops_up_before_the_stacks_file_is_rewritten(tmp_path):
    user = tmp_path / "mine.toml"
    user.write_text("[streaming]\nbatch_max_user = 128\n")
    stack_dir = tmp_path / "stack"
    refused = infra("up", "--stack-dir", str(stack_dir), env={**os.environ, "MINDSTREAM_CONFIG": str(user)})
    assert refused.returncode == 2, refused.stderr
    assert f"{user}: [streaming] has unknown keys ['batch_max_user']" in refused.stderr
    assert not StackLayout(stack_dir.resolve()).config_path.exists()  # status and down still read the last good one


def test_a_running_service_is_told_by_its_start_stamp_not_the_wall_clock(tmp_path, monkeypatch):
    """A clock step made psutil's create_time of every running service later than its PID file:
    all of them looked dead, `down` orphaned them and `up` started a second stack on their data."""
    from infra.stack import Stack

    stack = Stack(tmp_path)
    stack._write_pid("redis", os.getpid())
    assert stack.running_pid("redis") == os.getpid()
    monkeypatch.setattr(psutil.Process, "create_time", lambda self: time.time() + 3600)  # the wall clock stepped forward
    assert stack.running_pid("redis") == os.getpid()
    # another process under the same PID (recycled) has another start stamp
    pid, stamp = stack.layout.pid_file("redis").read_text().split()
    stack.layout.pid_file("redis").write_text(f"{pid} {stamp.rsplit('/', 1)[0]}/1\n")
    assert stack.running_pid("redis") is None


@pytest.mark.parametrize("value", ["emoji \U0001F600 beyond U+FFFF", "DEL \x7f", 'quote " back\\slash', "control \x01\n\t", "é"])
def test_any_string_of_the_users_settings_survives_the_generated_file(tmp_path, value):
    import tomllib

    from infra.stack import render_toml

    assert tomllib.loads(render_toml({"recall": {"auth_token": value}}, "# header"))["recall"]["auth_token"] == value


def test_down_stops_the_services_even_when_the_stacks_file_no_longer_parses(tmp_path):
    from infra.stack import Stack

    said = []
    stack = Stack(tmp_path, environ={}, out=said.append)
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)  # stands in for the stack's Redis
    try:
        stack._write_pid("redis", sleeper.pid)
        stack.layout.config_path.write_text("[streaming]\nbatch_max_user = 1\n")  # edited by hand, say
        assert stack.down() == 0
        assert sleeper.wait(timeout=20) is not None and any("stopping the services with the default settings" in line for line in said)
    finally:
        sleeper.kill()


def test_a_stacks_file_that_no_longer_reads_is_written_anew_when_nothing_runs(tmp_path):
    """A key an older version wrote and this one dropped must not block every later `up`."""
    from infra.stack import Stack, StackError

    stack = Stack(tmp_path, environ={})
    stack.layout.config_path.write_text("[streaming]\nbatch_max_user = 1\n")
    ports = stack._choose_ports(keep_current=False)
    assert ports and all(ports.values())
    with pytest.raises(StackError, match="run `python -m infra down`, then `up`"):
        stack._choose_ports(keep_current=True)
    # a shell that exports MINDSTREAM_CONFIG naming that file: up says which file and what to do
    named = Stack(tmp_path, environ={"MINDSTREAM_CONFIG": str(stack.layout.config_path)})
    with pytest.raises(StackError, match="is the stack's generated file, which this shell's MINDSTREAM_CONFIG names"):
        named.up()


def test_services_ignore_variables_that_would_move_the_stacks_addresses(tmp_path):
    moving = ("MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS", "MINDSTREAM_RECALL__METRICS_HOST", "MINDSTREAM_MONITORING__EXPORTER_HOST",
              # production credentials in the shell: the stack's own servers speak none of them
              "MINDSTREAM_KAFKA__SECURITY_PROTOCOL", "MINDSTREAM_KAFKA__SASL_PASSWORD", "MINDSTREAM_REDIS__PASSWORD",
              "MINDSTREAM_REDIS__CLUSTER", "MINDSTREAM_MILVUS__TOKEN", "MINDSTREAM_MILVUS__TLS_CAFILE", "MINDSTREAM_MILVUS__TLS_SERVER_NAME")
    env = service_environment({**dict.fromkeys(moving, "0.0.0.0"), "MINDSTREAM_STREAMING__BATCH_MAX_USERS": "64", "PATH": "/bin"},
                              tmp_path / "mindstream.toml")
    assert not set(moving) & set(env)
    assert env["MINDSTREAM_STREAMING__BATCH_MAX_USERS"] == "64"  # tuning passes through
    assert env["MINDSTREAM_CONFIG"] == str(tmp_path / "mindstream.toml")


def test_the_stack_reaches_its_services_directly_whatever_proxy_the_shell_exports(tmp_path, monkeypatch):
    """urllib and gRPC send 127.0.0.1 to an exported http_proxy unless no_proxy names it: every
    readiness probe failed (`up` waited out its timeout) and the services' own loopback calls too."""
    import http.server
    import threading

    from infra.process import http_ok

    env = service_environment({"http_proxy": "http://proxy.corp:3128", "no_proxy": "intranet.corp", "PATH": "/bin"}, tmp_path / "m.toml")
    assert env["no_proxy"] == env["NO_PROXY"] == "intranet.corp,127.0.0.1,localhost,::1"
    assert "no_proxy" not in service_environment({"PATH": "/bin"}, tmp_path / "m.toml")  # no proxy: left as it was

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{process.free_port()}")  # nothing listens there
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert http_ok(f"http://127.0.0.1:{server.server_port}/")
    finally:
        server.shutdown()


def test_up_refuses_a_recall_ca_file_without_a_certificate_before_starting_anything(tmp_path):
    """The clients speak TLS when [recall].tls_cafile is set, the service only with a certificate: with
    a production client's CA file in the shell `up` waited 90 s for a probe that could never answer."""
    from infra.stack import Stack, StackError

    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    stack = Stack(tmp_path / "stack", environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_RECALL__TLS_CAFILE": str(ca)})
    with pytest.raises(StackError, match=r"\[recall\].tls_cafile is set .* but \[recall\].tls_certfile is not"):
        stack.up()
    assert not stack.layout.config_path.exists()


def test_a_service_that_cannot_be_executed_is_a_one_line_error(tmp_path, monkeypatch):
    """A binary left without exec permission (an interrupted install) raised Popen's PermissionError
    as a traceback from `up`."""
    from infra import stack as stack_module

    class NotExecutable(ManagedProcess):
        def command(self):
            return [str(binary)]

    binary = tmp_path / "broker-binary"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o600)
    monkeypatch.setattr(stack_module.Stack, "process", lambda self, name, config: NotExecutable(tmp_path / f"{name}.log"))
    stack = stack_module.Stack(tmp_path / "stack", environ={"MINDSTREAM_CONFIG": ""})
    with pytest.raises(stack_module.StackError, match=r"broker could not be started: \[Errno 13\] Permission denied.*infra down"):
        stack.up()


class Stubborn(ManagedProcess):
    """A shell that ignores SIGTERM and has a child: stop must escalate to SIGKILL for the whole group."""

    name = "stubborn"
    stop_grace_s = 0.5

    def command(self):
        return ["sh", "-c", "trap '' TERM; sleep 60 & echo started; wait"]

    def ready(self):
        return "started" in self.log_path.read_text()


def test_stop_kills_the_whole_group_after_the_grace_period(tmp_path):
    process = Stubborn(tmp_path / "stubborn.log").start(timeout_s=10)
    pid = process.pid
    children = psutil.Process(pid).children()
    assert children and os.getpgid(pid) == pid  # its own group, with a child in it
    began = time.monotonic()
    process.stop()
    assert 0.4 < time.monotonic() - began < 10
    for p in [psutil.Process(pid), *children] if psutil.pid_exists(pid) else children:
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE


@pytest.fixture
def stack_dir(tmp_path):
    yield tmp_path / "stack"
    infra("down", "--stack-dir", str(tmp_path / "stack"))  # whatever a failed assertion left running


def test_up_status_down_with_real_processes(stack_dir):
    env = {**os.environ, "MINDSTREAM_MONITORING__SCRAPE_INTERVAL_S": "1"}
    up = infra("up", "--stack-dir", str(stack_dir), "--skip", "streaming-job", env=env)
    assert up.returncode == 0, up.stderr
    layout = StackLayout(stack_dir.resolve())
    config = load_config(layout.config_path, environ={})
    pids = {name: int(layout.pid_file(name).read_text().split()[0]) for name in STARTED}
    for name, pid in pids.items():
        assert os.getpgid(pid) == pid, f"{name} is not in its own process group"
        assert layout.log(name).is_file()
    assert len(set(ports_of(config).values())) == len(PORTS)

    status = infra("status", "--json", "--stack-dir", str(stack_dir))
    states = {s["name"]: s["state"] for s in json.loads(status.stdout)["services"]}
    assert states == {**dict.fromkeys(STARTED, "running"), "streaming-job": "stopped"}
    assert status.returncode == 3  # not everything runs

    again = infra("up", "--stack-dir", str(stack_dir), "--skip", "streaming-job", env=env)
    assert again.returncode == 0 and "already running" in again.stderr

    # Prometheus scrapes the services on the ports of the generated configuration.
    deadline = time.monotonic() + 20
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{config.monitoring.prometheus_port}/api/v1/targets", timeout=5) as response:
            health = {t["labels"]["job"]: t["health"] for t in json.load(response)["data"]["activeTargets"]}
        # Each target turns "up" at its own first scrape, Prometheus's own included.
        scraped = all(health.get(job) == "up" for job in ("mindstream-recall", "mindstream-exporter", "prometheus"))
        if scraped or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert health["mindstream-recall"] == health["mindstream-exporter"] == health["prometheus"] == "up", health

    # A crashed service is restarted by the next `up`, on the same port; the others are left alone.
    os.killpg(pids["redis"], signal.SIGKILL)
    time.sleep(0.3)
    assert {s["name"]: s["state"] for s in json.loads(infra("status", "--json", "--stack-dir", str(stack_dir)).stdout)["services"]}["redis"] == "exited"
    # ... unless another process took its port meanwhile: the port probe would take it for Redis
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", ports_of(config)["redis"]))
        squatter.listen()
        refused = infra("up", "--stack-dir", str(stack_dir), "--skip", "streaming-job", env=env)
    assert refused.returncode == 2, refused.stderr
    assert f"redis is not running but its port 127.0.0.1:{ports_of(config)['redis']} is taken by " in refused.stderr
    assert f"(pid {os.getpid()})" in refused.stderr
    restarted = infra("up", "--stack-dir", str(stack_dir), "--skip", "streaming-job", env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert "redis          ready" in restarted.stderr and "broker         already running" in restarted.stderr
    assert ports_of(load_config(layout.config_path, environ={})) == ports_of(config)

    down = infra("down", "--stack-dir", str(stack_dir))
    assert down.returncode == 0 and f"stopped {len(STARTED)} service(s)" in down.stderr
    pids["redis"] = int(restarted.stderr.split("redis          ready")[1].split("(pid ")[1].split(")")[0])
    for name, pid in pids.items():
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, f"{name} still runs"
        assert not layout.pid_file(name).exists()
    assert "not running" in infra("down", "--stack-dir", str(stack_dir)).stderr  # idempotent


def test_the_milvus_servers_own_ports_leave_the_stacks_to_the_services_started_after_it(tmp_path):
    """Milvus starts in the first wave; the recall service, exporter and Prometheus bind their ports in the second."""
    import json

    import milvus

    from infra.milvus_server import MilvusServer

    kept = MilvusServer(tmp_path, 12345)._internal_ports(milvus)  # as the last start on this data left them
    reserved = frozenset(list(kept.values())[:3])  # since given to the stack's services
    ports = MilvusServer(tmp_path, 12345, reserved=reserved)._internal_ports(milvus)
    assert not reserved & set(ports.values()) and json.loads((tmp_path / "ports.json").read_text()) == ports


def test_the_stack_runs_the_milvus_server_and_restarts_it_on_its_data(stack_dir, two_exports):
    """[milvus].embedded_server = "server": the standalone binary under the same supervisor; a model
    published into it is searchable, and after a crash `up` restarts it on its port with its data."""
    from pymilvus import MilvusClient

    from model_export.artifact import ModelArtifact
    from model_export.publish import publish_version
    from model_export.registry import ModelRegistry
    from recall_service.backends import MilvusItemSearch
    from recall_service.recaller import SearchRejected

    env = {**os.environ, "MINDSTREAM_MILVUS__EMBEDDED_SERVER": "server"}
    only_stores = [arg for name in ("streaming-job", "recall", "exporter", "prometheus") for arg in ("--skip", name)]
    up = infra("up", "--stack-dir", str(stack_dir), *only_stores, env=env)
    assert up.returncode == 0, up.stderr
    layout = StackLayout(stack_dir.resolve())
    config = load_config(layout.config_path, environ={})
    assert config.milvus.embedded_server == "server"
    pid = int(layout.pid_file("milvus").read_text().split()[0])
    assert psutil.Process(pid).name() == "milvus"

    registry = ModelRegistry(layout.models_dir)
    published = publish_version(two_exports[0], registry, MilvusClient(config.milvus.uri), config.milvus.collection_prefix, progress=lambda m: None)
    query = ModelArtifact.load(registry.path(published.model_version)).item_vectors()[:2]

    def top5(search):
        try:
            hits = search.search(published.model_version, query, 5, "", timeout_s=30)
        except SearchRejected:  # not loaded (after a restart): the search started loading it
            return None
        return hits.raw_ids.tolist(), hits.scores.round(4).tolist()

    search = MilvusItemSearch(config.milvus.uri, prefix=config.milvus.collection_prefix)
    search.connect()
    before = top5(search)
    assert all(len(row) == 5 and "" not in row for row in before[0])

    os.killpg(pid, signal.SIGKILL)
    restarted = infra("up", "--stack-dir", str(stack_dir), *only_stores, env=env)
    assert restarted.returncode == 0, restarted.stderr
    assert "milvus         ready" in restarted.stderr and ports_of(load_config(layout.config_path, environ={})) == ports_of(config)
    search = MilvusItemSearch(config.milvus.uri, prefix=config.milvus.collection_prefix)
    search.connect()
    assert wait_for(lambda: top5(search), 60, "the collection loaded again") == before

    # Back to Milvus Lite: its own (empty) data folder, and `up` says the model must be published again.
    assert infra("down", "--stack-dir", str(stack_dir)).returncode == 0
    lite = infra("up", "--stack-dir", str(stack_dir), *only_stores)
    assert lite.returncode == 0, lite.stderr
    assert f"this Milvus (lite) starts empty while the stack's current model is {published.model_version}" in lite.stderr
    assert load_config(layout.config_path, environ={}).milvus.embedded_server == "lite"


def test_the_main_command_refuses_a_model_it_cannot_serve_before_setting_anything_up():
    """MostPop has no user tower: `MODEL=mostpop infra/run.sh` would set up and train, then fail at export."""
    result = subprocess.run(["infra/run.sh"], cwd=REPO, capture_output=True, text=True, timeout=30, env={**os.environ, "MODEL": "mostpop"})
    assert result.returncode == 2
    assert "use mind_remi, mind or youtube_dnn" in result.stderr
    assert "installing" not in result.stderr and "training" not in result.stderr


def test_up_starts_a_new_stack_while_the_shell_exports_its_not_yet_written_file(tmp_path):
    """`status` tells users to export MINDSTREAM_CONFIG=<stack>/mindstream.toml; after the folder is
    removed (or for a new --stack-dir), `up` must still write that file rather than refuse it as missing."""
    stack_dir = tmp_path / "stack"
    from infra.stack import Stack

    stack = Stack(stack_dir, environ={**os.environ, "MINDSTREAM_CONFIG": str(stack_dir / "mindstream.toml")})
    assert stack._choose_milvus_server(milvus_runs=False) == "lite"
    assert stack._write_config({name: 0 for name in PORTS}, "lite").recall.host == "127.0.0.1"


def test_a_production_replication_factor_in_the_users_file_still_starts_the_embedded_broker(stack_dir, tmp_path):
    """The Kubernetes ConfigMap sets 3 for a real cluster; the stack's one broker can keep one copy only."""
    user = tmp_path / "mine.toml"
    user.write_text("[streaming]\ntopic_replication_factor = 3\n")
    only_the_broker = [arg for name in SERVICES if name != "broker" for arg in ("--skip", name)]
    up = infra("up", "--stack-dir", str(stack_dir), *only_the_broker, env={**os.environ, "MINDSTREAM_CONFIG": str(user)})
    assert up.returncode == 0, up.stderr
    assert "topics         created" in up.stderr
    assert load_config(StackLayout(stack_dir.resolve()).config_path, environ={}).streaming.topic_replication_factor == 1


def test_a_broker_that_refuses_the_topics_is_one_line_saying_what_to_do(tmp_path, monkeypatch):
    from kafka.errors import InvalidReplicationFactorError

    from infra import stack as stack_module

    def refuse(config):
        raise InvalidReplicationFactorError("Replication factor must be larger than 0 and not larger than the number of brokers")

    monkeypatch.setattr(stack_module, "ensure_configured_topics", refuse)
    stack = stack_module.Stack(tmp_path, environ={})
    config = stack._write_config({key: 20000 + i for i, key in enumerate(PORTS)}, "lite")
    with pytest.raises(stack_module.StackError, match=r"did not create the topics .*InvalidReplicationFactorError.*`python -m infra down` stops what runs"):
        stack._create_topics(config)


class NeverReady(ManagedProcess):
    name = "never-ready"
    start_timeout_s = 20.0

    def command(self):
        return ["sleep", "120"]

    def ready(self):
        return False


def test_a_server_whose_start_is_interrupted_is_stopped(tmp_path):
    """Ctrl-C (or SIGTERM, taken as it) while a `with` block's server starts escaped __enter__, so
    __exit__ never stopped it: in its own session it outlived the command."""
    class InterruptedWhileStarting(NeverReady):
        def ready(self):
            raise KeyboardInterrupt

    server = InterruptedWhileStarting(tmp_path / "interrupted.log")
    with pytest.raises(KeyboardInterrupt):
        with server:
            pass
    assert server.pid is None and not any(p.info["cmdline"] == ["sleep", "120"] and p.info["ppid"] == os.getpid()
                                          for p in psutil.process_iter(["cmdline", "ppid"]))


class SigintReporter(ManagedProcess):
    name = "sigint-reporter"

    def command(self):
        return ["sh", "-c", "grep SigIgn /proc/self/status; sleep 60"]

    def ready(self):
        return "SigIgn" in self.log_path.read_text()


def test_a_server_started_with_sigint_ignored_gets_it_back_as_its_stop_signal(tmp_path):
    """A background job of a non-interactive shell has SIGINT ignored and its children inherit that:
    Milvus and the broker, whose stop signal it is, sat out the grace period and were killed."""
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        server = SigintReporter(tmp_path / "sigint.log").start(timeout_s=10)
    finally:
        signal.signal(signal.SIGINT, before)
    try:
        ignored = int((tmp_path / "sigint.log").read_text().split()[-1], 16)
        assert not ignored & (1 << (signal.SIGINT - 1))
    finally:
        server.stop()


def test_ctrl_c_while_up_waits_returns_at_once_and_leaves_the_services_starting(tmp_path, monkeypatch):
    """The waits ran in a pool whose exit joined them: Ctrl-C took up to the slowest start timeout (180 s)."""
    from infra import stack as stack_module

    def interrupted(futures):
        raise KeyboardInterrupt  # as Ctrl-C does while `up` waits for the health checks

    monkeypatch.setattr(stack_module, "as_completed", interrupted)
    stack = stack_module.Stack(tmp_path, environ={})
    starting = NeverReady(tmp_path / "never-ready.log").spawn()
    try:
        began = time.monotonic()
        with pytest.raises(BaseException) as raised:
            stack._await_all({"recall": (starting, began)}, None)
        assert time.monotonic() - began < 5
        assert raised.type is stack_module.StackError, raised.value
        assert "still starting in the background: recall." in str(raised.value) and f"`python -m infra down --stack-dir {stack.layout.root}` stops" in str(raised.value)
        assert starting.alive()
    finally:
        starting.stop()


def test_up_and_down_wait_for_one_another_in_a_stack_folder(tmp_path):
    import fcntl
    import threading

    from infra.stack import Stack

    said = []
    stack = Stack(tmp_path, environ={}, out=said.append)
    finished = threading.Event()
    with open(tmp_path / "lock", "a") as held:  # another `up` in this folder
        fcntl.flock(held, fcntl.LOCK_EX)
        worker = threading.Thread(target=lambda: (stack.down(), finished.set()))
        worker.start()
        wait_for(lambda: any(f"another `python -m infra up` or `down` is running in {stack.layout.root}: waiting" in line for line in said),
                 10, "the note that down waits")
        assert not finished.wait(0.5)
    worker.join(10)
    assert finished.is_set() and said[-1] == "the stack is not running"
    # a `down` where nothing was ever started leaves no folder (nor lock) behind
    nowhere = tmp_path / "never-started"
    assert Stack(nowhere, environ={}, out=said.append).down() == 0 and not nowhere.exists()


def test_the_port_probe_tells_a_taken_port_and_binds_as_milvus_does_when_asked():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert process.bind_loopback(port) is None and process.bind_loopback(port, reuse_address=True) is None
        assert not process.port_free(port)
    probe = process.bind_loopback(port, reuse_address=True)
    assert probe is not None and probe.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
    probe.close()
    assert process.port_free(port)


def test_prometheus_is_looked_for_where_the_configuration_says_it_is_installed(tmp_path, monkeypatch):
    """[monitoring].prometheus_home is where infra/install_prometheus.sh puts it, and where the stack looks."""
    from infra.monitoring import prometheus_tool

    home = tmp_path / "prometheus"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "prometheus").write_text("#!/bin/sh\n")
    monkeypatch.setenv("MINDSTREAM_MONITORING__PROMETHEUS_HOME", str(home))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert prometheus_tool("prometheus") == home / "bin" / "prometheus"
    assert prometheus_tool("promtool") is None


def _path_of(folder, *tools, java_version=None):
    """A PATH folder holding only these tools (links to the real ones) and, given a version line, a fake java."""
    folder.mkdir(exist_ok=True)
    for tool in tools:
        (folder / tool).symlink_to(shutil.which(tool))
    if java_version is not None:
        (folder / "java").write_text(f"#!/bin/sh\necho '{java_version}' >&2\n")  # java -version writes to stderr
        (folder / "java").chmod(0o755)
    return str(folder)


def test_the_prometheus_install_is_best_effort_where_apt_get_is_missing(tmp_path):
    """The stack runs without Prometheus: the set-up (bootstrap.sh, under set -e) must not stop there."""
    env = {"PATH": _path_of(tmp_path / "bin", "dirname"), "MINDSTREAM_CONFIG": "", "MINDSTREAM_MONITORING__PROMETHEUS_HOME": str(tmp_path / "prometheus")}
    result = subprocess.run([shutil.which("bash"), "infra/install_prometheus.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "warning: Prometheus not installed: apt-get not found" in result.stderr and "The stack runs without it" in result.stderr
    assert not (tmp_path / "prometheus").exists()


@pytest.mark.parametrize("java_version, says", [
    ('openjdk version "11.0.22" 2024-01-16', 'found: openjdk version "11.0.22" 2024-01-16.'),
    ('java version "1.8.0_392"', 'found: java version "1.8.0_392".'),
    (None, "found: no java."),
])
def test_the_set_up_refuses_a_java_older_than_17_before_it_installs_anything(tmp_path, java_version, says):
    """PyFlink's JVM: without this check the main command trained for minutes, then failed at the job's start."""
    env = {"PATH": _path_of(tmp_path / "bin", "dirname", java_version=java_version)}
    result = subprocess.run([shutil.which("bash"), "infra/bootstrap.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "error: Java 17 or newer is required" in result.stderr and says in result.stderr
    assert "Python 3.11 is required" not in result.stderr  # checked before anything else


@pytest.mark.parametrize("java_version", ['openjdk version "17.0.15" 2025-04-15', 'openjdk version "21" 2023-09-19'])
def test_the_set_up_takes_java_17_and_newer(tmp_path, java_version):
    env = {"PATH": _path_of(tmp_path / "bin", "dirname", "flock", java_version=java_version), "PYTHON": str(tmp_path / "no-python")}
    result = subprocess.run([shutil.which("bash"), "infra/bootstrap.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert "Java 17" not in result.stderr and "Python 3.11 is required" in result.stderr  # it went on, to the next check


def test_the_set_up_makes_a_venv_of_another_python_again(tmp_path):
    """A .venv of another Python (an older checkout's) has a working pip: it was kept, and the pinned set failed in it."""
    checkout = tmp_path / "checkout"
    (checkout / "infra").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "infra", "bootstrap.sh"), checkout / "infra")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").write_text(
        '#!/bin/sh\ncase "$1" in\n  --version) echo "Python 3.10.12" ;;\n  -c) exit 1 ;;  # not 3.11\n  *) exit 0 ;;  # pip and the rest work\nesac\n')
    (checkout / ".venv" / "bin" / "python").chmod(0o755)
    python = tmp_path / "python3.11"  # the real one, but for `-m venv`, which it records
    python.write_text(f'#!/bin/sh\nif [ "$1 $2" = "-m venv" ]; then echo "$@" > {tmp_path}/venv-args; exit 3; fi\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    env = {"PATH": _path_of(tmp_path / "bin", "dirname", "flock", java_version='openjdk version "17.0.15"'), "PYTHON": str(python)}
    result = subprocess.run([shutil.which("bash"), str(checkout / "infra" / "bootstrap.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result.stderr
    assert "note: .venv is no working Python 3.11 environment (Python 3.10.12): making it again" in result.stderr
    assert (tmp_path / "venv-args").read_text().split() == ["-m", "venv", "--clear", ".venv"]


def _fake_checkout(tmp_path):
    """A checkout holding bootstrap.sh, pyproject.toml and the constraints, and a .venv whose python
    passes for 3.11 with pip and records every `-m pip` call in `pip-calls`."""
    checkout = tmp_path / "checkout"
    (checkout / "infra").mkdir(parents=True)
    shutil.copy(os.path.join(REPO, "infra", "bootstrap.sh"), checkout / "infra")
    (checkout / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (checkout / "infra" / "constraints.txt").write_text("six==1.17.0\n")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "python").write_text(
        f'#!/bin/sh\nif [ "$1 $2" = "-m pip" ]; then echo "$@" >> {tmp_path}/pip-calls; fi\nexit 0\n')
    (checkout / ".venv" / "bin" / "python").chmod(0o755)
    env = {"PATH": _path_of(tmp_path / "bin", "dirname", "flock", "cat", "sha256sum", "cut", "rm", "touch",
                            java_version='openjdk version "17.0.15"'), "PYTHON": sys.executable}
    return checkout, env


def test_the_set_up_installs_again_when_the_pins_come_back_to_an_earlier_set(tmp_path):
    """Pins A, then B, then A again (an older checkout): A's stamp was still there, so nothing was
    installed and the venv kept B's versions."""
    checkout, env = _fake_checkout(tmp_path)

    def bootstrap(pins: str) -> list[str]:
        (checkout / "infra" / "constraints.txt").write_text(pins)
        (tmp_path / "pip-calls").unlink(missing_ok=True)
        subprocess.run([shutil.which("bash"), str(checkout / "infra" / "bootstrap.sh")], env=env, capture_output=True, text=True, timeout=60)
        return (tmp_path / "pip-calls").read_text().splitlines() if (tmp_path / "pip-calls").exists() else []

    assert bootstrap("six==1.17.0\n") and bootstrap("six==1.16.0\n")
    assert bootstrap("six==1.17.0\n"), "back to the first pins: installed again"
    assert len(list((checkout / ".venv").glob(".installed-*"))) == 1


def test_two_set_ups_at_once_take_turns(tmp_path):
    """Two bootstraps at once (the README's two commands on a fresh machine) cleared the venv under
    each other's pip: the second waits for the first."""
    import fcntl

    checkout, env = _fake_checkout(tmp_path)
    with open(checkout / ".bootstrap.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # a first bootstrap at work
        second = subprocess.Popen([shutil.which("bash"), str(checkout / "infra" / "bootstrap.sh")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.5)
        assert second.poll() is None and not (tmp_path / "pip-calls").exists()  # waiting, nothing installed
    second.wait(60)  # the lock let go: it goes on
    assert (tmp_path / "pip-calls").exists()


def test_the_test_command_takes_test_paths_given_from_another_folder():
    """It moves to the repository's root first: `../infra/test.sh test_heap.py` from tests/ found no file."""
    result = subprocess.run([os.path.join(REPO, "infra", "test.sh"), "--collect-only", "-q", "test_heap.py", "-k", "heap"],
                            cwd=os.path.join(REPO, "tests"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "test_heap.py" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]


def test_a_command_holding_a_server_stops_it_when_terminated(tmp_path):
    """SIGTERM (timeout, kill, a cancelled CI job) stops the servers a command started, as Ctrl-C
    does: they run in their own sessions and would otherwise outlive it."""
    script = (f"import sys, time; sys.path.insert(0, {REPO!r})\n"
              "from infra.redis_server import EmbeddedRedis\n"
              f"with EmbeddedRedis({str(tmp_path / 'redis')!r}) as server:\n"
              "    print(server.pid, flush=True)\n"
              "    time.sleep(120)\n")
    stderr = tmp_path / "stderr.txt"
    with open(stderr, "w") as err:
        command = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        line = command.stdout.readline()
        assert line.strip().isdigit(), stderr.read_text()[-2000:]
        redis_pid = int(line)
        command.send_signal(signal.SIGTERM)
        assert command.wait(60) != 0
        assert "KeyboardInterrupt: signal SIGTERM" in stderr.read_text()

        def redis_gone() -> bool:
            try:
                return psutil.Process(redis_pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(redis_gone, 30, "the terminated command's Redis to stop")
    finally:  # a Redis the command left (the failure this test is about) would outlive the test run
        command.kill()
        for proc in psutil.process_iter(["cwd"]):
            if str(tmp_path) in (proc.info["cwd"] or ""):  # Redis runs in its data folder; its command line names no path
                proc.kill()
