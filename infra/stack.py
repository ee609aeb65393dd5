"""The supervisor of the embedded stack: `python -m infra up | down | status`.

    broker -> redis -> milvus -> streaming-job -> recall -> exporter -> prometheus   (started in this
    order, stopped in the reverse one: the job and the services before the stores and the broker)

Everything lives in one folder (var/stack by default):
    mindstream.toml   the generated configuration: free loopback ports chosen at `up`, data folders;
                      every service runs with MINDSTREAM_CONFIG pointing at it
    logs/<service>.log, pids/<service>.pid, data/<service>/, models/ (the stack's model registry)
    prometheus.yml    generated from the same ports

Each service is a detached process in its own process group (infra/process.py), so `up` returns
while they run and `down` stops them later by PID: the service's own stop signal to the group
(SIGINT for the broker and Milvus Lite, SIGTERM for the rest), SIGKILL after a grace period.
One `up` or `down` at a time in a folder (a lock on its `lock` file): a second waits for the first.

The stack has its own model registry beside its Milvus data: a registry whose current version
has no collection in this Milvus would make every recall fall back. The streaming job cannot
start without a published model, so `up` leaves it out until one is published
(`python -m model_export publish`), and the next `up` starts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import shlex
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import psutil

from infra.broker import EmbeddedBroker, ensure_configured_topics
from infra.cli import UserError
from infra.config import ENV_PREFIX, REPO_ROOT, Config, ConfigError, MilvusConfig, MilvusServerKind, config_file, load_config
from infra.files import write_text_atomically
from infra.job_process import StreamingJobProcess
from infra.milvus_server import MilvusLiteServer, MilvusServer
from infra.monitoring import ExporterProcess, PrometheusProcess, prometheus_tool, write_prometheus_config
from infra.process import ManagedProcess, free_port, listener_of, loopback_unproxied, port_open, start_stamp
from infra.recall_process import RecallServiceProcess
from infra.redis_server import EmbeddedRedis
from model_export.registry import ModelRegistry

DEFAULT_STACK_DIR = REPO_ROOT / "var" / "stack"
SERVICES = ("broker", "redis", "milvus", "streaming-job", "recall", "exporter", "prometheus")
# The ports chosen at `up`, by the service that listens on them.
SERVICE_PORTS = {"broker": ("broker",), "redis": ("redis",), "milvus": ("milvus",), "streaming-job": ("streaming_metrics",),
                 "recall": ("recall", "recall_metrics"), "exporter": ("exporter",), "prometheus": ("prometheus",)}
PORTS = tuple(port for service in SERVICES for port in SERVICE_PORTS[service])
PID_SLACK_S = 2.0  # process start times are known to about a second


class StackError(UserError, RuntimeError):
    """The stack cannot do what was asked; the message says what to do next."""


@dataclasses.dataclass(frozen=True)
class StackLayout:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "mindstream.toml"

    @property
    def prometheus_config_path(self) -> Path:
        return self.root / "prometheus.yml"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def lock_path(self) -> Path:
        return self.root / "lock"

    def log(self, service: str) -> Path:
        return self.root / "logs" / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.root / "pids" / f"{service}.pid"

    def data(self, service: str) -> Path:
        return self.root / "data" / service


def stack_settings(layout: StackLayout, ports: dict[str, int], milvus_server: MilvusServerKind = MilvusConfig.embedded_server) -> dict[str, dict]:
    """What the stack decides: addresses, folders, which Milvus server it runs (chosen by the first
    `up` from the user's configuration, kept while it runs), and how its own stores are reached (no
    TLS, SASL, password or token: production credentials in the shell must not point the stack's
    services at its local servers with settings those do not speak), and that its one broker keeps one
    copy of each topic (a production file's replication factor of 3 cannot be met by it). Everything
    else comes from the user's configuration."""
    return {
        "paths": {"models_dir": layout.models_dir},
        "kafka": {"bootstrap_servers": f"127.0.0.1:{ports['broker']}", "security_protocol": "PLAINTEXT", "sasl_mechanism": "",
                  "sasl_username": "", "sasl_password": "", "ssl_cafile": "", "ssl_certfile": "", "ssl_keyfile": ""},
        "streaming": {"metrics_host": "127.0.0.1", "metrics_port": ports["streaming_metrics"],
                      "checkpoint_dir": layout.data("streaming-job") / "checkpoints", "topic_replication_factor": 1},
        "redis": {"uri": f"redis://127.0.0.1:{ports['redis']}/0", "password": "", "ssl_cafile": "", "cluster": False},
        "milvus": {"uri": f"http://127.0.0.1:{ports['milvus']}", "token": "", "tls_cafile": "", "tls_server_name": "",
                   "embedded_server": milvus_server},
        "recall": {"host": "127.0.0.1", "port": ports["recall"], "metrics_host": "127.0.0.1", "metrics_port": ports["recall_metrics"]},
        "monitoring": {"prometheus_port": ports["prometheus"], "exporter_host": "127.0.0.1", "exporter_port": ports["exporter"]},
        "retrain": {"state_dir": layout.root / "retrain"},
    }


def ports_of(config: Config) -> dict[str, int]:
    return {
        "broker": int(config.kafka.bootstrap_servers.rsplit(":", 1)[1]),
        "redis": int(config.redis.uri.rsplit(":", 1)[1].split("/")[0]),
        "milvus": int(config.milvus.uri.rsplit(":", 1)[1]),
        "streaming_metrics": config.streaming.metrics_port,
        "recall": config.recall.port,
        "recall_metrics": config.recall.metrics_port,
        "exporter": config.monitoring.exporter_port,
        "prometheus": config.monitoring.prometheus_port,
    }


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    # A JSON string is a TOML basic string, but for two things: ASCII-only JSON writes a character beyond
    # U+FFFF as a surrogate pair (TOML refuses those), and JSON leaves DEL (U+007F) raw (TOML refuses it).
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def render_toml(sections: dict[str, dict], header: str) -> str:
    lines = [header]
    for section, values in sections.items():
        lines += ["", f"[{section}]", *(f"{key} = {_toml_value(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"


def user_settings(environ: dict[str, str]) -> dict[str, dict]:
    """The TOML file load_config would read ($MINDSTREAM_CONFIG, else ./mindstream.toml). When that is
    the generated file itself, it carries the user's settings of the `up` that wrote it."""
    path = config_file(environ)
    if path is None:
        return {}
    with open(path, "rb") as fh:
        return tomllib.load(fh)


def generated_config(user: dict[str, dict], layout: StackLayout, ports: dict[str, int],
                     milvus_server: MilvusServerKind = MilvusConfig.embedded_server) -> str:
    """The stack's TOML file: the user's settings with the stack's addresses and folders on top."""
    sections = {section: dict(values) for section, values in user.items()}
    for section, values in stack_settings(layout, ports, milvus_server).items():
        sections[section] = {**sections.get(section, {}), **values}
    header = ("# Generated by `python -m infra up`: the embedded stack's addresses (free loopback ports) and folders,\n"
              "# on top of your own mindstream.toml if you have one. Rewritten by the next `up`.\n"
              f"# Every service of the stack reads it; to use the stack from a shell: export MINDSTREAM_CONFIG={layout.config_path}")
    return render_toml(sections, header)


def pinned_variables() -> set[str]:
    """The MINDSTREAM_* variables that would override an address or folder the stack chose: a shell
    that has them set for production must not send the stack's commands there (infra/run.sh unsets them)."""
    stack_fields = stack_settings(StackLayout(Path(".")), dict.fromkeys(PORTS, 0))
    return {f"{ENV_PREFIX}{section.upper()}__{key.upper()}" for section, values in stack_fields.items() for key in values}


def service_environment(environ: dict[str, str], config_path: Path) -> dict[str, str]:
    """The services' environment: MINDSTREAM_CONFIG -> the generated file, and no MINDSTREAM_*
    variable that would override an address the stack chose (the file is the one truth for them)."""
    overriding = pinned_variables()
    env = {k: v for k, v in environ.items() if k not in overriding}
    env[f"{ENV_PREFIX}CONFIG"] = str(config_path)
    env["PYTHONUNBUFFERED"] = "1"  # logs as they happen
    return loopback_unproxied(env)  # the services reach each other on loopback: not through an exported proxy


@dataclasses.dataclass
class ServiceState:
    name: str
    state: str  # running | not ready | exited | stopped
    pid: int | None
    address: str
    log: str
    note: str = ""  # why a stopped service cannot start yet


class Stack:
    def __init__(self, root: Path = DEFAULT_STACK_DIR, environ: dict[str, str] | None = None, out=print):
        self.layout = StackLayout(Path(root).resolve())
        self.environ = dict(os.environ if environ is None else environ)
        named = self.environ.get(f"{ENV_PREFIX}CONFIG")
        if named and Path(named).resolve() == self.layout.config_path and not self.layout.config_path.is_file():
            # The shell still exports this stack's file (as `status` suggests) but the stack folder is new or was
            # removed: `up` is what writes that file, so there are no user settings to read from it yet.
            del self.environ[f"{ENV_PREFIX}CONFIG"]
        self.env = service_environment(self.environ, self.layout.config_path)
        self.out = out

    # --- configuration -------------------------------------------------------------------------

    def config(self) -> Config:
        """The generated configuration as the services read it."""
        if not self.layout.config_path.is_file():
            raise StackError(f"no stack configuration at {self.layout.config_path}: run `python -m infra up` first")
        return load_config(self.layout.config_path, environ=self.env)

    def _write_config(self, ports: dict[str, int], milvus_server: MilvusServerKind) -> Config:
        # 0600: it copies the user's settings, passwords and tokens included
        write_text_atomically(self.layout.config_path, generated_config(user_settings(self.environ), self.layout, ports, milvus_server), mode=0o600)
        return self.config()

    def _choose_milvus_server(self, milvus_runs: bool) -> MilvusServerKind:
        """The one that runs, else the one the user's configuration asks for (each keeps its own data)."""
        if milvus_runs:
            return self.config().milvus.embedded_server
        return load_config(environ=self.environ).milvus.embedded_server

    def _choose_ports(self, keep_current: bool) -> dict[str, int]:
        """The ports of the last `up` where still free (or when services still use them), new free ones otherwise."""
        try:
            previous = ports_of(self.config()) if self.layout.config_path.is_file() else {}
        except ConfigError as exc:  # written by an older version of this code (a key since dropped), or edited by hand
            if keep_current:
                raise StackError(f"{self.layout.config_path} no longer reads ({exc}) while services run: "
                                 "run `python -m infra down`, then `up`") from None
            previous = {}  # nothing runs: new ports, and the file is written anew
        if keep_current:
            if not previous:
                raise StackError(f"services run but {self.layout.config_path} is gone: run `python -m infra down`, then `up`")
            return previous
        chosen: dict[str, int] = {}
        for key in PORTS:
            port = previous.get(key)
            if not port or port in chosen.values() or port_open("127.0.0.1", port):
                port = free_port()
                while port in chosen.values():
                    port = free_port()
            chosen[key] = port
        return chosen

    # --- processes -----------------------------------------------------------------------------

    def process(self, name: str, config: Config) -> ManagedProcess:
        layout, ports = self.layout, ports_of(config)
        if name == "broker":
            return EmbeddedBroker(layout.data(name), ports["broker"], log_path=layout.log(name))
        if name == "redis":
            return EmbeddedRedis(layout.data(name), ports["redis"], log_path=layout.log(name))
        if name == "milvus":
            kind = config.milvus.embedded_server  # each kind keeps its own data folder
            if kind == "server":  # its internal ports (etcd, components) must leave the stack's to the services started after it
                return MilvusServer(layout.data(name) / kind, ports["milvus"], log_path=layout.log(name), reserved=frozenset(ports.values()))
            return MilvusLiteServer(layout.data(name) / kind, ports["milvus"], log_path=layout.log(name))
        if name == "streaming-job":
            # restores window state and offsets from the newest checkpoint of an earlier run, if any
            return StreamingJobProcess(self.env, layout.log(name), f"http://127.0.0.1:{ports['streaming_metrics']}/metrics", restore="latest")
        if name == "recall":
            return RecallServiceProcess(self.env, config.recall, f"127.0.0.1:{ports['recall']}", layout.log(name))
        if name == "exporter":
            return ExporterProcess(self.env, ports["exporter"], layout.log(name))
        if name == "prometheus":
            return PrometheusProcess(layout.prometheus_config_path, layout.data(name), ports["prometheus"], layout.log(name),
                                     config.monitoring.prometheus_home)
        raise ValueError(f"unknown service {name!r}; the services are {', '.join(SERVICES)}")

    def running_pid(self, name: str) -> int | None:
        """The PID in the service's PID file if that process still runs (and is not a later one with a
        recycled PID: told by its start stamp, or where there is none by its start time against the file's)."""
        pid_file = self.layout.pid_file(name)
        try:
            pid, *stamp = pid_file.read_text().split()
            pid = int(pid)
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE:
                return None
            if stamp:
                return pid if start_stamp(pid) == stamp[0] else None
            return None if process.create_time() > pid_file.stat().st_mtime + PID_SLACK_S else pid
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
            return None

    def _write_pid(self, name: str, pid: int) -> None:
        # a truncated PID file would lose track of the service
        write_text_atomically(self.layout.pid_file(name), f"{pid} {start_stamp(pid) or ''}".rstrip() + "\n")

    def skip_reason(self, name: str, config: Config) -> str | None:
        """Why a service cannot start now (None: it can)."""
        if name == "streaming-job":
            if ModelRegistry(config.paths.models_dir).current_version() is None:
                return ("waits for a model: publish one with `MINDSTREAM_CONFIG=" f"{self.layout.config_path} python -m model_export publish "
                        "--export-dir DIR`, then run `python -m infra up` again")
        if name == "prometheus":
            if prometheus_tool("prometheus", config.monitoring.prometheus_home) is None:
                return "not installed: run infra/install_prometheus.sh (infra/bootstrap.sh does), then `python -m infra up` again"
        return None

    # --- commands ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self):
        """Holds the stack folder's lock: two `up`s would pick the same ports and start every service
        twice, and a `down` beside an `up` would stop what that one is starting."""
        self.layout.root.mkdir(parents=True, exist_ok=True)
        with open(self.layout.lock_path, "a") as lock:  # closing it lets go of the lock, whatever ends the command
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.out(f"another `python -m infra up` or `down` is running in {self.layout.root}: waiting for it to finish ...")
                fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def up(self, skip: tuple[str, ...] = ()) -> int:
        """Starts what is not running and waits for it to be ready."""
        with self._exclusive():
            return self._up(skip)

    def _up(self, skip: tuple[str, ...]) -> int:
        started_at = time.monotonic()
        wanted = [name for name in SERVICES if name not in skip]
        running = {name: self.running_pid(name) for name in SERVICES}
        if all(running[name] for name in wanted):
            self.out(f"the stack is already running ({self.layout.root}); `python -m infra status` shows it")
            return 0
        keep_current = any(running.values())
        try:
            user_config = load_config(environ=self.environ)  # the user's settings as they stand: a mistake stops here, before the stack's file is rewritten
        except ConfigError as exc:
            named = config_file(self.environ)
            if named is not None and named.resolve() == self.layout.config_path.resolve():  # the generated file, copied as the user's settings
                raise StackError(f"{exc}\n{self.layout.config_path} is the stack's generated file, which this shell's MINDSTREAM_CONFIG names "
                                 "(written by another version of mindstream, or edited): `python -m infra down`, delete it, then `up`") from None
            raise
        if user_config.recall.tls_cafile and not user_config.recall.tls_certfile:  # the recall section is the user's, not pinned
            raise StackError("[recall].tls_cafile is set (MINDSTREAM_RECALL__TLS_CAFILE or the configuration file) but [recall].tls_certfile "
                             "is not: the stack's recall service would serve plain text while its clients, the readiness probe included, "
                             "speak TLS to it. Unset tls_cafile for the embedded stack, or give the service a certificate (tls_certfile, tls_keyfile)")
        config = self._write_config(self._choose_ports(keep_current), self._choose_milvus_server(milvus_runs=bool(running["milvus"])))
        write_prometheus_config(config, self.layout.prometheus_config_path)
        current = ModelRegistry(config.paths.models_dir).current_version()
        if "milvus" in wanted and not running["milvus"] and current and not (self.layout.data("milvus") / config.milvus.embedded_server).exists():
            self.out(f"note: this Milvus ({config.milvus.embedded_server}) starts empty while the stack's current model is {current}: "
                     f"publish a model again (`MINDSTREAM_CONFIG={self.layout.config_path} python -m model_export publish --export-dir DIR`)")
        starting = [name for name in wanted if not running[name] and not self.skip_reason(name, config)]
        self._refuse_taken_ports(starting, config)
        self.out(f"starting the embedded stack in {self.layout.root} (configuration: {self.layout.config_path})")
        # Two waves: the stores first (the job and the services connect to them at start), then
        # the slow starters together (the job's JVM takes 10-25 s; the others start meanwhile).
        for wave in (("broker", "redis", "milvus"), ("streaming-job", "recall", "exporter", "prometheus")):
            spawned = {}
            for name in wave:
                if name in starting:
                    try:
                        spawned[name] = (self.process(name, config).spawn(), time.monotonic())
                    except OSError as exc:  # a binary that cannot run (no exec permission, gone): one line, not a traceback
                        started = ", ".join(spawned) or "none"
                        raise StackError(f"{name} could not be started: {exc}. Started in this step so far: {started} "
                                         f"(`python -m infra down --stack-dir {shlex.quote(str(self.layout.root))}` stops them); "
                                         "reinstall it (infra/bootstrap.sh), then `python -m infra up` again") from None
                    self._write_pid(name, spawned[name][0].pid)
            for name in wave:
                if name in wanted and name not in spawned:
                    note = f"already running (pid {running[name]})" if running[name] else f"not started: {self.skip_reason(name, config)}"
                    self.out(f"  {name:<14} {note}")
            self._await_all(spawned, config)
            if "broker" in wave and "broker" in wanted:
                self._create_topics(config)
        self.out(f"up in {time.monotonic() - started_at:.1f} s")
        return 0

    def _refuse_taken_ports(self, starting: list[str], config: Config) -> None:
        """A service restarted beside running ones keeps its port; if another process took it meanwhile,
        the port probe would take that process for the service (the service itself exits on bind)."""
        ports = ports_of(config)
        for name in starting:
            for key in SERVICE_PORTS[name]:
                if port_open("127.0.0.1", ports[key]):
                    raise StackError(f"{name} is not running but its port 127.0.0.1:{ports[key]} is taken{listener_of(ports[key])}: stop that "
                                     "process, or `python -m infra down` and `up` again (which picks free ports)")

    def _await_all(self, spawned: dict[str, tuple[ManagedProcess, float]], config: Config) -> None:
        """Waits for the health checks side by side, saying each service's start time as it becomes ready."""
        for name, (process, _) in spawned.items():
            if process.slow_start_note:
                self.out(f"  {name:<14} starting (pid {process.pid}): {process.slow_start_note} ...")
        failures = []
        interrupted = threading.Event()  # Ctrl-C: every wait returns at once (leaving the pool joins them)
        with ThreadPoolExecutor(max_workers=max(1, len(spawned))) as pool:
            waits = {pool.submit(process.wait_ready, abandon=interrupted): name for name, (process, _) in spawned.items()}
            finished = set()
            try:
                for done in as_completed(waits):
                    name = waits[done]
                    process, spawned_at = spawned[name]
                    finished.add(name)
                    try:
                        done.result()
                    except RuntimeError as exc:
                        self.layout.pid_file(name).unlink(missing_ok=True)
                        failures.append(f"{exc}\n{_tail(process.log_path)}")
                        continue
                    self.out(f"  {name:<14} ready in {time.monotonic() - spawned_at:4.1f} s  {self._address(name, config)}  (pid {process.pid})")
            except KeyboardInterrupt:
                interrupted.set()
                starting = ", ".join(name for name in spawned if name not in finished)
                where = shlex.quote(str(self.layout.root))
                raise StackError(f"interrupted; still starting in the background: {starting}. `python -m infra status --stack-dir {where}` "
                                 f"shows them, `python -m infra down --stack-dir {where}` stops the stack") from None
        if failures:
            raise StackError("\n".join(failures) + "\nfix it, then `python -m infra up` starts what is missing (`python -m infra down` stops the rest)")

    def _create_topics(self, config: Config) -> None:
        from kafka.errors import KafkaError

        try:
            created = ensure_configured_topics(config)
        except KafkaError as exc:
            raise StackError(f"the stack's broker did not create the topics {config.kafka.events_topic}, {config.kafka.dead_letter_topic} "
                             f"({exc}); see {self.layout.log('broker')}, fix it, then `python -m infra up` "
                             "again (`python -m infra down` stops what runs)") from None
        if created:
            self.out(f"  {'topics':<14} created {', '.join(created)}")

    def down(self) -> int:
        """Stops every service, in reverse order."""
        if not self.layout.root.is_dir():  # nothing was ever started here: no folder (nor lock) to make
            return self._down()
        with self._exclusive():
            return self._down()

    def _down(self) -> int:
        try:
            config = self.config() if self.layout.config_path.is_file() else self._settings_to_stop_with()
        except ConfigError as exc:  # stopping needs the PIDs, not the settings: never leave a stack running for a bad file
            self.out(f"note: {exc}; stopping the services with the default settings")
            config = self._settings_to_stop_with()
        stopped = 0
        for name in reversed(SERVICES):
            pid = self.stop_service(name, config)
            if pid is not None:
                stopped += 1
            self.layout.pid_file(name).unlink(missing_ok=True)
        self.out(f"stopped {stopped} service(s); data kept in {self.layout.root / 'data'}" if stopped else "the stack is not running")
        return 0

    def _settings_to_stop_with(self) -> Config:
        """The stack's own settings without its ports (their file is gone or does not parse): enough to
        stop each service by the PID in its file."""
        with tempfile.NamedTemporaryFile("w", suffix=".toml") as fh:
            fh.write(generated_config({}, self.layout, dict.fromkeys(PORTS, 0)))
            fh.flush()
            return load_config(fh.name, environ={})

    def stop_service(self, name: str, config: Config | None = None, kill: bool = False) -> int | None:
        """Stops one service (its stop signal, SIGKILL after the grace period; `kill`: SIGKILL at once,
        a crash as far as it can tell); its PID file stays, so `status` says "exited" and the next
        `up` starts it again on its port. Returns the PID stopped, None when it was not running."""
        pid = self.running_pid(name)
        if pid is None:
            return None
        began = time.monotonic()
        process = self.process(name, config or self.config()).adopt(pid)
        if kill:
            process.kill()
        else:
            process.stop()
        self.out(f"  {name:<14} {'killed' if kill else 'stopped'} in {time.monotonic() - began:4.1f} s (pid {pid})")
        return pid

    def rss_bytes(self, config: Config | None = None) -> dict[str, int]:
        """Resident memory of each running service (its whole process tree)."""
        config = config or self.config()
        return {name: self.process(name, config).adopt(pid).rss_bytes() for name in SERVICES if (pid := self.running_pid(name)) is not None}

    def status(self) -> list[ServiceState]:
        config = self.config()
        states = []
        for name in SERVICES:
            pid = self.running_pid(name)
            if pid is not None:
                state = "running" if self.process(name, config).ready() else "not ready"
            elif self.layout.pid_file(name).is_file():
                state = "exited"
            else:
                state = "stopped"
            note = (self.skip_reason(name, config) or "") if state == "stopped" else ""
            states.append(ServiceState(name, state, pid, self._address(name, config), str(self.layout.log(name)), note))
        return states

    @staticmethod
    def _address(name: str, config: Config) -> str:
        ports = ports_of(config)
        return {
            "broker": f"kafka://127.0.0.1:{ports['broker']}",
            "redis": config.redis.uri,
            "milvus": config.milvus.uri,
            "streaming-job": f"http://127.0.0.1:{ports['streaming_metrics']}/metrics",
            "recall": f"grpc://127.0.0.1:{ports['recall']} (metrics http://127.0.0.1:{ports['recall_metrics']}/metrics)",
            "exporter": f"http://127.0.0.1:{ports['exporter']}/metrics",
            "prometheus": f"http://127.0.0.1:{ports['prometheus']}",
        }[name]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"(no log at {path})"
    return f"--- last lines of {path} ---\n" + "\n".join(text)
