"""Flink's Kafka connector jars, fetched at set-up from the only registry that ships them.

The PyPI wheel shigawire-apache-flink-libraries carries flink-connector-kafka (4.0.1-2.0) and
kafka-clients (3.9.1). It is downloaded without being installed: installing it would drop
Flink 2.0.0 jars beside PyFlink's 2.0.2 flink-dist and break job submission. Only the two jars
are extracted, into var/jars.
"""

from __future__ import annotations

import sys
from pathlib import Path

from infra.wheels import WheelError, extract_from_wheel

WHEEL = "shigawire-apache-flink-libraries==2.0.0.post1"
JARS = ("flink-connector-kafka.jar", "kafka-clients.jar")
MEMBER_DIR = "pyflink/lib/"


def kafka_connector_jars(jars_dir: Path) -> list[Path]:
    """The connector jars in jars_dir, downloading them first if they are not there yet."""
    jars_dir = Path(jars_dir)
    paths = [jars_dir / name for name in JARS]
    if all(p.is_file() for p in paths):
        return paths
    print(f"fetching Flink's Kafka connector jars ({WHEEL} from PyPI, ~90 MB) into {jars_dir} ...", file=sys.stderr, flush=True)
    try:
        extract_from_wheel(WHEEL, {MEMBER_DIR + p.name: p for p in paths})
    except WheelError as exc:
        raise WheelError(f"{exc}; check access to PyPI, or put {', '.join(JARS)} into {jars_dir}") from None
    return paths
