"""The deployment files: Kubernetes manifests against the API schemas, docker-compose.yml, the two-tier
configs, and the facts that tie them together (drain graces, probes, ports, secrets, selectors).

Offline and quick: kubernetes-validate ships the Kubernetes JSON schemas; `docker compose config` runs only
where docker and its compose plugin are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from gateway.config import GatewayConfig, load_config, parse_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_FILE = ROOT / "docker-compose.yml"
GPU_CONFIG = DEPLOY / "two-tier.toml"
CPU_CONFIG = DEPLOY / "two-tier-cpu.toml"

KUBERNETES_VERSION = "1.30"
# Kinds outside the Kubernetes API, which kubernetes-validate has no schema for (it raises
# SchemaNotFoundError): each is checked by hand below, and any other kind must pass the schemas.
NOT_IN_SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"), ("kustomize.config.k8s.io/v1beta1", "Kustomization")}
SLOT_UTILISATION = (
    "(sum(duplexgate_worker_slots_active) + sum(duplexgate_worker_slots_reserved))"
    " / sum(duplexgate_worker_slots_total)"
)
CONFIG_PATH = "/etc/duplexgate/config.toml"
# What the deployments export: every secret they give is dummy here, enough for the loader's checks.
DEPLOY_ENV = {
    "TWILIO_AUTH_TOKEN": "test-token",
    "DUPLEXGATE_PUBLIC_URL": "https://gw.example.com",
    "DUPLEXGATE_API_KEY": "test-api-key",
    "DUPLEXGATE_WORKER_KEY": "test-worker-key",
}


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [doc for _, doc in k8s_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/k8s, found {len(found)}"
    return found[0]


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def configmap_toml() -> str:
    return k8s_object("ConfigMap", "duplexgate-config")["data"]["config.toml"]


def cli_option(args: list[str], option: str) -> str:
    return args[args.index(option) + 1]


def prestop_sleep_s(spec: dict[str, Any]) -> float:
    """Seconds a container's preStop hook waits before SIGTERM (only `sleep N` hooks are used here)."""
    hook = spec.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0.0
    command = hook["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, f"unexpected preStop hook {command}"
    return float(command[1])


def load_deploy_config(text: str, source: str) -> GatewayConfig:
    return parse_config(tomllib.loads(text), source=source, env=DEPLOY_ENV)


# --- Kubernetes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, doc", k8s_documents(), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_validates_against_the_kubernetes_schemas(name: str, doc: dict[str, Any]) -> None:
    if (doc["apiVersion"], doc["kind"]) in NOT_IN_SCHEMAS:
        with pytest.raises(SchemaNotFoundError):  # checked by hand in the tests below
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        return
    try:
        validated = kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # reported by the assert, without the chain
        validated = f"{'.'.join(map(str, exc.path))}: {exc.message}"
    assert validated == KUBERNETES_VERSION, f"{name}: {doc['kind']} {doc['metadata']['name']}"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kustomization["kind"] == "Kustomization"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    images = {image["name"] for image in kustomization["images"]}
    used = {
        container(doc)["image"].split(":")[0] for _, doc in k8s_documents() if doc["kind"] == "Deployment"
    }
    assert {"duplexgate-gateway", "duplexgate-worker"} <= images <= used


def test_keda_scaled_object_scales_workers_on_slot_utilisation() -> None:
    scaled = k8s_object("ScaledObject", "duplexgate-worker")
    spec = scaled["spec"]
    known = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod"}
    assert set(spec) <= known | {"advanced", "triggers", "idleReplicaCount", "fallback"}, "unknown spec key"
    target = spec["scaleTargetRef"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == "apps/v1"
    k8s_object("Deployment", target["name"])  # names the worker Deployment
    assert target["name"] == "duplexgate-worker"
    assert spec["minReplicaCount"] >= 1  # a warm worker: GPU pods take minutes to start
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    # A fleet-wide ratio: with AverageValue the HPA would divide it by the replica count again.
    assert trigger["metricType"] == "Value"
    metadata = trigger["metadata"]
    assert all(isinstance(value, str) for value in metadata.values()), "KEDA wants string metadata"
    assert metadata["query"] == SLOT_UTILISATION
    assert 0.5 <= float(metadata["threshold"]) <= 0.9
    assert re.fullmatch(r"https?://[^/\s]+(/\S*)?", metadata["serverAddress"])
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0


def test_gateway_hpa_scales_the_gateway_deployment_on_cpu() -> None:
    hpa = k8s_object("HorizontalPodAutoscaler", "duplexgate-gateway")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "duplexgate-gateway")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # CPU utilisation is measured against the request, which must be there
    assert container(k8s_object("Deployment", "duplexgate-gateway"))["resources"]["requests"]["cpu"]
    assert hpa["spec"]["minReplicas"] >= 2


def test_scaled_deployments_leave_their_replica_count_to_the_autoscalers() -> None:
    for name in ("duplexgate-gateway", "duplexgate-worker"):
        assert "replicas" not in k8s_object("Deployment", name)["spec"], f"a re-apply would reset {name}"


def test_worker_gets_one_gpu_and_advertises_its_pod_ip() -> None:
    worker = container(k8s_object("Deployment", "duplexgate-worker"))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"][0] == "worker"
    port = int(cli_option(worker["args"], "--port"))
    env = [entry["name"] for entry in worker["env"]]
    by_name = {entry["name"]: entry for entry in worker["env"]}
    assert by_name["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert by_name["DUPLEXGATE_WORKER_URL"]["value"] == f"http://$(POD_IP):{port}"
    # $(VAR) expands only variables defined earlier in the list
    assert env.index("POD_IP") < env.index("DUPLEXGATE_WORKER_URL")
    assert by_name["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "HF_TOKEN"
    mounts = {mount["mountPath"]: mount["name"] for mount in worker["volumeMounts"]}
    assert by_name["HF_HOME"]["value"] in mounts  # the weights land on a volume, not the container layer


@pytest.mark.parametrize("name, port", [("duplexgate-gateway", 8080), ("duplexgate-worker", 8090)])
def test_probes_hit_readyz_and_healthz_on_the_listening_port(name: str, port: int) -> None:
    spec = container(k8s_object("Deployment", name))
    assert spec["command"] == ["duplexgate"]
    assert spec["args"][0] == ("serve" if "gateway" in name else "worker")
    assert cli_option(spec["args"], "--config") == CONFIG_PATH
    assert cli_option(spec["args"], "--host") == "0.0.0.0"
    assert int(cli_option(spec["args"], "--port")) == port
    ports = {p.get("name", str(p["containerPort"])): p["containerPort"] for p in spec["ports"]}
    assert port in ports.values()

    def probed_port(probe: dict[str, Any]) -> int:
        target = probe["httpGet"]["port"]
        return ports[target] if isinstance(target, str) else target

    assert spec["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probed_port(spec["readinessProbe"]) == port
    for probe in ("livenessProbe", "startupProbe"):
        assert spec[probe]["httpGet"]["path"] == "/healthz"
        assert probed_port(spec[probe]) == port


@pytest.mark.parametrize(
    "name, section", [("duplexgate-gateway", "server"), ("duplexgate-worker", "workers")]
)
def test_termination_grace_outlasts_the_drain(name: str, section: str) -> None:
    deployment = k8s_object("Deployment", name)
    pod = deployment["spec"]["template"]["spec"]
    drain = tomllib.loads(configmap_toml())[section]["drain_grace_s"]
    # the preStop wait comes out of the same grace period, before SIGTERM starts the drain
    assert pod["terminationGracePeriodSeconds"] > prestop_sleep_s(container(deployment)) + drain
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_configmap_holds_the_two_tier_config_and_the_loader_accepts_it() -> None:
    text = configmap_toml()
    assert text == GPU_CONFIG.read_text(), "deploy/k8s/config.yaml must hold deploy/two-tier.toml"
    config = load_deploy_config(text, source="deploy/k8s/config.yaml")
    assert config.workers.enabled
    assert config.store.url == "redis://redis:6379/0"
    k8s_object("Service", "redis")  # the name the store url resolves in the namespace


def test_pods_mount_the_configmap_and_export_what_the_config_names() -> None:
    config = load_deploy_config(configmap_toml(), source="deploy/k8s/config.yaml")
    secret = k8s_object("Secret", "duplexgate")
    wanted = {
        "duplexgate-gateway": {
            config.carriers["twilio"].auth_token_env,
            config.server.public_url_env,
            config.control.api_key_env,
            config.workers.key_env,
        },
        "duplexgate-worker": {config.workers.key_env, config.workers.advertise_url_env},
    }
    for name, variables in wanted.items():
        pod = k8s_object("Deployment", name)["spec"]["template"]["spec"]
        spec = container(k8s_object("Deployment", name))
        env = {entry["name"]: entry for entry in spec["env"]}
        assert variables <= set(env), f"{name} lacks {variables - set(env)}"
        for entry in env.values():
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["name"] == "duplexgate" and ref["key"] in secret["stringData"], entry
        (config_volume,) = [v for v in pod["volumes"] if "configMap" in v]
        assert config_volume["configMap"]["name"] == "duplexgate-config"
        (mount,) = [m for m in spec["volumeMounts"] if m["name"] == config_volume["name"]]
        paths = [item["path"] for item in config_volume["configMap"].get("items", [])] or ["config.toml"]
        assert f"{mount['mountPath']}/config.toml" == CONFIG_PATH and "config.toml" in paths


def test_secret_example_is_marked_and_holds_only_placeholders() -> None:
    text = (K8S / "secret.example.yaml").read_text()
    assert "EXAMPLE ONLY" in text
    for key, value in k8s_object("Secret", "duplexgate")["stringData"].items():
        assert value == "CHANGE-ME" or value.startswith("https://gw.example.com"), key


def test_services_select_their_deployments_pods() -> None:
    services = [doc for _, doc in k8s_documents() if doc["kind"] == "Service"]
    deployments = [doc for _, doc in k8s_documents() if doc["kind"] == "Deployment"]
    assert {s["metadata"]["name"] for s in services} == {"redis", "duplexgate-gateway", "duplexgate-worker"}
    for deployment in deployments:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    for service in services:
        selector = service["spec"]["selector"]
        matched = [
            d for d in deployments if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, f"Service {service['metadata']['name']} selects {len(matched)} Deployments"
        port_names = {
            p.get("name") for c in matched[0]["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, port


# --- docker compose --------------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_default(value: str) -> str:
    """A compose value with each `${VAR:-default}` replaced by its default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


# a short-syntax volume: SOURCE:TARGET[:MODE], SOURCE possibly "${VAR:-default}"
VOLUME = re.compile(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(?:ro|rw))?")


def volume_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for volume in service.get("volumes", []):
        match = VOLUME.fullmatch(volume)
        assert match, f"unexpected volume {volume!r}"
        yield match.group(1), match.group(2)


def bind_mounts(service: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(raw source, source with defaults, target) of each bind mount (a source that is a path)."""
    for source, target in volume_mounts(service):
        resolved = compose_default(source)
        if resolved.startswith((".", "/")):
            yield source, resolved, target


def named_volumes(service: dict[str, Any]) -> dict[str, str]:
    """target -> volume name of each named-volume mount."""
    return {target: source for source, target in volume_mounts(service) if re.fullmatch(r"[\w.-]+", source)}


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def mounted_config(service: dict[str, Any]) -> dict[str, Any]:
    (source,) = [resolved for _, resolved, target in bind_mounts(service) if target == CONFIG_PATH]
    return tomllib.loads((ROOT / source).read_text())


def duration_s(value: str) -> float:
    """A compose duration such as "90s", "11m" or "1m30s" in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a compose duration: {value!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(number) * scale[unit] for number, unit in parts)


def depends_closure(services: dict[str, Any], names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            depends = services[name].get("depends_on", [])
            todo += list(depends) if isinstance(depends, dict) else depends
    return seen


GPU_TIER = {"gateway": "serve", "worker": "worker"}
CPU_TIER = {"gateway-cpu": "serve", "worker-cpu": "worker"}


def test_compose_runs_redis_a_gateway_and_a_gpu_worker_by_default() -> None:
    services = compose()["services"]
    for name in ("redis", *GPU_TIER):
        assert name in services and "profiles" not in services[name], f"{name} is not in the default profile"
    (device,) = gpu_devices(services["worker"])
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] == 1
    assert services["worker"]["build"]["dockerfile"] == "deploy/Dockerfile.worker"
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert not gpu_devices(services["gateway"])


def test_compose_cpu_profile_runs_the_same_topology_without_a_gpu() -> None:
    services = compose()["services"]
    for name, command in CPU_TIER.items():
        assert services[name]["profiles"] == ["cpu"]
        assert services[name]["command"][1] == command
    # `docker compose --profile cpu up gateway-cpu worker-cpu` starts these and what they depend on
    # (Prometheus and Grafana too with the observability profile): none of it may ask for a GPU.
    started = depends_closure(services, [*CPU_TIER, "prometheus", "grafana"])
    assert not started & set(GPU_TIER)
    assert not [name for name in started if gpu_devices(services[name])]
    # the GPU services' names on the network, so the worker URL and Prometheus' targets are the same
    assert services["gateway-cpu"]["networks"]["default"]["aliases"] == ["gateway"]
    assert services["worker-cpu"]["networks"]["default"]["aliases"] == ["worker"]
    assert mounted_config(services["worker-cpu"])["engine"]["device"] == "cpu"


@pytest.mark.parametrize("name", ["redis", *GPU_TIER, *CPU_TIER])
def test_compose_services_have_healthchecks_and_restart(name: str) -> None:
    service = compose()["services"][name]
    assert service["restart"] == "unless-stopped"
    test = service["healthcheck"]["test"]
    if name == "redis":
        assert test == ["CMD", "redis-cli", "ping"]
        return
    port = cli_option(service["command"], "--port")
    assert test[:3] == ["CMD", "python", "-c"]  # the slim image has no curl
    assert f"http://127.0.0.1:{port}/readyz" in test[3]
    depends = service["depends_on"]
    assert depends["redis"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name, section", [("gateway", "server"), ("worker", "workers")])
def test_compose_stop_grace_outlasts_the_drain_of_the_mounted_config(name: str, section: str) -> None:
    services = compose()["services"]
    for service in (services[name], services[f"{name}-cpu"]):
        assert service["command"][2:4] == ["--config", CONFIG_PATH]
        drain = mounted_config(service)[section]["drain_grace_s"]
        assert duration_s(service["stop_grace_period"]) > drain


def test_compose_mounts_files_that_exist_and_declares_its_named_volumes() -> None:
    document = compose()
    declared = set(document["volumes"])
    for name, service in document["services"].items():
        for raw, resolved, _ in bind_mounts(service):
            # key files (DUPLEXGATE_*_KEY_FILE) are the operator's secrets, written before the run
            if not re.match(r"\$\{[A-Z_]+_KEY_FILE:-", raw):
                assert (ROOT / resolved).exists(), f"{name} mounts {resolved}, which is not in the repository"
        assert set(named_volumes(service).values()) <= declared, name
    # both tiers of a topology read the same file, overridable from the environment
    gpu, cpu = (
        "${DUPLEXGATE_CONFIG:-./deploy/two-tier.toml}",
        "${DUPLEXGATE_CPU_CONFIG:-./deploy/two-tier-cpu.toml}",
    )
    for name, source in {"gateway": gpu, "worker": gpu, "gateway-cpu": cpu, "worker-cpu": cpu}.items():
        assert _config_source(document["services"][name]) == source, name
    worker = document["services"]["worker"]
    hf_home = worker["environment"]["HF_HOME"]
    assert named_volumes(worker)[hf_home] == "hf-cache"  # the weights outlive the container
    assert "/data" in named_volumes(worker)


def test_compose_requires_the_secrets_the_configs_name() -> None:
    services = compose()["services"]
    for gateway, worker in (("gateway", "worker"), ("gateway-cpu", "worker-cpu")):
        config = load_config(ROOT / compose_default(_config_source(services[gateway])), env=DEPLOY_ENV)
        required = {
            gateway: [
                config.carriers["twilio"].auth_token_env,
                config.server.public_url_env,
                config.workers.key_env,
            ],
            worker: [config.workers.key_env],
        }
        for name, variables in required.items():
            env = services[name]["environment"]
            for variable in variables:
                assert env[variable].startswith(f"${{{variable}:?"), f"{name}: {variable} = {env[variable]}"
        url = services[worker]["environment"][config.workers.advertise_url_env]
        assert url == f"http://worker:{cli_option(services[worker]['command'], '--port')}"


def _config_source(service: dict[str, Any]) -> str:
    return next(raw for raw, _, target in bind_mounts(service) if target == CONFIG_PATH)


def test_prometheus_scrapes_gateway_and_worker_with_their_keys() -> None:
    scrape = {
        job["job_name"]: job
        for job in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    }
    mounted = {target for _, _, target in bind_mounts(compose()["services"]["prometheus"])}
    for job, target in (("duplexgate", "gateway:8080"), ("duplexgate-worker", "worker:8090")):
        assert scrape[job]["static_configs"][0]["targets"] == [target]
        assert scrape[job]["authorization"]["credentials_file"] in mounted


def test_docker_compose_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker is not installed")
    if subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker's compose plugin is not installed")
    env = {**os.environ, **DEPLOY_ENV}
    for profiles in ([], ["--profile", "cpu", "--profile", "observability"]):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE_FILE), *profiles, "config", "-q"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr


# --- images and configs ----------------------------------------------------------------------------------


def test_images_hold_the_code_and_the_worker_image_the_cuda_torch() -> None:
    worker = (DEPLOY / "Dockerfile.worker").read_text()
    cpu = (DEPLOY / "Dockerfile").read_text()
    for dockerfile in (worker, cpu):
        for folder in ("gateway", "engine", "crm_adapters", "templates", "deploy"):
            assert f"COPY {folder} {folder}" in dockerfile
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-\w+-ubuntu24\.04$", worker, re.M)
    assert "https://download.pytorch.org/whl/cu126" in worker
    assert "torch==" not in worker  # no pin: `pip install -e .` keeps the CUDA build installed first
    assert (
        '"worker", "--config", "/etc/duplexgate/config.toml", "--host", "0.0.0.0", "--port", "8090"' in worker
    )
    assert "https://download.pytorch.org/whl/cpu" in cpu


@pytest.mark.parametrize("path", [GPU_CONFIG, CPU_CONFIG], ids=lambda p: p.name)
def test_two_tier_config_loads(path: Path) -> None:
    config = load_config(path, env=DEPLOY_ENV)
    assert config.workers.enabled
    assert config.store.url == "redis://redis:6379/0"
    assert config.carriers["twilio"].auth_token == DEPLOY_ENV["TWILIO_AUTH_TOKEN"]  # signatures on
    for agent in config.agents.values():
        # a drain on either tier lets any call reach its own limit
        assert agent.limits.max_duration is not None
        assert agent.limits.max_duration < min(config.server.drain_grace_s, config.workers.drain_grace_s)


def test_two_tier_configs_differ_only_where_a_laptop_must() -> None:
    gpu, cpu = (load_config(path, env=DEPLOY_ENV) for path in (GPU_CONFIG, CPU_CONFIG))
    assert (gpu.engine.checkpoint, gpu.engine.device) == ("nvidia/personaplex-7b-v1", "cuda")
    assert (cpu.engine.checkpoint, cpu.engine.device, cpu.engine.slots) == ("", "cpu", 2)
    assert set(gpu.agents) == set(cpu.agents) and gpu.numbers == cpu.numbers
    assert {agent.voice for agent in cpu.agents.values()} == {"demo"}
    assert (gpu.workers.key_env, gpu.workers.advertise_url_env) == (
        cpu.workers.key_env,
        cpu.workers.advertise_url_env,
    )
