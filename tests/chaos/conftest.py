"""Faults as tests: kube-apiserver killed, the operator killed mid-change, generated
PoolBudgets through the real API server. `make test` runs a quick version; `make chaos`
runs more trials and longer outages (POOLBUDGET_CHAOS_TRIALS, POOLBUDGET_OUTAGE_SECONDS).
Each test records its figures; they are printed at the end and written to out/chaos.json."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
TRIALS = int(os.environ.get("POOLBUDGET_CHAOS_TRIALS", "3"))
OUTAGE_SECONDS = float(os.environ.get("POOLBUDGET_OUTAGE_SECONDS", "30"))

_FIGURES: dict[str, Any] = {}


@pytest.fixture
def chaos_report(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """This test's figures (a dict it fills in), kept whether it passes or fails."""
    figures: dict[str, Any] = {}
    yield figures
    _FIGURES[request.node.name] = figures


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
    terminalreporter.section("chaos figures (out/chaos.json)")
    for test, figures in sorted(_FIGURES.items()):
        terminalreporter.write_line(f"{test}: {json.dumps(figures, sort_keys=True)}")
