"""End-to-end fixtures: the CRD installed, the operator running as its own process.

The operator is started exactly as users run it (`poolbudget run`), against the real
local control plane, with its metrics and health endpoints on free loopback ports. Tests
observe it the way a user would: through the API (ConfigMaps, Deployments, ReplicaSets,
PoolBudget status, Events) and its /metrics endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.localcluster import LocalCluster
from devtools.operator_process import OperatorProcess
from tests.e2e.support import Cluster

REPO = Path(__file__).resolve().parents[2]


# Package scope: the operator watches every namespace, so it must be gone before other
# packages' tests (the chart's own operator, with its narrower rights) run.
@pytest.fixture(scope="package")
def operator_process(
    crd_installed: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        kubeconfig=crd_installed.kubeconfig,
        log_path=tmp_path_factory.mktemp("operator") / "operator.log",
        # Log in to databases again every 5 s (default 300): the database fault test
        # changes a password on the server and waits for it to be noticed. Secrets are
        # checked every second (default 10): a test times how soon a changed one is used.
        extra_args=["--database-connection-lifetime", "5", "--secret-check-seconds", "1"],
    )
    process.start()
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def ns(
    local_cluster: LocalCluster, kube_namespace: str, operator_process: OperatorProcess
) -> Cluster:
    """The test's namespace on the real node: pods run, rollouts complete when they do."""
    del operator_process  # running is all we need of it here
    return Cluster(local_cluster, kube_namespace)
