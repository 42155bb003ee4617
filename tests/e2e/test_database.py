"""The operator with a real PostgreSQL behind a Secret: limits, refresh, failures."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from devtools.localcluster import LocalClusterError
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.e2e, pytest.mark.postgres]

PASSWORD = "e2e-monitor-pw-4471"


@pytest.fixture
def database() -> Iterator[tuple[PostgresServer, str]]:
    settings = {
        "max_connections": "60",
        "superuser_reserved_connections": "3",
        "reserved_connections": "2",
    }
    with PostgresServer(major=16, settings=settings) as server:
        yield server, server.create_role("monitor", PASSWORD, database="shop")


def secret(ns: Cluster, dsn: str) -> None:
    manifest = ns.kubectl(
        "create",
        "secret",
        "generic",
        "shop-db",
        f"--from-literal=dsn={dsn}",
        "--dry-run=client",
        "-o",
        "yaml",
    ).stdout
    ns.apply(manifest)


def db_budget(refresh: int = 5) -> dict[str, object]:
    doc = budget("shop", [{"deploymentName": "api", "processesPerPod": 2}])
    doc["spec"]["database"] = {
        "connectionSecretRef": {"name": "shop-db", "key": "dsn"},
        "refreshSeconds": refresh,
    }
    return doc


def shop_settled(ns: Cluster, dsn: str, *, refresh: int) -> None:
    """The Secret, the api Deployment (2 replicas) and the budget, rolled out and Ready."""
    secret(ns, dsn)
    ns.apply(deployment("api", 2))
    ns.apply(db_budget(refresh=refresh))
    wait_for(lambda: ns.settled("shop"), timeout=60, what="PoolBudget shop Ready")


def observed_reason(ns: Cluster) -> str:
    return str((ns.condition("shop", "DatabaseObserved") or {}).get("reason"))


def test_limits_come_from_the_database_and_follow_a_restart(
    ns: Cluster, database: tuple[PostgresServer, str]
) -> None:
    server, dsn = database
    shop_settled(ns, dsn, refresh=5)
    status = ns.status("shop")
    assert status["database"]["maxConnections"] == 60
    assert status["database"]["superuserReservedConnections"] == 3
    assert status["database"]["reservedConnections"] == 2
    assert status["database"]["serverVersion"].startswith("16.")
    assert status["usableConnections"] == 60 - 3 - 2 - 10
    # 2 replicas + 25% surge = 3 pods x 2 workers = 6 workers; floor(45 / 6) - 5 = 2
    assert ns.configmap("api-db-pool")["DB_POOL_SIZE"] == "2"  # type: ignore[index]
    sets = ns.replicasets("api")

    server.restart({"max_connections": "120"})
    wait_for(
        lambda: (ns.status("shop").get("database") or {}).get("maxConnections") == 120,
        timeout=30, what="the new max_connections within refreshSeconds",
    )  # fmt: skip
    wait_for(lambda: (ns.configmap("api-db-pool") or {}).get("DB_POOL_SIZE") == str(105 // 6 - 5),
             timeout=30, what="the grown pool")  # fmt: skip
    wait_for(lambda: len(ns.replicasets("api")) > len(sets), timeout=30, what="a rollout")
    assert PASSWORD not in str(ns.status("shop"))


def test_wrong_password_and_missing_secret_keep_the_last_good_configmap(
    ns: Cluster, database: tuple[PostgresServer, str], operator_process: OperatorProcess
) -> None:
    _, dsn = database
    shop_settled(ns, dsn, refresh=5)
    good = ns.configmap("api-db-pool")
    sets = ns.replicasets("api")

    wrong = dsn.replace(PASSWORD, "wrong-password-9931")
    secret(ns, wrong)
    wait_for(
        lambda: (ns.condition("shop", "DatabaseObserved") or {}).get("reason") == "AuthenticationFailed",
        timeout=30, what="DatabaseObserved=False AuthenticationFailed",
    )  # fmt: skip
    observed = ns.condition("shop", "DatabaseObserved")
    assert observed is not None
    assert observed["status"] == "False"
    assert "last good ConfigMaps are kept" in observed["message"]
    assert ns.condition("shop", "Ready")["status"] == "False"  # type: ignore[index]
    assert ns.configmap("api-db-pool") == good
    assert ns.replicasets("api") == sets
    assert ns.events("AuthenticationFailed")

    ns.kubectl("delete", "secret", "shop-db")
    wait_for(
        lambda: (ns.condition("shop", "DatabaseObserved") or {}).get("reason") == "SecretNotFound",
        timeout=30, what="DatabaseObserved=False SecretNotFound",
    )  # fmt: skip
    assert ns.configmap("api-db-pool") == good
    assert ns.events("SecretNotFound")

    # Secrets never leak: not in status, not in events, not in the operator's log.
    everything = str(ns.status("shop")) + str(ns.get("events")) + operator_process.log()
    for leaked in (PASSWORD, "wrong-password-9931"):
        assert leaked not in everything

    secret(ns, dsn)  # fixed: back to Ready without touching the Deployment
    wait_for(lambda: ns.settled("shop"), timeout=30, what="Ready again after the fix")
    assert ns.configmap("api-db-pool") == good
    assert ns.replicasets("api") == sets


def test_invalid_spec_is_rejected_by_the_api_server(ns: Cluster) -> None:
    doc = budget("bad", [{"deploymentName": "api", "minPoolSize": 5, "maxPoolSize": 2}])
    with pytest.raises(LocalClusterError, match="minPoolSize"):
        ns.apply(doc)
    assert ns.get("poolbudget", "bad") is None


@pytest.mark.chaos
def test_database_faults_keep_the_last_good_configmap_and_recover(
    ns: Cluster, database: tuple[PostgresServer, str], operator_process: OperatorProcess
) -> None:
    """The server stopped; the role's password changed on the server while the operator's
    connection stays open; a garbage DSN: each is reported within one refresh (5 s; the
    password within refresh + the operator's 5 s connection lifetime) with the last good
    ConfigMap kept and no restart. max_connections lowered and the server restarted: the
    next refresh brings the smaller plan."""
    server, dsn = database
    shop_settled(ns, dsn, refresh=5)
    good, sets = ns.configmap("api-db-pool"), ns.replicasets("api")

    def kept() -> None:
        assert ns.configmap("api-db-pool") == good
        assert ns.replicasets("api") == sets

    server.ctl("stop")
    wait_for(lambda: observed_reason(ns) not in ("Probed", "None"), timeout=15,
             what="the stopped server reported")  # fmt: skip
    kept()
    server.ctl("start")
    wait_for(lambda: observed_reason(ns) == "Probed", timeout=15, what="recovered")

    # The open connection stays authenticated; the operator's next login (its connection
    # lifetime is 5 s here) is refused.
    server.sql("ALTER ROLE monitor PASSWORD 'rotated-on-the-server-9913'")
    changed = time.monotonic()
    wait_for(lambda: observed_reason(ns) == "AuthenticationFailed", timeout=20,
             what="the changed password reported without a server restart")  # fmt: skip
    noticed = time.monotonic() - changed
    kept()
    secret(ns, dsn.replace(PASSWORD, "rotated-on-the-server-9913"))
    wait_for(lambda: observed_reason(ns) == "Probed", timeout=15, what="the new password used")

    secret(ns, "postgresql://this is not a dsn")
    wait_for(lambda: observed_reason(ns) not in ("Probed", "None"), timeout=15,
             what="the garbage DSN reported")  # fmt: skip
    kept()
    secret(ns, dsn.replace(PASSWORD, "rotated-on-the-server-9913"))
    wait_for(lambda: observed_reason(ns) == "Probed", timeout=15, what="the DSN fixed")

    # 54 - 3 - 2 - 10 = 39 usable for 6 workers: floor(39 / 6) - 5 = 1 (was 2 at 60).
    server.restart({"max_connections": "54"})
    wait_for(lambda: (ns.configmap("api-db-pool") or {}).get("DB_POOL_SIZE") == "1",
             timeout=30, what="the smaller plan after max_connections was lowered")  # fmt: skip
    print(f"\npassword changed on the server: reported after {noticed:.1f} s")
    everything = str(ns.status("shop")) + str(ns.get("events")) + operator_process.log()
    for leaked in (PASSWORD, "rotated-on-the-server-9913"):
        assert leaked not in everything


def test_a_changed_secret_is_used_within_seconds_not_at_the_next_refresh(
    ns: Cluster, database: tuple[PostgresServer, str], operator_process: OperatorProcess
) -> None:
    """refreshSeconds 300: the limits are not re-read for five minutes, yet a Secret that
    changes is read within seconds (the operator checks each referenced Secret's
    resourceVersion every --secret-check-seconds, 1 s here, with `get` only) and the new
    DSN is used: a wrong password is reported, the right one again recovers."""
    _, dsn = database
    shop_settled(ns, dsn, refresh=300)
    good, sets = ns.configmap("api-db-pool"), ns.replicasets("api")

    secret(ns, dsn.replace(PASSWORD, "not-the-password-5521"))
    changed = time.monotonic()
    wait_for(lambda: observed_reason(ns) == "AuthenticationFailed", timeout=15,
             what="the changed Secret used before the next refresh")  # fmt: skip
    to_failed = time.monotonic() - changed
    assert ns.configmap("api-db-pool") == good  # the last good settings stay
    assert ns.replicasets("api") == sets

    secret(ns, dsn)
    changed = time.monotonic()
    wait_for(lambda: observed_reason(ns) == "Probed", timeout=15, what="the fixed Secret used")
    to_fixed = time.monotonic() - changed
    print(f"\nSecret changed: wrong password reported after {to_failed:.1f} s, "
          f"the fix after {to_fixed:.1f} s (refreshSeconds 300)")  # fmt: skip
    assert max(to_failed, to_fixed) < 10
    everything = str(ns.status("shop")) + str(ns.get("events")) + operator_process.log()
    assert "not-the-password-5521" not in everything
    assert PASSWORD not in everything
