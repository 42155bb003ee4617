"""The fleet proof in its small size: real PostgreSQL, one OS process per worker.

The budgeted fleet (ConfigMaps planned and rendered as the operator does) bursts to three
times its pools and never gets 53300; the same fleet with pool_size=50, max_overflow=20 does.
"""

from __future__ import annotations

import pytest

from devtools.fleet import (
    ADMIN_CONNECTIONS,
    NAIVE_MAX_OVERFLOW,
    NAIVE_POOL_SIZE,
    SCALES,
    TOO_MANY_CONNECTIONS,
    run_proof,
)

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize("major", [15, 16], ids=["pg15", "pg16"])
def test_budgeted_fleet_fits_and_naive_fleet_gets_too_many_clients(major: int) -> None:
    proof = run_proof("small", major=major)
    budgeted, naive = proof.budgeted, proof.naive
    scale = SCALES["small"]

    # The plan came from the real server's limits (3 superuser-reserved by default; 15 has
    # no reserved_connections, 16 has it at 0 by default).
    assert proof.max_connections == scale.max_connections
    assert proof.usable == scale.max_connections - 3 - scale.reserved_connections
    assert proof.planned_peak <= proof.usable
    assert budgeted.processes == naive.processes == sum(proof.workers.values()) >= 4

    # Every worker ran its burst: 3 x (pool_size + max_overflow) queries each.
    assert budgeted.worker_failures == []
    assert naive.worker_failures == []
    assert budgeted.queries == 3 * proof.planned_peak
    assert naive.queries == 3 * (NAIVE_POOL_SIZE + NAIVE_MAX_OVERFLOW) * naive.processes
    assert budgeted.samples >= 10
    assert naive.samples >= 10

    # Budgeted: no connection refused, nothing lost, the server stayed inside the budget.
    assert budgeted.errors == {}
    assert budgeted.errors.get(TOO_MANY_CONNECTIONS, 0) == 0
    assert budgeted.pool_timeouts == 0
    assert budgeted.ok == budgeted.queries
    assert budgeted.peak_server_connections <= proof.usable + ADMIN_CONNECTIONS
    # ...and the burst really used the budget, not a trickle of it.
    assert budgeted.peak_app_connections > proof.usable // 2

    # Naive: the database refuses clients, exactly what the operator prevents.
    assert naive.too_many_clients >= 1
    assert naive.ok < naive.queries
    assert naive.peak_app_connections > proof.usable
    assert proof.holds
