"""The sample application as a process (the same code the image runs), against a real
PostgreSQL: every worker builds its pool from the DB_* environment, readiness checks a
pooled connection out, a burst reaches every worker, SIGTERM ends it cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools import apps
from devtools.localcluster import free_port, wait_for
from devtools.pgserver import PostgresServer

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "images" / "sampleapp"
SETTINGS = {
    "DB_POOL_SIZE": "2",
    "DB_MAX_OVERFLOW": "1",
    "DB_POOL_TIMEOUT": "5",
    "DB_POOL_RECYCLE": "1800",
    "DB_POOL_PRE_PING": "true",
    "DB_STATEMENT_TIMEOUT_MS": "30000",
    "DB_IDLE_IN_TRANSACTION_SESSION_TIMEOUT_MS": "5000",
    "DB_COMMAND_TIMEOUT": "10",
    "DB_STATEMENT_CACHE_SIZE": "100",
    "DB_APPLICATION_NAME": "sample",
}


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    with PostgresServer(major=16, settings={"max_connections": "30"}) as pg:
        yield pg


def start_app(
    pg: PostgresServer, tmp_path: Path, *, workers: int, load: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    url = pg.create_role("app", "app-pw", database="shop").replace(
        "postgresql://", "postgresql+asyncpg://"
    )
    env = {
        **os.environ, **SETTINGS, "DATABASE_URL": url, "WEB_CONCURRENCY": str(workers),
        "LOAD_CONCURRENCY": load, "BURST_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(APP_DIR)]),
    }  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "sampleapp:app", "--app-dir", str(APP_DIR),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own group: a failed test kills the workers too
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: _ready(base), timeout=30, what="the sample app ready")
    return process, base


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """uvicorn's worker processes outlive a SIGKILLed parent: kill the whole group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)


def _ready(base: str) -> bool:
    try:
        return bool(apps.http_json(f"{base}/ready", timeout=2)["ready"])
    except OSError:
        return False


def test_workers_hold_their_pools_and_burst_together_then_exit_on_sigterm(
    server: PostgresServer, tmp_path: Path
) -> None:
    process, base = start_app(server, tmp_path, workers=2, load="full")
    try:
        pool = apps.http_json(f"{base}/pool")
        assert (pool["pool_size"], pool["max_overflow"]) == (2, 1)
        # Each of the 2 workers keeps its whole pool (2 + 1) busy.
        wait_for(lambda: apps.live_connections(server, ["sample"])["sample"] == 6, timeout=20,
                 what="6 connections named sample")  # fmt: skip

        apps.http_json(f"{base}/burst?at={time.time() + 0.5}&factor=3&hold=0.2", method="POST")

        def both_reported() -> list[dict[str, Any]] | None:
            reported: list[dict[str, Any]] = apps.http_json(f"{base}/results")
            return reported if len(reported) == 2 else None

        results = wait_for(both_reported, timeout=30, what="both workers' burst results")
        assert len({r["pid"] for r in results}) == 2
        for result in results:
            assert result["queries"] == 3 * 3
            assert result["ok"] == result["queries"]
            assert result["errors"] == {}
            assert result["pool_timeouts"] == 0
        assert apps.live_connections(server, ["sample"])["sample"] <= 6

        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=15) == 0
        stopped = time.monotonic() - started
        assert stopped < 5, f"took {stopped:.1f} s to stop"
        wait_for(lambda: apps.live_connections(server, ["sample"])["sample"] == 0, timeout=10,
                 what="every connection closed")  # fmt: skip
    finally:
        kill_group(process)


def test_not_ready_while_the_database_refuses(server: PostgresServer, tmp_path: Path) -> None:
    process, base = start_app(server, tmp_path, workers=1, load="0")
    try:
        server.ctl("stop")
        wait_for(lambda: not _ready(base), timeout=30, what="readiness to fail")
        server.ctl("start")
        wait_for(lambda: _ready(base), timeout=30, what="readiness to come back")
    finally:
        process.terminate()
        process.wait(timeout=15)
        kill_group(process)
