from pathlib import Path

import pytest

from infra.config import ConfigError, load_config


def test_defaults_are_local_and_loopback(tmp_path):
    config = load_config(environ={"MINDSTREAM_CONFIG": ""})
    assert config.kafka.bootstrap_servers.startswith("127.0.0.1:")
    assert config.redis.uri.startswith("redis://127.0.0.1")
    assert config.recall.host == config.recall.metrics_host == "127.0.0.1"
    assert config.streaming.metrics_host == config.monitoring.exporter_host == "127.0.0.1"
    assert config.milvus.uri.endswith(".db")  # Milvus Lite file by default


def test_file_then_environment_take_precedence(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[kafka]\nbootstrap_servers = "k1:9093"\nsecurity_protocol = "SASL_SSL"\nsasl_mechanism = "PLAIN"\nsasl_username = "svc"\n[recall]\nport = 6000\n')
    config = load_config(f, environ={"MINDSTREAM_RECALL__PORT": "7000", "MINDSTREAM_MILVUS__URI": "http://milvus:19530",
                                     "MINDSTREAM_RECALL__METRICS_HOST": "0.0.0.0", "MINDSTREAM_MONITORING__EXPORTER_HOST": "0.0.0.0"})
    assert config.kafka.bootstrap_servers == "k1:9093"
    assert config.kafka.security_protocol == "SASL_SSL"
    assert config.recall.port == 7000  # environment beats the file
    assert config.milvus.uri == "http://milvus:19530"
    assert config.recall.metrics_host == config.monitoring.exporter_host == "0.0.0.0"
    assert isinstance(config.paths.data_dir, Path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("[kafka]\nbrokers = 'x'\n", "unknown keys"),
        ("[nosuch]\na = 1\n", "unknown sections"),
        ("[recall]\nport = 'abc'\n", "expected an integer"),
        ("[recall]\nport = 50051.9\n", r"\[recall\].port: expected an integer, got 50051.9; write a whole number"),
        ("[recall]\nmax_n = true\n", r"\[recall\].max_n: expected a number, got the boolean True"),
        ("[streaming]\nmodel_poll_s = false\n", "got the boolean False"),
        ("[kafka\n", "not valid TOML"),
    ],
)
def test_bad_configuration_is_named(tmp_path, text, message):
    f = tmp_path / "m.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(f, environ={})


def test_a_whole_float_is_an_integer(tmp_path):
    f = tmp_path / "m.toml"
    f.write_text("[recall]\nport = 6000.0\n")
    assert load_config(f, environ={}).recall.port == 6000


def test_missing_topics_are_created_with_the_configured_partitions_retention_and_replication(monkeypatch):
    import kafka

    from infra.broker import ensure_configured_topics

    created = []

    class Admin:
        def __init__(self, **options):
            pass

        def list_topics(self):
            return []

        def create_topics(self, topics):
            created.extend(topics)

        def close(self):
            pass

    monkeypatch.setattr(kafka, "KafkaAdminClient", Admin)
    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_STREAMING__TOPIC_REPLICATION_FACTOR": "3",
                                  "MINDSTREAM_STREAMING__TOPIC_PARTITIONS": "8"})
    ensure_configured_topics(config)
    assert [(t.name, t.num_partitions, t.replication_factor, t.topic_configs) for t in created] == [
        (name, 8, 3, {"retention.ms": "86400000"}) for name in (config.kafka.events_topic, config.kafka.dead_letter_topic)]


@pytest.mark.parametrize("environ, message", [
    ({"MINDSTREAM_RECALL__AUTH_TOKN": "x"}, r"MINDSTREAM_RECALL__AUTH_TOKN \(did you mean MINDSTREAM_RECALL__AUTH_TOKEN\?\)"),
    ({"MINDSTREAM_NOSUCH__PORT": "1"}, r"unknown configuration variables: MINDSTREAM_NOSUCH__PORT; .* rename or unset them"),
    ({"MINDSTREAM_RECALL__PORT": "50051.9"}, "MINDSTREAM_RECALL__PORT: expected an integer"),
    ({"MINDSTREAM_RECALL__MAX_N": "true"}, "MINDSTREAM_RECALL__MAX_N: expected an integer"),
    # values of the right type that would fail deep inside a run, or run wrongly
    ({"MINDSTREAM_RETRAIN__HOLDOUT_FRACTION": "10"}, r"\[retrain\].holdout_fraction \(MINDSTREAM_RETRAIN__HOLDOUT_FRACTION\) = 10.0: must be in \(0.0, 1.0\)"),
    ({"MINDSTREAM_RETRAIN__TOLERANCE": "2"}, r"\[retrain\].tolerance .* = 2.0: must be in \[0.0, 1.0\]"),
    ({"MINDSTREAM_RETRAIN__EPOCHS": "0"}, r"\[retrain\].epochs .* = 0: must be in \[1, inf\)"),
    ({"MINDSTREAM_RECALL__SERVED_LOG_TTL_S": "-1"}, r"\[recall\].served_log_ttl_s .* = -1: must be in \[0, 2147483647\]"),
    # Redis takes EXPIRE -1 as "delete now" (every record gone as it is written), and a huge value as an error retried forever
    ({"MINDSTREAM_STREAMING__RECORD_TTL_S": "-1"}, r"\[streaming\].record_ttl_s .* = -1: must be in \[0, 2147483647\]"),
    ({"MINDSTREAM_STREAMING__RECORD_TTL_S": "10000000000000000"}, r"\[streaming\].record_ttl_s .* must be in \[0, 2147483647\]"),
    ({"MINDSTREAM_RECALL__SERVED_LOG_ANSWERS": "0"}, r"\[recall\].served_log_answers .* = 0: must be in \[1, inf\)"),
    ({"MINDSTREAM_STREAMING__SEEN_ITEMS": "-1"}, r"\[streaming\].seen_items .* = -1: must be in \[0, inf\)"),
    ({"MINDSTREAM_RETRAIN__TOLERANCE": "nan"}, "MINDSTREAM_RETRAIN__TOLERANCE: expected a finite number, got 'nan'"),
    ({"MINDSTREAM_STREAMING__MODEL_POLL_S": "inf"}, "expected a finite number"),
    ({"MINDSTREAM_RETRAIN__STATE_DIR": ""}, "MINDSTREAM_RETRAIN__STATE_DIR: expected a path, got an empty value"),
    # one underscore after a section: the API would run without the token its operator set
    ({"MINDSTREAM_RECALL_AUTH_TOKEN": "x"}, r"MINDSTREAM_RECALL_AUTH_TOKEN \(did you mean MINDSTREAM_RECALL__AUTH_TOKEN\?\)"),
    ({"MINDSTREAM_REDIS_PASSWORD": "x"}, r"MINDSTREAM_REDIS_PASSWORD \(did you mean MINDSTREAM_REDIS__PASSWORD\?\)"),
    # values that cannot work: no RPC ever served, a port that does not exist, TLS silently off
    ({"MINDSTREAM_RECALL__MAX_CONCURRENT_RPCS": "0"}, r"\[recall\].max_concurrent_rpcs .* = 0: must be in \[1, inf\)"),
    ({"MINDSTREAM_RECALL__PORT": "70000"}, r"\[recall\].port .* = 70000: must be in \[0, 65535\]"),
    ({"MINDSTREAM_STREAMING__WINDOW_LENGTH": "-3"}, r"\[streaming\].window_length .* = -3: must be in \[1, inf\)"),
    ({"MINDSTREAM_MONITORING__SCRAPE_INTERVAL_S": "0"}, r"\[monitoring\].scrape_interval_s .* = 0: must be in \[1, inf\)"),
    ({"MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "ssl"}, "MINDSTREAM_KAFKA__SECURITY_PROTOCOL: expected one of 'PLAINTEXT', 'SSL', 'SASL_PLAINTEXT', 'SASL_SSL', got 'ssl'"),
])
def test_bad_environment_variables_are_named(tmp_path, environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ={"MINDSTREAM_CONFIG": "", **environ})


def test_variables_that_are_not_fields_are_left_alone(tmp_path):
    config = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_DISABLE_GPU": "1",
                                  "MINDSTREAM_RECALL__PORT": "7000"})
    assert config.recall.port == 7000


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


def test_config_command_prints_effective_values_with_secrets_masked(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, MINDSTREAM_REDIS__PASSWORD="s3cret", MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS="kafka-1:9093", MINDSTREAM_CONFIG="",
               MINDSTREAM_RECALL__AUTH_TOKEN="t0ken", MINDSTREAM_KAFKA__SASL_PASSWORD="sasl-pw", MINDSTREAM_MILVUS__TOKEN="root:Milvus",
               MINDSTREAM_KAFKA__SECURITY_PROTOCOL="SASL_SSL", MINDSTREAM_KAFKA__SASL_MECHANISM="PLAIN", MINDSTREAM_KAFKA__SASL_USERNAME="svc",
               MINDSTREAM_MILVUS__URI="http://root:uri@pw@milvus:19530")
    out = subprocess.run([sys.executable, "-m", "infra", "config"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    printed = json.loads(out)
    assert printed["kafka"]["bootstrap_servers"] == "kafka-1:9093"
    assert printed["redis"]["password"] == printed["recall"]["auth_token"] == printed["kafka"]["sasl_password"] == printed["milvus"]["token"] == "***"
    assert printed["milvus"]["uri"] == "http://***@milvus:19530"
    # a password in the Redis URI instead of [redis].password: masked too
    env.pop("MINDSTREAM_REDIS__PASSWORD")
    env["MINDSTREAM_REDIS__URI"] = "rediss://default:uri-pw@redis:6380/0?password=query-pw&db=0"
    in_uri = subprocess.run([sys.executable, "-m", "infra", "config"], cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert json.loads(in_uri)["redis"]["uri"] == "rediss://***@redis:6380/0?password=***&db=0"
    for secret in ("s3cret", "t0ken", "sasl-pw", "Milvus", "uri-pw", "uri@pw", "query-pw"):
        assert secret not in out + in_uri, secret
    # both: the URI's would win unseen (a rotation through the variable ignored), so neither is taken
    both = subprocess.run([sys.executable, "-m", "infra", "config"], cwd=REPO, env=dict(env, MINDSTREAM_REDIS__PASSWORD="s3cret"),
                          capture_output=True, text=True)
    assert both.returncode == 2 and "password in [redis].uri are both set" in both.stderr and "s3cret" not in both.stderr + both.stdout
    bad = subprocess.run([sys.executable, "-m", "infra", "config", "--file", str(tmp_path / "missing.toml")], cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_a_named_configuration_file_must_exist_and_an_empty_name_means_none(tmp_path, monkeypatch):
    """A mistyped $MINDSTREAM_CONFIG would otherwise run a service on the loopback defaults without a word."""
    with pytest.raises(ConfigError, match=r"absent.toml \(\$MINDSTREAM_CONFIG\) does not exist"):
        load_config(environ={"MINDSTREAM_CONFIG": str(tmp_path / "absent.toml")})
    with pytest.raises(ConfigError, match="absent.toml does not exist"):
        load_config(path=tmp_path / "absent.toml", environ={})
    monkeypatch.chdir(tmp_path)  # ./mindstream.toml is read when present, and optional
    assert load_config(environ={}).redis.uri.startswith("redis://127.0.0.1")
    (tmp_path / "mindstream.toml").write_text('[redis]\nuri = "redis://cache:6379/0"\n')
    assert load_config(environ={}).redis.uri == "redis://cache:6379/0"
    assert load_config(environ={"MINDSTREAM_CONFIG": ""}).redis.uri.startswith("redis://127.0.0.1")


def test_uris_are_printed_without_their_credentials():
    from infra.config import printable_uri

    assert printable_uri("rediss://default:pw@redis:6380/0?password=qp&db=1") == "rediss://***@redis:6380/0?password=***&db=1"
    assert printable_uri("http://root:Milvus@milvus:19530") == "http://***@milvus:19530"
    assert printable_uri("/var/milvus/lite.db") == "/var/milvus/lite.db"
    # a password holding "/" (base64) or a space, which the URI's own rules let through to the client
    assert printable_uri("redis://:Zm9v/YmFy+cw==@redis.prod:6379/0") == "redis://***@redis.prod:6379/0"
    assert printable_uri("rediss://:pa ss@redis.prod:6380/0") == "rediss://***@redis.prod:6380/0"
    for uri in ("redis://:Zm9v/YmFy+cw==@redis.prod:bad/0", "https://root:S3cr/et@milvus.prod:notaport"):
        key = "REDIS" if uri.startswith("redis") else "MILVUS"
        with pytest.raises(ConfigError) as refused:
            load_config(environ={"MINDSTREAM_CONFIG": "", f"MINDSTREAM_{key}__URI": uri})
        assert "YmFy" not in str(refused.value) and "S3cr" not in str(refused.value)


def test_the_milvus_clients_messages_name_the_server_without_its_credentials():
    from recall_service.backends import MilvusItemSearch

    search = MilvusItemSearch("http://root:s3cret@127.0.0.1:1", {}, "p", connect_timeout_s=0.2)
    assert "s3cret" not in search.shown_uri and search.shown_uri == "http://***@127.0.0.1:1"


def test_a_redis_uri_that_is_no_uri_is_a_config_error():
    from infra.config import ConfigError, RedisConfig

    with pytest.raises(ConfigError, match="is not a URI"):
        RedisConfig(uri="redis://[::1:6379/0")


@pytest.mark.parametrize("environ, message", [
    # credentials a client would drop without a word: the broker gets none
    ({"MINDSTREAM_KAFKA__SASL_USERNAME": "svc", "MINDSTREAM_KAFKA__SASL_PASSWORD": "pw"},
     r"sasl_username / sasl_password are set but security_protocol is PLAINTEXT, which sends no credentials"),
    ({"MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SSL", "MINDSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512"}, "security_protocol is SSL, which sends no credentials"),
    ({"MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "MINDSTREAM_KAFKA__SASL_MECHANISM": "PLAIN"}, r"needs \[kafka\].sasl_username"),
    ({"MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "MINDSTREAM_KAFKA__SASL_MECHANISM": "PLAIN", "MINDSTREAM_KAFKA__SASL_USERNAME": " "},
     r"needs \[kafka\].sasl_username"),
    # Milvus URIs pymilvus would refuse later, with advice about the wrong setting
    ({"MINDSTREAM_MILVUS__URI": "milvus.milvus.svc:19530"}, r"neither a Milvus Lite file nor a server URI \(a server\? http://milvus.milvus.svc:19530\)"),
    ({"MINDSTREAM_MILVUS__URI": "htp://milvus:19530"}, "a server URI starts with http://, https://, tcp://, grpc:// and names a host"),
    ({"MINDSTREAM_MILVUS__URI": "http://:19530"}, "names a host"),
    ({"MINDSTREAM_MILVUS__URI": "http://milvus:notaport"}, "is not a URI"),
    ({"MINDSTREAM_MILVUS__URI": "/var/milvus/items.sqlite"}, "neither a Milvus Lite file nor a server URI"),
    ({"MINDSTREAM_MILVUS__URI": ""}, r"\[milvus\].uri \(MINDSTREAM_MILVUS__URI\) is empty"),
    # empty settings that would fail far from them (or bind every interface)
    ({"MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": ""}, r"\[kafka\].bootstrap_servers \(MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS\) is empty: set it, or leave it out for the default '127.0.0.1:9092'"),
    ({"MINDSTREAM_RECALL__HOST": ""}, r"\[recall\].host .* is empty"),
    ({"MINDSTREAM_MILVUS__COLLECTION_PREFIX": " "}, r"\[milvus\].collection_prefix .* is empty"),
    ({"MINDSTREAM_STREAMING__CHECKPOINT_DIR": ""}, r"\[streaming\].checkpoint_dir .* is empty"),
    ({"MINDSTREAM_KAFKA__EVENTS_TOPIC": "t", "MINDSTREAM_KAFKA__DEAD_LETTER_TOPIC": "t"}, "events_topic and dead_letter_topic are both 't'"),
    # the recall service's two listeners on one port: the second would die at its bind
    ({"MINDSTREAM_RECALL__METRICS_PORT": "50051"}, r"\[recall\].port and \[recall\].metrics_port are both 50051"),
    # the other MINDSTREAM_* names: misspelled ones are refused too, and the GPU switch is a boolean
    ({"MINDSTREAM_CONFG": "/etc/mindstream.toml"}, r"MINDSTREAM_CONFG \(did you mean MINDSTREAM_CONFIG\?\)"),
    ({"MINDSTREAM_DISABLEGPU": "1"}, r"MINDSTREAM_DISABLEGPU \(did you mean MINDSTREAM_DISABLE_GPU\?\)"),
    ({"MINDSTREAM_DISABLE_GPU": "please"}, "MINDSTREAM_DISABLE_GPU: expected a boolean, got 'please'"),
    # values taken, then failing far from them: gRPC's C int (a traceback at the service's start), the
    # broker's topic creation (after it started), Redis Cluster's client (advice to start the local stack)
    ({"MINDSTREAM_RECALL__MAX_REQUEST_BYTES": "600000000"}, r"\[recall\].max_request_bytes"),
    # above Milvus' top k per query vector: every such search refused, answered by popular items instead
    ({"MINDSTREAM_RECALL__MAX_PER_INTEREST_N": "16385"}, r"\[recall\].max_per_interest_n"),
    ({"MINDSTREAM_RECALL__MAX_FILTER_CHARS": "1000000"}, r"\[recall\].max_filter_chars"),
    ({"MINDSTREAM_STREAMING__TOPIC_RETENTION_MS": "-5"}, r"\[streaming\].topic_retention_ms"),
    ({"MINDSTREAM_REDIS__CLUSTER": "true", "MINDSTREAM_REDIS__URI": "redis://127.0.0.1:6379/3"}, "names a db other than 0"),
    ({"MINDSTREAM_REDIS__CLUSTER": "true", "MINDSTREAM_REDIS__URI": "redis://127.0.0.1:6379/0?db=2"}, "names a db other than 0"),
    ({"MINDSTREAM_REDIS__CLUSTER": "true", "MINDSTREAM_REDIS__URI": "unix:///tmp/redis.sock"}, "is a socket path"),
])
def test_settings_that_would_be_dropped_or_fail_later_are_refused_at_load(environ, message):
    with pytest.raises(ConfigError, match=message):
        load_config(environ={"MINDSTREAM_CONFIG": "", **environ})


@pytest.mark.parametrize("uri", ["/var/milvus/items.db", "relative/items.db", "http://milvus:19530", "https://root:pw@milvus.example",
                                 "tcp://milvus:19530", "grpc://10.0.0.7:19530"])
def test_milvus_uris_pymilvus_connects_to_are_accepted(uri):
    assert load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_MILVUS__URI": uri}).milvus.uri == uri


def test_sasl_without_its_password_loads_for_the_processes_that_use_no_kafka():
    """The recall pods read the cluster's SASL settings but get no Kafka secret (k8s/recall.yaml)."""
    kafka = load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_SSL",
                                 "MINDSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512", "MINDSTREAM_KAFKA__SASL_USERNAME": "svc"}).kafka
    assert kafka.sasl_username == "svc" and kafka.sasl_password == ""
    # ... while a process that talks to Kafka is refused its clients, with the variable to set
    from streaming.kafka_clients import java_client_properties, python_client_options

    for client_settings in (python_client_options, java_client_properties):
        with pytest.raises(ConfigError, match="MINDSTREAM_KAFKA__SASL_PASSWORD"):
            client_settings(kafka)


def test_a_kafka_client_key_the_java_client_cannot_read_is_refused_with_the_command_that_converts_it(tmp_path):
    """kafka-python takes a PKCS#1 key (BEGIN RSA PRIVATE KEY), the Flink job's Java client only
    PKCS#8; an encrypted one would need a key password, which [kafka] has not."""
    import shlex
    import shutil
    import subprocess

    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed: cannot make a test key")
    pkcs1, encrypted = tmp_path / "client-key.pem", tmp_path / "encrypted-key.pem"
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(pkcs1), "2048"], check=True, capture_output=True)
    subprocess.run(["openssl", "pkcs8", "-topk8", "-in", str(pkcs1), "-out", str(encrypted), "-passout", "pass:secret"], check=True, capture_output=True)
    assert b"BEGIN RSA PRIVATE KEY" in pkcs1.read_bytes() and b"BEGIN ENCRYPTED PRIVATE KEY" in encrypted.read_bytes()

    def load(keyfile):
        return load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SSL",
                                    "MINDSTREAM_KAFKA__SSL_CERTFILE": str(tmp_path / "client-cert.pem"), "MINDSTREAM_KAFKA__SSL_KEYFILE": str(keyfile)})

    with pytest.raises(ConfigError, match=r"MINDSTREAM_KAFKA__SSL_KEYFILE\) = .* holds a PEM key labelled 'ENCRYPTED PRIVATE KEY'"):
        load(encrypted)
    with pytest.raises(ConfigError, match=r"MINDSTREAM_KAFKA__SSL_KEYFILE\) = .* holds a PEM key labelled 'RSA PRIVATE KEY'") as refused:
        load(pkcs1)
    convert = str(refused.value).split("`")[1]
    assert convert == f"openssl pkcs8 -topk8 -nocrypt -in {pkcs1} -out {pkcs1}.pk8"
    subprocess.run(shlex.split(convert), check=True, capture_output=True)
    assert b"BEGIN PRIVATE KEY" in Path(f"{pkcs1}.pk8").read_bytes() and load(f"{pkcs1}.pk8").kafka.ssl_keyfile == f"{pkcs1}.pk8"
    assert load(tmp_path / "elsewhere.pem")  # not here: the recall service reads the settings without the Kafka key


@pytest.mark.parametrize("value, disabled", [("", False), ("1", True), ("true", True), ("YES", True), ("on", True), ("0", False), ("false", False)])
def test_the_gpu_switch_is_a_boolean(value, disabled):
    from infra.config import gpu_disabled

    assert gpu_disabled({"MINDSTREAM_DISABLE_GPU": value}) is disabled
    assert gpu_disabled({}) is False
    load_config(environ={"MINDSTREAM_CONFIG": "", "MINDSTREAM_DISABLE_GPU": value})  # a valid value passes the load


SASL_PLAINTEXT = {"MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": "broker-1.prod:9092", "MINDSTREAM_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT",
                  "MINDSTREAM_KAFKA__SASL_MECHANISM": "PLAIN", "MINDSTREAM_KAFKA__SASL_USERNAME": "svc", "MINDSTREAM_KAFKA__SASL_PASSWORD": "pw"}


@pytest.mark.parametrize("environ, warned", [
    ({"MINDSTREAM_REDIS__URI": "redis://redis.example.com:6379/0", "MINDSTREAM_REDIS__PASSWORD": "pw"}, "the Redis password goes to redis.example.com in clear text"),
    ({"MINDSTREAM_REDIS__URI": "redis://:pw@10.1.2.3:6379/0"}, "the Redis password goes to 10.1.2.3 in clear text"),
    ({"MINDSTREAM_MILVUS__URI": "http://milvus.example.com:19530", "MINDSTREAM_MILVUS__TOKEN": "root:Milvus"}, "the Milvus token goes to milvus.example.com in clear text"),
    ({"MINDSTREAM_MILVUS__URI": "http://root:Milvus@milvus:19530"}, "the Milvus token goes to milvus in clear text"),
    ({**SASL_PLAINTEXT, "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:9092,broker-1.prod:9092"},
     "the Kafka password goes to broker-1.prod in clear text"),
    # TLS, loopback, a socket or a file: nothing crosses a network in clear
    ({"MINDSTREAM_REDIS__URI": "rediss://redis.example.com:6380/0", "MINDSTREAM_REDIS__PASSWORD": "pw"}, None),
    ({"MINDSTREAM_REDIS__URI": "redis://127.0.0.1:6379/0", "MINDSTREAM_REDIS__PASSWORD": "pw"}, None),
    ({"MINDSTREAM_REDIS__URI": "unix:///run/redis.sock", "MINDSTREAM_REDIS__PASSWORD": "pw"}, None),
    ({"MINDSTREAM_REDIS__URI": "redis://redis.example.com:6379/0"}, None),
    ({"MINDSTREAM_MILVUS__URI": "https://milvus.example.com", "MINDSTREAM_MILVUS__TOKEN": "root:Milvus"}, None),
    ({"MINDSTREAM_MILVUS__URI": "http://localhost:19530", "MINDSTREAM_MILVUS__TOKEN": "root:Milvus"}, None),
    ({"MINDSTREAM_MILVUS__TOKEN": "root:Milvus"}, None),  # Milvus Lite file
    ({**SASL_PLAINTEXT, "MINDSTREAM_KAFKA__BOOTSTRAP_SERVERS": "localhost:9092,[::1]:9093"}, None),
    ({**SASL_PLAINTEXT, "MINDSTREAM_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512"}, None),  # a proof of the password, not the password
    ({**SASL_PLAINTEXT, "MINDSTREAM_KAFKA__SASL_PASSWORD": ""}, None),  # a process that reaches no Kafka has no password to send
])
def test_credentials_sent_in_clear_text_to_another_host_are_warned_about_once(environ, warned, caplog, monkeypatch):
    from infra import config as config_module

    monkeypatch.setattr(config_module, "_warned", set())
    with caplog.at_level("WARNING", logger="infra.config"):
        for _ in range(2):
            load_config(environ={"MINDSTREAM_CONFIG": "", **environ})
    said = [r.getMessage() for r in caplog.records if r.name == "infra.config"]
    assert said == ([] if warned is None else [said[0]]) and (warned is None or said[0].startswith(warned)), said
    assert not any(secret in " ".join(said) for secret in ("pw", "Milvus@", "root:Milvus"))
