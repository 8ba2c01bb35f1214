"""The image built from our Dockerfile, run as our deployment files run it (read-only root,
tmpfs /tmp, the manifest's 512 MiB): `make image-test` builds it (tests/image/build.sh) and
runs this module with IMAGE_TEST=<image>; without IMAGE_TEST every test here is skipped."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest

from tests.conftest import ROOT
from tests.helpers import max_diff
from tests.image.container import Container, declared_memory_limit_mib, podman

IMAGE = os.environ.get("IMAGE_TEST", "")
# Collected and skipped (not left out) without an image, so that running this file alone
# says "skipped" rather than "no tests".
pytestmark = pytest.mark.skipif(not IMAGE, reason="IMAGE_TEST names no image: `make image-test`"
                                " builds one and runs these")

GPU_TOLERANCE = 1e-4
MAXIMAL = {"sequences": 64, "tokens": 2048}  # the published MAX_BATCH x MAX_LEN
HIDDEN_CHECKED = (0, 21, 42, 63)  # sequences whose hidden states are compared value by value
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def container() -> Iterator[Container]:
    """One replica for the checks that leave it running."""
    with Container(IMAGE) as running:
        print(f"time to ready: {running.wait_until_ready():.1f} s")
        yield running


@pytest.fixture
def fresh_container() -> Iterator[Container]:
    """A replica of its own, for a check that may end it."""
    with Container(IMAGE) as running:
        running.wait_until_ready()
        yield running


@pytest.fixture
def patient_container() -> Iterator[Container]:
    """A replica of its own with a deadline long enough for four maximal requests on two
    shared cores (~14 s of compute): these checks are about memory, not CPU speed."""
    with Container(IMAGE, env={"REQUEST_TIMEOUT_S": "120"}) as running:
        running.wait_until_ready()
        yield running


def infer(container: Container, body: dict) -> dict:
    response = httpx.post(container.url + "/infer", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def as_arrays(rows: list) -> list[np.ndarray]:
    return [np.asarray(r, np.float32) for r in rows]


def report_memory(figures: dict[str, int], what: str) -> None:
    print(f"{what}: cgroup memory now {figures['current'] / MIB:.0f} MiB, "
          f"peak {figures.get('peak', 0) / MIB:.0f} MiB, OOM kills {figures['oom_kills']}")


def test_ready_as_uid_10001_on_a_read_only_root(container: Container) -> None:
    assert httpx.get(container.url + "/readyz").status_code == 200
    server = container.exec("cat", "/proc/1/status").stdout
    uid_line = next(line for line in server.splitlines() if line.startswith("Uid:"))
    assert uid_line.split()[1:] == ["10001"] * 4, uid_line  # real, effective, saved, fs
    refused = container.exec("touch", "/opt/venv/written")
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    assert container.exec("touch", "/tmp/written").returncode == 0
    # The limit is visible where the service sizes itself from (cgroup v2, else v1).
    limit = container.exec("sh", "-c", "cat /sys/fs/cgroup/memory.max 2>/dev/null"
                           " || cat /sys/fs/cgroup/memory/memory.limit_in_bytes").stdout
    assert int(limit) == declared_memory_limit_mib() * MIB
    report_memory(container.memory(), "ready, idle")


def test_the_image_built_the_native_kernel_and_times_it(container: Container) -> None:
    """The build stage compiled the kernel (the final stage has no compiler): ENGINE=auto timed
    it beside ONNX Runtime and served the faster."""
    choice = httpx.get(container.url + "/v1/model", timeout=10).json()["engine_choice"]
    assert set(choice["timings"]) >= {"native", "onnxruntime"}
    assert "lone_ms" in choice["timings"]["native"], choice
    assert choice["chosen"] in ("native", "onnxruntime")


def test_demo_restores_the_spaces(container: Container) -> None:
    demo = subprocess.run([sys.executable, "examples/segment.py", "--url", container.url,
                           "thequickbrownfoxjumpsoverthelazydog"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert demo.stdout.strip() == "the quick brown fox jumps over the lazy dog", demo.stderr


def test_gpu_parity(container: Container, gpu_reference: dict) -> None:
    sequences = [s.tolist() for s in gpu_reference["ids"]]
    body = infer(container, {"sequences": sequences, "return_hidden": True})
    assert max_diff(as_arrays(body["outputs"]), gpu_reference["probs_fp32"]) <= GPU_TOLERANCE
    assert max_diff(as_arrays(body["hidden"]), gpu_reference["hidden_fp32"]) <= GPU_TOLERANCE


def test_the_images_healthcheck_passes(container: Container) -> None:
    healthcheck = podman("image", "inspect", "--format", "{{json .Config.Healthcheck}}", IMAGE).stdout
    assert "/healthz" in healthcheck, "HEALTHCHECK lost: build with --format docker"
    result = podman("healthcheck", "run", container.name, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def maximal_sequences() -> list[list[int]]:
    rng = np.random.default_rng(8)
    return rng.integers(0, 96, (MAXIMAL["sequences"], MAXIMAL["tokens"])).tolist()


@pytest.fixture(scope="module")
def answered_alone(container: Container, maximal_sequences: list[list[int]]) -> dict:
    """Each maximal sequence answered alone (with hidden states for HIDDEN_CHECKED)."""
    outputs, hidden = [], {}
    for i, sequence in enumerate(maximal_sequences):
        body = infer(container, {"sequences": [sequence], "return_hidden": i in HIDDEN_CHECKED})
        outputs.append(np.asarray(body["outputs"][0], np.float32))
        if i in HIDDEN_CHECKED:
            hidden[i] = np.asarray(body["hidden"][0], np.float32)
    return {"outputs": outputs, "hidden": hidden}


def post_to_file(url: str, body: bytes, answer: Path, patience_s: float = 120) -> int | str:
    """POST /infer as a patient client would (waiting out `503` + Retry-After), the answer
    streamed to a file; returns the status, or how the connection failed."""
    deadline = time.monotonic() + patience_s
    try:
        while True:
            with httpx.stream("POST", url + "/infer", content=body, timeout=300,
                              headers={"content-type": "application/json"}) as response:
                if response.status_code == 503 and "retry-after" in response.headers \
                        and time.monotonic() < deadline:
                    time.sleep(float(response.headers["retry-after"]))
                    continue
                with answer.open("wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                return response.status_code
    except httpx.TransportError as error:
        return f"{type(error).__name__}: {error}"


def check_complete_and_correct(answer: Path, alone: dict) -> None:
    """Every sequence's outputs, and the hidden states' shapes, as the sequences alone got
    them; the hidden values for HIDDEN_CHECKED. One parsed document at a time: ~1.3 GB."""
    body = orjson.loads(answer.read_bytes())
    assert max_diff(as_arrays(body["outputs"]), alone["outputs"]) <= 1e-6
    assert len(body["hidden"]) == MAXIMAL["sequences"]
    hidden_width = next(iter(alone["hidden"].values())).shape[1]
    for i, rows in enumerate(body["hidden"]):
        assert np.shape(rows) == (MAXIMAL["tokens"], hidden_width), i
    checked = [np.asarray(body["hidden"][i], np.float32) for i in HIDDEN_CHECKED]
    assert max_diff(checked, list(alone["hidden"].values())) <= 1e-6


@pytest.mark.parametrize("at_once", [1, 4])
def test_maximal_requests_are_answered_in_full_within_the_limit(
        patient_container: Container, maximal_sequences: list[list[int]], answered_alone: dict,
        at_once: int, tmp_path: Path) -> None:
    """64 x 2048 tokens with hidden states (~377 MB of JSON), inside every published limit."""
    body = orjson.dumps({"sequences": maximal_sequences, "return_hidden": True})
    answers = [tmp_path / f"answer-{i}.json" for i in range(at_once)]
    started = time.monotonic()
    with patient_container.watching_memory() as memory, ThreadPoolExecutor(at_once) as pool:
        statuses = list(pool.map(lambda answer: post_to_file(patient_container.url, body, answer),
                                 answers))
    print(f"{at_once} maximal request(s) at once: {statuses} in {time.monotonic() - started:.1f} s")
    report_memory(memory, f"{at_once} at once, last sample")
    state = patient_container.state()
    assert state["Running"] and memory["oom_kills"] == 0, (
        f"the replica died: exit {state['ExitCode']}, OOMKilled {state['OOMKilled']}, "
        f"OOM kills in its cgroup {memory['oom_kills']}; answers {statuses}")
    assert statuses == [200] * at_once
    for answer in answers:
        check_complete_and_correct(answer, answered_alone)
        answer.unlink()


def test_stop_says_not_ready_then_exits_cleanly(fresh_container: Container) -> None:
    stopping = fresh_container.stop()
    seen = set()
    while stopping.poll() is None:
        with contextlib.suppress(httpx.TransportError):  # refused once it has exited
            seen.add(httpx.get(fresh_container.url + "/readyz", timeout=2).status_code)
        time.sleep(0.1)
    state = fresh_container.state()
    assert 503 in seen, seen
    assert (state["ExitCode"], state["OOMKilled"]) == (0, False), (state, fresh_container.logs())
