"""Redrive: dead letters of chosen reasons sent back into the events topic, as they were produced.

The job sets a record aside rather than stop (streaming/job.py): bad input for good, and also valid
events it failed to apply (`internal`: a bug, an unreadable window state) or judged too late for
the settings of the day. Once the cause is fixed (a new release, a wider allowed lateness), those
are accepted data to apply: `python -m streaming redrive --reason internal` reads the dead-letter
topic up to its end offsets seen at the start, and sends the original value of every letter of the
chosen reasons to the events topic again, keyed by its user id, with the job's own acceptance rule
checked first (a value that was malformed stays a dead letter: counted, not sent).

Progress is a consumer group of the dead-letter topic (`[kafka]`'s brokers, group
`mindstream-redrive` by default), committed once what was read is acknowledged by the broker, so a
second run goes on from where the first stopped, and a run cut short sends at most its unacknowledged
tail again: a copy the job drops by event id (the window's duplicate rule) where events carry one.
A letter that fails again lands after the read's end offsets, so a run always ends.
"""

from __future__ import annotations

import base64
import binascii
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

from infra.cli import UserError
from streaming.events import EventError, accept_record, parse_event
from streaming.kafka_clients import group_consumer, records_before, topic_partitions, unread

DEFAULT_GROUP = "mindstream-redrive"
# Why a letter of a chosen reason is not sent again
TRUNCATED, UNDECODABLE, STILL_INVALID = "truncated", "undecodable", "still_invalid"


class RedriveError(UserError):
    """Some letters were not acknowledged: the next run sends them again."""


@dataclass
class RedriveReport:
    read: int = 0  # dead letters read
    sent: Counter = field(default_factory=Counter)  # reason -> letters sent again (or that would be, dry run)
    not_sent: Counter = field(default_factory=Counter)  # why a letter of a chosen reason was not sent -> count
    other_reasons: int = 0  # letters of reasons not chosen, left as they are
    complete: bool = True  # False: the read stopped at the timeout before the end offsets

    def summary(self) -> dict:
        return {"read": self.read, "sent": dict(self.sent), "not_sent": dict(self.not_sent), "other_reasons": self.other_reasons,
                "complete": self.complete}


def original_value(letter: bytes, reasons: set[str]) -> tuple[str, bytes | None, str | None]:
    """A dead-letter record -> (its reason, the original value to send again or None, why not).
    `why not` is None for a letter whose reason is not in `reasons` (left alone) and for one to send."""
    try:
        record = json.loads(letter)
        reason = record["kind"]
    except (ValueError, TypeError, KeyError):
        return "", None, UNDECODABLE  # not written by the job: nothing to restore
    if reason not in reasons:
        return reason, None, None
    if record.get("truncated"):
        return reason, None, TRUNCATED  # the letter keeps the first 64 KiB only: the event is not in it whole
    try:
        if "value_base64" in record:
            return reason, base64.b64decode(record["value_base64"], validate=True), None
        return reason, record["value"].encode("utf-8"), None
    except (binascii.Error, AttributeError, KeyError, UnicodeEncodeError):
        return reason, None, UNDECODABLE


def redrive(config, reasons: set[str], group: str = DEFAULT_GROUP, dry_run: bool = False, timeout_s: float = 600.0,
            progress: bool = True) -> RedriveReport:
    """Sends the dead letters of `reasons` after the group's committed offsets back to the events topic
    (see the module's docstring); dry_run counts what would be sent and commits nothing. A send the
    broker does not acknowledge stops the commit of its partition before that letter (RedriveError
    after the commit of what went through)."""
    from streaming.producer import EventProducer

    report = RedriveReport()
    kafka, max_bytes = config.kafka, config.streaming.max_event_bytes
    consumer = group_consumer(kafka, group)
    producer = None if dry_run else EventProducer.for_config(config)
    sends: list = []  # (partition, letter offset, future)
    try:
        partitions = topic_partitions(consumer, kafka.dead_letter_topic)
        ends = consumer.end_offsets(partitions)
        consumer.assign(partitions)  # an unseen group starts at the earliest offset (group_consumer's reset policy)
        total = sum(max(0, ends[tp] - consumer.position(tp)) for tp in partitions)
        last_report = time.monotonic()
        for tp, record in records_before(consumer, ends, timeout_s):
            report.read += 1
            reason, value, why_not = original_value(record.value or b"", reasons)
            if value is None:
                if why_not is None:
                    report.other_reasons += 1
                else:
                    report.not_sent[why_not] += 1
                continue
            now_ms = int(time.time() * 1000)
            try:
                user = parse_event(value, max_bytes).user_id
                accept_record(user, value, max_bytes, now_ms)  # the job's whole rule, for a record stamped now
            except EventError:
                report.not_sent[STILL_INVALID] += 1
                continue
            if producer is not None:
                sends.append((tp, record.offset, producer.send_encoded(user, value, now_ms)))
            report.sent[reason] += 1
            if progress and time.monotonic() - last_report > 2:
                print(f"  read {report.read:,}/{total:,} dead letters, {sum(report.sent.values()):,} sent", file=sys.stderr, flush=True)
                last_report = time.monotonic()
        report.complete = not unread(consumer, ends)
        if producer is None:
            return report
        producer.flush()
        # up to the read's end (a poll may have run past it), and not past a letter whose send failed
        commit = {tp: min(consumer.position(tp), ends[tp]) for tp in partitions}
        failed = [(tp, offset, future.exception) for tp, offset, future in sends if future.failed()]
        for tp, offset, _ in failed:
            commit[tp] = min(commit[tp], offset)
        consumer.commit({tp: _offset_and_metadata(offset) for tp, offset in commit.items()})
        if failed:
            raise RedriveError(f"{len(failed):,} of {len(sends):,} letters were not acknowledged by {kafka.bootstrap_servers} "
                               f"(the first: {failed[0][2]}); the group's offsets stop before them: run redrive again")
        return report
    finally:
        consumer.close()
        if producer is not None:
            producer.close()


def _offset_and_metadata(offset: int):
    from kafka.structs import OffsetAndMetadata

    try:
        return OffsetAndMetadata(offset, "", -1)
    except TypeError:  # kafka-python < 2.1 takes (offset, metadata)
        return OffsetAndMetadata(offset, "")
