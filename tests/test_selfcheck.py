"""The start-up self-check: it must fail when the served numbers differ from the GPU's, in
the outputs or in the hidden states, by more than the tolerance, and pass at it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from app.engine.runner import Runner
from app.engine.selfcheck import DEFAULT_TOLERANCE, run_self_check, tolerance_for
from app.errors import ModelError
from app.formats.bundle import load_bundle
from app.formats.parity import ParityData
from tests.conftest import DEFAULT_MODEL
from tests.helpers import runner_for

SHIFT = 1e-3  # far past float32 noise (about 1e-6 here), far under a real conversion bug


@pytest.fixture(scope="module")
def parity_and_runner() -> tuple[ParityData, Runner]:
    bundle = load_bundle(DEFAULT_MODEL)
    assert bundle.parity is not None and bundle.parity.hidden is not None
    return bundle.parity, runner_for(bundle.spec, "onnxruntime", 256, 32)


def shifted(rows: list[np.ndarray], sequence: int, step: int, column: int) -> list[np.ndarray]:
    copy = [r.copy() for r in rows]
    copy[sequence][step, column] += SHIFT
    return copy


def test_the_default_model_passes_against_the_gpu(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    check = run_self_check(parity, runner.run, DEFAULT_TOLERANCE)
    assert check.passed and check.sequences == 32 and check.tolerance == DEFAULT_TOLERANCE
    assert check.max_abs_diff_outputs < 1e-5 and check.max_abs_diff_hidden is not None
    assert check.max_abs_diff_hidden < 1e-5
    assert check.worst == max(check.max_abs_diff_outputs, check.max_abs_diff_hidden)
    assert check.as_dict()["passed"] is True and check.reference == parity.file


def test_a_hidden_state_mismatch_fails_the_check(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    assert parity.hidden is not None
    check = run_self_check(replace(parity, hidden=shifted(parity.hidden, 30, 7, 200)), runner.run, 1e-4)
    assert not check.passed and check.as_dict()["passed"] is False
    assert check.max_abs_diff_hidden == pytest.approx(SHIFT, rel=0.05)
    assert check.max_abs_diff_outputs < 1e-5  # the outputs alone would have passed
    assert check.worst == check.max_abs_diff_hidden


def test_an_output_mismatch_fails_the_check(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    check = run_self_check(replace(parity, outputs=shifted(parity.outputs, 0, 0, 1)), runner.run, 1e-4)
    assert not check.passed
    assert check.max_abs_diff_outputs == pytest.approx(SHIFT, rel=0.05)
    assert check.worst == check.max_abs_diff_outputs


def test_the_tolerance_is_the_bound(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    wrong = replace(parity, outputs=shifted(parity.outputs, 5, 3, 0))
    worst = run_self_check(wrong, runner.run, 1.0).worst
    assert run_self_check(wrong, runner.run, worst).passed  # at the tolerance: passes
    assert not run_self_check(wrong, runner.run, worst * 0.999).passed
    assert run_self_check(wrong, runner.run, 1e-2).passed  # a TF32-sized tolerance allows it


def test_parity_data_without_hidden_checks_outputs_only(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    check = run_self_check(replace(parity, hidden=None), runner.run, 1e-4)
    assert check.passed and check.max_abs_diff_hidden is None
    assert check.worst == check.max_abs_diff_outputs


def test_rows_of_the_wrong_shape_are_a_model_error(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    cut = [o[:, :1] for o in parity.outputs]
    with pytest.raises(ModelError, match=r"parity data has rows of shape \(\d+, 1\), the model gives"):
        run_self_check(replace(parity, outputs=cut), runner.run, 1e-4)


def test_a_runner_that_loses_a_sequence_cannot_pass(parity_and_runner: tuple[ParityData, Runner]) -> None:
    parity, runner = parity_and_runner
    with pytest.raises(ValueError, match="zip"):
        run_self_check(parity, lambda sequences: runner.run(sequences)[:-1], 1e-4)


def test_the_tolerance_is_the_chosen_one_else_the_parity_datas_else_the_default() -> None:
    def parity(tolerance: float | None) -> ParityData:
        return ParityData("parity.npz", [], [], None, tolerance)

    assert tolerance_for(5e-4, parity(1e-3)) == 5e-4
    assert tolerance_for(None, parity(1e-3)) == 1e-3
    assert tolerance_for(None, parity(None)) == DEFAULT_TOLERANCE == 1e-4
    assert tolerance_for(None, None) == DEFAULT_TOLERANCE
    assert tolerance_for(2e-6, None) == 2e-6
