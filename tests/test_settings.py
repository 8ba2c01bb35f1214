"""Settings as documented and as honoured: every default of docs/configuration.md's table
is pinned here once, against what the service actually uses; limits hold at their exact
boundaries; ``PARITY_TOLERANCE`` overrides the manifest's tolerance, which overrides 1e-4."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.config import Settings
from app.engine.selfcheck import DEFAULT_TOLERANCE
from tests.conftest import DEFAULT_MODEL, ROOT, converted_copy
from tests.helpers import in_process

# Documented default texts that are not plain values.
DOCUMENTED_DEFAULTS = {
    "models/segmenter": DEFAULT_MODEL,
    "empty": "",
    "unset": None,
    "CPU count": os.cpu_count(),
    "1 (native: 2; keras: CPU count)": None,  # unset: each engine picks its own
    "4 MiB": 4 * 1024 * 1024,
    "manifest, else 1e-4": None,  # unset: the manifest's tolerance, else DEFAULT_TOLERANCE
    "64 MiB": 64 * 1024 * 1024,
    "from the cgroup": None,  # unset: derived at start-up (app.service.pricing.sized_budget)
    "from the memory budget": None,  # unset: app.api.dataplane.most_requests, grpc_service.most_calls
    # unset XDG_CACHE_HOME, as in this test's environment:
    "$XDG_CACHE_HOME/bigru-serve`, else `/tmp/bigru-serve-cache` (the container: "
    "`/var/cache/bigru-serve`)": Path("/tmp/bigru-serve-cache"),
}


def readme_settings() -> list[tuple[str, str]]:
    """(variable, documented default) for each variable of docs/configuration.md's table."""
    section = (ROOT / "docs" / "configuration.md").read_text()
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([A-Z][A-Z_]+)`", cells[0])
        if not names or len(cells) < 3:
            continue
        defaults = [d.strip().strip("`") for d in cells[1].split(",")] if len(names) > 1 else [cells[1]]
        assert len(defaults) == len(names), line
        rows += zip(names, (d.strip("`") for d in defaults))
    return rows


def expected_value(text: str, actual: object) -> object:
    if text in DOCUMENTED_DEFAULTS:
        return DOCUMENTED_DEFAULTS[text]
    if isinstance(actual, bool):
        return {"true": True, "false": False}[text]
    return type(actual)(text)


def test_every_documented_default_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = readme_settings()
    assert len(rows) >= 20, rows  # the table was found and read
    for name, _ in rows:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    documented = set()
    for name, text in rows:
        actual = getattr(settings, name.lower())
        expected = expected_value(text, actual)
        assert actual == expected, f"{name}: docs/configuration.md says {text!r}, the service uses {actual!r}"
        documented.add(name.lower())
    assert DEFAULT_TOLERANCE == 1e-4
    assert documented == set(Settings.model_fields), "every setting is documented, and only those"


def test_the_default_body_limit_is_honoured_to_the_byte() -> None:
    limit = 4 * 1024 * 1024
    body = b'{"sequences": [[5, 6]]}'
    with in_process(Settings(_env_file=None)) as client:  # type: ignore[call-arg]
        exact = client.post("/infer", content=body + b" " * (limit - len(body)),
                            headers={"content-type": "application/json"})
        assert exact.status_code == 200, exact.text
        over = client.post("/infer", content=body + b" " * (limit + 1 - len(body)),
                           headers={"content-type": "application/json"})
        assert over.status_code == 413 and over.json()["error"]["type"] == "body_too_large"
        assert over.json()["error"]["message"] == f"the body exceeds {limit} bytes"


def chunks(total: int, size: int = 1000):
    """A body without Content-Length, streamed in pieces."""
    prefix = b'{"sequences": [[5, 6]]}'
    yield prefix
    left = total - len(prefix)
    while left > 0:
        yield b" " * min(size, left)
        left -= size


@pytest.mark.parametrize("limit", [1024, 16384])
def test_a_body_limit_holds_at_its_boundary_with_and_without_length(limit: int) -> None:
    with in_process(Settings(_env_file=None, max_body_bytes=limit)) as client:  # type: ignore[call-arg]
        headers = {"content-type": "application/json"}
        assert client.post("/infer", content=b"".join(chunks(limit)), headers=headers).status_code == 200
        assert client.post("/infer", content=b"".join(chunks(limit + 1)), headers=headers).status_code == 413
        assert client.post("/infer", content=chunks(limit), headers=headers).status_code == 200
        streamed = client.post("/infer", content=chunks(limit + 1), headers=headers)
        assert streamed.status_code == 413 and "x-request-id" in streamed.headers
        assert streamed.json()["error"]["request_id"] == streamed.headers["x-request-id"]
        assert client.get("/readyz").status_code == 200


def test_max_len_and_max_batch_hold_at_their_boundaries() -> None:
    with in_process(Settings(_env_file=None, max_len=64, max_batch=8)) as client:  # type: ignore[call-arg]
        def status(sequences: list[list[int]]) -> int:
            return client.post("/infer", json={"sequences": sequences}).status_code

        assert status([[3] * 64] * 8) == 200
        assert status([[3] * 65]) == 422
        assert status([[3]] * 9) == 422
        schema = client.get("/openapi.json").json()["paths"]["/infer"]["post"]["requestBody"]
        sequences = schema["content"]["application/json"]["schema"]["properties"]["sequences"]
        assert (sequences["maxItems"], sequences["items"]["maxItems"]) == (8, 64)
        limits = client.get("/v1/model").json()["limits"]
        assert (limits["max_batch"], limits["max_len"]) == (8, 64)


def model_dir_with_tolerance(tmp_path: Path, tolerance: float | None) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(DEFAULT_MODEL, directory)
    manifest = json.loads((directory / "model.json").read_text())
    manifest["parity"].pop("tolerance")
    if tolerance is not None:
        manifest["parity"]["tolerance"] = tolerance
    (directory / "model.json").write_text(json.dumps(manifest))
    return directory


def tolerance_used(settings: Settings) -> float:
    with in_process(settings) as client:
        check = client.get("/v1/model").json()["self_check"]
        assert check["passed"]
        return check["tolerance"]


def test_the_manifests_parity_tolerance_goes_through_the_conversion(tmp_path: Path) -> None:
    """A source's own tolerance, converted at start-up, is the one the self-check uses."""
    settings = Settings(_env_file=None, model_path=model_dir_with_tolerance(tmp_path, 5e-4))  # type: ignore[call-arg]
    assert tolerance_used(settings) == 5e-4


# The same precedence on converted directories (the conversion's part: the test above).
@pytest.mark.parametrize(("manifest", "setting", "used"), [
    (None, None, DEFAULT_TOLERANCE),  # neither: 1e-4
    (5e-4, None, 5e-4),  # the manifest's
    (1e-9, 1e-3, 1e-3),  # PARITY_TOLERANCE wins over a manifest the check would fail
])
def test_parity_tolerance_comes_from_the_setting_then_the_manifest(
    tmp_path: Path, default_converted: Path, manifest: float | None, setting: float | None, used: float,
) -> None:
    model = converted_copy(default_converted, tmp_path / "model", tolerance=manifest)
    settings = Settings(_env_file=None, model_path=model, parity_tolerance=setting)  # type: ignore[call-arg]
    assert tolerance_used(settings) == used


def test_a_parity_tolerance_too_tight_keeps_the_service_not_ready() -> None:
    settings = Settings(_env_file=None, parity_tolerance=1e-12)  # type: ignore[call-arg]
    with in_process(settings, ready=False) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["stage"] == "failed"
        assert "self-check failed" in ready.json()["error"] and "tolerance 1e-12" in ready.json()["error"]
        refused = client.post("/infer", json={"sequences": [[2, 3]]})
        assert refused.status_code == 503 and refused.json()["error"]["type"] == "not_ready"
        # the first check to meet the parity data (the Keras model's, at start-up) fails it
        check = client.get("/v1/model").json()["keras"]["self_check"]
        assert check["passed"] is False and check["tolerance"] == 1e-12
        assert np.isfinite(check["max_abs_diff_outputs"]) and check["max_abs_diff_outputs"] > 1e-12


def test_request_timeout_s_gives_504_and_counts_it() -> None:
    with in_process(Settings(_env_file=None, request_timeout_s=1e-9)) as client:  # type: ignore[call-arg]
        response = client.post("/infer", json={"sequences": [[3, 4]]})
        assert response.status_code == 504
        assert response.json()["error"] | {"request_id": None} == {
            "status": 504, "type": "deadline_exceeded", "message": "no result within 1e-09 s",
            "request_id": None}
        assert 'bigru_rejected_requests_total{reason="deadline"} 1.0' in client.get("/metrics").text


def test_max_queue_refuses_what_does_not_fit_with_503_and_retry_after() -> None:
    with in_process(Settings(_env_file=None, max_queue=1)) as client:  # type: ignore[call-arg]
        response = client.post("/infer", json={"sequences": [[3], [4]]})  # 2 sequences > MAX_QUEUE
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        assert response.json()["error"] | {"request_id": None} == {
            "status": 503, "type": "overloaded", "message": "the queue is full; retry shortly",
            "request_id": None}
        assert 'bigru_rejected_requests_total{reason="queue_full"} 1.0' in client.get("/metrics").text
        assert client.post("/infer", json={"sequences": [[3]]}).status_code == 200
