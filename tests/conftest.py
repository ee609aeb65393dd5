import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def synthetic_interactions(n_users: int = 120, n_items: int = 60, seed: int = 0) -> pd.DataFrame:
    """A small CSV-shaped table with clustered tastes, item genres and a user profile field."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        tastes = rng.choice(4, size=2, replace=False)  # each user likes two of four item clusters
        length = int(rng.integers(6, 25))
        for t in range(length):
            cluster = tastes[t % 2]
            item = int(cluster * (n_items // 4) + rng.integers(0, n_items // 4))
            rows.append({"user": f"u{u}", "item": f"i{item}", "timestamp": 1_000 * t + u, "item_genre": f"g{cluster}|gx", "user_gender": "MF"[u % 2]})
    return pd.DataFrame(rows)


@pytest.fixture
def synthetic_csv(tmp_path) -> Path:
    path = tmp_path / "interactions.csv"
    synthetic_interactions().to_csv(path, index=False)
    return path


@pytest.fixture(scope="session")
def two_exports(tmp_path_factory) -> list[Path]:
    """Two exports (two model versions) of a small MIND trained for one epoch on the synthetic CSV."""
    root = tmp_path_factory.mktemp("exports")
    csv = root / "interactions.csv"
    synthetic_interactions().to_csv(csv, index=False)
    exports = []
    for seed in ("1", "2"):
        run = root / f"run{seed}"
        for args in (
            ["train", "--dataset", str(csv), "--model", "mind", "--out", str(run), "--epochs", "1", "--seed", seed, "--quiet"],
            ["export", "--model-dir", str(run), "--dataset", str(csv)],
        ):
            subprocess.run([sys.executable, "-m", "model_export", *args], cwd=REPO, check=True, capture_output=True)
        exports.append(run / "export")
    return exports
