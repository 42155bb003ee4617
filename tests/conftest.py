"""Shared pytest set-up: the real-infrastructure fixtures live in tests/fixtures/."""

from __future__ import annotations

import pytest

pytest_plugins = ["tests.fixtures.cluster", "tests.fixtures.postgres"]

# A test that reaches the local cluster or a PostgreSQL server through one of these fixtures
# (directly or through another fixture) gets its marker whatever its module declares, so
# `make unit` (-m "not postgres and not cluster and not e2e") never starts one by surprise.
FIXTURE_MARKERS = {
    "local_cluster": "cluster",
    "own_cluster": "cluster",
    "pg": "postgres",
    "fresh_pg": "postgres",
    "own_pg": "postgres",
    "slow_autovacuum_pg": "postgres",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        for fixture, marker in FIXTURE_MARKERS.items():
            if fixture in used and item.get_closest_marker(marker) is None:
                item.add_marker(marker)
