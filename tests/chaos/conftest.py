"""Faults as tests: kube-apiserver killed, the operator killed mid-change, generated
PoolBudgets through the real API server. `make test` runs a quick version; `make chaos`
runs more trials and longer outages (POOLBUDGET_CHAOS_TRIALS, POOLBUDGET_OUTAGE_SECONDS).
Each test records its figures; they are printed at the end and written to out/chaos.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster, find_binaries
from tests.e2e.support import Cluster

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


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    """A control plane of its own: its API server or etcd is killed here. No node is
    needed: the budgets write ConfigMaps only (rollout strategy None)."""
    with LocalCluster(tmp_path / "cluster", binaries=find_binaries(), node=False) as cluster:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.wait_established("poolbudgets.poolbudget.dev")
        yield cluster


def unreflected(
    ns: Cluster, budget: str, replicas: Mapping[str, int], missing: Iterable[str] = ()
) -> list[str]:
    """The targets of `budget` whose allocation does not show their Deployment as it is now:
    one that exists is Applied for its replicas plus the default 25% surge (rounded up),
    one that does not is Missing and budgeted as one pod."""
    allocations = {a["deploymentName"]: a for a in ns.status(budget).get("allocations") or []}

    def shown(name: str) -> tuple[str | None, int | None]:
        allocation = allocations.get(name) or {}
        return allocation.get("state"), allocation.get("podsWorstCase")

    wrong = [n for n, r in replicas.items() if shown(n) != ("Applied", r + math.ceil(r * 0.25))]
    wrong += [n for n in missing if shown(n) != ("Missing", 1)]
    return sorted(wrong)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _FIGURES:
        return
    out = REPO / "out"
    out.mkdir(exist_ok=True)
    (out / "chaos.json").write_text(json.dumps(_FIGURES, indent=2, sort_keys=True) + "\n")
    terminalreporter.section("chaos figures (out/chaos.json)")
    for test, figures in sorted(_FIGURES.items()):
        terminalreporter.write_line(f"{test}: {json.dumps(figures, sort_keys=True)}")
