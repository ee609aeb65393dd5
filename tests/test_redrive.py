"""Redrive of dead letters (streaming/redrive.py): which letters give back an event, and a run against
the real broker that sends exactly those, keyed by user, and goes on from where it stopped."""

from __future__ import annotations

import base64
import json
import time

import pytest

from infra.broker import EmbeddedBroker, ensure_topics
from streaming.__main__ import main
from streaming.events import BehaviourEvent, encode_event
from streaming.interest_writer import dead_letter
from streaming.redrive import STILL_INVALID, TRUNCATED, UNDECODABLE, original_value

NOW = int(time.time() * 1000)


def event_bytes(user: str, item: str, event_id: str = "") -> bytes:
    return encode_event(BehaviourEvent(user, item, "click", NOW - 60_000, event_id))


def letter(value: bytes, kind: str = "internal", max_bytes: int = 65_536) -> bytes:
    return dead_letter(f"{kind}: for a test", kind, value, 0, 7, NOW, "mindstream.events.v1", max_bytes).encode()


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


def test_redrive_sends_the_chosen_letters_back_keyed_by_user_and_goes_on_from_where_it_stopped(tmp_path, monkeypatch, capsys):
    from kafka import KafkaConsumer, KafkaProducer

    with EmbeddedBroker(tmp_path / "broker") as broker:
        monkeypatch.setenv("MINDSTREAM_CONFIG", "")
        monkeypatch.setenv("MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS", broker.bootstrap_servers)
        from infra.config import load_config

        kafka = load_config().kafka
        ensure_topics(kafka, partitions=2, retention_ms=3_600_000)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers)

        def dead_letters(*letters: bytes) -> None:
            for n, value in enumerate(letters):
                producer.send(kafka.dead_letter_topic, value=value, partition=n % 2)
            producer.flush()

        def redrive(*flags: str) -> dict:
            assert main(["redrive", "--quiet", *flags]) == 0
            return json.loads(capsys.readouterr().out)

        failed = [event_bytes("u1", "a", "e1"), event_bytes("u2", "b")]
        dead_letters(letter(failed[0]), letter(event_bytes("u3", "c"), "late"), letter(b"{", "malformed"), letter(failed[1]),
                     letter(event_bytes("u4", "d"), max_bytes=10), letter(b'{"schema": 1}'))
        assert redrive("--dry-run") == {"dry_run": True, "group": "mindstream-redrive", "read": 6, "sent": {"internal": 2},
                                        "not_sent": {TRUNCATED: 1, STILL_INVALID: 1}, "other_reasons": 2, "complete": True}
        report = redrive()  # the dry run committed nothing: the same letters
        assert report["sent"] == {"internal": 2} and report["read"] == 6

        consumer = KafkaConsumer(kafka.events_topic, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest",
                                 consumer_timeout_ms=3000)
        records = list(consumer)
        assert sorted((r.key, r.value) for r in records) == [(b"u1", failed[0]), (b"u2", failed[1])]
        assert all(r.timestamp >= NOW for r in records)  # stamped when sent again: the job's future rule holds

        assert redrive()["read"] == 0  # the group's offsets moved on
        again = event_bytes("u5", "e")
        dead_letters(letter(again), letter(event_bytes("u6", "f"), "late"))
        assert redrive("--reason", "internal", "--reason", "late")["sent"] == {"internal": 1, "late": 1}
        assert sorted(r.key for r in consumer) == [b"u5", b"u6"]
        consumer.close()
        producer.close()


def test_redrive_refuses_an_unknown_reason(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["redrive", "--reason", "bogus"])
    assert exited.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def test_a_send_the_broker_does_not_acknowledge_stops_the_commit_before_its_letter(monkeypatch):
    """Letters 0-3 of one partition, the send of letter 2 failed: the group's offset is 2, so the next
    run sends 2 and 3 again (3 a copy the job drops by event id), and the run says so."""
    from types import SimpleNamespace

    from conftest import FakeTopicConsumer

    import streaming.producer
    import streaming.redrive as redrive_module
    from infra.cli import UserError

    class Consumer(FakeTopicConsumer):
        committed_offsets = None

        def commit(self, offsets):
            Consumer.committed_offsets = {tp.partition: o.offset for tp, o in offsets.items()}

    class Producer:
        sent = []

        @classmethod
        def for_config(cls, config):
            return cls()

        def send_encoded(self, user, value, produced_ms):
            Producer.sent.append(user)
            return SimpleNamespace(failed=lambda: user == "u2", exception=RuntimeError("NotEnoughReplicas"))

        def flush(self):
            pass

        def close(self):
            pass

    letters = [(None, letter(event_bytes(f"u{n}", "i", f"e{n}")), NOW) for n in range(4)]
    monkeypatch.setattr(redrive_module, "group_consumer", lambda kafka, group: Consumer(letters))
    monkeypatch.setattr(streaming.producer, "EventProducer", Producer)
    config = SimpleNamespace(kafka=SimpleNamespace(dead_letter_topic="events", bootstrap_servers="b:9092"),
                             streaming=SimpleNamespace(max_event_bytes=65_536))
    with pytest.raises(UserError, match="1 of 4 letters were not acknowledged by b:9092 .*NotEnoughReplicas"):
        redrive_module.redrive(config, {"internal"}, progress=False)
    assert Producer.sent == ["u0", "u1", "u2", "u3"] and Consumer.committed_offsets == {0: 2}
