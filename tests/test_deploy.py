"""The production deployment files of infra/deploy/ (no network, no Docker, no cluster).

- docker-compose.yml against the compose-spec JSON schema vendored by check-jsonschema, plus the
  cross-references a schema cannot see (mounted files exist, services and volumes are declared);
- Kubernetes core kinds against the Kubernetes OpenAPI schemas bundled by kubernetes-validate
  (strict: unknown fields fail); the CRDs (FlinkDeployment, ServiceMonitor, PodMonitor, PrometheusRule) have no
  bundled schema, so their fields the deployment depends on are checked structurally;
- the consistency between the job's configuration and its FlinkDeployment.
"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import pytest
import yaml

from infra.config import load_config

DEPLOY = Path(__file__).resolve().parent.parent / "infra" / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.30.0"  # the oldest Kubernetes these manifests target (native gRPC probes are GA since 1.27)
CRD_KINDS = {"FlinkDeployment", "ServiceMonitor", "PodMonitor", "PrometheusRule"}


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def _as_compose_fills(value) -> str:
    """A compose value with its ${NAME:?...} filled from secrets.env.example, as
    `docker compose --env-file` fills it (the secret's placeholder, not the error text, is the value)."""
    example = dict(line.split("=", 1) for line in (DEPLOY / "secrets.env.example").read_text().splitlines() if line and not line.startswith("#"))
    return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: example[m.group(1)], str(value))


def _k8s_docs() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[dict]:
    return [d for _, d in _k8s_docs() if d["kind"] == kind]


def _named(kind: str, name: str) -> dict:
    (doc,) = [d for d in _by_kind(kind) if d["metadata"]["name"] == name]
    return doc


def test_compose_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema_file = resources.files("check_jsonschema") / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)  # the schema's own draft (2020-12)
    errors = sorted(validator.iter_errors(_compose()), key=str)
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_compose_has_every_server_with_a_healthcheck():
    services = _compose()["services"]
    for name in ("kafka", "jobmanager", "taskmanager", "job-submit", "milvus", "etcd", "minio", "redis", "prometheus", "grafana", "recall"):
        assert name in services, name
    for name in ("kafka", "jobmanager", "milvus", "etcd", "minio", "redis", "prometheus", "grafana", "recall"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"  # KRaft


def test_compose_cross_references():
    compose = _compose()
    services, volumes = compose["services"], set(compose["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in volumes, f"{name} uses undeclared volume {source}"
        for env_file in svc.get("env_file", []):
            path = env_file["path"] if isinstance(env_file, dict) else env_file
            assert (DEPLOY / (Path(path).name + ".example")).is_file(), f"no example for {path}"
    build = services["jobmanager"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert (DEPLOY / "grpc_health_check.py").is_file()


def test_job_submit_cancels_the_running_job_before_it_submits_again(tmp_path):
    """Run again (after publish, a JobManager restart, a rescale), job-submit must not leave the
    running job beside the new one: Flink's Kafka source assigns partitions itself, so two jobs each
    read every event. Its script runs here against a `flink` that answers `list` as Flink's CLI does."""
    import subprocess

    from streaming.job import JOB_NAME

    service = _compose()["services"]["job-submit"]
    assert service["profiles"] == ["tools"]  # not submitted by `up`, before any model is published
    script = service["command"][0].replace("$$", "$")  # compose's escape of a literal $
    flink = tmp_path / "bin" / "flink"
    flink.parent.mkdir()
    calls = tmp_path / "calls"
    flink.write_text(f"""#!/bin/sh
echo "$@" >> {calls}
if [ "$1" = list ]; then
  echo "Waiting for response..."
  echo "------------------ Running/Restarting Jobs -------------------"
  echo "07.01.2026 16:18:08 : 4f7fc878af8c43e3014dc1d0723e8548 : {JOB_NAME} (RUNNING)"
  echo "07.01.2026 16:19:08 : 77c0064c2878acb7c9c903492d3a11cd : another team's job (RUNNING)"
  echo "07.01.2026 16:20:08 : e8024b50d877e73c85f02a858ff7bc38 : {JOB_NAME}-v2 (RESTARTING)"
  echo "--------------------------------------------------------------"
fi
""")
    flink.chmod(0o755)
    ran = subprocess.run(["sh", "-c", script], env={"FLINK_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    list_call, cancel_call, run_call = calls.read_text().splitlines()
    assert list_call.split()[:2] == ["list", "--running"]
    assert cancel_call.split() == ["cancel", "--jobmanager", "jobmanager:8081", "4f7fc878af8c43e3014dc1d0723e8548"]
    assert run_call.split()[0] == "run" and run_call.endswith("--pyModule streaming --pyClientExecutable /opt/mindstream/.venv/bin/python run --restore latest")


def _config_fields() -> set[tuple[str, str]]:
    from infra import config as cfg

    return {(s.name, f.name) for s in cfg.dataclasses.fields(cfg.Config) for f in cfg.dataclasses.fields(cfg.typing.get_type_hints(cfg.Config)[s.name])}


def _service_config(env: dict[str, str], toml: Path | str = ""):
    """The configuration a process with these variables reads; every MINDSTREAM_* variable must
    name a real field (a typo would be ignored silently)."""
    fields = _config_fields()
    for key in env:
        if key.startswith("MINDSTREAM_") and key != "MINDSTREAM_CONFIG":
            section, field = key[len("MINDSTREAM_"):].lower().split("__")
            assert (section, field) in fields, f"{key} is not a configuration field"
    return load_config(path=None, environ={"MINDSTREAM_CONFIG": str(toml), **env})


def test_compose_environment_is_valid_configuration_and_listens_beyond_loopback():
    """The defaults bind loopback; in a container the API and every /metrics Prometheus scrapes
    from its own container must listen on all interfaces."""
    services = _compose()["services"]
    configs = {name: _service_config({k: _as_compose_fills(v) for k, v in (services[name].get("environment") or {}).items() if k.startswith("MINDSTREAM_")})
               for name in ("jobmanager", "taskmanager", "job-submit", "recall", "exporter", "publish")}
    assert configs["recall"].kafka.bootstrap_servers == "kafka:9092"
    assert configs["recall"].recall.host == configs["recall"].recall.metrics_host == "0.0.0.0"
    assert configs["taskmanager"].streaming.metrics_host == "0.0.0.0"
    assert configs["exporter"].monitoring.exporter_host == "0.0.0.0"


def test_compose_publishes_ports_on_the_hosts_loopback_only():
    published = [(name, port) for name, svc in _compose()["services"].items() for port in svc.get("ports", [])]
    assert len(published) == 5
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface of the host"


def test_prometheus_config_scrapes_the_jobs_the_rules_expect():
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"] for j in prom["scrape_configs"]}
    assert {"mindstream-streaming", "mindstream-recall", "mindstream-exporter"} <= jobs
    for rule_file in prom["rule_files"]:
        assert (DEPLOY.parent / "prometheus" / Path(rule_file).name).is_file()


def test_core_kinds_match_the_kubernetes_schemas():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = 0
    for name, doc in _k8s_docs():
        if doc["kind"] in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)  # raises ValidationError
        checked += 1
    assert checked >= 7


def test_kustomization_lists_every_manifest():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_one_pod_may_write_the_model_registry_and_nothing_else_does():
    """Every server mounts the registry read-only; without the toolbox nothing could publish a model,
    and the recall service would never be ready nor the job start."""
    def containers(node):  # of every pod spec in a manifest, the FlinkDeployment's pod template too
        if isinstance(node, dict):
            yield from node.get("containers", [])
            for value in node.values():
                yield from containers(value)
        elif isinstance(node, list):
            for value in node:
                yield from containers(value)

    readers, writers = [], []
    for _, doc in _k8s_docs():
        for container in containers(doc.get("spec")):
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/var/lib/mindstream/models"]
            (writers if any(not m.get("readOnly") for m in mounts) else readers if mounts else []).append(doc["metadata"]["name"])
    assert {"recall", "exporter", "mindstream-streaming"} <= set(readers)
    assert writers == ["model-tools"]
    tools = _named("Deployment", "model-tools")
    assert tools["spec"]["strategy"]["type"] == "Recreate" and tools["spec"]["template"]["spec"]["securityContext"]["fsGroup"] == 9999


def test_recall_probes_use_the_grpc_health_service():
    deploy = _named("Deployment", "recall")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["grpc"]["port"] == 50051
    assert container["startupProbe"]["grpc"]["port"] == 50051
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # new RPCs are refused from SIGTERM on: the pod keeps serving until it is out of the Endpoints
    drain_s = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert drain_s >= 5 and deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= drain_s + 5 + 10
    (hpa,) = _by_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    secret_refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs == {"mindstream-secrets"}


def _toml() -> dict:
    (cm,) = _by_kind("ConfigMap")
    return tomllib.loads(cm["data"]["mindstream.toml"])


def test_configmap_and_the_recall_pods_environment_are_a_valid_configuration(tmp_path):
    path = tmp_path / "mindstream.toml"
    path.write_text(_by_kind("ConfigMap")[0]["data"]["mindstream.toml"])
    recall, exporter = (_named("Deployment", name)["spec"]["template"]["spec"]["containers"][0] for name in ("recall", "exporter"))
    configs = {}
    for container in (recall, exporter):
        env = {e["name"]: e.get("value", "from-a-secret") for e in container["env"] if e["name"] != "MINDSTREAM_CONFIG"}
        configs[container["name"]] = _service_config(env, path)
    config = configs["recall"]
    assert config.recall.host == config.recall.metrics_host == "0.0.0.0" and config.streaming.metrics_host == "0.0.0.0"
    assert {"name": "metrics", "containerPort": config.recall.metrics_port} in recall["ports"]
    monitoring = configs["exporter"].monitoring
    assert monitoring.exporter_host == "0.0.0.0" and {"name": "metrics", "containerPort": monitoring.exporter_port} in exporter["ports"]


def test_flink_deployment_structure(tmp_path):
    """FlinkDeployment is a CRD without a bundled schema: check the fields this job relies on."""
    (fd,) = _by_kind("FlinkDeployment")
    assert fd["apiVersion"] == "flink.apache.org/v1beta1"
    spec = fd["spec"]
    assert spec["flinkVersion"] == "v2_0"
    conf = spec["flinkConfiguration"]
    assert conf["state.backend.type"] == "rocksdb"
    assert conf["python.execution-mode"] == "thread"
    assert conf["taskmanager.numberOfTaskSlots"] == "1"
    assert conf["execution.checkpointing.dir"].startswith("s3://")
    job = spec["job"]
    assert job["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    assert job["args"][job["args"].index("-pym") + 1] == "streaming" and job["args"][-1] == "run"
    assert job["upgradeMode"] in ("last-state", "savepoint")
    # The job sets parallelism.default and the checkpoint dir itself from the configuration: they
    # must agree with the operator's, and Kafka partitions must cover every subtask.
    streaming = _toml()["streaming"]
    assert job["parallelism"] == streaming["parallelism"]
    assert streaming["topic_partitions"] >= streaming["parallelism"]
    assert streaming["topic_replication_factor"] >= 3  # the job creates missing topics: replicated, as acks=all expects
    from streaming.job import STATE_LAYOUT, checkpoint_location

    # through the loaded configuration, as the job reads it (a Path there once made s3:// a local "s3:/" folder)
    path = tmp_path / "mindstream.toml"
    path.write_text(_by_kind("ConfigMap")[0]["data"]["mindstream.toml"])
    loaded = load_config(path, environ={}).streaming.checkpoint_dir
    assert conf["execution.checkpointing.dir"] == checkpoint_location(loaded) == f"{streaming['checkpoint_dir']}/{STATE_LAYOUT}"
    (container,) = spec["podTemplate"]["spec"]["containers"]
    assert container["name"] == "flink-main-container"  # the operator merges by this name
    assert {"name": "job-metrics", "containerPort": streaming["metrics_port"]} in container["ports"]


def test_monitors_point_at_declared_ports():
    for name in ("recall", "exporter"):
        sm, svc = _named("ServiceMonitor", f"mindstream-{name}"), _named("Service", name)
        assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
        assert sm["spec"]["endpoints"][0]["relabelings"][0]["replacement"] == f"mindstream-{name}"  # the job the rules expect
    (pm,) = _by_kind("PodMonitor")
    (fd,) = _by_kind("FlinkDeployment")
    assert pm["spec"]["selector"]["matchLabels"]["app"] == fd["metadata"]["name"]  # the operator's pod label
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "job-metrics"
    for monitor in (*_by_kind("ServiceMonitor"), pm):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"


def test_the_clusters_prometheus_rule_is_infra_prometheus_rules():
    """prometheus-rules.yaml is generated from infra/prometheus/ (python -m infra k8s-rules)."""
    from infra.k8s_rules import RULE_FILES, render_rules

    (rule,) = _by_kind("PrometheusRule")
    assert (K8S / "prometheus-rules.yaml").read_text() == render_rules(), "run `python -m infra k8s-rules` and commit the file"
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["spec"]["groups"] == [g for path in RULE_FILES for g in yaml.safe_load(path.read_text())["groups"]]


def _pod_specs():
    """Every pod template of the manifests: Deployments' and the FlinkDeployment's pod template."""
    for doc in _by_kind("Deployment"):
        yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]
    for doc in _by_kind("FlinkDeployment"):
        yield doc["metadata"]["name"], doc["spec"]["podTemplate"]["spec"]


def test_every_pods_configuration_file_is_mounted_from_the_configmap():
    """A MINDSTREAM_CONFIG that names a missing file stops every command (infra/config.py): each pod
    that sets it must mount the ConfigMap that holds that file at its folder."""
    configmaps = {cm["metadata"]["name"]: cm for cm in _by_kind("ConfigMap")}
    checked = 0
    for name, pod in _pod_specs():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            path = next((e["value"] for e in container.get("env", []) if e["name"] == "MINDSTREAM_CONFIG"), None)
            if path is None:
                continue
            folder, file_name = path.rsplit("/", 1)
            mounts = [m for m in container.get("volumeMounts", []) if m["mountPath"] == folder]
            assert mounts, f"{name}: MINDSTREAM_CONFIG={path} but nothing is mounted at {folder}"
            source = volumes[mounts[0]["name"]].get("configMap", {}).get("name")
            assert source in configmaps and file_name in configmaps[source]["data"], f"{name}: {path} is not in a ConfigMap"
            checked += 1
    assert checked >= 3  # recall, exporter, the Flink job


def test_the_image_generates_the_grpc_stubs_while_it_can_write_them():
    # The stubs are git-ignored and generated on import when missing; the image's processes run as
    # flink, who cannot write recall_service/: a build without this step gives a service that
    # cannot start (PermissionError on recall_service/_generated.lock).
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert dockerfile.index("python -m recall_service stubs") < dockerfile.index("\nUSER flink")
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "recall_service/_generated" in ignored  # a checkout's stale copy never enters the image


def _example_secrets() -> set[str]:
    lines = (DEPLOY / "secrets.env.example").read_text().splitlines()
    return {line.split("=", 1)[0] for line in lines if line and not line.startswith("#")}


def test_each_compose_service_is_handed_only_the_secrets_it_uses():
    """All of secrets.env went to every container (env_file): the recall token in Grafana, MinIO's
    root password in the recall service. Now compose fills ${...} from it (--env-file) and each
    service names the variables it needs."""
    import re

    text = (DEPLOY / "docker-compose.yml").read_text()
    secrets = _example_secrets()
    interpolated = set(re.findall(r"\$\{([A-Z0-9_]+):\?", text))
    assert interpolated == secrets  # every secret is used, and only from the example's names
    assert not re.search(r"\$\{[A-Z0-9_]+\}", text)  # a missing secret stops compose instead of starting with an empty one
    services = _compose()["services"]
    assert not [name for name, svc in services.items() if svc.get("env_file")]
    handed = {name: {key for key, value in (svc.get("environment") or {}).items() if "${" in str(value)} for name, svc in services.items()}
    assert {name: keys for name, keys in handed.items() if keys} == {
        "redis": {"MINDSTREAM_REDIS__PASSWORD"},
        "minio": {"MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"},
        "milvus": {"MINIO_ACCESS_KEY_ID", "MINIO_SECRET_ACCESS_KEY"},
        "job-submit": {"MINDSTREAM_REDIS__PASSWORD"},  # the job's Redis settings ride in the job graph to the TaskManagers
        "recall": {"MINDSTREAM_REDIS__PASSWORD", "MINDSTREAM_RECALL__AUTH_TOKEN"},
        "exporter": {"MINDSTREAM_REDIS__PASSWORD"},
        "grafana": {"GF_SECURITY_ADMIN_PASSWORD"},
    }


def test_the_image_checks_the_python_tarball_before_unpacking_it():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "ARG PYTHON_VERSION=3.11.13\n" in dockerfile  # the checksum below is this version's
    assert "ARG PYTHON_SHA256=0f1a22f4dfd34595a29cf69ee7ea73b9eff8b1cc89d7ab29b3ab0ec04179dad8\n" in dockerfile
    assert 0 < dockerfile.index("sha256sum -c") < dockerfile.index("tar -x")
    assert "| tar" not in dockerfile  # nothing unpacked straight from the network
    assert "-c infra/constraints.txt" in dockerfile  # the versions infra/bootstrap.sh installs


def _top_level_imports(path: Path) -> set[str]:
    """The modules a file imports when it is loaded (imports inside functions load on use)."""
    import ast

    modules = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
    return modules


def test_what_the_packages_import_at_load_is_a_runtime_dependency():
    """The image installs the project without extras (`pip install -e .`): a module the code imports at
    load time from the dev extra only (PyYAML was: infra/monitoring.py, which `python -m infra up` imports) is missing there."""
    import importlib.metadata
    import re
    import sys

    repo = DEPLOY.parent.parent
    project = tomllib.loads((repo / "pyproject.toml").read_text())["project"]

    def names(requirements):
        return {re.split(r"[=<>!~\[; ]", requirement, maxsplit=1)[0].lower().replace("_", "-") for requirement in requirements}

    runtime, dev = names(project["dependencies"]), names(project["optional-dependencies"]["dev"])
    distributions = importlib.metadata.packages_distributions()
    own = {"infra", "model_export", "streaming", "recall_service"}
    for package in sorted(own):
        for path in sorted((repo / package).rglob("*.py")):
            if "_generated" in path.parts:
                continue
            for module in _top_level_imports(path) - own - set(sys.stdlib_module_names) - {"__future__"}:
                provided = {name.lower().replace("_", "-") for name in distributions.get(module, [module])}
                assert provided & runtime or not provided & dev, f"{path.relative_to(repo)} imports {module} at load, which only the dev extra installs"
