"""Behind a real nginx reverse proxy on loopback, under a path prefix."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import httpx
import pytest

from tests.conftest import ROOT, Server

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
PREFIX = "/api/gru"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    if NGINX is None:
        pytest.fail("nginx is not installed; .ci/run installs it (apt-get install nginx)")
    service = Server({"ROOT_PATH": PREFIX}, serve=True)
    service.wait_until()
    tmp = tmp_path_factory.mktemp("nginx")
    port = free_port()
    template = (ROOT / "deploy" / "nginx" / "gateway.conf.template").read_text()
    config = (template.replace("${LISTEN}", f"127.0.0.1:{port}")
              .replace("${UPSTREAM}", f"127.0.0.1:{service.port}").replace("${TMP}", str(tmp)))
    (tmp / "nginx.conf").write_text(config)
    nginx = subprocess.Popen([NGINX, "-c", str(tmp / "nginx.conf"), "-p", str(tmp), "-g", "daemon off;"],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}{PREFIX}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    yield url, service
    nginx.terminate()
    nginx.wait(timeout=10)
    service.stop()


def test_infer_and_probes_through_the_gateway(gateway: tuple[str, Server]) -> None:
    url, _ = gateway
    assert httpx.get(url + "/readyz").json()["ready"] is True
    response = httpx.post(url + "/infer", json={"sequences": [[41, 74, 71, 81], [8]]},
                          headers={"X-Request-ID": "via-nginx-1"})
    assert response.status_code == 200
    assert [len(o) for o in response.json()["outputs"]] == [4, 1]
    assert response.headers["x-request-id"] == "via-nginx-1"
    bad = httpx.post(url + "/infer", json={"sequences": [[1000]]}, headers={"X-Request-ID": "via-nginx-2"})
    assert bad.status_code == 422 and bad.json()["error"]["request_id"] == "via-nginx-2"


def test_docs_and_openapi_work_under_the_prefix(gateway: tuple[str, Server]) -> None:
    url, _ = gateway
    docs = httpx.get(url + "/docs")
    assert docs.status_code == 200 and f"{PREFIX}/openapi.json" in docs.text
    schema = httpx.get(url + "/openapi.json").json()
    assert schema["servers"] == [{"url": PREFIX}]
    assert "/infer" in schema["paths"]


def test_forwarded_client_address_is_honoured(gateway: tuple[str, Server]) -> None:
    url, service = gateway
    httpx.post(url + "/infer", json={"sequences": [[5]]},
               headers={"X-Request-ID": "forwarded-1", "X-Forwarded-For": "203.0.113.7"})
    time.sleep(0.2)
    (entry,) = [line for line in service.log_records() if line.get("request_id") == "forwarded-1"]
    assert entry["client"] == "203.0.113.7"
