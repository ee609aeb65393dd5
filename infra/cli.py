"""How every `python -m <package>` command ends when it fails: a failure the user can act on (a
setting, a missing file or model, a server that is not reachable) is one line on stderr that says
what to do next, exit 2; anything else is a bug and keeps its traceback.

The error types of the client libraries are matched only when their module is already loaded (an
exception of a library never imported cannot occur), so a command that does not use Kafka, Redis or
gRPC does not import them here.
"""

from __future__ import annotations

import sys
from typing import Callable



def _loaded(module: str, *names: str) -> tuple[type, ...]:
    loaded = sys.modules.get(module)
    return tuple(getattr(loaded, name) for name in names if hasattr(loaded, name)) if loaded else ()


def user_error(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on; None for anything else."""
    from infra.config import ConfigError

    known = (ConfigError, *_loaded("model_export.data", "DatasetError"), *_loaded("model_export.manifest", "ManifestError"),
             *_loaded("model_export.registry", "RegistryError"), *_loaded("model_export.train", "RunDirError"),
             *_loaded("infra.stack", "StackError"), *_loaded("infra.harness", "HarnessError"),
             *_loaded("recall_service.server", "ServeError"))
    if isinstance(exc, known):
        return str(exc)
    if isinstance(exc, _loaded("kafka.errors", "KafkaTimeoutError", "NoBrokersAvailable")):
        return _unreachable("the Kafka brokers", exc, "[kafka].bootstrap_servers")
    if isinstance(exc, _loaded("redis.exceptions", "ConnectionError", "TimeoutError", "AuthenticationError")):
        return _unreachable("Redis", exc, "[redis].uri")
    if isinstance(exc, _loaded("pymilvus.exceptions", "MilvusException")) and "connect" in str(exc).lower():
        return _unreachable("Milvus", exc, "[milvus].uri")
    return None


def _unreachable(server: str, exc: BaseException, setting: str) -> str:
    return (f"cannot reach {server} ({exc}): start the embedded stack (python -m infra up, and export the MINDSTREAM_CONFIG "
            f"it prints), or set {setting} to yours (python -m infra config shows the settings in effect)")


def run_command(func: Callable[..., int], args, also: tuple[type[BaseException], ...] = ()) -> int:
    """Runs a subcommand; `also`: further exception types the package reports as one line."""
    try:
        return func(args)
    except Exception as exc:
        message = user_error(exc) or (str(exc) if isinstance(exc, also) else None)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
