"""Server processes of the embedded stack: each started detached in its own process group, its
output appended to a log file, ready when its health probe says so, stopped by PID.

Its own process group (a new session), because a service may be a tree of processes (the
streaming job is a Python client plus the JVM it launches): signalling the group reaches all of
them, and the group outlives the command that started it (`python -m infra up` returns while the
services keep running).

A ManagedProcess is either started here (tests and benchmarks hold it and stop it; the supervisor
also writes its PID to a file) or adopted from that PID by a later command (`python -m infra down`).
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import psutil

from infra.config import REPO_ROOT


# Ports for servers are drawn below the kernel's ephemeral range: a port the kernel hands out for
# bind(0) is also what it hands to outgoing connections, and one of those (a Kafka client, a
# Prometheus scrape) could take it between the pick and the server's bind ("Address already in use").
LOWEST_SERVER_PORT = 10_000
_port_picker = random.Random()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def bind_loopback(port: int, reuse_address: bool = False) -> socket.socket | None:
    """A socket bound to 127.0.0.1:port and listening (the caller closes it), None when the port is
    taken: the one free-port probe. reuse_address: bind as servers that set SO_REUSEADDR do (Milvus),
    which may take a port whose last connections are still in TIME_WAIT; without it such a port
    counts as taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_address:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        return sock
    except OSError:
        sock.close()
        return None


def port_free(port: int) -> bool:
    probe = bind_loopback(port)
    if probe is None:
        return False
    probe.close()
    return True


def free_port() -> int:
    """A port nobody listens on, outside the ephemeral range when the host leaves room below it."""
    low, _ = _ephemeral_range()
    if low - LOWEST_SERVER_PORT >= 1_000:
        for _ in range(100):
            port = _port_picker.randrange(LOWEST_SERVER_PORT, low)
            if port_free(port):
                return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(host: str, port: int, timeout_s: float = 0.2) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def listener_of(port: int) -> str:
    """' by <name> (pid N)' for the process listening on a local TCP port, '' when it cannot be told."""
    try:
        for connection in psutil.net_connections(kind="tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr and connection.laddr.port == port and connection.pid:
                return f" by {psutil.Process(connection.pid).name()} (pid {connection.pid})"
    except (psutil.Error, OSError):
        pass
    return ""


def start_stamp(pid: int) -> str | None:
    """Which process `pid` is, independent of the wall clock: this boot's id and the process's start
    time in clock ticks since boot (/proc/<pid>/stat field 22). psutil's create_time follows the wall
    clock, so a clock step (NTP, a VM resumed) made every running service look like another process.
    None where /proc is not there (not Linux)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        after_name = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # the name may hold spaces and ")"
        return f"{boot}/{after_name[19]}"  # after the name: field 3 (state) is index 0, field 22 index 19
    except (OSError, IndexError):
        return None


# The stack's probes and readers of its own services ask loopback addresses, never through a proxy:
# urllib (and gRPC) send 127.0.0.1 to an exported http_proxy unless no_proxy names it.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
PROXY_VARIABLES = ("http_proxy", "https_proxy", "grpc_proxy", "all_proxy")


def open_direct(url: str, timeout_s: float):
    """urllib's urlopen without any proxy."""
    return _DIRECT.open(url, timeout=timeout_s)


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with open_direct(url, timeout_s) as response:
            return response.status == 200
    except OSError:
        return False


def loopback_unproxied(environ: dict[str, str]) -> dict[str, str]:
    """`environ` for a service of the stack: where a proxy is set, no_proxy (both spellings, which
    urllib, requests and gRPC read) also names the loopback hosts, so the services reach each other
    directly."""
    if not any(environ.get(name) or environ.get(name.upper()) for name in PROXY_VARIABLES):
        return dict(environ)
    listed = [host for name in ("no_proxy", "NO_PROXY") for host in environ.get(name, "").split(",") if host.strip()]
    no_proxy = ",".join(dict.fromkeys([*listed, *LOOPBACK_HOSTS]))
    return {**environ, "no_proxy": no_proxy, "NO_PROXY": no_proxy}


class SigtermAsInterrupt:
    """While held, SIGTERM (what `timeout`, `kill` and a cancelled CI job send) raises
    KeyboardInterrupt in the main thread, as Ctrl-C does: a command holding detached servers (their
    own sessions outlive it) then stops them on its way out instead of dying with them running.
    Nested holds share one handler; the last release restores the one before. Elsewhere than in the
    main thread (no signal handler can be set there) it does nothing."""

    _depth = 0
    _previous = None

    @classmethod
    def hold(cls) -> None:
        if threading.current_thread() is threading.main_thread():
            if cls._depth == 0:
                cls._previous = signal.signal(signal.SIGTERM, _interrupt)
            cls._depth += 1

    @classmethod
    def release(cls) -> None:
        if threading.current_thread() is threading.main_thread():
            cls._depth -= 1
            if cls._depth == 0:
                signal.signal(signal.SIGTERM, cls._previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count: in a container nobody
    may reap an orphaned leader)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ManagedProcess:
    """One service process. Subclasses say what to run (`command`) and when it is ready (`ready`)."""

    name = "process"
    stop_signal = signal.SIGTERM  # the service's clean shutdown
    stop_grace_s = 10.0  # then SIGKILL to the whole group
    start_timeout_s = 30.0
    slow_start_note = ""  # said while waiting for a service that takes long to be ready

    def __init__(self, log_path: Path, env: dict[str, str] | None = None, cwd: Path | None = None):
        self.log_path, self.env, self.cwd = Path(log_path), env, cwd
        self.process: subprocess.Popen | None = None
        self.pid: int | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """A quick health probe (no waiting): True once the service answers."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Runs before the start: folders, generated files."""

    def spawn(self) -> "ManagedProcess":
        """Starts the process without waiting for it to be ready (see wait_ready)."""
        self.prepare()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # A process started from a background job of a non-interactive shell inherits SIGINT ignored:
        # a server whose stop signal it is (Milvus, the broker) would then sit out the grace period
        # and be killed. The child gets the default back (only then: preexec_fn is a fork hook).
        inherited_ignore = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command(), cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT, start_new_session=True,
                                            preexec_fn=_default_sigint if inherited_ignore else None)
        self.pid = self.process.pid
        return self

    def wait_ready(self, timeout_s: float | None = None, abandon: threading.Event | None = None) -> "ManagedProcess":
        """Waits for the health probe; a process that exits or stays unready is stopped, and the
        error names its log. `abandon` set (the user pressed Ctrl-C): returns at once and leaves the
        process starting."""
        timeout_s = self.start_timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        while abandon is None or not abandon.is_set():
            # alive first: a server that exited on its bind must not pass for ready because another process holds the port
            if not self.alive():
                code = self.process.returncode if self.process is not None else "?"
                self.stop()
                raise RuntimeError(f"{self.name} exited with {code}; see {self.log_path}")
            if self.ready():
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name} was not ready within {timeout_s:.0f} s; see {self.log_path}")
            time.sleep(0.1)
        return self

    def start(self, timeout_s: float | None = None) -> "ManagedProcess":
        return self.spawn().wait_ready(timeout_s)

    def adopt(self, pid: int) -> "ManagedProcess":
        """Takes charge of a process started by an earlier command (its PID from a PID file)."""
        self.process, self.pid = None, pid
        return self

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        if self.pid is None:
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def rss_bytes(self) -> int:
        """Resident memory of the service: its process and everything it started (the streaming job:
        the Python client, its JVM and the Python embedded in it); 0 when it does not run."""
        if not self.alive():
            return 0
        try:
            root = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.NoSuchProcess:
            return 0

    def stop(self, grace_s: float | None = None) -> None:
        """The service's stop signal to its group, then SIGKILL to whatever is left after the grace period."""
        self._signal_group(self.stop_signal, self.stop_grace_s if grace_s is None else grace_s)

    def kill(self) -> None:
        """SIGKILL to the whole group: a crash, as far as the service can tell."""
        self._signal_group(signal.SIGKILL, 10.0)

    def _signal_group(self, sig: int, grace_s: float) -> None:
        if self.pid is None:
            return
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass
        if not self._wait_gone(grace_s):
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._wait_gone(10.0)
        self.process, self.pid = None, None

    def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process is not None:
                self.process.poll()  # reaps our own child, so it does not linger as a zombie
            if not _group_alive(self.pid):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def __enter__(self):
        SigtermAsInterrupt.hold()
        try:
            return self.start()
        except BaseException:  # Ctrl-C or SIGTERM while it starts too: the with block's __exit__ will not run
            self.__exit__()
            raise

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            SigtermAsInterrupt.release()


class PythonModuleProcess(ManagedProcess):
    """`python -m <module> <arguments>` of this repository, with this interpreter (the venv's)."""

    module_args: tuple[str, ...] = ()

    def __init__(self, log_path: Path, env: dict[str, str] | None = None):
        super().__init__(log_path, env=env, cwd=REPO_ROOT)

    def command(self) -> list[str]:
        return [sys.executable, "-m", *self.module_args]
