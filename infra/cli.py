"""How every `python -m <package>` command ends when it fails: a failure the user can act on (a
setting, a missing file or model, a server that is not reachable) is one line on stderr that says
what to do next, exit 2; anything else is a bug and keeps its traceback.

The project's own kinds derive from `UserError`. The client libraries' connection errors are
matched only when their module is already loaded (an exception of a library never imported cannot
occur), so a command that does not use Kafka, Redis or Milvus does not import them here.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable


class UserError(Exception):
    """A failure the user can act on; the message says what to do next. Each package's own kinds
    (a bad setting, dataset, manifest, run folder or registry, a stack or server that cannot start)
    derive from it, so every command reports them in one line."""


def at_least(low: float, kind: Callable[[str], float] = int, at_most: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite number >= low (and <= at_most, e.g. the range of the protobuf field it
    goes to), else the usual one-line usage error (exit 2) naming the flag (a negative start or rate is
    refused where it is parsed, not taken for another meaning later)."""

    def parse(text: str) -> float:
        value = kind(text)  # a ValueError: argparse's "invalid int value"
        if not value >= low:  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text} is below {low}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"{text} is above {at_most}")
        if value == float("inf"):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" messages
    return parse


def comma_list(item: Callable[[str], object] = str, choices: tuple[str, ...] = ()) -> Callable[[str], list]:
    """An argparse type: "a,b,c" -> [item(a), item(b), item(c)], at least one, each of `choices` when
    given (a typo is refused where it is parsed, not run as something else and labelled with it)."""

    def parse(text: str) -> list:
        parts = [part.strip() for part in text.split(",") if part.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{text!r} names nothing: give a comma-separated list")
        wrong = [part for part in parts if choices and part not in choices]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(wrong)}: expected any of {', '.join(choices)}")
        return [item(part) for part in parts]  # item's ArgumentTypeError / ValueError: argparse's usage error

    parse.__name__ = "comma-separated list"
    return parse


def _loaded(module: str, *names: str) -> tuple[type, ...]:
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name)) if loaded else ()


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on; None for anything else."""
    if isinstance(exc, UserError):
        return str(exc)
    if isinstance(exc, _loaded("redis.exceptions", "AuthenticationError", "AuthenticationWrongNumberOfArgsError")):
        return f"Redis refused the credentials ({exc}): set [redis].password (MINDSTREAM_REDIS__PASSWORD) to the server's"
    if isinstance(exc, _loaded("kafka.errors", "KafkaTimeoutError", "NoBrokersAvailable")):
        return _unreachable("the Kafka brokers", exc, "[kafka].bootstrap_servers")
    # RedisClusterException: no node of the cluster answered the start (redis-py raises it, not ConnectionError)
    if isinstance(exc, _loaded("redis.exceptions", "ConnectionError", "TimeoutError", "RedisClusterException")):
        return _unreachable("Redis", exc, "[redis].uri")
    if isinstance(exc, _loaded("pymilvus.exceptions", "MilvusException")) and "connect" in str(exc).lower():
        return _unreachable("Milvus", exc, "[milvus].uri")
    grpc = sys.modules.get("grpc")  # a client of the recall service (the demo, `recall_service recall`) whose call found no server
    if grpc is not None and isinstance(exc, grpc.RpcError) and hasattr(exc, "code") and exc.code() in (
            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return _unreachable("the recall service", f"{exc.code().name}: {exc.details()}", "[recall].host / port")
    return None


def _unreachable(server: str, exc: BaseException | str, setting: str) -> str:
    return (f"no answer from {server} ({exc}): start the embedded stack (python -m infra up, and export the MINDSTREAM_CONFIG "
            f"it prints), or set {setting} to yours (python -m infra config shows the settings in effect)")


def run_command(func: Callable[..., int], args) -> int:
    """Runs a subcommand and returns its exit status."""
    try:
        return func(args)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
