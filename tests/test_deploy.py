"""Deployment files, validated offline: Kubernetes manifests against the API schemas
(kubernetes-validate ships them), and the compose file's scaled profile."""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from tests.conftest import ROOT

MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
RESOURCES = [m for m in MANIFESTS if m.name != "kustomization.yaml"]
MEASURED_RSS_MIB = 200  # docs/operations.md: max RSS in the 10-minute soak, rounded up
MEASURED_CONVERSION_MIB = 800  # docs/models.md "Start-up": the conversion's peak (child + parent), rounded up


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "deploy" / "kubernetes" / name).read_text())


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
@pytest.mark.parametrize("manifest", RESOURCES, ids=[m.name for m in RESOURCES])
def test_manifest_is_valid(manifest: Path, version: str) -> None:
    for document in yaml.safe_load_all(manifest.read_text()):
        kubernetes_validate.validate(document, version, strict=True)


def test_the_validator_rejects_a_wrong_manifest() -> None:
    deployment = copy.deepcopy(load("deployment.yaml"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, "1.37.0", strict=True)


def test_kustomization_lists_every_resource() -> None:
    assert sorted(load("kustomization.yaml")["resources"]) == sorted(m.name for m in RESOURCES)


def test_deployment_probes_resources_and_hardening() -> None:
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    memory = container["resources"]["requests"]["memory"]
    assert memory.endswith("Mi") and int(memory[:-2]) >= MEASURED_RSS_MIB
    env = {e["name"]: e["value"] for e in container["env"]}
    assert float(env["GRACE_PERIOD_S"]) + 5 <= pod["terminationGracePeriodSeconds"]
    assert float(env["DRAIN_DELAY_S"]) < float(env["GRACE_PERIOD_S"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    (init,) = pod["initContainers"]  # the Keras conversion, with limits of its own
    assert init["command"] == ["python", "-m", "app", "convert"]
    init_memory = init["resources"]["limits"]["memory"]
    assert init_memory.endswith("Gi") and int(init_memory[:-2]) * 1024 >= MEASURED_CONVERSION_MIB
    assert container["resources"]["limits"]["memory"] == "512Mi"
    init_env = {e["name"]: e["value"] for e in init["env"]}
    assert all(init_env[name] == env[name] for name in ("MODEL_PATH", "MODEL_CACHE_DIR"))
    (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["MODEL_CACHE_DIR"]]
    assert cache["readOnly"] is True
    assert any(m["mountPath"] == env["MODEL_CACHE_DIR"] for m in init["volumeMounts"])
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == load("deployment.yaml")["metadata"]["name"]


def compose_services() -> dict:
    """docker-compose.yml's services as docker-compose itself resolves them (scaled profile)."""
    compose = ROOT / ".venv-tools" / "bin" / "docker-compose"
    result = subprocess.run([str(compose), "--profile", "scaled", "config"], cwd=ROOT,
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def test_compose_converts_once_before_the_servers_start() -> None:
    services = compose_services()
    assert services["convert"]["command"] == ["python", "-m", "app", "convert"]
    assert services["convert"]["restart"] == "no"
    for name in ("bigru", "bigru-replica"):
        assert services[name]["depends_on"]["convert"]["condition"] == "service_completed_successfully"
        assert any(v.endswith(":/var/cache/bigru-serve:ro") for v in services[name]["volumes"])
    assert services["bigru"]["mem_limit"] in ("512m", 536870912)


def test_compose_scaled_profile_puts_replicas_behind_nginx() -> None:
    services = compose_services()
    assert services["bigru-replica"]["deploy"]["replicas"] == 3
    assert services["gateway"]["environment"]["UPSTREAM"] == "bigru-replica:8000"
    assert services["gateway"]["environment"]["GRPC_UPSTREAM"] == "bigru-replica:8001"
    assert "gateway.conf.template" in services["gateway"]["volumes"][0]
