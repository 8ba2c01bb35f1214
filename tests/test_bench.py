"""The benchmark's own parts, run for real and briefly (its timings are not checked here: they
belong to ``make bench``): wrk with the Lua bodies against a real uvicorn, and the report."""

from __future__ import annotations

import json

from bench import breakdown, report
from bench.server import RESULTS, cpu_seconds, start_bare_uvicorn, stop, wrk


def test_wrk_sends_varied_bodies_and_reports_a_summary() -> None:
    process = start_bare_uvicorn()
    try:
        row = wrk(4, 1, (8, 16), (2, 96), server_pid=process.pid)
        assert cpu_seconds(process.pid) > 0
    finally:
        stop(process)
    assert row["requests"] > 0 and row["errors"] == 0
    assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["server_cpu_ms_per_request"] is not None


def test_report_renders_the_tables_ratios_and_targets(tmp_path) -> None:
    results = json.loads((RESULTS / "latest.json").read_text())
    text = report.markdown(results)
    assert "XLA Keras in-process" in text and "HTTP / XLA (p50)" in text
    assert "Targets: 64 tokens over HTTP at" in text and "H100 anchor" in text
    assert "Sporadic: one sequence at a time" in text
    assert "Sporadic" not in report.markdown({**results, "http": {k: v for k, v in results["http"].items()
                                                                  if k != "sporadic"}})  # older results
    page = tmp_path / "benchmark.md"
    page.write_text(report.PAGE.read_text())  # the page `make bench BENCH_ARGS=--readme` rewrites
    report.paste_into(text, page)
    pasted = page.read_text()
    original = report.PAGE.read_text()
    before, after = original.split(report.START)[0], original.split(report.END)[1]
    assert pasted == f"{before}{report.START}\n{text}\n{report.END}{after}"


BREAKDOWN = {
    "lone": {str(n): {**{phase: 0.01 * (i + 1) for i, phase in enumerate(report.PHASES)},
                      "total": 1.0 + n / 100, "loop cpu": 0.5, "parse cpu": 0.1, "engine cpu": n / 100,
                      "n": 10} for n in (16, 64, 256, 2048)},
    "missing": [],
    "load": {"connections": 32, "seconds": 3, "seq_s": 500.0, "requests": 1500, "errors": 0,
             "cpu_ms_per_request": 4.0,
             "cpu_ms_per_request_by_thread": {"event loop": 0.8, "engine threads": 3.1, "other threads": 0.1},
             "gil": {"rate_hz": 250, "requests": 1400, "seq_s": 480.0, "gil_ms_per_request": 0.9,
                     "gil_ms_per_request_by_thread": {"event loop": 0.8, "engine threads": 0.07,
                                                      "other threads": 0.03}}},
    "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [1.5, 1.0, 1.0], "quick": False,
}


def test_report_renders_where_the_time_goes() -> None:
    results = json.loads((RESULTS / "latest.json").read_text())
    text = report.markdown({**results, "breakdown": BREAKDOWN})
    table = text.split("Where the time goes")[1]
    assert "| phase | 16 tokens | 64 tokens | 256 tokens | 2048 tokens |" in table
    for phase in report.PHASES:
        assert f"| {phase} |" in table
    assert "| **total** | **1.16** | **1.64** | **3.56** | **21.48** |" in table
    assert "**4.00 ms of CPU per request**" in table and "**0.90 ms per request**" in table
    without_gil = {**BREAKDOWN, "load": {**BREAKDOWN["load"], "gil": {"error": "py-spy could not attach"}}}
    assert "interpreter lock not sampled: py-spy could not attach" in report.breakdown_markdown(without_gil)
    earlier = {key: value for key, value in results.items() if key != "breakdown"}
    assert "Where the time goes" not in report.markdown(earlier)  # results from before the breakdown


def test_py_spy_samples_are_counted_per_kind_of_thread(tmp_path) -> None:
    raw = tmp_path / "gil.txt"
    raw.write_text("thread (1): MainThread;run (asyncio/runners.py:118);infer (app/api/routes.py:83) 7\n"
                   "thread (1): MainThread;send (uvicorn/protocols/http/httptools_impl.py:561) 3\n"
                   "thread (5): engine_0;_worker (concurrent/futures/thread.py:83);"
                   "run (app/engine/runner.py:30) 2\n"
                   "thread (6): body-parsing_0;_worker (concurrent/futures/thread.py:83) 1\n")
    assert breakdown.gil_samples(raw) == {"event loop": 10, "engine threads": 2, "other threads": 1}


def test_the_phases_of_a_request_from_its_events() -> None:
    ms = 1_000_000
    events = [("admission", 1 * ms, 2 * ms), ("parsed", 3 * ms, 6 * ms), ("parse", 4 * ms, 5 * ms),
              ("admission", 7 * ms, 8 * ms), ("enqueued", 9 * ms, 9 * ms), ("engine", 10 * ms, 20 * ms),
              ("delivered", 21 * ms, 21 * ms), ("encode", 22 * ms, 23 * ms), ("encode", 24 * ms, 25 * ms)]
    phases = breakdown.phases_of(events, 0, 27 * ms)
    assert phases["envelope + routing + body"] == 2  # 0..3, less the body's admission
    assert phases["parse + validate"] == 1 and phases["parsing hop"] == 2
    assert phases["admission"] == 2 and phases["queue hop"] == 1 and phases["engine call"] == 10
    assert phases["back hop"] == 1 and phases["encode"] == 2 and phases["send"] == 2
    assert phases["total"] == 27 and phases["other"] == 27 - 23


def test_a_lone_request_is_broken_down_through_the_real_app() -> None:
    """The in-process part for real (a smoke run): every phase found at every length."""
    lone = breakdown.in_process(quick=True)
    assert lone["missing"] == []
    for n in breakdown.LENGTHS:
        row = lone["lone"][str(n)]
        assert all(row[phase] is not None for phase in report.PHASES), row
        assert row["engine cpu"] > 0 and row["parse cpu"] > 0 and row["total"] > row["engine call"]
