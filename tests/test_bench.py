"""The benchmark's own parts, run for real and briefly (its timings are not checked here: they
belong to ``make bench``): wrk with the Lua bodies against a real uvicorn, and the report."""

from __future__ import annotations

import json

from bench import report
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
    page = tmp_path / "benchmark.md"
    page.write_text(report.PAGE.read_text())  # the page `make bench BENCH_ARGS=--readme` rewrites
    report.paste_into(text, page)
    pasted = page.read_text()
    original = report.PAGE.read_text()
    before, after = original.split(report.START)[0], original.split(report.END)[1]
    assert pasted == f"{before}{report.START}\n{text}\n{report.END}{after}"
