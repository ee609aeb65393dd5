"""The flags of the load that `python -m infra faults`, `python -m infra soak` and
`python -m model_export refresh-bench` put on the stack (infra/harness.py runs it).

Apart from the harness so that building a command's parser imports only the configuration:
`python -m model_export --help` must start where only the model's packages are installed (a GPU
training machine has no broker, Redis or Milvus binaries).
"""

from __future__ import annotations

import typing
from pathlib import Path

from infra.config import REPO_ROOT, MilvusConfig, MilvusServerKind


def add_load_arguments(p) -> None:
    """Adds the load flags (the module docstring names the commands) to parser `p`."""
    p.add_argument("--export-dir", type=Path, default=None, help="the trained export to publish into the stack (default: the main command's, under [paths].artifacts_dir)")
    p.add_argument("--dataset", default="ml-1m", help="the events to replay: ml-1m, beauty or a file (as python -m streaming produce); each (user, item) once")
    p.add_argument("--start", type=int, default=0, help="index of the first replayed event")
    p.add_argument("--rate", type=float, default=500.0, help="events per second sent to the broker")
    p.add_argument("--qps", type=float, default=50.0, help="Recall calls per second, all clients together (open loop)")
    p.add_argument("--clients", type=int, default=4, help="gRPC clients, one channel each")
    p.add_argument("--deadline-ms", type=float, default=1000.0, help="deadline of each Recall call")
    p.add_argument("--window-length", type=int, default=None,
                   help="behaviours kept per user by the stack's job (default: the configuration's); a window longer than any "
                        "user's events in the run keeps every acked event checkable in the store")
    p.add_argument("--per-interest-n", type=int, default=0,
                   help="candidates per interest asked for in each Recall (0: the service's default, n + the window's items): "
                        "fixes the search cost whatever the window length")
    p.add_argument("--poll-s", type=float, default=0.25, help="how often the stored windows of unseen events are read (the resolution of ack->store times)")
    p.add_argument("--drain-timeout-s", type=float, default=120.0, help="at the end: how long to wait for every acked event to reach the store")
    p.add_argument("--work-dir", type=Path, default=REPO_ROOT / "var" / "faults", help="the stack's folder (wiped at start) and the reports")
    p.add_argument("--milvus", choices=typing.get_args(MilvusServerKind), default=MilvusConfig.embedded_server,
                   help="the stack's Milvus: lite (the embedded default) or server (the standalone Milvus 2.3.5 binary: "
                        "searches in parallel, for recall loads beyond Milvus Lite's ~10 calls/s)")
