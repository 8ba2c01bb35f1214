"""deploy/kserve/inferenceservice.yaml, validated offline as far as schemas allow.

Validated:
- the whole InferenceService against the schema KServe v0.20.0 publishes in its CRD
  (tests/fixtures/kserve), strictly: unknown fields are refused, as ``kubectl apply
  --validate=strict`` would refuse them (the CRD's structural schema would otherwise prune them);
- the predictor's pod part (every predictor field that is a PodSpec field: containers, probes,
  security context, volumes...) and the metadata as a core v1 Pod, with the Kubernetes API
  schemas kubernetes-validate ships (strict), for the oldest and newest versions we support;
- what KServe's controller reads from it (v0.20.0 source): ``PROTOCOL=v2`` (the protocol of a
  custom predictor), the HTTP port first (KServe serves it on port 80) and a port named
  ``grpc`` (KServe gives it ``appProtocol: kubernetes.io/h2c``), probes on ``/v2/health/*``.
Not validated (no cluster): KServe's admission webhook and controller as they run, the
Deployment, Service and HPA they derive, and the pods' behaviour.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.conftest import FIXTURES, ROOT

MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
CRD_SCHEMA = FIXTURES / "kserve" / "inferenceservice-v1beta1.schema.json.gz"
POD_SPEC = (Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / "v1.37.0-local-strict"
            / "podspec-v1.json")


def load() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def strict(schema: dict) -> dict:
    """The CRD schema with unknown fields refused wherever it lists the known ones."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(value) for value in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validator() -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(strict(json.loads(gzip.decompress(CRD_SCHEMA.read_bytes()))))


def as_pod(service: dict) -> dict:
    pod_fields = json.loads(POD_SPEC.read_text())["properties"]
    predictor = service["spec"]["predictor"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": service["metadata"],
            "spec": {key: value for key, value in predictor.items() if key in pod_fields}}


def test_inference_service_matches_kserve_crd_schema(crd_validator: jsonschema.Draft4Validator) -> None:
    service = load()
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in crd_validator.iter_errors(service)]
    assert not errors, errors


@pytest.mark.parametrize("version", ["1.30.0", "1.37.0"])
def test_predictor_pod_part_is_a_valid_pod(version: str) -> None:
    kubernetes_validate.validate(as_pod(load()), version, strict=True)


def test_validators_reject_wrong_fields(crd_validator: jsonschema.Draft4Validator) -> None:
    typo = copy.deepcopy(load())
    typo["spec"]["predictor"]["minReplica"] = 1  # a KServe field, misspelt
    assert list(crd_validator.iter_errors(typo))
    wrong_type = copy.deepcopy(load())
    wrong_type["spec"]["predictor"]["scaleTarget"] = "seventy"
    assert list(crd_validator.iter_errors(wrong_type))
    pod_typo = copy.deepcopy(load())
    pod_typo["spec"]["predictor"]["containers"][0]["readinesProbe"] = {}  # a PodSpec field, misspelt
    assert list(crd_validator.iter_errors(pod_typo))
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(as_pod(pod_typo), "1.37.0", strict=True)


def test_protocol_ports_and_probes_are_what_kserve_and_the_service_expect() -> None:
    service = load()
    assert service["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    predictor = service["spec"]["predictor"]
    (container,) = predictor["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    http, grpc = container["ports"]
    assert (http["name"], http["containerPort"]) == ("http", int(env["PORT"])) == ("http", 8000)
    assert "grpc" in grpc["name"] and grpc["containerPort"] == int(env["GRPC_PORT"]) == 8001
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert float(env["GRACE_PERIOD_S"]) + 5 <= predictor["terminationGracePeriodSeconds"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])


def test_memory_limit_is_the_one_the_cgroup_tests_prove() -> None:
    """v2 answers are admitted by memory cost like /infer's: the maximal v2 request is answered
    (HTTP) or refused with advice (gRPC) inside a 512 MiB cgroup (tests/test_kserve_limits.py)."""
    (container,) = load()["spec"]["predictor"]["containers"]
    assert container["resources"]["limits"]["memory"] == "512Mi"
