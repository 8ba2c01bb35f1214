"""Deployment files, validated offline: Kubernetes manifests against the API schemas
(kubernetes-validate ships them), the model repository's overlay as kustomize renders it, and
the compose files (the scaled profile, the repository variant)."""

from __future__ import annotations

import copy
import shutil
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
OVERLAY = ROOT / "deploy" / "kubernetes-repository"
REPOSITORY_MOUNT = "/models/repository"
# docs/repository.md "Memory": two models ready 245 MiB RSS + engine calls 106 + a reload 154 +
# the largest request 121, over 0.9 for the headroom
REPOSITORY_SIZING_MIB = (245 + 106 + 154 + 121) / 0.9


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


def rendered_overlay() -> list[dict]:
    """deploy/kubernetes-repository as ``kubectl apply -k`` renders it (kustomize)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with kustomize) is not installed")
    result = subprocess.run([kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return list(yaml.safe_load_all(result.stdout))


def the(documents: list[dict], kind: str) -> dict:
    (document,) = [d for d in documents if d["kind"] == kind]
    return document


@pytest.fixture(params=["default", "repository"])
def deployment(request: pytest.FixtureRequest) -> dict:
    return load("deployment.yaml") if request.param == "default" else the(rendered_overlay(), "Deployment")


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container["env"]}


def memory_mib(quantity: str) -> int:
    return int(quantity[:-2]) * {"Mi": 1, "Gi": 1024}[quantity[-2:]]


def test_deployment_probes_resources_and_hardening(deployment: dict) -> None:
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert memory_mib(container["resources"]["requests"]["memory"]) >= MEASURED_RSS_MIB
    env = env_of(container)
    assert float(env["GRACE_PERIOD_S"]) + 5 <= pod["terminationGracePeriodSeconds"]
    assert float(env["DRAIN_DELAY_S"]) < float(env["GRACE_PERIOD_S"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])
    (init,) = pod["initContainers"]  # the Keras conversion, with limits of its own
    assert init["command"] == ["python", "-m", "app", "convert"]
    assert memory_mib(init["resources"]["limits"]["memory"]) >= MEASURED_CONVERSION_MIB
    source = "MODEL_REPOSITORY" if "MODEL_REPOSITORY" in env else "MODEL_PATH"
    init_env = env_of(init)
    assert all(init_env[name] == env[name] for name in (source, "MODEL_CACHE_DIR"))
    (cache,) = [m for m in container["volumeMounts"] if m["mountPath"] == env["MODEL_CACHE_DIR"]]
    assert cache["readOnly"] is True
    assert any(m["mountPath"] == env["MODEL_CACHE_DIR"] for m in init["volumeMounts"])
    hpa = load("hpa.yaml")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_the_default_deployment_serves_the_image_model_in_512mi() -> None:
    (container,) = load("deployment.yaml")["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["memory"] == "512Mi"
    env = env_of(container)
    assert env["MODEL_PATH"] == "/models/segmenter" and "MODEL_REPOSITORY" not in env


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_the_repository_overlay_renders_valid_manifests(version: str) -> None:
    documents = rendered_overlay()
    assert sorted(d["kind"] for d in documents) == sorted(
        [*(load(m.name)["kind"] for m in RESOURCES), "PersistentVolumeClaim"])
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_repository_overlay_mounts_the_claim_read_only_and_polls_it() -> None:
    documents = rendered_overlay()
    claim = the(documents, "PersistentVolumeClaim")
    pod = the(documents, "Deployment")["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": claim["metadata"]["name"], "readOnly": True}
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # replicas on any node, and a writer
    for container in [*pod["initContainers"], *pod["containers"]]:
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert (mount["mountPath"], mount["readOnly"]) == (REPOSITORY_MOUNT, True)
        assert env_of(container)["MODEL_REPOSITORY"] == REPOSITORY_MOUNT
        assert "MODEL_PATH" not in env_of(container)  # not read beside a repository
    (server,) = pod["containers"]
    assert env_of(server)["MODEL_CONTROL"] == "poll" and float(env_of(server)["REPOSITORY_POLL_S"]) > 0
    limit = memory_mib(server["resources"]["limits"]["memory"])
    assert REPOSITORY_SIZING_MIB <= limit <= 1024  # sized for two models and a reload, no conversion


def test_kustomization_of_the_overlay_lists_its_resources() -> None:
    kustomization = yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes", "model-repository-pvc.yaml"]
    assert kustomization["patches"] == [{"path": "deployment-patch.yaml"}]
    assert {p.name for p in OVERLAY.iterdir()} == {"kustomization.yaml", "model-repository-pvc.yaml",
                                                   "deployment-patch.yaml", "repository-writer.yaml"}


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
@pytest.mark.parametrize("manifest", ["model-repository-pvc.yaml", "repository-writer.yaml"])
def test_overlay_manifests_are_valid_alone(manifest: str, version: str) -> None:
    kubernetes_validate.validate(yaml.safe_load((OVERLAY / manifest).read_text()), version, strict=True)


def test_the_writer_mounts_the_repository_read_write_with_room_to_convert() -> None:
    pod = yaml.safe_load((OVERLAY / "repository-writer.yaml").read_text())["spec"]
    claim = yaml.safe_load((OVERLAY / "model-repository-pvc.yaml").read_text())["metadata"]["name"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"] == {"claimName": claim}
    (writer,) = pod["containers"]
    (mount,) = [m for m in writer["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["mountPath"] == REPOSITORY_MOUNT and not mount.get("readOnly")
    assert memory_mib(writer["resources"]["limits"]["memory"]) >= MEASURED_CONVERSION_MIB
    assert writer["securityContext"]["readOnlyRootFilesystem"] is True


def compose_services(*files: str) -> dict:
    """The compose files' services as docker-compose itself resolves them (scaled profile)."""
    compose = ROOT / ".venv-tools" / "bin" / "docker-compose"
    chosen = [arg for name in files for arg in ("-f", name)]
    result = subprocess.run([str(compose), *chosen, "--profile", "scaled", "config"], cwd=ROOT,
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


def test_compose_repository_variant_mounts_the_repository_read_only_and_polls_it() -> None:
    services = compose_services("docker-compose.yml", "docker-compose.repository.yml")
    for name in ("convert", "bigru", "bigru-replica"):
        service = services[name]
        assert any(v.endswith(f":{REPOSITORY_MOUNT}:ro") for v in service["volumes"]), service["volumes"]
        assert service["environment"]["MODEL_REPOSITORY"] == REPOSITORY_MOUNT
    for name in ("bigru", "bigru-replica"):
        assert services[name]["environment"]["MODEL_CONTROL"] == "poll"
        assert any(v.endswith(":/var/cache/bigru-serve:ro") for v in services[name]["volumes"])
        assert services[name]["mem_limit"] in ("768m", 768 * 1024 * 1024)
    assert services["convert"]["command"] == ["python", "-m", "app", "convert"]
    assert services["bigru"]["depends_on"]["convert"]["condition"] == "service_completed_successfully"
    default = compose_services()
    assert "MODEL_REPOSITORY" not in default["bigru"]["environment"]  # the default stays the image's model
