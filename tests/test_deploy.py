"""Deployment artifacts under deploy/: every file parses and holds what the docs promise.

Structure is checked with PyYAML/json alone, so this runs anywhere; the real tools are used
when installed: ``promtool`` (rules, rule unit tests, config, the dashboard's queries),
``kubectl kustomize`` (the base and the optional components render) and ``docker compose
config``. ``kubectl apply --dry-run=client`` is not used: it needs a reachable cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from factpatch.config import OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
PROM = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "factpatch.json"

# The metrics every factpatch process exports (all prefixed factpatch_).
HISTOGRAMS = {
    "rpc_duration_seconds",
    "inference_duration_seconds",
    "time_to_first_token_seconds",
    "job_duration_seconds",
    "edit_phase_seconds",
    "apply_pause_seconds",
    "apply_wait_seconds",
    "check_seconds",
}
COUNTERS = {
    "rpc_requests_total",
    "http_requests_total",
    "generated_tokens_total",
    "job_retries_total",
    "dead_letters_total",
    "rollbacks_total",
    "hash_verification_failures_total",
    "checks_total",
    "commits_refused_total",
}
GAUGES = {
    "queue_depth",
    "queue_oldest_job_age_seconds",
    "model_version",
    "ledger_head",
    "version_lag",
    "replica_ready",
    "model_load_seconds",
    "build_info",
}
METRICS = {f"factpatch_{m}" for m in HISTOGRAMS | COUNTERS | GAUGES}

# FACTPATCH_* variables the manifests may set: the settings table, plus those read elsewhere.
KNOWN_ENV = {o.env for o in OPTIONS} | {
    "FACTPATCH_CACHE_DIR",  # factpatch/paths.py
    "FACTPATCH_METRICS_PORT",  # --metrics-port
    "FACTPATCH_ADMIN_TOKEN",  # access control (secret template)
}


def load_all(path: Path) -> list:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def load_one(path: Path):
    (doc,) = load_all(path)
    return doc


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def k8s_docs() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/k8s (kustomizations and components excluded)."""
    out = []
    for path in yaml_files():
        if K8S in path.parents and path.name != "kustomization.yaml":
            out += [(path, doc) for doc in load_all(path)]
    return out


def k8s_objects(kind: str, name: str | None = None) -> list[dict]:
    found = [
        doc
        for path, doc in k8s_docs()
        if doc["kind"] == kind
        and (name is None or doc["metadata"]["name"] == name)
        and "components" not in path.parts
    ]
    assert found, f"no {kind} {name or ''} under deploy/k8s"
    return found


def compose() -> dict:
    return load_one(DEPLOY / "compose.yaml")


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kwargs)


# --- every file ------------------------------------------------------------------------------


def test_deploy_tree_is_complete():
    for rel in [
        "Dockerfile",
        "compose.yaml",
        "prometheus/prometheus.yml",
        "prometheus/alerts.yaml",
        "grafana/factpatch.json",
        "k8s/kustomization.yaml",
        "k8s/README.md",
    ]:
        assert (DEPLOY / rel).is_file(), rel


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_yaml_file_parses(path):
    docs = load_all(path)
    assert docs and all(isinstance(d, dict) for d in docs), path


# --- compose ---------------------------------------------------------------------------------


def test_compose_services():
    services = compose()["services"]
    assert {"redis", "server", "prometheus", "grafana"} <= services.keys()
    workers = [s for name, s in services.items() if name.startswith("worker")]
    cpu_workers = [s for s in workers if "gpu" not in s.get("profiles", [])]
    replicas = sum(s.get("deploy", {}).get("replicas", 1) for s in cpu_workers)
    assert replicas >= 2, "two worker replicas by default"
    for name in ["server", *(n for n in services if n.startswith("worker"))]:
        service = services[name]
        assert service["command"][0] == name.split("-")[0]
        assert "image" in service and "build" in service
        assert (DEPLOY / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        env = service["environment"]
        assert env["FACTPATCH_REDIS_URL"] == "redis://redis:6379/0"
        assert env["FACTPATCH_HOST"] == "0.0.0.0", "reachable from other containers"
        assert str(env["FACTPATCH_METRICS_PORT"]) == "9400"
        assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"


def redis_version_ok(image: str) -> bool:
    name, _, tag = image.partition(":")
    assert name in {"redis", "docker.io/redis", "docker.io/library/redis"}, image
    numbers = tuple(int(x) for x in re.findall(r"\d+", tag)[:2])
    return numbers >= (6, 2)


def assert_redis_persistence(args: list[str]) -> None:
    text = " ".join(str(a) for a in args)
    assert "--appendonly yes" in text
    assert re.search(r"--appendfsync (always|everysec)", text)
    assert "--maxmemory-policy noeviction" in text


def test_compose_redis_persists():
    redis = compose()["services"]["redis"]
    assert redis_version_ok(redis["image"])
    assert_redis_persistence(redis["command"])
    volume, _, target = redis["volumes"][0].partition(":")
    assert target == "/data" and volume in compose()["volumes"], "a named volume"
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_compose_server_ports_and_healthcheck():
    server = compose()["services"]["server"]
    token = server["environment"]["FACTPATCH_ADMIN_TOKEN"]
    assert token.startswith("${FACTPATCH_ADMIN_TOKEN:?"), "required, never a default"
    published = {p.split(":")[-1] for p in server["ports"]}
    assert {"50051", "9400"} <= published
    check = server["healthcheck"]
    assert check["test"][:3] == ["CMD", "python", "-c"]
    assert "grpc_health" in check["test"][3]
    assert check["start_period"], "model loading takes a while"


class HealthServer:
    def __init__(self) -> None:
        from concurrent import futures

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def set(self, status) -> None:
        self.health.set("", status)


def test_compose_healthcheck_probes_grpc_health():
    """The healthcheck's Python, run here against a real grpc.health.v1 server."""
    code = compose()["services"]["server"]["healthcheck"]["test"][3]
    hs = HealthServer()
    try:

        def probe() -> int:
            env = {**os.environ, "FACTPATCH_PORT": str(hs.port)}
            return run([sys.executable, "-c", code], env=env).returncode

        hs.set(health_pb2.HealthCheckResponse.NOT_SERVING)
        assert probe() != 0
        hs.set(health_pb2.HealthCheckResponse.SERVING)
        assert probe() == 0
    finally:
        hs.server.stop(None)
    assert probe() != 0, "nothing listening"


def test_compose_gpu_worker():
    services = compose()["services"]
    gpu = [s for s in services.values() if "gpu" in s.get("profiles", [])]
    assert len(gpu) == 1
    (worker,) = gpu
    assert worker["command"] == ["worker"]
    assert worker["environment"]["FACTPATCH_DEVICE"] == "cuda"
    assert worker["environment"]["FACTPATCH_DTYPE"] == "bfloat16"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert worker["build"]["args"]["TORCH_VARIANT"].startswith("cu")
    assert "worker" in worker["networks"]["default"]["aliases"], "scraped with the workers"
    text = (DEPLOY / "compose.yaml").read_text()
    assert "same dtype" in text, "the comment that servers must use the GPU worker's dtype"


def bind_mounts(service: dict) -> list[tuple[Path, str]]:
    out = []
    for volume in service.get("volumes", []):
        source, _, rest = volume.partition(":")
        if source.startswith("."):
            out.append((DEPLOY / source, rest.split(":")[0]))
    return out


def test_compose_mounts_exist():
    services = compose()["services"]
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert source.exists(), f"{name}: {source}"
    prometheus = {target: source for source, target in bind_mounts(services["prometheus"])}
    config = prometheus["/etc/prometheus/prometheus.yml"]
    rule_files = load_one(config)["rule_files"]
    for rule_file in rule_files:
        target = str(Path("/etc/prometheus") / rule_file)
        assert target in prometheus, f"{rule_file} is mounted beside prometheus.yml"
        assert prometheus[target].resolve() == (PROM / "alerts.yaml").resolve()
    grafana = {target: source for source, target in bind_mounts(services["grafana"])}
    assert grafana["/etc/grafana/provisioning"].is_dir()
    providers = load_one(DEPLOY / "grafana/provisioning/dashboards/factpatch.yaml")["providers"]
    folder = providers[0]["options"]["path"]
    assert grafana[f"{folder}/factpatch.json"].resolve() == DASHBOARD.resolve()


def test_prometheus_scrapes_servers_and_workers():
    config = load_one(PROM / "prometheus.yml")
    assert config["rule_files"] == ["alerts.yaml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose()["services"]
    for service in ["server", "worker"]:
        job = jobs[f"factpatch-{service}"]
        (sd,) = job["dns_sd_configs"]
        assert sd["names"] == [service] and sd["port"] == 9400 and service in services


def test_grafana_datasource():
    (source,) = load_one(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["isDefault"] is True


# --- Kubernetes ------------------------------------------------------------------------------


def test_k8s_objects_are_named():
    docs = k8s_docs()
    assert len(docs) >= 10
    for path, doc in docs:
        where = f"{path.relative_to(DEPLOY)}: {doc.get('kind')}"
        assert doc.get("apiVersion") and doc.get("kind"), where
        assert doc.get("metadata", {}).get("name"), where
        assert "namespace" not in doc["metadata"], f"{where}: namespace-agnostic"


def containers(doc: dict) -> list[dict]:
    return doc["spec"]["template"]["spec"]["containers"]


def test_k8s_deployments():
    for doc in k8s_objects("Deployment"):
        assert doc["spec"]["replicas"] >= 2, doc["metadata"]["name"]
        template = doc["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
        (container,) = containers(doc)
        assert container["image"] and container["args"][0] in {"server", "worker"}
        assert container["resources"]["requests"] and container["resources"]["limits"]
        refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
        assert refs == ["factpatch-config", "factpatch-secrets"], "the Secret wins"
        optional = container["envFrom"][1]["secretRef"].get("optional", False)
        assert optional is (container["args"][0] == "worker"), "servers need a token"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == 9400
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == "9400"
        assert annotations["prometheus.io/path"] == "/metrics"
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True


def test_k8s_server_probes():
    (server,) = k8s_objects("Deployment", "factpatch-server")
    (container,) = containers(server)
    assert {"name": "grpc", "containerPort": 50051, "protocol": "TCP"} in container["ports"]
    for probe in ["livenessProbe", "readinessProbe", "startupProbe"]:
        assert container[probe]["grpc"]["port"] == 50051, probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "model loading"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in container["ports"]
    (service,) = k8s_objects("Service", "factpatch-server")
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051 and ports["grpc"]["targetPort"] in {"grpc", 50051}
    assert ports["http"]["port"] == 8000 and ports["http"]["targetPort"] in {"http", 8000}
    assert (
        service["spec"]["selector"].items()
        <= server["spec"]["template"]["metadata"]["labels"].items()
    )
    drain = float(k8s_objects("ConfigMap")[0]["data"]["FACTPATCH_DRAIN_SECONDS"])
    assert server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_k8s_config():
    (config,) = k8s_objects("ConfigMap", "factpatch-config")
    data = config["data"]
    assert set(data) <= KNOWN_ENV, set(data) - KNOWN_ENV
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values are strings"
    assert data["FACTPATCH_HOST"] == "0.0.0.0"
    assert data["FACTPATCH_PORT"] == "50051" and data["FACTPATCH_METRICS_PORT"] == "9400"
    (redis_service,) = k8s_objects("Service", "factpatch-redis")
    assert data["FACTPATCH_REDIS_URL"] == "redis://factpatch-redis:6379/0"
    assert redis_service["spec"]["ports"][0]["port"] == 6379


def test_k8s_redis_persists():
    (redis,) = k8s_objects("StatefulSet", "factpatch-redis")
    (container,) = containers(redis)
    assert redis_version_ok(container["image"])
    assert_redis_persistence(container["args"])
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mount[claim["metadata"]["name"]] == "/data"
    assert claim["spec"]["resources"]["requests"]["storage"]


def test_k8s_secret_is_a_template_and_not_applied():
    (path, secret), *rest = [(p, d) for p, d in k8s_docs() if d["kind"] == "Secret"]
    assert not rest and path.name == "secret.example.yaml"
    values = secret["stringData"]
    assert "FACTPATCH_ADMIN_TOKEN" in values and set(values) <= KNOWN_ENV
    assert all("PLACEHOLDER" in v for v in values.values())
    assert "PLACEHOLDER" in path.read_text().splitlines()[0]
    assert path.name not in load_one(K8S / "kustomization.yaml")["resources"]


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomizations_list_existing_files(path):
    doc = load_one(path)
    assert doc["kind"] in {"Kustomization", "Component"}
    listed = doc.get("resources", []) + doc.get("components", [])
    listed += [p["path"] for p in doc.get("patches", []) if "path" in p]
    assert listed
    for entry in listed:
        assert (path.parent / entry).exists(), f"{path}: {entry}"
    if doc["kind"] == "Kustomization":
        for text in re.findall(r"#\s+-\s+(components/\S+)", path.read_text()):
            assert (path.parent / text / "kustomization.yaml").is_file(), text


def test_every_k8s_file_is_used():
    used = set()
    for path in kustomizations():
        doc = load_one(path)
        for entry in doc.get("resources", []) + [p["path"] for p in doc.get("patches", [])]:
            used.add((path.parent / entry).resolve())
    for path, _ in k8s_docs():
        if path.name != "secret.example.yaml":
            assert path.resolve() in used, f"{path} is in no kustomization"


def test_k8s_podmonitor():
    path = K8S / "components/podmonitor/podmonitor.yaml"
    monitor = load_one(path)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and monitor["kind"] == "PodMonitor"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["replacement"].startswith("factpatch-")
    selector = monitor["spec"]["selector"]["matchLabels"]
    for deployment in k8s_objects("Deployment"):
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_k8s_gpu_components():
    patch = load_one(K8S / "components/gpu-workers/worker-gpu.yaml")
    (container,) = containers(patch)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "FACTPATCH_DEVICE", "value": "cuda"} in container["env"]
    config = load_one(K8S / "components/gpu-workers/config-bfloat16.yaml")
    assert config["data"] == {"FACTPATCH_DTYPE": "bfloat16"}, "the whole ledger in bf16"
    server = load_one(K8S / "components/gpu-servers/server-gpu.yaml")
    assert containers(server)[0]["resources"]["limits"]["nvidia.com/gpu"] == 1


# --- alerts, dashboard, metric names ---------------------------------------------------------

ALERTS = {
    # name: (expression, for, severity)
    "FactpatchReplicaVersionLag": ("factpatch_version_lag > 0", "5m", "warning"),
    "FactpatchDeadLetters": ("increase(factpatch_dead_letters_total[15m])", None, "warning"),
    "FactpatchHashVerificationFailed": (
        "increase(factpatch_hash_verification_failures_total[5m]) > 0",
        None,
        "critical",
    ),
    "FactpatchQueueBacklog": ("factpatch_queue_oldest_job_age_seconds) > 600", "5m", "warning"),
    "FactpatchReplicaNotReady": ("factpatch_replica_ready == 0", "5m", "warning"),
    "FactpatchTargetDown": ('up{job=~"factpatch.*"} == 0', "5m", "warning"),
}


def alert_rules() -> dict[str, dict]:
    groups = load_one(PROM / "alerts.yaml")["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    by_name = {rule["alert"]: rule for rule in rules}
    assert len(by_name) == len(rules), "alert names are unique"
    return by_name


def test_alert_rules():
    rules = alert_rules()
    for name, (expr, wait, severity) in ALERTS.items():
        rule = rules[name]
        assert expr in rule["expr"], name
        assert rule.get("for") == wait, name
        assert rule["labels"]["severity"] == severity, name
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name


def dashboard_panels() -> list[dict]:
    panels = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return panels


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]


def test_dashboard():
    board = json.loads(DASHBOARD.read_text())
    assert board["schemaVersion"] >= 36 and board["uid"] and board["title"]
    (variable,) = [v for v in board["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    panels = dashboard_panels()
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert panel["targets"] and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " | ".join(p["title"].lower() for p in panels)
    for words in ["request rate", "latency", "first token", "tokens per second", "queue depth"]:
        assert words in titles, words
    for words in ["job age", "phase", "apply pause", "version lag", "errors", "rollbacks"]:
        assert words in titles, words


def metric_names(text: str) -> set[str]:
    names = set()
    for name in re.findall(r"\bfactpatch_[a-z_]+", text):
        for suffix in ("_bucket", "_sum", "_count"):
            if name.endswith(suffix) and name.removesuffix(suffix)[10:] in HISTOGRAMS:
                name = name.removesuffix(suffix)
        names.add(name)
    return names


def test_metric_names_are_the_exported_ones():
    sources = [PROM / "alerts.yaml", PROM / "alerts.test.yaml", DASHBOARD]
    used = set().union(*(metric_names(p.read_text()) for p in sources))
    assert used <= METRICS, sorted(used - METRICS)
    assert metric_names(DASHBOARD.read_text()) == METRICS, "every metric has a panel"


def test_metric_list_matches_what_factpatch_exports():
    """The names above (and so every query) against factpatch/metrics.py, with types."""
    metrics = pytest.importorskip("factpatch.metrics")
    kinds = {"counter": COUNTERS, "histogram": HISTOGRAMS, "gauge": GAUGES}
    exported: dict[str, str] = {}
    for family in metrics.REGISTRY.collect():
        if family.name.startswith("factpatch_"):
            exported[family.name[10:] + ("_total" if family.type == "counter" else "")] = (
                family.type
            )
    replica = SimpleNamespace(version=3, ready=True, ledger=SimpleNamespace(head=lambda: 4))
    queue = SimpleNamespace(depth=lambda kind: 0, oldest_age=lambda kind: 0.0)
    for collector in [metrics.ReplicaCollector(replica), metrics.QueueCollector(queue)]:
        exported |= {f.name[10:]: f.type for f in collector.collect()}
    assert {f"factpatch_{name}" for name in exported} == METRICS
    for name, kind in exported.items():
        assert name in kinds[kind], f"factpatch_{name} is a {kind}"


def test_queries_use_each_metric_type_correctly():
    exprs = dashboard_exprs() + [rule["expr"] for rule in alert_rules().values()]
    for expr in exprs:
        for name in re.findall(r"(?:rate|increase)\((factpatch_[a-z_]+)", expr):
            assert name.endswith("_total") or name.endswith("_bucket"), expr
        for name in re.findall(r"\b(factpatch_[a-z_]+)_bucket", expr):
            assert name[10:] in HISTOGRAMS, expr
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr
        for name in re.findall(r"\bfactpatch_([a-z_]+)", expr):
            if name in HISTOGRAMS:
                raise AssertionError(f"{expr}: a histogram without _bucket/_sum/_count")


# --- the image -------------------------------------------------------------------------------


def test_dockerfile():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    instructions = [line for line in lines if not line.startswith("#")]
    assert "ARG BASE_IMAGE=python:3.11-slim" in instructions
    assert "FROM ${BASE_IMAGE}" in instructions
    assert "ARG TORCH_VARIANT=cpu" in instructions
    assert "https://download.pytorch.org/whl/${TORCH_VARIANT}" in text
    assert 'pip install ".[bundled]"' in text
    torch_at = text.index('--index-url "${TORCH_INDEX_URL}" "torch')
    assert torch_at < text.index('pip install ".[bundled]"'), "torch first"
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in {"0", "root"}
    last_user = max(i for i, line in enumerate(instructions) if line.startswith("USER "))
    assert not any("pip install" in line for line in instructions[last_user:])
    assert 'ENTRYPOINT ["factpatch"]' in instructions
    for line in instructions:
        if line.startswith("COPY "):
            *sources, _ = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), line
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert "*" in ignore and "factpatch/_gen/" in ignore
    for source in ["pyproject.toml", "setup.py", "README.md", "proto/", "factpatch/"]:
        assert f"!{source}" in ignore, source


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="no setuptools to build a wheel"
)
def test_an_installed_wheel_carries_its_grpc_code(tmp_path):
    """What the Dockerfile does: build the wheel (setup.py generates factpatch/_gen from
    proto/) and install it; with no proto/ anywhere, factpatch.rpc still imports."""
    src, site, work = tmp_path / "src", tmp_path / "site", tmp_path / "work"
    src.mkdir()
    work.mkdir()
    for name in ["pyproject.toml", "setup.py", "README.md"]:
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "proto", src / "proto")
    skip = shutil.ignore_patterns("_gen", "__pycache__", ".codegen.lock", ".gen-*")
    shutil.copytree(ROOT / "factpatch", src / "factpatch", ignore=skip)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheel_cmd = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."]
    built = run(wheel_cmd, cwd=src)
    if built.returncode:
        pytest.skip(f"cannot build a wheel offline here: {built.stderr[-500:]}")
    (wheel,) = tmp_path.glob("factpatch-*.whl")
    assert run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)]).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(site)}
    assert (site / "factpatch/_gen/STAMP").is_file()
    shutil.rmtree(src)  # no proto/ anywhere now, as in the image
    check = "import factpatch.rpc as r; print(r.__file__, r.pb.DESCRIPTOR.name)"
    imported = run([sys.executable, "-c", check], env=env, cwd=work)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith(str(site)), imported.stdout


# --- the real tools, when installed ----------------------------------------------------------

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="no promtool")


@needs_promtool
def test_promtool_checks_the_rules():
    result = run(["promtool", "check", "rules", str(PROM / "alerts.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    result = run(["promtool", "test", "rules", str(PROM / "alerts.test.yaml")])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_checks_the_config():
    result = run(["promtool", "check", "config", str(PROM / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = [{"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(["promtool", "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def kustomize(path: Path) -> list[dict]:
    result = run(["kubectl", "kustomize", str(path)])
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def rendered(docs: list[dict], kind: str, name: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")
def test_kubectl_kustomize_renders_the_base():
    docs = kustomize(K8S)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Deployment") == 2 and "StatefulSet" in kinds
    assert "Secret" not in kinds and "PodMonitor" not in kinds, "optional, not in the base"
    server = rendered(docs, "Deployment", "factpatch-server")
    assert containers(server)[0]["image"] == "factpatch:0.1.0"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl")
def test_kubectl_kustomize_renders_the_components(tmp_path):
    base = os.path.relpath(K8S, tmp_path)
    overlay = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "factpatch-test",
        "resources": [base],
        "components": [f"{base}/components/{c}" for c in ["podmonitor", "gpu-workers"]],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(overlay))
    docs = kustomize(tmp_path)
    assert all(d["metadata"]["namespace"] == "factpatch-test" for d in docs)
    assert rendered(docs, "PodMonitor", "factpatch")
    (worker,) = containers(rendered(docs, "Deployment", "factpatch-worker"))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["image"].endswith("-cuda") and worker["envFrom"], "patched, not replaced"
    (server,) = containers(rendered(docs, "Deployment", "factpatch-server"))
    assert "nvidia.com/gpu" not in server["resources"]["limits"]
    config = rendered(docs, "ConfigMap", "factpatch-config")["data"]
    assert config["FACTPATCH_DTYPE"] == "bfloat16" and config["FACTPATCH_REDIS_URL"]


def docker_compose() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(docker_compose() is None, reason="no docker compose")
def test_docker_compose_config():
    for profile in [[], ["--profile", "gpu"]]:
        cmd = [*docker_compose(), "-f", str(DEPLOY / "compose.yaml"), *profile, "config", "-q"]
        result = run(cmd, env={**os.environ, "FACTPATCH_ADMIN_TOKEN": "test"})
        assert result.returncode == 0, result.stderr


# --- docs ------------------------------------------------------------------------------------


def test_operations_doc_has_the_deploy_section():
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text[text.index("## Deploying with compose or Kubernetes") :]
    assert "docker compose -f deploy/compose.yaml up" in section
    assert re.search(r"kubectl apply (-n \S+ )?-k deploy/k8s", section)
    for path in re.findall(r"`(deploy/(?!factpatch-)[^`\s]+)`", section):  # not deploy/NAME
        assert (ROOT / path.rstrip("/")).exists(), path
