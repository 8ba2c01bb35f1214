"""Behind a real nginx reverse proxy on loopback, under a path prefix."""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from pathlib import Path

import grpc
import httpx
import pytest

from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import ROOT, Server, free_port

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
PREFIX = "/api/gru"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    if NGINX is None:
        pytest.fail("nginx is not installed; .ci/run installs it (apt-get install nginx)")
    service = Server({"ROOT_PATH": PREFIX}, serve=True)
    service.wait_until()
    tmp = tmp_path_factory.mktemp("nginx")
    port, grpc_port = free_port(), free_port()
    template = (ROOT / "deploy" / "nginx" / "gateway.conf.template").read_text()
    config = (template.replace("${LISTEN}", f"127.0.0.1:{port}")
              .replace("${UPSTREAM}", f"127.0.0.1:{service.port}").replace("${TMP}", str(tmp))
              .replace("${GRPC_LISTEN}", f"127.0.0.1:{grpc_port}")
              .replace("${GRPC_UPSTREAM}", service.grpc_target))
    assert "${" not in config
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
    service.gateway_grpc_target = f"127.0.0.1:{grpc_port}"  # type: ignore[attr-defined]
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


CHROMIUM = shutil.which("chromium")
ARTIFACTS = ROOT / "test-artifacts"


def headless_chromium(url: str, *args: str, profile: Path) -> str:
    """Debian's Chromium, headless, with every host but loopback unresolvable: a page that
    needs a CDN renders blank here, as it would in an air-gapped cluster."""
    if CHROMIUM is None:
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", f"--user-data-dir={profile}", "--window-size=1280,1000",
               "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
               "--virtual-time-budget=20000", *args, url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    return done.stdout


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_docs_render_offline_in_a_browser(gateway: tuple[str, Server], page: str,
                                          tmp_path: Path) -> None:
    url, _ = gateway
    html = httpx.get(f"{url}/{page}").text
    assert "http://" not in html and "https://" not in html  # every asset is ours
    dom = headless_chromium(f"{url}/{page}", "--dump-dom", profile=tmp_path / "dom")
    if page == "docs":  # Swagger UI drew the operation from our OpenAPI document
        assert 'class="opblock-summary-path" data-path="/infer"' in dom
    else:  # ReDoc drew the operation's summary
        assert "Per-step outputs for unpadded, variable-length sequences" in dom
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"{page}.png"
    headless_chromium(f"{url}/{page}", f"--screenshot={shot}", profile=tmp_path / "shot")
    assert shot.stat().st_size > 10_000


def test_only_the_shipped_docs_assets_are_served(gateway: tuple[str, Server]) -> None:
    url, _ = gateway
    assert httpx.get(f"{url}/docs-assets/swagger-ui.css").status_code == 200
    for name in ("app.py", "..%2F__init__.py", "%2Fetc%2Fpasswd"):
        response = httpx.get(f"{url}/docs-assets/{name}")
        assert response.status_code == 404 and response.json()["error"]["status"] == 404


def test_open_inference_protocol_through_the_gateway(gateway: tuple[str, Server]) -> None:
    url, service = gateway
    body = {"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 4], "data": [41, 74, 71, 81]}]}
    over_http = httpx.post(url + "/v2/models/segmenter/infer", json=body)
    assert over_http.status_code == 200  # tensors by name: with both, `hidden` streams first
    assert {o["name"]: o["shape"] for o in over_http.json()["outputs"]}["outputs"] == [1, 4, 2]
    assert httpx.get(url + "/v2/health/ready").status_code == 200

    stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(service.gateway_grpc_target))
    assert stub.ServerReady(pb.ServerReadyRequest()).ready
    ids = pb.ModelInferRequest.InferInputTensor(name="ids", datatype="INT32", shape=[1, 4])
    request = pb.ModelInferRequest(model_name="segmenter", inputs=[ids],
                                   raw_input_contents=[struct.pack("<4i", 41, 74, 71, 81)])
    response, call = stub.ModelInfer.with_call(request, metadata=(("x-request-id", "via-nginx-grpc"),))
    assert ("x-request-id", "via-nginx-grpc") in call.initial_metadata()
    assert [list(o.shape) for o in response.outputs] == [[1, 4, 2], [1, 4, 256]]
    with pytest.raises(grpc.RpcError) as caught:  # errors pass through as status codes
        stub.ModelInfer(pb.ModelInferRequest(model_name="nope", inputs=[ids]))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
