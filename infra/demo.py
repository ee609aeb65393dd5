"""The end of the main command: after a replay, ask the recall service for a few replayed users and
print what they watched and what was recalled for them, with the interest that found each item
(`python -m infra demo`). For MovieLens-1M the raw item ids are the movie titles. Then measure the
online hit rate on the next events (`python -m infra online-replay`): serve every user of the next
slice of the dataset once, replay the slice, and read how many of its events named an item that
had been served to their user, as the exporter's judge counted them (recall_service/online_quality.py).

Both first wait until the streaming job has committed every replayed event (consumer lag 0, as
the stack's exporter computes it), so the answers come from the interests of the whole replay.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, defaultdict

from infra.cli import UserError
from infra.config import Config
from infra.process import open_direct

# Users per BatchRecall of the online replay: a batch is one Milvus search, and the embedded Milvus
# Lite (a pure-Python engine) materialises every hit's whole row, ~65 us each (measured on a 2-core
# AMD EPYC). A user asks each of its 4 interests for n + the items it leaves out (its window and seen
# set, up to 178 here), so a busy user costs up to ~60 ms: 8 per batch came within reach of the
# search's 500 ms cap ([recall].vector_search_timeout_ms) and fell back to popular items under load.
SERVE_BATCH = 2
SERVE_ATTEMPTS = 3  # a batch that fell back for a failed vector search is served again, at most this often


def busiest_users(events, count: int) -> list[tuple[str, list[str]]]:
    """The `count` users with the most replayed events, each with the items they had, oldest first."""
    history: dict[str, list[str]] = {}
    for event in events:
        history.setdefault(event.user_id, []).append(event.item_id)
    ranked = sorted(history.items(), key=lambda pair: (-len(pair[1]), pair[0]))
    return ranked[:count]


def wait_for_the_job(config: Config, timeout_s: float, say) -> bool:
    """Waits until the job's consumer group has committed everything in the events topic."""
    caught_up = wait_for_group(config, config.streaming.consumer_group, timeout_s, say)
    say("  the streaming job has applied every event (consumer lag 0)" if caught_up else
        f"  the job is still behind after {timeout_s:.0f} s; recalling anyway (older interests or a fallback)")
    return caught_up


def wait_for_group(config: Config, group: str, timeout_s: float, say=lambda line: None) -> bool:
    """Waits until `group` has committed everything in the events topic; False after timeout_s."""
    from infra.exporter import StackCollector

    collector = StackCollector(config)
    deadline, last = time.monotonic() + timeout_s, None
    try:
        while time.monotonic() < deadline:
            lag = sum(collector.consumer_lag(group).values())
            if lag == 0:
                return True
            if lag != last:
                say(f"  waiting for {group}: {lag:,} events not committed yet")
                last = lag
            time.sleep(1.0)
    finally:
        collector.close()
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


def online_counts(config: Config) -> Counter:
    """The exporter's online-judge counters, (path, outcome) -> events, over versions and event types."""
    from prometheus_client.parser import text_string_to_metric_families

    monitoring = config.monitoring
    host = "127.0.0.1" if monitoring.exporter_host in ("0.0.0.0", "::") else monitoring.exporter_host
    url = f"http://{host}:{monitoring.exporter_port}/metrics"
    try:
        with open_direct(url, 5) as response:
            text = response.read().decode()
    except OSError as exc:
        raise UserError(f"the exporter does not answer at {url} ({exc}): start the stack (`python -m infra up`)") from None
    counts: Counter = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mindstream_online_recall_events_total":
                counts[(sample.labels["path"], sample.labels["outcome"])] += sample.value
    return counts


def run_online_replay(config: Config, dataset: str, start: int, limit: int, n: int, wait_s: float) -> dict:
    """Serves each user of events [start, start + limit) once (n items), replays those events, waits
    until the exporter has judged them all and returns the hit rate per recall path: the share of
    the slice's events whose item was in an answer served to their user before them (this one, or one
    of an earlier replay still kept in the served log within its ttl)."""
    from recall_service.channel import recall_channel
    from recall_service.served_log import RedisServedLog
    from recall_service.stubs import recall_pb2, recall_pb2_grpc
    from streaming.producer import EventProducer, ReplayError, ReplayEvents, replay

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    nothing = {"sent": 0, "next_start": start, "users_served": 0, "served_by": {}, "judged": {}, "unjudged": 0}
    if not config.recall.served_log_ttl_s:
        say("==> online hit rate: skipped, [recall].served_log_ttl_s is 0 (answers are not kept, so no event can be judged)")
        return nothing
    replayed = ReplayEvents.from_dataset(dataset, config.paths.data_dir, config.paths.shared_data_dir)
    events = list(replayed.events(start, start + limit))
    if not events:
        say(f"==> online hit rate: {dataset} has {len(replayed):,} events, none left to replay from {start:,}")
        return nothing
    users = list(dict.fromkeys(event.user_id for event in events))
    say(f"==> online hit rate: serving the {len(users):,} users of {dataset} events {start:,}-{start + len(events):,} "
        f"({n} items each), then replaying those events")
    wait_for_the_job(config, wait_s, say)
    if not wait_for_group(config, config.monitoring.online_quality_group, wait_s):  # so that the counts below are the slice's alone
        say(f"  the exporter's judge ({config.monitoring.online_quality_group}) is behind; its counts may include earlier events")
    served_by: Counter = Counter()
    served_again = 0
    serving_ms = int(time.time() * 1000)
    with recall_channel(config.recall) as channel:
        stub = recall_pb2_grpc.RecallServiceStub(channel)
        for first in range(0, len(users), SERVE_BATCH):
            requests = [recall_pb2.RecallRequest(user_id=user, n=n) for user in users[first:first + SERVE_BATCH]]
            for attempt in range(SERVE_ATTEMPTS):
                responses = stub.BatchRecall(recall_pb2.BatchRecallRequest(requests=requests), timeout=60.0).responses
                # A run of slow searches opens the service's circuit breaker for [recall].outage_cooldown_ms, and every
                # batch sent meanwhile falls back: this step judges the model's answers, so such a batch is
                # served again after the cool-down (its new answers replace the old in the served log).
                if attempt + 1 == SERVE_ATTEMPTS or not any(r.fallback_reason == recall_pb2.FALLBACK_REASON_VECTOR_SEARCH_UNAVAILABLE for r in responses):
                    break
                served_again += len(requests)
                time.sleep(config.recall.outage_cooldown_ms / 1000 + 0.2)
            for response in responses:
                path = recall_pb2.RecallPath.Name(response.path).removeprefix("RECALL_PATH_").lower()
                reason = recall_pb2.FallbackReason.Name(response.fallback_reason).removeprefix("FALLBACK_REASON_").lower()
                served_by[path if reason == "unspecified" else f"{path} ({reason})"] += 1
    say("  served: " + ", ".join(f"{count:,} by {path}" for path, count in served_by.most_common())
        + (f" ({served_again:,} served again after a failed vector search)" if served_again else ""))
    served_log = RedisServedLog.for_config(config)
    deadline = time.monotonic() + 30
    # the service writes its records in the background; a user's record from an earlier run is not this answer
    while not all(isinstance(answers, tuple) and answers and answers[0].served_ms >= serving_ms for answers in served_log.get_many(users)):
        if time.monotonic() > deadline:
            raise UserError("the recall service's answers did not reach the served log in Redis within 30 s: see its log "
                            "(mindstream_recall_served_log_dropped_total)")
        time.sleep(0.2)
    before = online_counts(config)
    with EventProducer.for_config(config) as producer:
        try:
            sent = replay(iter(events), producer)
        except ReplayError as exc:
            raise UserError(f"{exc}: the online replay's slice is not all in Kafka; run it again once the broker answers") from None
    deadline, seen, delta = time.monotonic() + wait_s, 0, Counter()
    while seen < sent and time.monotonic() < deadline:
        time.sleep(0.5)
        delta = online_counts(config) - before
        seen = int(sum(delta.values()))  # hit, miss and unjudged
    if seen < sent:
        say(f"  the exporter counted {seen:,} of the {sent:,} events within {wait_s:.0f} s: the figures below cover those")
    by_path: dict = defaultdict(lambda: {"hit": 0, "miss": 0})
    for (path, outcome), count in delta.items():
        if outcome in ("hit", "miss"):
            by_path[path][outcome] += int(count)
    for path, counts in sorted(by_path.items()):
        counts["hit_rate"] = round(counts["hit"] / max(1, counts["hit"] + counts["miss"]), 4)
        say(f"  {path}: {counts['hit']:,} of {counts['hit'] + counts['miss']:,} events named a served item (hit rate {counts['hit_rate']:.3f})")
    unjudged = int(sum(count for (_, outcome), count in delta.items() if outcome == "unjudged"))
    if unjudged:
        say(f"  {unjudged:,} events unjudged (no answer in force when they entered Kafka)")
    return {"sent": sent, "next_start": start + sent, "users_served": len(users), "served_by": dict(served_by),
            "judged": dict(by_path), "unjudged": unjudged}
