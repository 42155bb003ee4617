"""`poolbudget plan --dsn/--dsn-env`: the limits read live from real PostgreSQL 15 and 16
servers, and a refused login reported without the password."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from poolbudget.cli import EXIT_OK, EXIT_USAGE, main
from tests.fixtures.postgres import MONITOR_PASSWORD, Database

pytestmark = pytest.mark.postgres

BUDGET = {
    "apiVersion": "poolbudget.dev/v1alpha1",
    "kind": "PoolBudget",
    "metadata": {"name": "shop-db"},
    "spec": {
        "database": {"connectionSecretRef": {"name": "shop-db-monitor"}},
        "reservedConnections": 2,
        "defaults": {"maxOverflow": 1},
        "targets": [{"deploymentName": "api", "processesPerPod": 2}],
    },
}
API = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "api"},
    "spec": {"replicas": 3},
}


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "rendered.yaml"
    path.write_text(yaml.safe_dump_all([BUDGET, API]))
    return path


def test_limits_are_read_from_the_server(
    pg: Database,
    manifests: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("SHOP_DB_DSN", pg.dsn)
    code = main(["plan", "-f", str(manifests), "--dsn-env", "SHOP_DB_DSN", "-o", "json"])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    plan = json.loads(out)["budgets"][0]["plan"]
    withheld = pg.expected["superuser_reserved_connections"] + pg.expected.get(
        "reserved_connections", 0
    )
    assert plan["maxConnections"] == pg.expected["max_connections"] == 37
    assert plan["withheldByServer"] == withheld  # 2 on 15; 2 + 3 on 16
    assert plan["usableConnections"] == 37 - withheld - 2
    # api: 3 replicas + 1 surge (25%, rounded up) = 4 pods, 8 workers.
    (api,) = plan["allocations"]
    assert api["workers"] == 8
    assert api["poolSize"] == plan["usableConnections"] // 8 - 1
    assert MONITOR_PASSWORD not in out + err

    code = main(["plan", "-f", str(manifests), "--dsn", pg.dsn])
    out, err = capsys.readouterr()
    assert code == EXIT_OK, err
    assert f"max_connections 37 - withheld by PostgreSQL {withheld} - reserved 2" in out
    assert MONITOR_PASSWORD not in out + err


def test_a_refused_login_names_the_server_not_the_password(
    pg: Database, manifests: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = pg.dsn.replace(MONITOR_PASSWORD, "not-the-password-42")
    assert wrong != pg.dsn
    code = main(["plan", "-f", str(manifests), "--dsn", wrong])
    out, err = capsys.readouterr()
    assert code == EXIT_USAGE
    assert out == ""
    assert "--dsn: authentication failed for monitor@" in err
    assert "/shop" in err
    assert "not-the-password-42" not in err
    assert len(err.strip().splitlines()) == 1
