"""The README's main command, `infra/run.sh`, end to end on a user-brought CSV (small, so it takes
about a minute): set-up, train, evaluate, export, bench, the whole embedded stack, publish, a replay
through Kafka and the PyFlink job, recalls from the stored interests, and the online hit rate of
the next events (each of their users served first, the exporter judging). Run from another folder
with relative paths, as a user would; its own run and stack folders; the stack is stopped after."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, synthetic_interactions


@pytest.fixture
def stack_dir(tmp_path):
    stack = tmp_path / "stack"
    yield stack
    subprocess.run([sys.executable, "-m", "infra", "down", "--stack-dir", str(stack)], cwd=REPO, capture_output=True, timeout=180)


@pytest.mark.slow
def test_the_main_command_runs_end_to_end_on_a_user_brought_dataset(tmp_path, stack_dir):
    synthetic_interactions().to_csv(tmp_path / "shop.csv", index=False)
    (tmp_path / "mine.toml").write_text("[retrain]\nepochs = 3\n")  # a user's own configuration, named relative to their folder
    stack_dir.mkdir()
    (stack_dir / "replay-shop.next").write_text("")  # left empty by an earlier replay that was interrupted
    env = {**os.environ, "DATASET": "shop.csv", "EVENTS": "1500", "ONLINE_EVENTS": "300", "RUN": "runs/shop", "STACK_DIR": "stack", "MINDSTREAM_CONFIG": "mine.toml",
           # a shell set up for another deployment: the stack's steps must not go there
           "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": "production-kafka.invalid:9092", "MINDSTREAM_MILVUS__URI": "http://production-milvus.invalid:19530"}
    result = subprocess.run([str(REPO / "infra" / "run.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "note: MINDSTREAM_MILVUS__URI is set in this shell; the stack's own value is used instead" in result.stderr
    assert (tmp_path / "runs" / "shop" / "export" / "manifest.json").is_file()
    assert (stack_dir / "replay-shop.next").read_text().strip() == "1800"  # the replay, then the online slice
    # Recalls printed for the busiest users of the replay, from interests the job stored with the published model
    exported = re.search(r'"model_version": "(shop-mind_remi-[^"]+)"', result.stdout + result.stderr)
    assert exported, "no exported model version in the output"
    answers = re.findall(r"model (\S+), from stored interests", result.stdout)
    assert answers and set(answers) == {exported.group(1)}
    assert len(re.findall(r"^\s+\d+\. \S+\s+interest\s+\d+\s+score", result.stdout, flags=re.M)) >= 10
    # The online slice: its 300 events judged against the answers served just before, by path
    judged = re.findall(r"^  (\w+): ([\d,]+) of ([\d,]+) events named a served item \(hit rate (\S+)\)$", result.stderr, flags=re.M)
    assert judged and "stored_interests" in {path for path, *_ in judged}, result.stderr[-3000:]
    unjudged = re.search(r"^  ([\d,]+) events unjudged", result.stderr, flags=re.M)
    assert sum(int(total.replace(",", "")) for _, _, total, _ in judged) + (int(unjudged.group(1).replace(",", "")) if unjudged else 0) == 300
    status = subprocess.run([sys.executable, "-m", "infra", "status", "--stack-dir", str(stack_dir), "--json"], cwd=REPO, capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
