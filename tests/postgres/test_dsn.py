"""DSN checks of the probe: pure, no server (so no `postgres` marker)."""

from __future__ import annotations

import pytest

from poolbudget.adapters.postgres import DsnParts, InvalidDsnError, describe_dsn, parse_dsn


@pytest.mark.parametrize(
    ("dsn", "expected"),
    [
        (
            "postgresql://mon:pw@db.example:6432/shop",
            DsnParts("mon", (("db.example", 6432),), "shop"),
        ),
        ("postgres://mon@db/shop", DsnParts("mon", (("db", 5432),), "shop")),
        (
            "postgresql://mon:p%40ss@db/sh%20op?sslmode=require",
            DsnParts("mon", (("db", 5432),), "sh op"),
        ),
        (
            "postgresql://mon:a@b@db/shop",
            DsnParts("mon", (("db", 5432),), "shop"),
        ),  # unencoded @ in the password
        (
            "postgresql://mon:pw@h1:5432,h2:5433/shop",
            DsnParts("mon", (("h1", 5432), ("h2", 5433)), "shop"),
        ),
        ("postgresql://mon:pw@[::1]:5433/shop", DsnParts("mon", (("::1", 5433),), "shop")),
        ("postgresql://mon:pw@db?dbname=shop&port=7000", DsnParts("mon", (("db", 7000),), "shop")),
        ("postgresql:///shop?host=db&user=mon", DsnParts("mon", (("db", 5432),), "shop")),
    ],
)
def test_parses_what_asyncpg_accepts(dsn: str, expected: DsnParts) -> None:
    assert parse_dsn(dsn) == expected


@pytest.mark.parametrize(
    ("dsn", "message"),
    [
        ("mysql://u:pw@db/shop", "must start with postgresql://"),
        ("db.example:5432/shop", "must start with postgresql://"),
        ("postgresql://u:pw@db:notaport/shop", "invalid port 'notaport'"),
        ("postgresql://u:pw@db:70000/shop", "invalid port '70000'"),
        ("postgresql://u:pw@h1,,h2/shop", "empty host"),
        ("postgresql://u:pw@/shop", "names no host"),
        ("postgresql:///shop", "names no host"),
        ("postgresql://u:pw@db", "names no database"),
        ("postgresql://u:pw@db/", "names no database"),
        ("postgresql://u:pw@db/?sslmode=require", "names no database"),
    ],
)
def test_rejects_with_a_reason_and_without_the_password(dsn: str, message: str) -> None:
    with pytest.raises(InvalidDsnError, match=message) as caught:
        parse_dsn(dsn)
    assert "pw" not in str(caught.value)


def test_description_never_holds_the_password_or_options() -> None:
    dsn = "postgresql://mon:hunter2@db:6432/shop?password=hunter2&sslmode=require"
    assert describe_dsn(dsn) == "mon@db:6432/shop"
    assert describe_dsn("postgresql://mon:hunter2@db") == "<invalid DSN>"
