"""The fleet proof on real pods, small size: the operator's ConfigMaps hold under a burst of
every worker of every pod at 3x its pool; the naive 50 + 20 fleet on the same server gets
53300. (`make fleet-pods` runs the full size and draws the picture.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from devtools.fleet import NAIVE_MAX_OVERFLOW, NAIVE_POOL_SIZE, TOO_MANY_CONNECTIONS
from devtools.fleet_pods import SCALES, run_pod_proof
from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.postgres]


def test_budgeted_pods_fit_and_naive_pods_get_too_many_clients(
    local_cluster: LocalCluster, operator_process: OperatorProcess, tmp_path: Path
) -> None:
    del operator_process  # it sizes the budgeted fleet's pools
    plot = tmp_path / "fleet.png"
    proof = run_pod_proof("small", cluster=local_cluster, plot=plot)
    budgeted, naive = proof.budgeted, proof.naive
    scale = SCALES["small"]
    workers = sum(r * p for r, p, _ in scale.deployments.values())

    assert proof.usable == scale.max_connections - 3 - scale.reserved_connections
    assert proof.planned_peak <= proof.usable
    assert sum(proof.workers.values()) == workers == budgeted.processes == naive.processes

    # Every worker of every pod reported its burst.
    assert budgeted.worker_failures == []
    assert naive.worker_failures == []
    assert budgeted.queries == 3 * proof.planned_peak
    assert naive.queries == 3 * (NAIVE_POOL_SIZE + NAIVE_MAX_OVERFLOW) * workers
    assert budgeted.samples >= 10
    assert naive.samples >= 10

    # Budgeted: nothing refused, nothing timed out, the server stayed within usable, and
    # the burst really filled the budget.
    assert budgeted.errors == {}
    assert budgeted.pool_timeouts == 0
    assert budgeted.ok == budgeted.queries
    assert budgeted.peak_app_connections <= proof.usable
    assert budgeted.peak_app_connections > proof.usable // 2

    # Naive: the database refuses clients.
    assert naive.errors.get(TOO_MANY_CONNECTIONS, 0) >= 1
    assert naive.ok < naive.queries
    assert proof.holds
    assert plot.stat().st_size > 10_000
