"""The model repository extension (index, load, unload) over HTTP and gRPC, for administrators
only, against real servers on a small repository: ``segmenter`` (the default model) loaded at
start-up, ``tagger`` (a Keras 2 cuDNN GRU) loaded and unloaded by the tests, a broken model,
and symlinks that lead out of the repository. The real tritonclient drives it too
(tests/triton_repository_client.py, in .venv-client)."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest

from app.api.kserve import grpc_predict_v2_pb2 as pb
from app.api.kserve import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.conftest import DEFAULT_MODEL, FIXTURES, ROOT, Server

CLIENT_PYTHON = ROOT / ".venv-client" / "bin" / "python"
TOKEN = "s3cret-Token_42"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
GRPC_ADMIN = (("authorization", f"Bearer {TOKEN}"),)
INDEX = "/v2/repository/index"
LOAD, UNLOAD = "/v2/repository/models/{}/load", "/v2/repository/models/{}/unload"
CODES = grpc.StatusCode
SEGMENTER_READY = {"name": "segmenter", "version": "1", "state": "READY"}
TAGGER_READY = {"name": "tagger", "version": "1", "state": "READY"}
TAGGER_UNLOADED = {"name": "tagger", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}
TAGGER_BODY = {"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 3], "data": [7, 40, 25]}]}


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """segmenter/1, tagger/1, broken/1 (not a model), linked/1 (a symlink out of the
    repository) and escape (a model directory that is a symlink out of it)."""
    base = tmp_path_factory.mktemp("repository-api")
    root, outside = base / "models", base / "outside"
    shutil.copytree(DEFAULT_MODEL, root / "segmenter" / "1")
    (root / "tagger" / "1").mkdir(parents=True)
    shutil.copy(FIXTURES / "legacy" / "A_bidir_cudnngru_model.h5", root / "tagger" / "1" / "model.h5")
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.h5").write_bytes(b"not an HDF5 file")
    (outside / "1").mkdir(parents=True)
    shutil.copy(FIXTURES / "legacy" / "A_bidir_cudnngru_model.h5", outside / "1" / "model.h5")
    (root / "linked").mkdir()
    (root / "linked" / "1").symlink_to(outside / "1")
    (root / "escape").symlink_to(outside)
    return root


@pytest.fixture(scope="module")
def admin_server(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Explicit control, the extension on, the token in a file (with echo's newline)."""
    token_file = tmp_path_factory.mktemp("secret") / "token"
    token_file.write_text(TOKEN + "\n")
    server = Server({"MODEL_REPOSITORY": str(repository), "MODEL_CONTROL": "explicit",
                     "LOAD_MODELS": "segmenter", "REPOSITORY_API": "true",
                     "ADMIN_TOKEN_FILE": str(token_file)})
    server.wait_until(timeout=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fixed_server() -> Iterator[Server]:
    """The default model alone, MODEL_CONTROL=none, the extension on, the token in ADMIN_TOKEN."""
    server = Server({"REPOSITORY_API": "true", "ADMIN_TOKEN": TOKEN})
    server.wait_until()
    yield server
    server.stop()


def stub(server: Server) -> pb_grpc.GRPCInferenceServiceStub:
    return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.grpc_target))


def grpc_code(call, request, metadata=GRPC_ADMIN) -> tuple[grpc.StatusCode, str]:
    try:
        call(request, metadata=metadata, timeout=120)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return CODES.OK, ""


def grpc_controls(server: Server, name: str) -> list[tuple]:
    """Load and unload of ``name``: (the stub's method, its request)."""
    calls = stub(server)
    return [(calls.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name=name)),
            (calls.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name=name))]


def post(server: Server, path: str, body: dict | None = None, headers: dict | None = ADMIN,
         timeout: float = 180) -> httpx.Response:
    return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)


def index_of(server: Server, ready: bool | None = None) -> list[dict]:
    response = post(server, INDEX, None if ready is None else {"ready": ready})
    assert response.status_code == 200, response.text
    return response.json()


# -- who may call --------------------------------------------------------------------------

ROUTES = (INDEX, LOAD.format("tagger"), UNLOAD.format("tagger"))
RPCS = (("RepositoryIndex", pb.RepositoryIndexRequest()),
        ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="tagger")),
        ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="tagger")))


@pytest.mark.parametrize("path", ROUTES)
def test_http_callers_without_the_token_are_refused(admin_server: Server, path: str) -> None:
    for headers in ({}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer"}):
        refused = post(admin_server, path, headers=headers)
        assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer", headers
        assert "Authorization: Bearer <token>" in refused.json()["error"]
    for wrong in ("Bearer wrong", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}"):
        refused = post(admin_server, path, headers={"Authorization": wrong})
        assert refused.status_code == 403 and refused.json() == {
            "error": "the bearer token is not the administrators' token"}


@pytest.mark.parametrize(("method", "request_"), RPCS, ids=[name for name, _ in RPCS])
def test_grpc_callers_without_the_token_are_refused(admin_server: Server, method: str, request_) -> None:
    call = getattr(stub(admin_server), method)
    code, message = grpc_code(call, request_, metadata=())
    assert code == CODES.UNAUTHENTICATED and "Bearer" in message
    assert grpc_code(call, request_, (("authorization", "Bearer wrong"),))[0] == CODES.PERMISSION_DENIED
    assert grpc_code(call, request_, (("authorization", TOKEN),))[0] == CODES.UNAUTHENTICATED


def test_the_token_is_taken_in_any_case_of_the_scheme_and_never_logged(admin_server: Server) -> None:
    assert post(admin_server, INDEX, headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    assert grpc_code(stub(admin_server).RepositoryIndex, pb.RepositoryIndexRequest())[0] == CODES.OK
    assert TOKEN not in admin_server.output()


def test_off_unless_enabled(server: Server) -> None:
    """The session's default server: REPOSITORY_API unset."""
    for path in ROUTES:
        refused = post(server, path)
        assert refused.status_code == 403 and "REPOSITORY_API=true" in refused.json()["error"], path
    for method, request_ in RPCS:
        code, message = grpc_code(getattr(stub(server), method), request_)
        assert code == CODES.PERMISSION_DENIED and "REPOSITORY_API=true" in message, method
    assert httpx.get(server.url + "/v2").json()["extensions"] == ["binary_tensor_data"]
    assert not any(path.startswith("/v2/repository") for path in
                   httpx.get(server.url + "/openapi.json").json()["paths"])


def test_advertised_when_enabled(admin_server: Server) -> None:
    extensions = ["binary_tensor_data", "model_repository"]
    assert httpx.get(admin_server.url + "/v2").json()["extensions"] == extensions
    assert list(stub(admin_server).ServerMetadata(pb.ServerMetadataRequest()).extensions) == extensions


@pytest.mark.parametrize(("env", "message"), [
    ({}, "set ADMIN_TOKEN, or ADMIN_TOKEN_FILE to a file holding it (it is unset)"),
    ({"ADMIN_TOKEN_FILE": "EMPTY"}, "(it is empty)"),
    ({"ADMIN_TOKEN_FILE": "/nonexistent/token"}, "ADMIN_TOKEN_FILE /nonexistent/token: cannot be read"),
    ({"ADMIN_TOKEN": "two words"}, "ADMIN_TOKEN: the token must be visible ASCII characters"),
    ({"ADMIN_TOKEN": TOKEN, "ADMIN_TOKEN_FILE": "EMPTY"}, "set one of ADMIN_TOKEN and ADMIN_TOKEN_FILE"),
])
def test_enabled_without_a_token_the_server_does_not_start(env: dict, message: str, tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("\n")
    env = {key: str(empty) if value == "EMPTY" else value for key, value in env.items()}
    server = Server({"REPOSITORY_API": "true", **env}, serve=True)
    try:
        code = server.process.wait(timeout=120)
    finally:
        output = server.stop()
    assert code == 2 and message in output and "cannot start" in output and "Traceback" not in output


# -- names are names ------------------------------------------------------------------------

PATH_LIKE = ("..", "%2E%2E", "a%2Fb", "%2Fetc%2Fpasswd", "/etc/passwd", "segmenter%2F..%2F..%2Fetc",
             ".hidden", "-rf", "a%00b", "%20")


@pytest.mark.parametrize("name", PATH_LIKE)
def test_path_like_names_are_refused_over_http(admin_server: Server, name: str) -> None:
    """Sent as is (http.client normalizes nothing): the server decodes %2F before routing."""
    for route in (LOAD, UNLOAD):
        connection = http.client.HTTPConnection("127.0.0.1", admin_server.port, timeout=30)
        connection.request("POST", route.format(name), body=b"", headers=ADMIN)
        answer = connection.getresponse()
        assert answer.status == 400, (route, name)
        assert "invalid model name" in json.loads(answer.read())["error"]
        connection.close()


@pytest.mark.parametrize("name", ["..", "../segmenter", "a/b", "/etc/passwd", "", "segmenter/1"])
def test_path_like_names_are_refused_over_grpc(admin_server: Server, name: str) -> None:
    for call, request_ in grpc_controls(admin_server, name):
        code, message = grpc_code(call, request_)
        assert code == CODES.INVALID_ARGUMENT and "invalid model name" in message


def test_symlinks_out_of_the_repository_are_refused(admin_server: Server) -> None:
    escaped = post(admin_server, LOAD.format("escape"))
    assert escaped.status_code == 404 and "no model 'escape' in the repository" in escaped.json()["error"]
    linked = post(admin_server, LOAD.format("linked"))
    assert linked.status_code == 400 and "leads out of the repository" in linked.json()["error"]
    assert linked.json()["error"].startswith("failed to load 'linked': version 1: ")


# -- index, load, unload --------------------------------------------------------------------

def test_index_lists_every_model_loaded_or_not(admin_server: Server) -> None:
    entries = index_of(admin_server)
    assert SEGMENTER_READY in entries
    names = [entry["name"] for entry in entries]
    assert "escape" not in names and names == sorted(names)
    assert {"name": "tagger"} in entries  # on disk, never loaded: its name alone, as Triton lists it
    assert index_of(admin_server, ready=True) == [SEGMENTER_READY]
    response = stub(admin_server).RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=GRPC_ADMIN)
    assert [(m.name, m.version, m.state, m.reason) for m in response.models] == [
        ("segmenter", "1", "READY", "")]


@pytest.mark.parametrize(("body", "message"), [
    (b'{"ready": "yes"}', "ready"), (b"{nope", "not valid JSON"), (b"[]", "body")])
def test_malformed_index_bodies(admin_server: Server, body: bytes, message: str) -> None:
    refused = httpx.post(admin_server.url + INDEX, content=body, headers=ADMIN)
    assert refused.status_code == 400 and message in refused.json()["error"]


def test_load_serve_unload(admin_server: Server) -> None:
    loaded = post(admin_server, LOAD.format("tagger"), {})
    assert loaded.status_code == 200 and loaded.content == b""
    answer = post(admin_server, "/v2/models/tagger/infer", TAGGER_BODY, headers={})
    assert answer.status_code == 200 and answer.json()["model_version"] == "1", answer.text
    assert TAGGER_READY in index_of(admin_server, ready=True)
    unloaded = post(admin_server, UNLOAD.format("tagger"), {"parameters": {"unload_dependents": False}})
    assert unloaded.status_code == 200 and unloaded.content == b""
    gone = post(admin_server, "/v2/models/tagger/infer", TAGGER_BODY, headers={})
    assert gone.status_code == 404 and "unknown model 'tagger'" in gone.json()["error"]
    assert httpx.get(admin_server.url + "/v2/models/tagger").status_code == 404
    assert TAGGER_UNLOADED in index_of(admin_server)
    assert post(admin_server, UNLOAD.format("tagger")).status_code == 404  # unloaded already


def test_load_and_unload_over_grpc(admin_server: Server) -> None:
    grpc_stub = stub(admin_server)
    grpc_stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="tagger"), metadata=GRPC_ADMIN,
                                  timeout=180)
    assert grpc_stub.ModelReady(pb.ModelReadyRequest(name="tagger")).ready
    unload = pb.RepositoryModelUnloadRequest(model_name="tagger")
    unload.parameters["unload_dependents"].bool_param = True  # nothing depends on a model here
    grpc_stub.RepositoryModelUnload(unload, metadata=GRPC_ADMIN)
    code, _ = grpc_code(grpc_stub.ModelReady, pb.ModelReadyRequest(name="tagger"), metadata=())
    assert code == CODES.NOT_FOUND


def test_a_broken_version_fails_its_load_with_the_reason(admin_server: Server) -> None:
    refused = post(admin_server, LOAD.format("broken"))
    assert refused.status_code == 400
    assert refused.json()["error"].startswith("failed to load 'broken': version 1: ")
    entry = next(entry for entry in index_of(admin_server) if entry["name"] == "broken")
    assert entry["state"] == "UNAVAILABLE" and entry["reason"] in refused.json()["error"]
    code, message = grpc_code(stub(admin_server).RepositoryModelLoad,
                              pb.RepositoryModelLoadRequest(model_name="broken"))
    assert code == CODES.INVALID_ARGUMENT and message.startswith("failed to load 'broken': version 1: ")


def test_unknown_models_are_404(admin_server: Server) -> None:
    for route in (LOAD, UNLOAD):
        refused = post(admin_server, route.format("nosuch"))
        assert refused.status_code == 404 and "'nosuch'" in refused.json()["error"]
    for call, request_ in grpc_controls(admin_server, "nosuch"):
        assert grpc_code(call, request_)[0] == CODES.NOT_FOUND


@pytest.mark.parametrize(("parameters", "message"), [
    ({"config": "{\"backend\": \"onnxruntime\"}"}, "never takes a model's configuration or files"),
    ({"file:1/model.onnx": "AAAA"}, "never takes a model's configuration or files"),
    ({"priority": 1}, "unrecognized load parameter 'priority'"),
])
def test_load_takes_no_configuration_or_files(admin_server: Server, parameters: dict, message: str) -> None:
    refused = post(admin_server, LOAD.format("tagger"), {"parameters": parameters})
    assert refused.status_code == 400 and message in refused.json()["error"]
    request_ = pb.RepositoryModelLoadRequest(model_name="tagger")
    for key, value in parameters.items():
        if key.startswith("file:"):
            request_.parameters[key].bytes_param = value.encode()
        elif isinstance(value, str):
            request_.parameters[key].string_param = value
        else:
            request_.parameters[key].int64_param = value
    code, got = grpc_code(stub(admin_server).RepositoryModelLoad, request_)
    assert code == CODES.INVALID_ARGUMENT and message in got
    assert "tagger" not in [entry["name"] for entry in index_of(admin_server, ready=True)]


def test_unload_parameters_and_repository_names(admin_server: Server) -> None:
    refused = post(admin_server, UNLOAD.format("segmenter"), {"parameters": {"unload_dependents": "yes"}})
    assert refused.status_code == 400 and "must be a boolean" in refused.json()["error"]
    code, message = grpc_code(stub(admin_server).RepositoryIndex,
                              pb.RepositoryIndexRequest(repository_name="elsewhere"))
    assert code == CODES.UNIMPLEMENTED and "'repository_name' specification is not supported" in message
    assert index_of(admin_server, ready=True)[0]["name"] == "segmenter"  # still served


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tritonclient_drives_the_repository(admin_server: Server, protocol: str, tmp_path: Path) -> None:
    if not CLIENT_PYTHON.exists():
        pytest.fail(f"{CLIENT_PYTHON} is missing; `make install` creates it")
    address = f"127.0.0.1:{admin_server.port}" if protocol == "http" else admin_server.grpc_target
    out = tmp_path / "report.json"
    done = subprocess.run([str(CLIENT_PYTHON), str(ROOT / "tests" / "triton_repository_client.py"), protocol,
                           address, TOKEN, "tagger", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    http_ = protocol == "http"
    assert "model_repository" in report["extensions"]
    assert report["no_token"]["status"] == ("401" if http_ else "StatusCode.UNAUTHENTICATED")
    assert report["wrong_token"]["status"] == ("403" if http_ else "StatusCode.PERMISSION_DENIED")
    assert report["ready_loaded"] is True
    assert report["ready_unloaded"] == (False if http_ else "StatusCode.NOT_FOUND")
    assert TAGGER_READY in report["index_loaded"] and TAGGER_UNLOADED in report["index_unloaded"]
    assert report["unknown"]["status"] == ("404" if http_ else "StatusCode.NOT_FOUND")


# -- MODEL_CONTROL other than explicit -------------------------------------------------------

def test_load_and_unload_need_explicit_control(fixed_server: Server) -> None:
    for route in (LOAD, UNLOAD):
        refused = post(fixed_server, route.format("segmenter"))
        assert refused.status_code == 400
        assert refused.json()["error"].endswith(
            "MODEL_CONTROL is none; only MODEL_CONTROL=explicit takes load and unload requests")
    code, message = grpc_code(stub(fixed_server).RepositoryModelUnload,
                              pb.RepositoryModelUnloadRequest(model_name="segmenter"))
    assert code == CODES.INVALID_ARGUMENT and "MODEL_CONTROL is none" in message
    assert index_of(fixed_server) == [SEGMENTER_READY]
    assert httpx.post(fixed_server.url + "/v2/models/segmenter/infer", json=TAGGER_BODY).status_code == 200
