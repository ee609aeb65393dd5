"""Redrive of dead letters (streaming/redrive.py): which letters give back an event, runs against the
real broker that send exactly those, keyed by user, and go on from where they stopped, one group per
reason; and, on fakes of the consumer groups and the producer, what is committed when a send fails or
the run is cut short, and a group offset the topic no longer has."""

from __future__ import annotations

import base64
import itertools
import json
import time
from types import SimpleNamespace

import pytest
from conftest import FakeTopicConsumer

import streaming.producer
import streaming.redrive as redrive_module
from infra.broker import EmbeddedBroker, ensure_topics
from infra.cli import UserError
from streaming.__main__ import main
from streaming.events import REDRIVEN_HEADER, BehaviourEvent, encode_event
from streaming.interest_writer import dead_letter
from streaming.redrive import REPEATED, STILL_INVALID, TRUNCATED, UNDECODABLE, original_value

NOW = int(time.time() * 1000)
INTERNAL_GROUP, LATE_GROUP = "mindstream-redrive.internal", "mindstream-redrive.late"


def event_bytes(user: str, item: str, event_id: str = "") -> bytes:
    return encode_event(BehaviourEvent(user, item, "click", NOW - 60_000, event_id))


_RECORD_OFFSETS = itertools.count()


def letter(value: bytes, kind: str = "internal", max_bytes: int = 65_536, offset: int | None = None) -> bytes:
    """The job's letter of the record at `offset` (default: one no other letter names) of the events
    topic's partition 0."""
    offset = next(_RECORD_OFFSETS) if offset is None else offset
    return dead_letter(f"{kind}: for a test", kind, value, 0, offset, NOW, "mindstream.events.v1", max_bytes).encode()


def test_a_letter_gives_back_its_original_bytes_when_its_reason_is_chosen():
    value = event_bytes("u1", "i1")
    assert original_value(letter(value), {"internal"}) == ("internal", value, None)
    assert original_value(letter(value, "late"), {"internal"}) == ("late", None, None)  # not chosen: left alone
    raw = b"\xff\xfe not utf-8"
    assert json.loads(letter(raw))["value_base64"] == base64.b64encode(raw).decode()
    assert original_value(letter(raw, "malformed"), {"malformed"}) == ("malformed", raw, None)  # the exact bytes, not the text
    assert original_value(letter(value, max_bytes=10), {"internal"}) == ("internal", None, TRUNCATED)
    assert original_value(b"not a letter", {"internal"}) == ("", None, UNDECODABLE)
    assert original_value(json.dumps({"kind": "internal", "value_base64": "***"}).encode(), {"internal"}) == ("internal", None, UNDECODABLE)
    # never an exception, which would stop every run at this letter
    assert original_value(json.dumps({"kind": ["internal"], "value": "{}"}).encode(), {"internal"}) == ("", None, UNDECODABLE)
    assert original_value(json.dumps({"kind": "internal", "value_base64": "é"}).encode(), {"internal"}) == ("internal", None, UNDECODABLE)
    assert original_value(json.dumps({"kind": "internal", "value_base64": None}).encode(), {"internal"}) == ("internal", None, UNDECODABLE)


@pytest.fixture
def broker(tmp_path, monkeypatch):
    """A real broker with the topics (2 partitions) that the CLI is pointed at: (a function that appends
    letters to the dead-letter topic, alternating partitions, and one that returns the events topic's
    records not yet returned)."""
    from kafka import KafkaConsumer, KafkaProducer

    with EmbeddedBroker(tmp_path / "broker") as running:
        monkeypatch.setenv("MINDSTREAM_CONFIG", "")
        monkeypatch.setenv("MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS", running.bootstrap_servers)
        from infra.config import load_config

        kafka = load_config().kafka
        ensure_topics(kafka, partitions=2, retention_ms=3_600_000)
        producer = KafkaProducer(bootstrap_servers=running.bootstrap_servers)
        consumer = KafkaConsumer(kafka.events_topic, bootstrap_servers=running.bootstrap_servers, auto_offset_reset="earliest",
                                 consumer_timeout_ms=3000)

        def dead_letters(*letters: bytes) -> None:
            for n, value in enumerate(letters):
                producer.send(kafka.dead_letter_topic, value=value, partition=n % 2)
            producer.flush()

        yield dead_letters, lambda: list(consumer)
        consumer.close()
        producer.close()


@pytest.fixture
def cli(capsys):
    """A function that runs `python -m streaming redrive --quiet FLAGS` and returns its JSON report."""
    def redrive(*flags: str) -> dict:
        assert main(["redrive", "--quiet", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    return redrive


def test_redrive_sends_the_chosen_letters_back_keyed_by_user_and_goes_on_from_where_it_stopped(broker, cli):
    dead_letters, new_events = broker
    failed = [event_bytes("u1", "a", "e1"), event_bytes("u2", "b")]
    dead_letters(letter(failed[0]), letter(event_bytes("u3", "c"), "late"), letter(b"{", "malformed"), letter(failed[1]),
                 letter(event_bytes("u4", "d"), max_bytes=10), letter(b'{"schema": 1}'))
    assert cli("--dry-run") == {"dry_run": True, "groups": [INTERNAL_GROUP], "read": 6, "sent": {"internal": 2}, "not_acknowledged": 0,
                                "not_sent": {TRUNCATED: 1, STILL_INVALID: 1}, "other_reasons": 2, "handled_before": 0, "gaps": [],
                                "complete": True}
    report = cli()  # the dry run committed nothing: the same letters
    assert report["sent"] == {"internal": 2} and report["read"] == 6

    records = new_events()
    assert sorted((r.key, r.value) for r in records) == [(b"u1", failed[0]), (b"u2", failed[1])]
    assert all(r.timestamp >= NOW for r in records)  # stamped when sent again: the job's future rule holds
    assert all(r.headers == [(REDRIVEN_HEADER, b"1")] for r in records)  # the online judge judged the originals: it skips these

    assert cli()["read"] == 0  # the group's offsets moved on
    dead_letters(letter(event_bytes("u5", "e")), letter(event_bytes("u6", "f"), "late"))
    # the late group is new: its letters are read from the start, the internal ones only after the internal group's offsets
    report = cli("--reason", "internal", "--reason", "late")
    assert report["groups"] == [INTERNAL_GROUP, LATE_GROUP] and report["sent"] == {"internal": 1, "late": 2}
    assert report["read"] == 8 and report["handled_before"] == 4 and report["other_reasons"] == 1
    assert sorted(r.key for r in new_events()) == [b"u3", b"u5", b"u6"]
    assert cli("--reason", "late")["read"] == 0  # committed by the run above, whose reader was the internal group's consumer


def test_a_run_of_one_reason_leaves_the_letters_of_the_others_to_their_own_run(broker, cli):
    dead_letters, new_events = broker
    dead_letters(letter(event_bytes("u1", "a")), letter(event_bytes("u2", "b"), "late"), letter(event_bytes("u3", "c"), "late"))
    assert cli()["sent"] == {"internal": 1}  # the default reason, internal: the late letters are left to the late group
    report = cli("--reason", "late")  # e.g. after a wider allowed_lateness_ms
    assert report["sent"] == {"late": 2} and report["other_reasons"] == 1
    assert sorted(r.key for r in new_events()) == [b"u1", b"u2", b"u3"]
    assert cli("--reason", "late", "--reason", "internal")["read"] == 0  # both groups are at the end


def test_redrive_refuses_an_unknown_reason(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["redrive", "--reason", "bogus"])
    assert exited.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


class GroupConsumer(FakeTopicConsumer):
    """A consumer of one partition's letters in a consumer group whose committed offsets are kept in
    `offsets` (group -> partition -> offset), as the broker keeps them. Like kafka-python's, its
    position after `assign` is the group's committed offset (the beginning for a group without one)."""

    def __init__(self, records, group: str, offsets: dict, beginning: int = 0, commit_error: Exception | None = None):
        super().__init__(records)
        self.group, self.offsets, self.beginning, self.commit_error = group, offsets, beginning, commit_error

    def beginning_offsets(self, partitions):
        return {self.tp: self.beginning}

    def assign(self, partitions):
        committed = self.committed(self.tp)
        self.at = self.beginning if committed is None else committed

    def committed(self, tp):
        return self.offsets.get(self.group, {}).get(tp.partition)

    def commit(self, offsets):
        if self.commit_error is not None:
            raise self.commit_error
        self.offsets.setdefault(self.group, {}).update({tp.partition: o.offset for tp, o in offsets.items()})


class FakeProducer:
    """EventProducer's part that redrive uses; `fails` (user ids) are not acknowledged, `raises` (user
    ids) make the send itself raise, as a full buffer does (KafkaTimeoutError)."""

    def __init__(self, sent: list, fails: set, raises: set):
        self.sent, self.fails, self.raises = sent, fails, raises

    def send_encoded(self, user, value, produced_ms, headers=None):
        if user in self.raises:
            raise RuntimeError(f"no buffer space for {user}")
        self.sent.append(user)
        return SimpleNamespace(failed=lambda: user in self.fails, exception=RuntimeError("NotEnoughReplicas"))

    def flush(self):
        pass

    def close(self):
        pass


@pytest.fixture
def fake_kafka(monkeypatch):
    """Redrive on fakes: set `letters` (the dead-letter topic's partition 0, from offset `beginning`),
    `offsets` (the groups' committed offsets), `commit_error` (what a commit raises), `fails` / `raises`
    (user ids, see FakeProducer), then `run(reasons)`; `sent` lists the user ids sent."""
    fake = SimpleNamespace(letters=[], beginning=0, offsets={}, commit_error=None, sent=[], fails=set(), raises=set())
    monkeypatch.setattr(redrive_module, "group_consumer",
                        lambda kafka, group: GroupConsumer(fake.letters, group, fake.offsets, fake.beginning, fake.commit_error))
    monkeypatch.setattr(streaming.producer.EventProducer, "for_config", lambda config: FakeProducer(fake.sent, fake.fails, fake.raises))
    config = SimpleNamespace(kafka=SimpleNamespace(dead_letter_topic="events", bootstrap_servers="b:9092"),
                             streaming=SimpleNamespace(max_event_bytes=65_536))
    fake.run = lambda reasons=("internal",): redrive_module.redrive(config, set(reasons), progress=False)
    return fake


def internal_letters(*users: str) -> list:
    return [(None, letter(event_bytes(user, "i", f"e-{user}")), NOW) for user in users]


def test_a_send_the_broker_does_not_acknowledge_stops_the_commit_before_its_letter(fake_kafka):
    """Letters 0-3 of one partition, the send of letter 2 failed: the group's offset is 2, so the next
    run sends 2 and 3 again (3 a copy the job drops by event id), and the run says so."""
    fake_kafka.letters, fake_kafka.fails = internal_letters("u0", "u1", "u2", "u3"), {"u2"}
    with pytest.raises(UserError, match="1 of 4 letters were not acknowledged by b:9092 .*NotEnoughReplicas") as raised:
        fake_kafka.run()
    assert fake_kafka.sent == ["u0", "u1", "u2", "u3"] and fake_kafka.offsets == {INTERNAL_GROUP: {0: 2}}
    assert raised.value.report.not_acknowledged == 1 and raised.value.report.sent == {"internal": 4}


def test_the_cli_prints_the_report_before_the_error_when_a_send_was_not_acknowledged(fake_kafka, monkeypatch, capsys):
    monkeypatch.setenv("MINDSTREAM_CONFIG", "")
    monkeypatch.setenv("MINDSTREAM_KAFKA__DEAD_LETTER_TOPIC", "events")  # the fake's topic
    fake_kafka.letters, fake_kafka.fails = internal_letters("u0", "u1", "u2", "u3"), {"u2"}
    assert main(["redrive", "--quiet"]) == 2
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert report["sent"] == {"internal": 4} and report["not_acknowledged"] == 1 and report["groups"] == [INTERNAL_GROUP]
    assert err.startswith("error: 1 of 4 letters were not acknowledged")


def test_a_letter_that_cannot_be_decoded_is_counted_and_does_not_stop_the_run(fake_kafka):
    """A kind that is no string and a value_base64 that is no ASCII text, among good letters: without the
    commit, every later run would send the letters before them again and fail on them again."""
    good = internal_letters("u0", "u2", "u4")
    fake_kafka.letters = [good[0], (None, json.dumps({"kind": ["internal"], "value": "{}"}).encode(), NOW), good[1],
                          (None, json.dumps({"kind": "internal", "value_base64": "é"}).encode(), NOW), good[2]]
    report = fake_kafka.run()
    assert report.sent == {"internal": 3} and report.not_sent == {UNDECODABLE: 2} and report.complete
    assert fake_kafka.sent == ["u0", "u2", "u4"] and fake_kafka.offsets == {INTERNAL_GROUP: {0: 5}}
    assert fake_kafka.run().read == 0


def test_a_letter_written_twice_is_sent_once(fake_kafka):
    """A job restored from a checkpoint replays the records after it and writes their letters again
    (its sink is at least once): the copy names the same record, and is not sent a second time."""
    first, second = (letter(event_bytes(user, "i", f"e-{user}"), offset=offset) for user, offset in (("u0", 7), ("u1", 8)))
    fake_kafka.letters = [(None, first, NOW), (None, second, NOW), (None, first, NOW)]
    report = fake_kafka.run()
    assert fake_kafka.sent == ["u0", "u1"] and report.sent == {"internal": 2} and report.not_sent == {REPEATED: 1}
    assert fake_kafka.offsets == {INTERNAL_GROUP: {0: 3}}


def test_a_run_cut_short_commits_what_it_handled_before_the_error(fake_kafka, caplog):
    fake_kafka.letters, fake_kafka.fails, fake_kafka.raises = internal_letters("u0", "u1", "u2", "u3", "u4"), {"u1"}, {"u3"}
    with pytest.raises(RuntimeError, match="no buffer space for u3"):
        fake_kafka.run(["internal", "late"])
    # internal: up to the failed send of u1; late: past letters 0-2, none of them late, but not past u3, never handled
    assert fake_kafka.offsets == {INTERNAL_GROUP: {0: 1}, LATE_GROUP: {0: 3}}

    fake_kafka.offsets.clear()
    fake_kafka.commit_error = ConnectionError("coordinator gone")
    with pytest.raises(RuntimeError, match="no buffer space for u3"):  # the run's own error, not the commit's
        fake_kafka.run()
    assert "committing the letters handled before the error failed too" in caplog.text and "coordinator gone" in caplog.text


def test_a_group_offset_the_topic_no_longer_has_is_reported_and_the_topic_read_from_its_beginning(fake_kafka, capsys):
    fake_kafka.letters = internal_letters("u0", "u1", "u2")
    fake_kafka.offsets[INTERNAL_GROUP] = {0: 10}  # the topic was recreated: its offsets started again
    report = fake_kafka.run()
    assert report.sent == {"internal": 3} and fake_kafka.offsets == {INTERNAL_GROUP: {0: 3}}
    recreated = f"group {INTERNAL_GROUP}, partition 0: the topic ends at 3, before the 10 already read: it was recreated; reading it from its start"
    assert report.gaps == [recreated] and f"warning: events {recreated}" in capsys.readouterr().err

    fake_kafka.letters += internal_letters("u3", "u4", "u5")
    fake_kafka.beginning, fake_kafka.sent[:] = 4, []  # retention deleted letters 0-3, and the group was at 3
    report = fake_kafka.run()
    assert fake_kafka.sent == ["u4", "u5"] and fake_kafka.offsets == {INTERNAL_GROUP: {0: 6}}
    assert report.gaps == [f"group {INTERNAL_GROUP}, partition 0: records 3-3 were deleted by retention before redrive read them "
                           "(redrive before the dead-letter topic's retention deletes them)"]
