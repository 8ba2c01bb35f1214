"""Mutation testing of the modules that decide correctness and safety: ``make mutation``.

Each module is mutated by mutmut (3.x: every function's mutants live side by side behind a
trampoline, and each runs only the tests that call the mutated function) against its own
fast, in-process test subset, one module at a time, in a scratch copy under
``build/mutation/<module>/`` so that results are kept between runs (a rerun only retests
what changed). Prints the kill rate per module: killed (or timed out) over all mutants less
those listed in ``mutation/equivalent.txt`` (mutants that cannot change behaviour, each
with its reason). Exits 1 when a module is under TARGET.

    python -m mutation                      # every module
    python -m mutation runner batcher       # some of them, by the short names below
    python -m mutation --fresh runner       # forget earlier results first
    python -m mutation --retest runner      # retest the mutants that survived (after new tests)
    python -m mutation --survivors runner   # also print the surviving mutants' diffs
    python -m mutation --report             # the last results again, without running
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "build" / "mutation"
EQUIVALENT = Path(__file__).resolve().parent / "equivalent.txt"
TARGET = 0.90
CHILDREN = 2  # the CI machines have 2 cores


@dataclass(frozen=True)
class Module:
    path: str
    tests: tuple[str, ...]  # pytest arguments: files, or node ids
    deselect: str = ""  # a -k expression of tests to leave out (slow ones)
    timeout_s: int = 300  # per test: a mutant that hangs a test counts as killed when it runs out


MODULES = {
    "gru_layouts": Module("app/formats/gru_layouts.py",
                          ("tests/test_layouts.py", "tests/test_layout_errors.py")),
    "spec": Module("app/spec.py", ("tests/test_spec.py", "tests/test_startup_failures.py"),
                   "not server and not self_check"),
    "onnx_graph": Module("app/lowering/onnx_graph.py", ("tests/test_onnx_graph.py",)),
    "runner": Module("app/engine/runner.py",
                     ("tests/test_runner.py", "tests/test_exactness.py", "tests/test_batcher.py"),
                     "not keras"),
    "batcher": Module("app/service/batcher.py", ("tests/test_batcher.py",)),
    "selfcheck": Module("app/engine/selfcheck.py", ("tests/test_selfcheck.py",)),
    "middleware": Module("app/api/middleware.py",
                         ("tests/test_envelope_asgi.py",)),
    "routes": Module("app/api/routes.py", (
        "tests/test_routes.py", "tests/test_validation.py",
        "tests/test_settings.py::test_a_parity_tolerance_too_tight_keeps_the_service_not_ready"),
        # mutants of the router's wiring leave requests unanswered: each test takes seconds
        timeout_s=60),
    "plain_routes": Module("app/api/plain_routes.py", ("tests/test_plain_routes.py",)),
    "inputs": Module("app/api/inputs.py", ("tests/test_inputs.py",)),
    "json_body": Module("app/api/json_body.py", ("tests/test_json_body.py", "tests/test_validation.py")),
    "pricing": Module("app/service/pricing.py", ("tests/test_limits.py",),
                      "parts_hold or price or budget_admits or budget_is_fifo or line_moves "
                      "or budget_sized or configured_budget or engine_calls or loaded_later"),
    "policy": Module("app/service/policy.py", ("tests/test_repository.py",), "policies"),
    "layout": Module("app/service/layout.py", ("tests/test_repository.py",), "names or layout"),
    "system": Module("app/system.py", ("tests/test_limits.py",),
                     "cgroup_limit or cgroup_v1 or cgroup_paths or rss or freed_blocks"),
}
COPIED = ("app", "tests", "bench", "models", "docs", "README.md")  # tests import bench helpers
RESULT = re.compile(r"^\s+(\S+__mutmut_\d+): (.+)$")


def equivalent_mutants() -> dict[str, str]:
    """``name  # reason`` per line of mutation/equivalent.txt."""
    listed = {}
    for line in EQUIVALENT.read_text().splitlines():
        name, _, reason = line.partition("#")
        if name.strip():
            listed[name.strip()] = reason.strip()
    return listed


def prepare(name: str, module: Module, fresh: bool) -> Path:
    """A scratch copy of the project whose pyproject tells mutmut what to mutate and run."""
    work = WORK / name
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for item in COPIED:
        source, target = ROOT / item, work / item
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target)
    addopts = ["-p", "no:cacheprovider", "-q", f"--timeout={module.timeout_s}"]
    if module.deselect:
        addopts += ["-k", module.deselect]
    settings = {
        "source_paths": ["app"],
        "only_mutate": [module.path],
        "also_copy": list(COPIED[2:]),
        "pytest_add_cli_args": addopts,
        "pytest_add_cli_args_test_selection": list(module.tests),
        "use_git_change_detection": False,
    }
    text = (ROOT / "pyproject.toml").read_text()
    lines = [f"{key} = {toml_value(value)}" for key, value in settings.items()]
    (work / "pyproject.toml").write_text(text.rstrip() + "\n\n[tool.mutmut]\n" + "\n".join(lines) + "\n")
    return work


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def mutmut(work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "mutmut"), *args]
    # mutmut forks a worker per mutant from the process that ran the tests; a gRPC server
    # started there (the app in process) makes those forks crash (SIGSEGV), so none runs.
    # Conversions are kept across the per-mutant test sessions: each would redo them.
    environment = os.environ | {"GRPC_PORT": "0", "TEST_MODEL_CACHE_DIR": str(work / "model-cache")}
    return subprocess.run(command, cwd=work, capture_output=True, text=True, env=environment)


def mutant_statuses(work: Path) -> dict[str, str]:
    """Each mutant's last result (killed, survived, timeout, not checked, ...)."""
    results = mutmut(work, "results", "--all", "true")
    return {m.group(1): m.group(2) for m in map(RESULT.match, results.stdout.splitlines()) if m}


def forget_survivors(work: Path) -> None:
    """Make mutmut retest every mutant not yet killed, and re-map which tests call what
    (new tests may reach functions no test reached)."""
    statuses = mutant_statuses(work)
    for meta_path in (work / "mutants").rglob("*.meta"):
        meta = json.loads(meta_path.read_text())
        codes = meta["exit_code_by_key"]
        for mutant in codes:
            if statuses.get(mutant) not in ("killed", "timeout"):
                codes[mutant] = None
        meta_path.write_text(json.dumps(meta, indent=4))
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)


def run_module(name: str, module: Module, fresh: bool, survivors: bool,
               report: bool, retest: bool = False) -> tuple[int, int, int, float]:
    """Returns (killed, counted, equivalent, seconds)."""
    started = time.monotonic()
    if report:
        work = WORK / name
        run = subprocess.CompletedProcess([], 0, "", "")
    else:
        work = prepare(name, module, fresh)
        if retest and (work / "mutants").exists():
            forget_survivors(work)
            # mutmut copies the tests only when it creates mutants/
            shutil.copytree(work / "tests", work / "mutants" / "tests", dirs_exist_ok=True)
        run = mutmut(work, "run", "--max-children", str(CHILDREN))
    seconds = time.monotonic() - started
    statuses = mutant_statuses(work)
    if not statuses:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n")
        raise SystemExit(f"{name}: mutmut produced no results")
    listed = equivalent_mutants()
    equivalent = [m for m in statuses if m in listed]
    counted = {m: s for m, s in statuses.items() if m not in listed}
    killed = sum(s in ("killed", "timeout") for s in counted.values())
    for mutant, status in sorted(counted.items()):
        if status not in ("killed", "timeout"):
            print(f"  {status:>10}  {mutant}")
            if survivors:
                print(mutmut(work, "show", mutant).stdout)
    return killed, len(counted), len(equivalent), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", choices=[[], *MODULES], metavar="module", default=[])
    parser.add_argument("--fresh", action="store_true", help="forget earlier results")
    parser.add_argument("--retest", action="store_true", help="retest the mutants not killed")
    parser.add_argument("--survivors", action="store_true", help="print the surviving mutants' diffs")
    parser.add_argument("--report", action="store_true", help="print the last results, run nothing")
    options = parser.parse_args()
    rows = []
    for name in options.modules or MODULES:
        verb = "results of" if options.report else "mutating"
        print(f"{name}: {verb} {MODULES[name].path} ...", flush=True)
        killed, counted, equivalent, seconds = run_module(name, MODULES[name], options.fresh,
                                                          options.survivors, options.report,
                                                          options.retest)
        rate = killed / counted if counted else 1.0
        rows.append((name, rate))
        print(f"{name}: {killed}/{counted} killed = {rate:.1%} ({equivalent} equivalent not counted, "
              f"{seconds:.0f} s)", flush=True)
    print(f"\nkill rate per module (target {TARGET:.0%}):")
    for name, rate in rows:
        print(f"  {MODULES[name].path:<32} {rate:6.1%}  {'ok' if rate >= TARGET else 'UNDER TARGET'}")
    return 0 if all(rate >= TARGET for _, rate in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
