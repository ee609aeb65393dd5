"""The end of the main command: after a replay, ask the recall service for a few replayed users and
print what they watched and what was recalled for them, with the interest that found each item
(`python -m infra demo`). For MovieLens-1M the raw item ids are the movie titles.

It first waits until the streaming job has committed every replayed event (consumer lag 0, as
the stack's exporter computes it), so the answers come from the interests of the whole replay.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from infra.config import Config


def busiest_users(events, count: int) -> list[tuple[str, list[str]]]:
    """The `count` users with the most replayed events, each with the items they had, oldest first."""
    history: dict[str, list[str]] = {}
    for event in events:
        history.setdefault(event.user_id, []).append(event.item_id)
    ranked = sorted(history.items(), key=lambda pair: (-len(pair[1]), pair[0]))
    return ranked[:count]


def wait_for_the_job(config: Config, timeout_s: float, say) -> bool:
    """Waits until the job's consumer group has committed everything in the events topic."""
    from infra.exporter import StackCollector

    collector = StackCollector(config)
    deadline, last = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            lag = sum(collector.consumer_lag().values())
            if lag == 0:
                say("  the streaming job has applied every event (consumer lag 0)")
                return True
            if lag != last:
                say(f"  waiting for the streaming job: {lag:,} events not committed yet (commits follow checkpoints)")
                last = lag
            time.sleep(1.0)
    finally:
        collector.close()
    say(f"  the job is still behind after {timeout_s:.0f} s; recalling anyway (older interests or a fallback)")
    return False


def recall(config: Config, user_id: str, n: int):
    from recall_service.channel import recall_channel
    from recall_service.stubs import recall_pb2, recall_pb2_grpc

    with recall_channel(config.recall) as channel:
        response = recall_pb2_grpc.RecallServiceStub(channel).Recall(recall_pb2.RecallRequest(user_id=user_id, n=n), timeout=5.0)
    return response, recall_pb2.RecallPath.Name(response.path), recall_pb2.FallbackReason.Name(response.fallback_reason)


def run_demo(config: Config, dataset: str, start: int, limit: int, users: int, n: int, wait_s: float) -> int:
    from streaming.producer import ReplayEvents

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    say(f"==> recalls for the {users} busiest users of the replay ({dataset}, events {start:,}-{start + limit:,})")
    replayed = ReplayEvents.from_dataset(dataset, config.paths.data_dir, config.paths.shared_data_dir)
    chosen = busiest_users(replayed.events(start, start + limit), users)
    wait_for_the_job(config, wait_s, say)
    for user_id, items in chosen:
        response, path, reason = recall(config, user_id, n)
        print(f"\nuser {user_id}: {len(items)} events in this replay; the last 5: " + "; ".join(items[-5:]))
        found = "from stored interests" if path == "RECALL_PATH_STORED_INTERESTS" else f"{path} ({reason})"
        per_interest = Counter(item.interest_index for item in response.items)
        print(f"  model {response.model_version}, {found}; items per interest: "
              + ", ".join(f"#{i}: {c}" for i, c in sorted(per_interest.items())))
        for rank, item in enumerate(response.items, 1):
            print(f"  {rank:2d}. {item.item_id:<60.60} interest {item.interest_index:2d}  score {item.score:7.3f}")
    return 0
