"""poolbudget.pool_monitor's pure decisions: which signals a sample shows, and when to log."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from poolbudget.pool_monitor import (
    METRICS,
    Action,
    AlertState,
    PoolSample,
    Signal,
    conditions,
    message,
    step,
)


def sample(checked_out: int = 0, overflow: int = 0, waits: int = 0, timeouts: int = 0,
           pool_size: int = 2, max_overflow: int = 1) -> PoolSample:  # fmt: skip
    return PoolSample(pool_size, max_overflow, checked_out, overflow, waits, timeouts)


@pytest.mark.parametrize(
    ("s", "expected"),
    [
        (sample(), set()),
        (sample(checked_out=2), set()),  # 2/3 < 0.85
        (sample(checked_out=3, overflow=1), {Signal.SATURATED, Signal.OVERFLOW}),
        (
            sample(checked_out=3, overflow=1, waits=1),
            {Signal.SATURATED, Signal.OVERFLOW, Signal.WAITS},
        ),
        (sample(timeouts=1), {Signal.WAITS}),
        (sample(checked_out=17, pool_size=20, max_overflow=0), {Signal.SATURATED}),  # exactly 0.85
        (sample(checked_out=16, pool_size=20, max_overflow=0), set()),
        (
            sample(checked_out=5, pool_size=5, max_overflow=-1, overflow=0),
            {Signal.SATURATED},
        ),  # unlimited: vs pool_size
    ],
)
def test_conditions(s: PoolSample, expected: set[Signal]) -> None:
    assert {signal for signal, on in conditions(s, 0.85).items() if on} == expected


def run(flags: list[bool], every: int) -> list[Action]:
    state, actions = AlertState(), []
    for active in flags:
        state, action = step(state, active, every)
        actions.append(action)
    return actions


def test_warn_on_entering_repeat_while_it_lasts_clear_once() -> None:
    W, C, N = Action.WARN, Action.CLEAR, Action.NONE
    assert run([False, True, True, True, True, True, False, False], every=3) == [N, W, N, N, W, N, C, N]  # fmt: skip


def test_flapping_is_rate_limited() -> None:
    W, C, N = Action.WARN, Action.CLEAR, Action.NONE
    # Re-entering within the window stays silent, and so does its end (nothing to clear).
    assert run([True, False, True, False, True, False], every=4) == [W, C, N, N, W, C]


@given(st.lists(st.booleans(), max_size=200), st.integers(min_value=1, max_value=20))
def test_properties_of_step(flags: list[bool], every: int) -> None:
    actions = run(flags, every)
    warnings = [i for i, a in enumerate(actions) if a is Action.WARN]
    # Never more than one warning in any `every` consecutive samples.
    assert all(b - a >= every for a, b in itertools.pairwise(warnings))
    # A warning only while the signal is on, a clear only when it is off and only after a
    # warning with no clear in between.
    outstanding = False
    for active, action in zip(flags, actions, strict=True):
        assert action is not Action.WARN or active
        if action is Action.CLEAR:
            assert outstanding
            assert not active
            outstanding = False
        if action is Action.WARN:
            outstanding = True
    # A signal that lasts is never silent for longer than the window.
    run_length = 0
    for active, action in zip(flags, actions, strict=True):
        run_length = run_length + 1 if active else 0
        if action is Action.WARN:
            run_length = 0
        assert run_length < 2 * every


@pytest.mark.parametrize("signal", list(Signal))
def test_messages_name_the_application_and_the_numbers(signal: Signal) -> None:
    text = message(signal, sample(checked_out=3, overflow=1, waits=4, timeouts=1), "api-web", 5.0)
    assert "'api-web'" in text
    expected = {
        Signal.SATURATED: "3 of 3",
        Signal.OVERFLOW: "1 overflow",
        Signal.WAITS: "4 checkout(s)",
    }
    assert expected[signal] in text


def test_importable_without_sqlalchemy_and_metrics_need_prometheus_client() -> None:
    """client and pool_monitor import no third-party package at import time; asking for
    metrics without prometheus_client is a clear error, not an ImportError deep inside."""
    code = """
import sys
sys.modules["sqlalchemy"] = None
sys.modules["prometheus_client"] = None
import poolbudget.client, poolbudget.pool_monitor
try:
    poolbudget.pool_monitor.PoolMonitor(object(), metrics=True)
except RuntimeError as error:
    print(error)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert "needs prometheus_client: pip install prometheus-client" in result.stdout


def test_the_readme_lists_the_client_metrics() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Watching the pool from the application", 1)[1]
    section = section.split("\n### ", 1)[0]
    documented = set(re.findall(r"^\| `(poolbudget_client_[a-z_]+)` \|", section, re.MULTILINE))
    assert documented == set(METRICS)
