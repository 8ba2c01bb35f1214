"""A model repository served by one process: models by name, versions rolled out while clients
keep sending, a broken version kept out, all in the 512 MiB memory cgroup our deployment declares.

The repository holds the default segmenter and a GPU-trained tagger (a Keras 2 ``CuDNNGRU``
file); the tagger's version 2 is another architecture (the GPU-trained segmenter's own ``.h5``),
converted ahead into the shared cache (``python -m app convert``, as an operator's job would)
and renamed into place; version 3 is a broken file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.service.layout import VersionDir, scan, valid_name
from app.service.policy import VersionPolicy
from app.system import MiB
from tests.conftest import DEFAULT_MODEL, FIXTURES, ROOT, Server
from tests.test_limits import make_cgroup, serve_in_cgroup

TOLERANCE = 1e-5
LEGACY_A = FIXTURES / "legacy" / "A_bidir_cudnngru_model.h5"


# -- the layout and the version policies, on their own -------------------------------------------

def test_version_policies_choose_as_tf_serving_and_triton_do() -> None:
    present = [1, 2, 3, 7]
    assert VersionPolicy.parse("latest:1").chosen(present) == {7}
    assert VersionPolicy.parse("latest:2").chosen(present) == {3, 7}
    assert VersionPolicy.parse("latest:9").chosen(present) == {1, 2, 3, 7}
    assert VersionPolicy.parse("all").chosen(present) == {1, 2, 3, 7}
    assert VersionPolicy.parse("specific:1,3,5").chosen(present) == {1, 3}
    assert VersionPolicy.parse("latest:1").chosen([]) == set()
    assert str(VersionPolicy.parse(" specific:3,1 ")) == "specific:1,3"
    assert [str(VersionPolicy.parse(text)) for text in ("latest:2", "all")] == ["latest:2", "all"]
    assert VersionPolicy.parse("all") == VersionPolicy("all")
    for wrong in ("latest", "latest:0", "newest:1", "specific:", "specific:a", "all:2", ""):
        with pytest.raises(ValueError, match="expected latest:N, all or specific"):
            VersionPolicy.parse(wrong)


def test_names_are_names_never_paths() -> None:
    for good in ("tagger", "tagger-2", "a.b_c", "X9"):
        assert valid_name(good), good
    for bad in ("..", ".hidden", "a/b", "a\\b", "/etc", "a..b", "", "-x", "x" * 129, "a b", "%2e%2e"):
        assert not valid_name(bad), bad


def test_the_layout_is_read_as_documented(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tagger" / "1").mkdir(parents=True)
    (repo / "tagger" / "1" / "model.h5").write_bytes(b"x")
    (repo / "tagger" / "2").mkdir()
    (repo / "tagger" / "2" / "model.json").write_text("{}")  # a model directory itself
    (repo / "tagger" / "2" / "weights.h5").write_bytes(b"x")
    (repo / "tagger" / ".3.tmp").mkdir()  # being written: not read
    (repo / "tagger" / "draft").mkdir()  # not a number: not read
    (repo / "tagger" / "config.json").write_text(json.dumps({"version_policy": "all"}))
    (repo / "ckpt" / "4").mkdir(parents=True)
    for name in ("model.ckpt.index", "model.ckpt.data-00000-of-00001", ".DS_Store"):
        (repo / "ckpt" / "4" / name).write_bytes(b"x")
    (repo / "two" / "1").mkdir(parents=True)
    for name in ("a.h5", "b.h5"):
        (repo / "two" / "1" / name).write_bytes(b"x")
    (repo / "badconfig" / "1").mkdir(parents=True)
    (repo / "badconfig" / "config.json").write_text('{"version_policy": "newest"}')
    outside = tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "model.h5").write_bytes(b"x")
    (repo / "escape").symlink_to(outside)  # a model leading out of the repository
    (repo / "leaky" / "1").mkdir(parents=True)
    (repo / "leaky" / "1" / "model.h5").symlink_to(outside / "1" / "model.h5")
    (repo / ".git").mkdir()
    (repo / "README.md").write_text("not a model")

    found = scan(repo)
    assert sorted(found) == ["badconfig", "ckpt", "leaky", "tagger", "two"]
    tagger = found["tagger"]
    assert sorted(tagger.versions) == [1, 2] and str(tagger.policy) == "all"
    assert tagger.versions[1].model == repo / "tagger" / "1" / "model.h5"
    assert tagger.versions[2].model == repo / "tagger" / "2"
    assert found["ckpt"].versions[4].model == repo / "ckpt" / "4" / "model.ckpt"
    assert found["two"].versions[1].model is None
    assert "a.h5, b.h5: expected one model file" in str(found["two"].versions[1].problem)
    assert "expected latest:N, all or specific" in str(found["badconfig"].problem)
    assert "leads out of the repository" in str(found["leaky"].versions[1].problem)
    before = tagger.versions[1].fingerprint
    assert [name for name, _, _ in tagger.versions[2].fingerprint] == ["model.json", "weights.h5"]
    time.sleep(0.01)
    (repo / "tagger" / "1" / "model.h5").write_bytes(b"xy")
    assert scan(repo)["tagger"].versions[1].fingerprint != before
    renamed = repo / "tagger" / "2" / "weights.h5"
    before = scan(repo)["tagger"].versions[2].fingerprint
    renamed.rename(renamed.with_name("weights2.h5"))  # same size and time: the name tells
    assert scan(repo)["tagger"].versions[2].fingerprint != before


def test_what_the_layout_refuses_says_why(tmp_path: Path) -> None:
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    (outside / "1").mkdir(parents=True)
    (repo / "m" / "1").mkdir(parents=True)  # empty
    (repo / "m" / "5").symlink_to(outside / "1")  # a version leading out
    (repo / "m" / "6").mkdir()
    (repo / "m" / "6" / "dangling").symlink_to(tmp_path / "nowhere")
    (repo / "m" / "6" / "model.h5").write_bytes(b"x")
    for name in ("model.ckpt.index", "model.ckpt.data-0", "model.ckpt.data-1"):
        (repo / "m" / "7").mkdir(exist_ok=True)
        (repo / "m" / "7" / name).write_bytes(b"x")
    (repo / "m" / "8").mkdir()
    for name in ("a.ckpt.index", "b.ckpt.index"):
        (repo / "m" / "8" / name).write_bytes(b"x")
    found = scan(repo)["m"]
    assert found.versions[1].problem == (f"{repo / 'm' / '1'} holds nothing: expected one model file or "
                                         "directory, or a model.json naming the artifact")
    assert found.versions[5] == VersionDir(5, None, f"{repo / 'm' / '5'} leads out of the repository", ())
    assert [name for name, _, _ in found.versions[6].fingerprint] == ["model.h5"]  # the dangling link skipped
    assert found.versions[7].model == repo / "m" / "7" / "model.ckpt"
    assert found.versions[8].model is None
    for config in ('{"version_policy": "all", "other": 1}', "[]", '{"version_policy": 3}', "{"):
        (repo / "m" / "config.json").write_text(config)
        assert scan(repo)["m"].problem is not None, config
    (repo / "m" / "config.json").write_text('{"version_policy": 3}')
    assert scan(repo)["m"].problem == f'{repo / "m" / "config.json"}: expected {{"version_policy": "..."}}'
    (repo / "m" / "config.json").write_text("{}")
    assert scan(repo)["m"].problem is None and scan(repo)["m"].policy is None
    with pytest.raises(FileNotFoundError, match="the model repository is not a directory"):
        scan(tmp_path / "missing")


# -- the repository served: the done-when scenario ---------------------------------------------------

def infer(url: str, model: str, sequences: list[list[int]], version: int | None = None) -> httpx.Response:
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    return httpx.post(url + path, json={"sequences": sequences}, timeout=30)


def worst(answers: list, expected: list) -> float:
    assert len(answers) == len(expected)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(e)))) for a, e in zip(answers, expected))


def states(url: str) -> dict[str, dict[int, dict]]:
    listed = httpx.get(url + "/v1/models", timeout=10).json()["models"]
    return {model["name"]: {v["version"]: v for v in model["versions"]} for model in listed}


def wait_for(url: str, done, what: str, timeout: float = 180) -> dict[str, dict[int, dict]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = states(url)
        if done(now):
            return now
        time.sleep(0.2)
    raise AssertionError(f"never {what}: {now}")


def convert_ahead(model: Path) -> None:
    """What an operator's job does before renaming a version into place: convert it into the
    cache the server shares (``MODEL_CACHE_DIR``)."""
    subprocess.run([sys.executable, "-m", "app", "convert"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "MODEL_PATH": str(model)}, timeout=600)


def drop_in(directory: Path, files: dict[str, Path | bytes]) -> None:
    """A version written under another name, then renamed into place (as the docs advise)."""
    staging = directory.parent / f".{directory.name}.tmp"
    staging.mkdir(parents=True)
    for name, content in files.items():
        target = staging / name
        if isinstance(content, Path):
            shutil.copy(content, target)
        else:
            target.write_bytes(content)
    staging.rename(directory)


def grpc_infer(server: Server, model: str, ids: list[int]) -> np.ndarray:
    """One sequence's outputs from ``ModelInfer`` naming ``model``."""
    from app.api.kserve import grpc_predict_v2_pb2 as pb
    from tests.test_repository_api import stub

    tensor = pb.ModelInferRequest.InferInputTensor(name="ids", datatype="INT32", shape=[1, len(ids)])
    request = pb.ModelInferRequest(model_name=model, inputs=[tensor], raw_input_contents=[
        np.asarray(ids, dtype="<i4").tobytes()])
    request.outputs.add(name="outputs")
    answer = stub(server).ModelInfer(request, timeout=60)
    assert answer.model_name == model
    shape = list(answer.outputs[0].shape)
    return np.frombuffer(answer.raw_output_contents[0], dtype="<f4").reshape(shape)[0]


class Clients:
    """Four clients sending to the tagger without pause; every answer is kept."""

    def __init__(self, url: str, sequences: list[list[int]]) -> None:
        self.url, self.sequences = url, sequences
        self.answers: list[tuple[int, dict]] = []
        self.running = True
        self.threads = [threading.Thread(target=self._send, daemon=True) for _ in range(4)]

    def _send(self) -> None:
        with httpx.Client(timeout=60) as client:
            while self.running:
                response = client.post(self.url + "/v1/models/tagger/infer",
                                       json={"sequences": self.sequences})
                self.answers.append((response.status_code, response.json()))

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.running = False
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    root = tmp_path_factory.mktemp("repository")
    shutil.copytree(DEFAULT_MODEL, root / "segmenter" / "1")
    (root / "tagger" / "1").mkdir(parents=True)
    shutil.copy(LEGACY_A, root / "tagger" / "1" / "model.h5")
    cgroup = make_cgroup(512 * MiB)
    server = serve_in_cgroup(cgroup, {"MODEL_REPOSITORY": str(root), "MODEL_CONTROL": "poll",
                                      "REPOSITORY_POLL_S": "0.5", "DRAIN_DELAY_S": "0"})
    server.cgroup = cgroup  # type: ignore[attr-defined]
    try:
        server.wait_until(timeout=300)
        yield server, root
    finally:
        server.stop()
        assert cgroup.oom_kills() == 0, "the server was OOM-killed"
        cgroup.remove()


def test_a_repository_in_512_mib_rolls_versions_out_without_dropping_a_request(
        repository: tuple[Server, Path], legacy_expected: dict, gpu_reference: dict) -> None:
    server, root = repository
    url = server.url
    listed = states(url)
    assert listed == {"segmenter": {1: {"version": 1, "state": "READY"}},
                      "tagger": {1: {"version": 1, "state": "READY"}}}
    assert httpx.post(url + "/infer", json={"sequences": [[1, 2]]}).status_code == 400  # no default
    # Both answer by name, each exactly as it does alone (its references).
    gpu_ids = [ids.tolist() for ids in gpu_reference["ids"][:16]]
    segmenter = infer(url, "segmenter", gpu_ids)
    assert segmenter.status_code == 200
    assert worst(segmenter.json()["outputs"], gpu_reference["probs_fp32"][:16]) <= TOLERANCE
    legacy = legacy_expected["sequences"]
    tagger_v1 = infer(url, "tagger", legacy).json()["outputs"]
    assert worst(tagger_v1, legacy_expected["expected"]["A"]) <= TOLERANCE

    # Version 2, another architecture, converted ahead and renamed into place while four
    # clients keep sending: every request answered 200, by version 1 or by version 2.
    segmenter_h5 = DEFAULT_MODEL / "segmenter.h5"
    staged = root.parent / "staged" / "2"
    staged.mkdir(parents=True)
    shutil.copy(segmenter_h5, staged / "model.h5")
    convert_ahead(staged / "model.h5")
    with Clients(url, legacy) as clients:
        time.sleep(1)
        dropped = time.monotonic()
        drop_in(root / "tagger" / "2", {"model.h5": segmenter_h5})
        wait_for(url, lambda s: s["tagger"].get(2, {}).get("state") == "READY"
                 and s["tagger"][1]["state"] == "UNAVAILABLE", "served version 2 and unloaded version 1")
        swapped = time.monotonic() - dropped
        time.sleep(1)
    by_segmenter = infer(url, "segmenter", legacy).json()["outputs"]  # version 2's weights, served alone
    widths = {len(answer["outputs"][0][0]) for _, answer in clients.answers}
    assert {status for status, _ in clients.answers} == {200}, "a request was refused during the swap"
    assert widths == {5, 2} and len(clients.answers) > 20
    for _, answer in clients.answers:
        expected = legacy_expected["expected"]["A"] if len(answer["outputs"][0][0]) == 5 else by_segmenter
        assert worst(answer["outputs"], expected) <= TOLERANCE
    assert states(url)["tagger"][1] == {"version": 1, "state": "UNAVAILABLE", "reason": "unloaded"}
    v2 = infer(url, "tagger", gpu_ids)
    assert worst(v2.json()["outputs"], gpu_reference["probs_fp32"][:16]) <= TOLERANCE  # its GPU outputs
    assert infer(url, "tagger", legacy, version=1).status_code == 404  # unloaded: listed, not served
    assert infer(url, "tagger", legacy, version=9).status_code == 404

    # A broken version 3: listed UNAVAILABLE with the reason; version 2 keeps serving.
    drop_in(root / "tagger" / "3", {"model.h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 64})
    now = wait_for(url, lambda s: s["tagger"].get(3, {}).get("state") == "UNAVAILABLE", "refused version 3")
    assert "model.h5" in now["tagger"][3]["reason"]
    assert now["tagger"][2]["state"] == "READY"
    v2_again = infer(url, "tagger", gpu_ids).json()["outputs"]
    assert worst(v2_again, gpu_reference["probs_fp32"][:16]) <= TOLERANCE
    assert infer(url, "tagger", gpu_ids, version=3).status_code == 503
    grpc_outputs = grpc_infer(server, "tagger", gpu_ids[0])
    assert worst([grpc_outputs], gpu_reference["probs_fp32"][:1]) <= TOLERANCE  # over gRPC too, by name
    v2_info = httpx.get(url + "/v1/models/tagger").json()
    assert v2_info["version"] == 2 and v2_info["state"] == "READY"
    metrics = httpx.get(url + "/metrics").text
    assert 'bigru_model_ready{model="tagger",version="2"} 1.0' in metrics
    assert 'bigru_model_ready{model="tagger",version="1"}' not in metrics
    assert server.process.poll() is None and server.cgroup.oom_kills() == 0  # type: ignore[attr-defined]
    tagger_lines = [r for r in server.records("request") if r.get("model") == "tagger"]
    assert {r["model_version"] for r in tagger_lines} == {"1", "2"}
    print(json.dumps({"answers_during_swap": len(clients.answers), "seconds_to_swap": round(swapped, 2),
                      "cgroup_peak_mib": round(server.cgroup.peak() / MiB),  # type: ignore[attr-defined]
                      "cgroup_now_mib": round(server.cgroup.current() / MiB)}))  # type: ignore[attr-defined]



def test_in_512_mib_a_conversion_that_cannot_fit_is_refused_and_a_removed_model_unloaded(
        repository: tuple[Server, Path]) -> None:
    server, root = repository
    drop_in(root / "late" / "1", {"model.h5": FIXTURES / "legacy" / "C_named_bidir_model.h5"})
    now = wait_for(server.url, lambda s: s.get("late", {}).get(1, {}).get("state") == "UNAVAILABLE",
                   "refused the conversion")
    assert "convert it ahead" in now["late"][1]["reason"]
    shutil.rmtree(root / "segmenter")
    wait_for(server.url, lambda s: s["segmenter"][1]["state"] == "UNAVAILABLE", "unloaded segmenter")
    assert infer(server.url, "segmenter", [[1, 2]]).status_code == 404
    assert server.process.poll() is None and server.cgroup.oom_kills() == 0  # type: ignore[attr-defined]


def test_several_versions_a_default_model_and_one_budget(tmp_path: Path) -> None:
    from app.config import Settings
    from tests.helpers import in_process

    root = tmp_path / "repo"
    for version in (1, 2):
        shutil.copytree(DEFAULT_MODEL, root / "segmenter" / str(version))
    (root / "segmenter" / "config.json").write_text(json.dumps({"version_policy": "all"}))
    (root / "tagger" / "1").mkdir(parents=True)
    shutil.copy(LEGACY_A, root / "tagger" / "1" / "model.h5")
    settings = Settings(_env_file=None, model_repository=root, default_model="segmenter",  # type: ignore[call-arg]
                        grpc_port=0)
    with in_process(settings) as client:
        listed = client.get("/v1/models").json()["models"]
        assert [(m["name"], [v["version"] for v in m["versions"]]) for m in listed] == [
            ("segmenter", [1, 2]), ("tagger", [1])]
        body = {"sequences": [[5, 6, 7]]}
        assert client.post("/infer", json=body).json()["model"] == "segmenter"
        assert client.get("/v1/model").json()["version"] == 2  # the highest ready one
        one = client.get("/v1/models/segmenter/versions/1").json()
        assert one["version"] == 1 and one["state"] == "READY" and one["memory_bytes"] > 0
        v2_body = {"inputs": [{"name": "ids", "datatype": "INT32", "shape": [1, 3], "data": [5, 6, 7]}]}
        answer = client.post("/v2/models/segmenter/versions/1/infer", json=v2_body).json()
        assert (answer["model_name"], answer["model_version"]) == ("segmenter", "1")
        assert client.post("/v2/models/segmenter/infer", json=v2_body).json()["model_version"] == "2"
        assert client.get("/v2/models/segmenter").json()["versions"] == ["1", "2"]
        assert client.get("/v2/models/tagger/versions/1/ready").status_code == 200
        for path in ("/v2/models/nope/ready", "/v2/models/tagger/versions/2/ready", "/v1/models/nope"):
            assert client.get(path).status_code == 404, path
        refused = client.post("/v1/models/nope/infer", json=body)
        assert refused.status_code == 404
        assert "served: 'segmenter', 'tagger'" in refused.json()["error"]["message"]
        schema = client.get("/openapi.json").json()["paths"]["/infer"]["post"]["requestBody"]
        assert "96" in json.dumps(schema)  # the default model's vocabulary bounds the ids
        repository = client.app.state.repository  # type: ignore[attr-defined]
        budgets = {id(instance.budget) for instance in repository.ready_instances()}
        assert len(budgets) == 1  # one memory budget for every model
