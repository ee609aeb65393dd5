"""The flags of the load that `python -m infra faults`, `python -m infra soak` and
`python -m model_export refresh-bench` put on the stack (infra/harness.py runs it).

Apart from the harness so that building a command's parser imports only the configuration:
`python -m model_export --help` must start where only the model's packages are installed (a GPU
training machine has no broker, Redis or Milvus binaries).
"""

from __future__ import annotations

import typing
from pathlib import Path

from infra.cli import at_least
from infra.config import REPO_ROOT, MilvusConfig, MilvusServerKind


def add_load_arguments(p, start_note: str = "", export_note: str = "the main command's, under [paths].artifacts_dir", **defaults) -> None:
    """Adds the load flags (the module docstring names the commands) to parser `p`, with the command's
    own defaults (`defaults`, by destination name) written into their help; `start_note` says what a
    --start the command takes specially means, `export_note` which export a --export-dir left out is."""
    value = {"export_dir": None, "start": 0, "rate": 500.0, "qps": 50.0, "clients": 4, "deadline_ms": 1000.0, "window_length": None,
             "per_interest_n": 0, "poll_s": 0.25, "drain_timeout_s": 120.0, "work_dir": REPO_ROOT / "var" / "faults",
             "milvus": MilvusConfig.embedded_server, **defaults}
    # Each help states its default; "%(default).0s" (an empty string) keeps ArgumentDefaultsHelpFormatter
    # from adding a "(default: None)" where the help says in words what None means
    export = value["export_dir"] or export_note
    window = value["window_length"] or "the configuration's [streaming].window_length"
    p.add_argument("--export-dir", type=Path, default=value["export_dir"], help=f"the trained export to publish into the stack (default: {export}%(default).0s)")
    p.add_argument("--dataset", default="ml-1m", help="the events to replay: ml-1m, beauty or a file (as python -m streaming produce); each "
                   "(user, item) once (default: %(default)s)")
    p.add_argument("--start", type=at_least(-1 if start_note else 0), default=value["start"], help=f"index of the first replayed event (default: %(default)s{start_note})")
    p.add_argument("--rate", type=at_least(0.001, float), default=value["rate"], help="events per second sent to the broker (default: %(default)s)")
    p.add_argument("--qps", type=at_least(0.001, float), default=value["qps"], help="Recall calls per second, all clients together, open loop (default: %(default)s)")
    p.add_argument("--clients", type=at_least(1), default=value["clients"], help="gRPC clients, one channel each (default: %(default)s)")
    p.add_argument("--deadline-ms", type=at_least(1, float), default=value["deadline_ms"], help="deadline of each Recall call (default: %(default)s)")
    p.add_argument("--window-length", type=at_least(1), default=value["window_length"],
                   help=f"behaviours kept per user by the stack's job (default: {window}%(default).0s); a window longer than any "
                        "user's events in the run keeps every acked event checkable in the store")
    p.add_argument("--per-interest-n", type=at_least(0), default=value["per_interest_n"],
                   help="candidates per interest asked for in each Recall (0: the service's default, n + the window's items): "
                        "fixes the search cost whatever the window length (default: %(default)s)")
    p.add_argument("--poll-s", type=at_least(0.01, float), default=value["poll_s"],
                   help="how often the stored windows of unseen events are read, the resolution of ack->store times (default: %(default)s)")
    p.add_argument("--drain-timeout-s", type=at_least(0, float), default=value["drain_timeout_s"],
                   help="at the end: how long to wait for every acked event to reach the store (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=value["work_dir"], help="the reports, and the stack's folder <work-dir>/<command>/stack (wiped at start) (default: %(default)s)")
    p.add_argument("--milvus", choices=typing.get_args(MilvusServerKind), default=value["milvus"],
                   help="the stack's Milvus: lite (Milvus Lite) or server (the standalone Milvus 2.3.5 binary: searches in parallel, "
                        "for recall loads beyond Milvus Lite's ~10 calls/s) (default: %(default)s)")
