"""Kafka client settings from the one configuration: kafka-python options and Java client properties.

Both clients (the Python producer/consumers and Flink's Java connector) are configured from the
same [kafka] section, so pointing the system at a real cluster with SASL and TLS is a
configuration change only.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from infra.config import ConfigError

JAAS_MODULES = {
    "PLAIN": "org.apache.kafka.common.security.plain.PlainLoginModule",
    "SCRAM-SHA-256": "org.apache.kafka.common.security.scram.ScramLoginModule",
    "SCRAM-SHA-512": "org.apache.kafka.common.security.scram.ScramLoginModule",
}


def _check_sasl_password(kafka) -> None:
    """The configuration loads without the Kafka secret (a process that uses no Kafka gets none), so
    a client is where its absence is caught: the broker would only answer a failed login."""
    if kafka.security_protocol.startswith("SASL") and not kafka.sasl_password:
        raise ConfigError(f"[kafka].security_protocol = {kafka.security_protocol} and this process talks to Kafka, but "
                          f"[kafka].sasl_password is empty: set MINDSTREAM_KAFKA__SASL_PASSWORD (user {kafka.sasl_username!r})")


def python_client_options(kafka) -> dict:
    """Keyword arguments for kafka-python's KafkaProducer / KafkaConsumer / KafkaAdminClient."""
    options: dict = {"bootstrap_servers": kafka.bootstrap_servers.split(","), "security_protocol": kafka.security_protocol}
    _check_sasl_password(kafka)
    if kafka.security_protocol.startswith("SASL"):
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username, sasl_plain_password=kafka.sasl_password)
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        options.update({k: v for k, v in (("ssl_cafile", kafka.ssl_cafile), ("ssl_certfile", kafka.ssl_certfile), ("ssl_keyfile", kafka.ssl_keyfile)) if v})
    return options


def java_client_properties(kafka) -> dict[str, str]:
    """Properties for Flink's Kafka connector (the Java client); PEM files are passed inline."""
    props = {"bootstrap.servers": kafka.bootstrap_servers, "security.protocol": kafka.security_protocol}
    _check_sasl_password(kafka)
    if kafka.security_protocol.startswith("SASL"):
        if kafka.sasl_mechanism not in JAAS_MODULES:
            raise ValueError(f"[kafka].sasl_mechanism {kafka.sasl_mechanism!r}: use one of {sorted(JAAS_MODULES)}")
        props["sasl.mechanism"] = kafka.sasl_mechanism
        props["sasl.jaas.config"] = (f'{JAAS_MODULES[kafka.sasl_mechanism]} required username="{_jaas_quoted(kafka.sasl_username)}" '
                                     f'password="{_jaas_quoted(kafka.sasl_password)}";')
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        if kafka.ssl_cafile:
            props.update({"ssl.truststore.type": "PEM", "ssl.truststore.location": kafka.ssl_cafile})
        if kafka.ssl_certfile and kafka.ssl_keyfile:
            props.update({
                "ssl.keystore.type": "PEM",
                "ssl.keystore.certificate.chain": Path(kafka.ssl_certfile).read_text(),
                "ssl.keystore.key": Path(kafka.ssl_keyfile).read_text(),
            })
    return props


def _jaas_quoted(value: str) -> str:
    """A JAAS option value inside double quotes: a quote or backslash in a password must not end it early."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


# ----------------------------------------------------------------------------- bounded reads of a topic


def group_consumer(kafka, group: str):
    """A kafka-python consumer of `group` that commits only when told: for reads that end (retraining's
    event log, the dead-letter redrive), which assign their partitions and seek themselves."""
    from kafka import KafkaConsumer

    logging.getLogger("kafka").setLevel(logging.WARNING)
    return KafkaConsumer(group_id=group, enable_auto_commit=False, auto_offset_reset="earliest", consumer_timeout_ms=1000,
                         **python_client_options(kafka))


def topic_partitions(consumer, topic: str) -> list:
    """The topic's partitions (TopicPartition), waiting up to 10 s for its metadata; a missing topic
    is a UserError that says how to create it."""
    from kafka import TopicPartition

    from infra.cli import UserError

    ids = None
    deadline = time.monotonic() + 10
    while not ids and time.monotonic() < deadline:
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            time.sleep(0.2)
    if not ids:
        raise UserError(f"topic {topic!r} not found: create it with `python -m streaming topics` (or start the stack)")
    return [TopicPartition(topic, p) for p in sorted(ids)]


def records_before(consumer, ends: dict, timeout_s: float):
    """Yields (TopicPartition, record) for the assigned partitions' records below `ends` (partition ->
    offset: the end offsets seen when the read began, so a read always ends), then returns, or
    returns after `timeout_s` (the caller tells by the positions: `unread(consumer, ends)`). The end
    is judged by the consumer's own position, not the last record's offset: a position also moves
    past offsets that hold no record (transaction markers, compacted records), which would
    otherwise keep the read waiting."""
    deadline = time.monotonic() + timeout_s
    while unread(consumer, ends) and time.monotonic() < deadline:
        for tp, records in consumer.poll(timeout_ms=500, max_records=5000).items():
            for record in records:
                if record.offset < ends[tp]:
                    yield tp, record


def offset_and_metadata(offset: int):
    """A group offset to commit (the next record to read), for any kafka-python version."""
    from kafka.structs import OffsetAndMetadata

    try:
        return OffsetAndMetadata(offset, "", -1)
    except TypeError:  # kafka-python < 2.1 takes (offset, metadata)
        return OffsetAndMetadata(offset, "")


def unread(consumer, ends: dict) -> bool:
    """Whether some assigned partition's position is still below its end."""
    return any(consumer.position(tp) < end for tp, end in ends.items())


def resumed_offsets(partitions: list, recorded: dict[int, int], beginnings: dict, ends: dict, reader: str,
                    retention_advice: str) -> tuple[dict, list[str]]:
    """Where a bounded reader goes on from a topic's partitions whose next offset it recorded (`recorded`:
    partition id -> offset; `beginnings` and `ends`: TopicPartition -> the topic's offsets now): (TopicPartition
    -> offset to read from, for the recorded partitions only, and one line per partition that cannot go on
    where it stopped). A recorded offset below the beginning means records were deleted by retention before
    `reader` read them (the line ends with `retention_advice`); one above the end means the topic was
    recreated (its offsets start again): going on from the old one's would never read the new records, so it
    is read from its start."""
    starts, gaps = {}, []
    for tp in partitions:
        if tp.partition not in recorded:
            continue
        offset, beginning, end = recorded[tp.partition], beginnings[tp], ends[tp]
        starts[tp] = max(offset, beginning)
        if offset < beginning:
            gaps.append(f"partition {tp.partition}: records {offset:,}-{beginning - 1:,} were deleted by retention before {reader} "
                        f"read them ({retention_advice})")
        elif offset > end:
            starts[tp] = beginning
            gaps.append(f"partition {tp.partition}: the topic ends at {end:,}, before the {offset:,} already read: "
                        "it was recreated; reading it from its start")
    return starts, gaps
