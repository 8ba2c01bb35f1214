"""Bounded at the edges: memory admission by cost, streamed answers, over-limit bodies answered
(not reset) for real clients, stalled clients cut, limits published, cgroup limits read."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import requests

from app.engine.buckets import length_buckets
from app.service.pricing import (
    NOTHING_HELD,
    BudgetTaken,
    Cost,
    CostModel,
    Held,
    MemoryBudget,
    NeverFits,
    affordable_calls,
    sized_budget,
    split_parts,
)
from app.system import cgroup_memory_limit, process_rss, return_freed_memory
from tests.conftest import Server

MiB = 2**20
MAX_BODY = 131072


@pytest.fixture(scope="module")
def tight():
    """Small limits, reached cheaply: 16 MiB budget, 128 KiB bodies, 1 s / 1.5 s deadlines."""
    server = Server({"MEMORY_BUDGET_BYTES": str(16 * MiB), "MAX_BODY_BYTES": str(MAX_BODY),
                     "DISCARD_BODY_BYTES": str(MiB), "HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1.5",
                     "REQUEST_TIMEOUT_S": "5", "WORKERS": "2", "DRAIN_DELAY_S": "0"}, serve=True)
    server.wait_until()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def parts_server():
    """Engine calls of at most 256 padded tokens, so that every request runs in many parts."""
    server = Server({"MAX_BATCH_TOKENS": "256", "SEND_TIMEOUT_S": "1", "DRAIN_DELAY_S": "0"}, serve=True)
    server.wait_until()
    yield server
    server.stop()


# --- the cost model and the budget ----------------------------------------------------------

def test_cgroup_limit_is_the_tightest_along_the_path(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    (tmp_path / "kubepods" / "pod1").mkdir(parents=True)
    membership.write_text("0::/kubepods/pod1\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "kubepods" / "memory.max").write_text(f"{2048 * MiB}\n")
    (tmp_path / "kubepods" / "pod1" / "memory.max").write_text(f"{512 * MiB}\n")
    assert cgroup_memory_limit(tmp_path, membership) == 512 * MiB
    (tmp_path / "kubepods" / "pod1" / "memory.max").write_text("max\n")
    assert cgroup_memory_limit(tmp_path, membership) == 2048 * MiB


def test_cgroup_v1_and_no_limit(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("5:cpu,cpuacct:/\n4:memory:/\n0::/\n")
    (tmp_path / "memory").mkdir()
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert cgroup_memory_limit(tmp_path, membership) is None  # v1's "unlimited"
    (tmp_path / "memory" / "memory.limit_in_bytes").write_text(f"{512 * MiB}\n")
    assert cgroup_memory_limit(tmp_path, membership) == 512 * MiB
    assert cgroup_memory_limit(tmp_path, tmp_path / "absent") is None


def test_cgroup_paths_with_colons_missing_files_and_joined_controllers(tmp_path: Path) -> None:
    """Paths may hold ':' (cri-containerd), the root cgroup has no memory.max, and v1 lists
    controllers joined by commas; only the memory controller's hierarchy counts."""
    membership = tmp_path / "cgroup"
    membership.write_text("0::/kubepods/cri-containerd:abcX\n")
    (tmp_path / "kubepods" / "cri-containerd:abcX").mkdir(parents=True)
    (tmp_path / "kubepods" / "cri-containerd:abcX" / "memory.max").write_text(f"{300 * MiB}\n")
    assert cgroup_memory_limit(tmp_path, membership) == 300 * MiB
    v1 = tmp_path / "v1"
    (v1 / "memory" / "pod").mkdir(parents=True)
    (v1 / "memory" / "other").mkdir(parents=True)
    (v1 / "memory" / "pod" / "memory.limit_in_bytes").write_text(f"{700 * MiB}\n")
    (v1 / "memory" / "other" / "memory.limit_in_bytes").write_text(f"{100 * MiB}\n")
    membership.write_text("5:cpu,cpuacct:/other\n4:hugetlb,memory:/pod\n")
    assert cgroup_memory_limit(v1, membership) == 700 * MiB


def test_parts_hold_whole_sequences_within_the_token_cap() -> None:
    buckets = length_buckets(2048)
    lengths = [2048] * 5 + [3, 700, 700, 1, 2048]
    parts = split_parts(lengths, buckets, max_tokens=4096, max_sequences=32)
    assert [list(part) for part in parts] == [[0, 1], [2, 3], [4, 5, 6, 7, 8], [9]]
    assert [list(p) for p in split_parts([9000], [*buckets, 9000], 4096, 32)] == [[0]]  # alone
    assert len(split_parts([1] * 70, buckets, 8192, 32)) == 3
    assert [len(part) for part in split_parts([1] * 5, buckets, 8192, 2)] == [2, 2, 1]


def test_price_grows_with_tokens_and_hidden_states() -> None:
    costs = CostModel(length_buckets(2048), output_width=2, hidden_width=256, state_floats=512,
                      max_batch_tokens=8192, max_batch_size=32)
    small = costs.price([10], costs.kept_outputs(False), 100)
    maximal = costs.price([2048] * 64, costs.kept_outputs(True), 400_000)
    assert small.total < MiB < maximal.total < 48 * MiB  # streamed: a few parts at a time
    assert costs.price([2048] * 64, NOTHING_HELD, 400_000).total < maximal.total
    assert costs.price([2048] * 4, costs.kept_outputs(True), 0).total < \
        costs.price([2048] * 12, costs.kept_outputs(True), 0).total
    # held per token of each row padded to `steps` (a v2 tensor), or per bucket-padded token
    def extra(lengths: list[int], held: Held) -> int:
        return costs.price(lengths, held, 0).total - costs.price(lengths, NOTHING_HELD, 0).total

    assert extra([10, 2048], Held(1000, steps=2048)) == 1000 * 2 * 2048
    assert extra([10], Held(1000)) == 1000 * 12  # 10 tokens, in the bucket of 12
    assert costs.engine_reserve(workers=2) == 2 * 8192 * 16 * 512


def test_budget_admits_in_order_and_bounds_the_wait() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(80, "test")  # 70 for requests, 10 of waiting room
        with pytest.raises(NeverFits):
            await budget.admit(Cost(1, 71), 1)
        await budget.admit(Cost(5, 60), 1)
        waiter = asyncio.create_task(budget.admit(Cost(5, 20), 5))
        await asyncio.sleep(0.01)
        with pytest.raises(BudgetTaken):  # the waiting room (10) has 5 free: 6 don't fit
            await budget.admit(Cost(6, 6), 1)
        with pytest.raises(BudgetTaken):  # room to wait, but the wait runs out
            await budget.admit(Cost(1, 5), 0.05)
        assert not waiter.done()
        budget.release(60)
        await asyncio.wait_for(waiter, 1)
        assert budget.used == 20 and budget.waiting == 0

    asyncio.run(scenario())


def test_price_is_the_documented_sum() -> None:
    """Input (body + 64 B per token) + the results of the LOOKAHEAD=3 parts in flight
    ((output + hidden width) x 4 B per padded token) + with return_hidden the kept outputs
    (output width x 4 B per padded token) + 256 KiB of JSON being encoded."""
    costs = CostModel(length_buckets(2048), output_width=2, hidden_width=256, state_floats=512,
                      max_batch_tokens=1024, max_batch_size=32)
    lengths = [1000, 1000, 1000, 10]  # padded 1024, 1024, 1024, 12: four parts of one
    input_bytes = 500 + 64 * 3010
    plain = costs.price(lengths, costs.kept_outputs(False), 500)
    assert plain == Cost(input_bytes, input_bytes + 4 * 258 * 3 * 1024 + 4 * 64 * 1024)
    hidden = costs.price(lengths, costs.kept_outputs(True), 500)
    assert hidden.total - plain.total == 4 * 2 * (3 * 1024 + 12) and hidden.input == input_bytes
    assert costs.engine_bytes_per_token == 16 * 512 and costs.engine_reserve(3) == 3 * 1024 * 16 * 512
    assert [list(p) for p in costs.parts(lengths)] == [[0], [1], [2], [3]]


def test_budget_is_fifo_fills_to_the_byte_and_forgets_who_left() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(80, "test")  # 70 for requests, 10 of waiting room
        assert budget.describe() == {"memory_budget_bytes": 80, "memory_budget_from": "test",
                                     "largest_request_cost_bytes": 70, "waiting_room_bytes": 10}
        await budget.admit(Cost(1, 70), 1)  # exactly the budget
        big = asyncio.create_task(budget.admit(Cost(4, 50), 5))
        leaving = asyncio.create_task(budget.admit(Cost(3, 40), 5))
        await asyncio.sleep(0.01)
        assert budget.waiting == 7
        budget.release(30)  # 40 free: the head of the line (50) does not fit, nobody jumps it
        await asyncio.sleep(0.01)
        assert not big.done() and not leaving.done() and budget.used == 40
        leaving.cancel()
        await asyncio.sleep(0.01)
        assert budget.waiting == 4 and budget.used == 40
        budget.release(40)
        await asyncio.wait_for(big, 1)
        assert budget.used == 50 and budget.waiting == 0
        await asyncio.wait_for(budget.admit(Cost(2, 20), 5), 1)  # nobody in line, fits to the byte
        assert budget.used == 70 and budget.waiting == 0

    asyncio.run(scenario())


def test_the_line_moves_past_who_left_and_fills_to_the_byte() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(81, "test")  # 71 for requests, 10 of waiting room (whole bytes)
        assert (budget.total, budget.waiting_room) == (71, 10) and isinstance(budget.waiting_room, int)
        await budget.admit(Cost(1, 61), 1)
        head = asyncio.create_task(budget.admit(Cost(5, 71), 5))
        await asyncio.sleep(0.01)
        behind = asyncio.create_task(budget.admit(Cost(5, 10), 5))  # 5 + 5 fill the room exactly
        await asyncio.sleep(0.01)
        assert budget.waiting == 10 and not behind.done()
        with pytest.raises(BudgetTaken):  # refused at once: the room is full
            await asyncio.wait_for(budget.admit(Cost(1, 1), 5), 0.5)
        head.cancel()
        await asyncio.sleep(0.01)
        await asyncio.wait_for(behind, 1)  # 61 + 10 = 71: fits to the byte
        assert budget.used == 71 and budget.waiting == 0
        budget.release(71)
        await budget.admit(Cost(6, 6), 1)
        blocker = asyncio.create_task(budget.admit(Cost(4, 70), 5))
        await asyncio.sleep(0.01)
        with pytest.raises(BudgetTaken):  # 4 waiting + 7 > 10, though 7 - 4 would not be
            await asyncio.wait_for(budget.admit(Cost(7, 1), 5), 0.5)
        blocker.cancel()

    asyncio.run(scenario())


def test_a_configured_budget_is_taken_as_it_is() -> None:
    budget, workers = sized_budget(800, [(3, 10)])
    assert (budget.total, budget.waiting_room, workers) == (700, 100, [3])
    assert budget.derivation == "MEMORY_BUDGET_BYTES"
    assert sized_budget(-5, [(1, 1)])[0].total == 0


def test_a_budget_sized_from_a_cgroup_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """limit - RSS at ready - headroom (10%, at least 32 MiB) - the engine calls, which take at
    most half of what is left; no limit: the default."""
    from app.service import pricing

    monkeypatch.setattr(pricing, "process_rss", lambda: 100 * MiB)
    monkeypatch.setattr(pricing, "cgroup_memory_limit", lambda: 1000 * MiB)
    budget, workers = sized_budget(None, [(8, 100 * MiB)])
    available = 1000 * MiB - 100 * MiB - 100 * MiB  # 800 MiB: half of it holds 4 calls
    assert workers == [4] and budget.total + budget.waiting_room == available - 4 * 100 * MiB
    assert budget.derivation == ("cgroup limit 1000 MiB - RSS at ready 100 MiB - headroom 100 MiB - "
                                 "4 engine calls 400 MiB")
    monkeypatch.setattr(pricing, "cgroup_memory_limit", lambda: 300 * MiB)
    budget, workers = sized_budget(None, [(8, 100 * MiB)])  # headroom 32 MiB, 168 left
    assert workers == [1] and budget.total + budget.waiting_room == 68 * MiB  # at least one call
    monkeypatch.setattr(pricing, "cgroup_memory_limit", lambda: None)
    budget, workers = sized_budget(None, [(8, 100 * MiB)])
    assert (budget.total + budget.waiting_room, workers) == (pricing.DEFAULT_BUDGET, [8])
    assert budget.derivation == "default (no cgroup memory limit)"


def test_process_rss_is_the_kernels_count() -> None:
    status = Path("/proc/self/status").read_text()
    vm_rss = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS:"))
    assert abs(process_rss() - vm_rss) < 4 * MiB


MAPPED_BLOCKS_AFTER = """
import ctypes, sys
from app.system import MMAP_THRESHOLD, return_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def mapped(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    own = libc.mallinfo2().hblks - before
    libc.free(block)
    return own

libc.free(libc.malloc(24 << 20))  # glibc now serves blocks up to 24 MiB from the heap
return_freed_memory()
# a block the heap's free chunks cannot hold (imports leave several MiB of them)
large = max(MMAP_THRESHOLD, libc.mallinfo2().fordblks + (1 << 20))
assert large < 24 << 20
print(mapped(large), mapped(MMAP_THRESHOLD // 2), mapped(100 << 10))
"""


@pytest.mark.parametrize(("environment", "expected"),
                         [({}, "1 0 0"), ({"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, "0 0 0")])
def test_freed_blocks_of_8_mib_or_more_go_back_to_the_system(environment: dict, expected: str) -> None:
    """After return_freed_memory, a block of MMAP_THRESHOLD gets its own mapping (returned when
    freed) even after glibc's threshold rose, smaller ones come from the heap (reused); an
    operator's MALLOC_MMAP_THRESHOLD_ is left alone."""
    import os
    import sys

    return_freed_memory()  # as create_app does; here so that `make mutation` maps this test to it
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"}
    shown = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS_AFTER], env=env | environment,
                           capture_output=True, text=True, check=True)
    assert shown.stdout.split() == expected.split()


# --- memory admission over HTTP -------------------------------------------------------------

def test_a_request_that_can_never_fit_gets_413_naming_the_limit(tight: Server) -> None:
    body = {"sequences": [[5] * 2048] * 16, "return_hidden": True}
    response = httpx.post(tight.url + "/infer", json=body, timeout=30)
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["type"] == "over_memory_budget"
    assert "MEMORY_BUDGET_BYTES" in error["message"] and "split it" in error["message"]
    fitting = httpx.post(tight.url + "/infer", json={"sequences": [[5] * 2048] * 4, "return_hidden": True},
                         timeout=30)
    assert fitting.status_code == 200 and len(fitting.json()["hidden"]) == 4


def test_a_taken_budget_means_wait_or_503_with_retry_after(tight: Server) -> None:
    body = {"sequences": [[7] * 2048] * 4, "return_hidden": True}  # ~9 MiB of 14: one at a time

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=tight.url, timeout=60) as client:
            return await asyncio.gather(*[client.post("/infer", json=body) for _ in range(8)])

    responses = asyncio.run(run())
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
    for response in responses:
        if response.status_code == 503:
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "overloaded"
    answers = {r.content for r in responses if r.status_code == 200}
    assert len(answers) == 1  # the same request, the same document
    metrics = httpx.get(tight.url + "/metrics").text
    assert 'bigru_rejected_requests_total{reason="memory_budget"}' in metrics


def test_limits_are_published(tight: Server) -> None:
    limits = httpx.get(tight.url + "/v1/model").json()["limits"]
    assert limits["memory_budget_bytes"] == 16 * MiB
    assert limits["memory_budget_from"] == "MEMORY_BUDGET_BYTES"
    assert limits["largest_request_cost_bytes"] == 14 * MiB
    assert limits["max_body_bytes"] == MAX_BODY and limits["header_timeout_s"] == 1
    description = httpx.get(tight.url + "/openapi.json").json()["paths"]["/infer"]["post"]["description"]
    assert str(14 * MiB) in description and "over_memory_budget" in description


# --- streamed answers -----------------------------------------------------------------------

def test_streamed_answer_is_one_exact_document(parts_server: Server, gpu_reference: dict) -> None:
    sequences = [s.tolist() for s in gpu_reference["ids"]]
    with httpx.stream("POST", parts_server.url + "/infer", timeout=60,
                      json={"sequences": sequences, "return_hidden": True}) as response:
        assert response.headers["transfer-encoding"] == "chunked"
        raw = response.read()
    document = json.loads(raw)
    assert list(document) == ["model", "hidden", "outputs"]  # hidden first: it streams
    assert len(document["outputs"]) == len(document["hidden"]) == len(sequences)
    expected = zip(gpu_reference["probs_fp32"], gpu_reference["hidden_fp32"])
    for got, hidden, (outputs, expected_hidden) in zip(document["outputs"], document["hidden"], expected):
        assert np.max(np.abs(np.asarray(got) - outputs)) <= 1e-4
        assert np.max(np.abs(np.asarray(hidden) - expected_hidden)) <= 1e-4
    plain = httpx.post(parts_server.url + "/infer", json={"sequences": sequences}, timeout=60).json()
    assert list(plain) == ["model", "outputs"]
    assert plain["outputs"] == document["outputs"]


def test_a_client_that_leaves_mid_stream_frees_its_budget(parts_server: Server) -> None:
    body = json.dumps({"sequences": [[9] * 2048] * 64, "return_hidden": True}).encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", parts_server.port)) as conn:
            conn.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    time.sleep(1)
    small = httpx.post(parts_server.url + "/infer", json={"sequences": [[9] * 100]}, timeout=30)
    assert small.status_code == 200
    metrics = httpx.get(parts_server.url + "/metrics").text
    assert "bigru_memory_budget_used_bytes 0.0" in metrics


def test_a_client_that_stops_reading_is_cut_and_its_budget_freed(parts_server: Server) -> None:
    body = json.dumps({"sequences": [[9] * 2048] * 64, "return_hidden": True}).encode()  # 377 MB
    with socket.create_connection(("127.0.0.1", parts_server.port)) as conn:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        conn.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert conn.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(4)  # reading nothing: the server gives up after SEND_TIMEOUT_S (1 s)
        used = httpx.get(parts_server.url + "/metrics").text
        assert "bigru_memory_budget_used_bytes 0.0" in used
        received, _ = read_until_closed(conn, 30)
        assert len(received) < 100 * MiB  # cut short, not sent to the end


# --- over-limit bodies: the 413 reaches real clients ----------------------------------------

def over_limit_body() -> bytes:
    return b'{"sequences": [[' + b",".join([b"7"] * 150_000) + b"]]}"  # ~300 KB > 128 KiB


def test_413_reaches_urllib(tight: Server) -> None:
    request = urllib.request.Request(tight.url + "/infer", data=over_limit_body(),
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=30)
    assert caught.value.code == 413
    assert json.loads(caught.value.read())["error"]["type"] == "body_too_large"


def test_413_reaches_requests_and_the_connection_stays_usable(tight: Server) -> None:
    with requests.Session() as session:
        response = session.post(tight.url + "/infer", data=over_limit_body(), timeout=30,
                                headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"
        assert "close" not in response.headers.get("connection", "")  # drained: kept alive
        assert session.post(tight.url + "/infer", json={"sequences": [[3, 4]]}, timeout=30).status_code == 200


def test_413_reaches_httpx(tight: Server) -> None:
    with httpx.Client(timeout=30) as client:
        response = client.post(tight.url + "/infer", content=over_limit_body(),
                               headers={"Content-Type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["type"] == "body_too_large"


@pytest.mark.parametrize("expect", ["100-continue", ""])
def test_413_reaches_curl_with_and_without_expect(tight: Server, tmp_path: Path, expect: str) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(over_limit_body())
    result = subprocess.run(
        ["curl", "-sS", "-o", str(tmp_path / "answer"), "-w", "%{http_code} %{size_upload}",
         "-H", "Content-Type: application/json", "-H", f"Expect: {expect}",
         "--data-binary", f"@{body}", tight.url + "/infer"],
        capture_output=True, text=True, timeout=30)
    status, uploaded = result.stdout.split()
    assert status == "413", result.stderr
    assert json.loads((tmp_path / "answer").read_text())["error"]["type"] == "body_too_large"
    if expect:  # answered before the body: curl never sent it
        assert int(uploaded) < MAX_BODY


# --- stalled clients ------------------------------------------------------------------------

def read_until_closed(conn: socket.socket, timeout: float) -> tuple[bytes, float]:
    conn.settimeout(timeout)
    started, received = time.monotonic(), b""
    while chunk := conn.recv(65536):
        received += chunk
    return received, time.monotonic() - started


def test_stalled_headers_body_and_idle_connections_are_cut(tight: Server) -> None:
    idle = socket.create_connection(("127.0.0.1", tight.port))
    headers = socket.create_connection(("127.0.0.1", tight.port))
    headers.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-")
    body = socket.create_connection(("127.0.0.1", tight.port))
    body.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"sequences\"")
    started = time.monotonic()
    served = httpx.post(tight.url + "/infer", json={"sequences": [[5, 6, 7]]}, timeout=30)  # meanwhile
    assert served.status_code == 200 and time.monotonic() - started < 1.0

    answer, _ = read_until_closed(headers, 10)
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "header_timeout"
    answer, _ = read_until_closed(body, 10)
    assert answer.startswith(b"HTTP/1.1 408")
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "body_timeout"
    assert read_until_closed(idle, 10)[0] == b""  # nothing asked, nothing said: closed
    assert time.monotonic() - started < 5
    for conn in (idle, headers, body):
        conn.close()


def test_plain_uvicorn_gets_the_deadlines_with_the_protocol_flag() -> None:
    """``uvicorn app.main:app --http app.api.transport:HeaderDeadlineProtocol``: both deadlines."""
    launch = ("import os, sys; os.execv(sys.executable, [sys.executable, '-m', 'uvicorn', 'app.main:app', "
              "'--host', '127.0.0.1', '--port', os.environ['PORT'], '--no-access-log', "
              "'--http', 'app.api.transport:HeaderDeadlineProtocol'])")
    server = Server({"HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1"}, argv=("-c", launch))
    try:
        server.wait_until()
        with socket.create_connection(("127.0.0.1", server.port)) as headers:
            headers.sendall(b"GET /healthz HTTP/1.1\r\nHost")
            assert read_until_closed(headers, 10)[0].startswith(b"HTTP/1.1 408")
        with socket.create_connection(("127.0.0.1", server.port)) as body:
            body.sendall(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            assert read_until_closed(body, 10)[0].startswith(b"HTTP/1.1 408")
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()


# --- in a real 512 MiB memory cgroup (what `docker run --memory 512m` makes) -----------------

def make_cgroup(limit: int):
    from bench.peak_rss import MemoryCgroup

    try:
        return MemoryCgroup(limit)
    except OSError as exc:
        pytest.skip(f"no writable memory cgroup here ({exc}): `make peak-rss` as root checks this")


def serve_in_cgroup(cgroup, env: dict[str, str]) -> Server:
    """``python -m app serve`` started inside ``cgroup`` (it moves itself in, then execs)."""
    launch = ("import os, sys; open(os.environ['CGROUP_PROCS'], 'w').write(str(os.getpid())); "
              "os.execv(sys.executable, [sys.executable, '-m', 'app', 'serve'])")
    return Server(env | {"CGROUP_PROCS": str(cgroup.path / "cgroup.procs")}, argv=("-c", launch))


def test_in_a_512_mib_cgroup_the_budget_is_derived_and_the_maximal_request_survives() -> None:
    cgroup = make_cgroup(512 * MiB)
    server = serve_in_cgroup(cgroup, {"WORKERS": "16", "DRAIN_DELAY_S": "0"})
    try:
        server.wait_until()
        limits = httpx.get(server.url + "/v1/model").json()["limits"]
        assert limits["memory_budget_from"].startswith("cgroup limit 512 MiB")
        assert "16 engine calls" not in limits["memory_budget_from"]  # 16 x 52 MiB would not fit
        body = {"sequences": [[11] * 2048] * 64, "return_hidden": True}
        with httpx.stream("POST", server.url + "/infer", json=body, timeout=300) as response:
            assert response.status_code == 200
            size = sum(len(chunk) for chunk in response.iter_raw())
        assert size > 300_000_000 and server.process.poll() is None
        assert httpx.get(server.url + "/readyz").status_code == 200
    finally:
        server.stop()
        assert cgroup.oom_kills() == 0
        cgroup.remove()


def test_engine_calls_of_several_models_shrink_the_costliest_first() -> None:
    assert affordable_calls([(4, 100), (4, 10)], room=1000) == [4, 4]
    assert affordable_calls([(4, 100), (4, 10)], room=300) == [2, 4]  # 200 + 40
    assert affordable_calls([(4, 100), (4, 10)], room=50) == [1, 1]  # at least one call each
    assert affordable_calls([], room=0) == []


def test_a_model_loaded_later_takes_its_memory_out_of_the_budget_and_gives_it_back() -> None:
    async def scenario() -> None:
        budget = MemoryBudget(80, "test")  # 70 for requests
        await budget.admit(Cost(0, 50), 1)
        reserving = asyncio.create_task(budget.reserve(30, 5))  # waits for the request to finish
        await asyncio.sleep(0.05)
        assert not reserving.done()
        budget.release(50)
        await reserving
        assert (budget.total, budget.used) == (40, 0)
        with pytest.raises(NeverFits):
            await budget.reserve(41, 1)
        with pytest.raises(NeverFits):  # requests now meet the smaller budget
            await budget.admit(Cost(0, 41), 1)
        budget.unreserve(30)
        assert budget.total == 70

    asyncio.run(scenario())
