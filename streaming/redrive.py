"""Redrive: dead letters of chosen reasons sent back into the events topic, as they were produced.

The job sets a record aside rather than stop (streaming/job.py): bad input for good, and also valid
events it failed to apply (`internal`: a bug, an unreadable window state) or judged too late for
the settings of the day. Once the cause is fixed (a new release, a wider allowed lateness), those
are accepted data to apply: `python -m streaming redrive --reason internal` reads the dead-letter
topic up to its end offsets seen at the start, and sends the original value of every letter of the
chosen reasons to the events topic again, keyed by its user id, with the job's own acceptance rule
checked first (a value that was malformed stays a dead letter: counted, not sent). Each carries the
REDRIVEN_HEADER, so that the online judge, which judged the original, does not judge it again.

Progress is kept per reason, by a consumer group of the dead-letter topic (`[kafka]`'s brokers) named
`<prefix>.<reason>` (the prefix is `--group`, `mindstream-redrive` by default: `mindstream-redrive.internal`),
so a run of some reasons leaves the letters of the others to their own later runs. A run reads each
partition from the lowest offset of its reasons' groups and handles a letter of reason R only from
R's offset on (below it, an earlier run of R handled it). Once what it sent is acknowledged by the
broker, it commits each group at the read's end, but not past a letter of the group's reason whose
send failed; a run cut short by an error commits what it handled before the error the same way. So
a second run goes on from where the first stopped and sends at most the first's unacknowledged tail
again: a copy the job drops by event id (the window's duplicate rule) where events carry one. A
letter that fails again lands after the read's end offsets, so a run always ends. A group's offset
above the topic's end (the topic was recreated) or below its beginning (letters deleted by
retention) is reported as a gap (a warning, and `gaps` in the report), and the partition is read
from its beginning.

One run at a time per group: two runs of a reason at once would both send its letters.

A redriven event is judged like any other event (stamped when it is sent again): its lateness is
judged against the user's newest event, so an `internal` letter of a user who moved on by more than
[streaming].allowed_lateness_ms while the cause was being fixed comes back as a `late` letter
(retraining's event log still takes it, as it takes late events). Widening allowed_lateness_ms
before the redrive applies them.
"""

from __future__ import annotations

import base64
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from infra.cli import UserError
from streaming.events import REDRIVEN_HEADER, EventError, accept_record, parse_event
from streaming.kafka_clients import group_consumer, offset_and_metadata, records_before, resumed_offsets, topic_partitions, unread

log = logging.getLogger(__name__)

DEFAULT_GROUP = "mindstream-redrive"  # the prefix of the groups: one per reason, <prefix>.<reason>
# Why a letter of a chosen reason is not sent again
TRUNCATED, UNDECODABLE, STILL_INVALID, REPEATED = "truncated", "undecodable", "still_invalid", "repeated"


@dataclass
class RedriveReport:
    groups: list[str] = field(default_factory=list)  # the consumer groups of the chosen reasons
    read: int = 0  # dead letters read
    sent: Counter = field(default_factory=Counter)  # reason -> letters sent again (or that would be, dry run)
    not_acknowledged: int = 0  # of those sent: the sends the broker did not acknowledge (the next run sends them again)
    not_sent: Counter = field(default_factory=Counter)  # why a letter of a chosen reason was not sent -> count
    other_reasons: int = 0  # letters of reasons not chosen: left to their own groups
    handled_before: int = 0  # letters of a chosen reason below its group's offset: an earlier run of that reason handled them
    gaps: list[str] = field(default_factory=list)  # a group's offset the topic no longer has (retention, a recreated topic)
    complete: bool = True  # False: the read stopped at the timeout before the end offsets

    def summary(self) -> dict:
        return {"groups": self.groups, "read": self.read, "sent": dict(self.sent), "not_acknowledged": self.not_acknowledged,
                "not_sent": dict(self.not_sent), "other_reasons": self.other_reasons, "handled_before": self.handled_before,
                "gaps": self.gaps, "complete": self.complete}


class RedriveError(UserError):
    """Some letters were not acknowledged: the next run sends them again. `report` is what the run did."""

    def __init__(self, message: str, report: RedriveReport):
        super().__init__(message)
        self.report = report


def group_name(prefix: str, reason: str) -> str:
    """The consumer group that keeps the progress of `reason`'s letters."""
    return f"{prefix}.{reason}"


def letter_origin(letter: bytes) -> tuple | None:
    """Where the letter's record was in the events topic (topic, partition, offset), None if it does
    not say: the job writes a record's letter again when it replays it after a restore."""
    try:
        record = json.loads(letter)
        return record["topic"], record["partition"], record["offset"]
    except (ValueError, TypeError, KeyError):
        return None


def original_value(letter: bytes, reasons: set[str]) -> tuple[str, bytes | None, str | None]:
    """A dead-letter record -> (its reason, the original value to send again or None, why not).
    `why not` is None for a letter whose reason is not in `reasons` (left alone) and for one to send;
    a letter the job did not write (its reason is then "") or whose value cannot be decoded is
    UNDECODABLE, never an exception: one bad letter must not stop every run before it."""
    try:
        record = json.loads(letter)
        reason = record["kind"]
    except (ValueError, TypeError, KeyError):
        return "", None, UNDECODABLE
    if not isinstance(reason, str):  # the job's kinds are strings
        return "", None, UNDECODABLE
    if reason not in reasons:
        return reason, None, None
    if record.get("truncated"):
        return reason, None, TRUNCATED  # the letter keeps the first 64 KiB only: the event is not in it whole
    try:
        if "value_base64" in record:
            return reason, base64.b64decode(record["value_base64"], validate=True), None
        return reason, record["value"].encode("utf-8"), None
    except (ValueError, TypeError, AttributeError, KeyError):  # bad base64 or no ASCII text (ValueError), no string, no value
        return reason, None, UNDECODABLE


def redrive(config, reasons: set[str], group: str = DEFAULT_GROUP, dry_run: bool = False, timeout_s: float = 600.0,
            progress: bool = True) -> RedriveReport:
    """Sends the dead letters of `reasons` after their groups' committed offsets (`group` is the groups'
    prefix) back to the events topic (see the module's docstring); dry_run counts what would be sent
    and commits nothing. A send the broker does not acknowledge stops the commit of its reason's group
    in its partition before that letter (RedriveError after the commit of what went through); an error
    that cuts the read short is raised after the commit of what was handled before it."""
    from streaming.producer import EventProducer

    kafka, max_bytes = config.kafka, config.streaming.max_event_bytes
    groups = {reason: group_name(group, reason) for reason in sorted(reasons)}
    report = RedriveReport(groups=list(groups.values()))
    # one consumer per group, for its committed offsets and its commit (of explicit offsets: no assignment needed); the first also reads
    consumers = {reason: group_consumer(kafka, name) for reason, name in groups.items()}
    reader = next(iter(consumers.values()))
    producer = None
    sends: list = []  # (reason, partition, letter offset, future)
    sent_origins: set = set()  # (topic, partition, offset) of the records sent in this run

    def handle(tp, record) -> None:  # one letter; `starts` and `producer` are set below, before the read
        report.read += 1
        reason, value, why_not = original_value(record.value or b"", reasons)
        if reason in starts and record.offset < starts[reason][tp]:
            report.handled_before += 1
            return
        if value is None:
            if why_not is None:
                report.other_reasons += 1
            else:
                report.not_sent[why_not] += 1
            return
        now_ms = int(time.time() * 1000)
        try:
            user = parse_event(value, max_bytes).user_id
            accept_record(user, value, max_bytes, now_ms)  # the job's whole rule, for a record stamped now
        except EventError:
            report.not_sent[STILL_INVALID] += 1
            return
        origin = letter_origin(record.value)
        if origin is not None and origin in sent_origins:  # the sink is at least once: a restored job wrote it twice
            report.not_sent[REPEATED] += 1
            return
        sent_origins.add(origin)
        if producer is not None:
            sends.append((reason, tp, record.offset, producer.send_encoded(user, value, now_ms, [(REDRIVEN_HEADER, b"1")])))
        report.sent[reason] += 1

    try:
        partitions = topic_partitions(reader, kafka.dead_letter_topic)
        ends = reader.end_offsets(partitions)
        starts = _start_offsets(consumers, groups, partitions, reader.beginning_offsets(partitions), ends, report)
        for gap in report.gaps:
            print(f"warning: {kafka.dead_letter_topic} {gap}", file=sys.stderr, flush=True)
        read_from = {tp: min(start[tp] for start in starts.values()) for tp in partitions}
        reader.assign(partitions)
        for tp, offset in read_from.items():
            reader.seek(tp, offset)
        producer = None if dry_run else EventProducer.for_config(config)
        handled_to = dict(read_from)  # partition -> the offset after the last letter handled
        total = sum(max(0, ends[tp] - read_from[tp]) for tp in partitions)
        last_report = time.monotonic()
        try:
            for tp, record in records_before(reader, ends, timeout_s):
                handle(tp, record)
                handled_to[tp] = record.offset + 1
                if progress and time.monotonic() - last_report > 2:
                    print(f"  read {report.read:,}/{total:,} dead letters, {sum(report.sent.values()):,} sent", file=sys.stderr, flush=True)
                    last_report = time.monotonic()
        except BaseException:
            if producer is not None:  # so that the next run does not send again what was handled before the error
                try:
                    _commit_acknowledged(producer, sends, consumers, starts, handled_to, report)
                except Exception:
                    log.exception("redrive: committing the letters handled before the error failed too: the next run sends them again")
            raise
        report.complete = not unread(reader, ends)
        if producer is None:
            return report
        # the position, not the last letter: it also moves past offsets without one; not past the read's end (a poll may run past it)
        handled_to = {tp: min(reader.position(tp), ends[tp]) for tp in partitions}
        failed = _commit_acknowledged(producer, sends, consumers, starts, handled_to, report)
        if failed:
            raise RedriveError(f"{len(failed):,} of {len(sends):,} letters were not acknowledged by {kafka.bootstrap_servers} "
                               f"(the first: {failed[0][1]}); the groups' offsets stop before them: run redrive again", report)
        return report
    finally:
        for consumer in consumers.values():
            consumer.close()
        if producer is not None:
            producer.close()


def _start_offsets(consumers: dict, groups: dict, partitions: list, beginnings: dict, ends: dict, report: RedriveReport) -> dict:
    """reason -> partition -> the offset its letters are handled from: its group's committed offset, or
    the beginning for a group without one (as group_consumer's reset policy would) and for one whose
    offset the topic no longer has (a line in report.gaps)."""
    starts = {}
    for reason, consumer in consumers.items():
        committed = {tp.partition: offset for tp in partitions if (offset := consumer.committed(tp)) is not None}
        resumed, gaps = resumed_offsets(partitions, committed, beginnings, ends, "redrive",
                                        "redrive before the dead-letter topic's retention deletes them")
        starts[reason] = {tp: resumed.get(tp, beginnings[tp]) for tp in partitions}
        report.gaps += [f"group {groups[reason]}, {gap}" for gap in gaps]
    return starts


def _commit_acknowledged(producer, sends: list, consumers: dict, starts: dict, handled_to: dict, report: RedriveReport) -> list:
    """Waits for the broker's answer to every send, then commits each reason's group at `handled_to`
    (partition -> the offset after the letters handled), never below the group's start (a read cut short
    before it handled none of that reason's letters there) nor past a letter of its reason whose send
    failed; returns the failed sends as (letter offset, error), in the order they were sent."""
    producer.flush()
    failed = [(reason, tp, offset, future.exception) for reason, tp, offset, future in sends if future.failed()]
    report.not_acknowledged = len(failed)
    for reason, consumer in consumers.items():
        commit = {tp: max(start, handled_to[tp]) for tp, start in starts[reason].items()}
        for failed_reason, tp, offset, _ in failed:
            if failed_reason == reason:
                commit[tp] = min(commit[tp], offset)
        consumer.commit({tp: offset_and_metadata(offset) for tp, offset in commit.items()})
    return [(offset, error) for _, _, offset, error in failed]

