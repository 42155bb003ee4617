"""The sample application as a process (the same code the image runs), against a real
PostgreSQL: every worker builds its pool from the DB_* environment, readiness checks a
pooled connection out, a burst reaches every worker, SIGTERM ends it cleanly."""

from __future__ import annotations

import contextlib
import json
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
    pg: PostgresServer, tmp_path: Path, *, workers: int, load: str, **extra_env: str
) -> tuple[subprocess.Popen[bytes], str]:
    """The app under uvicorn; its stderr goes to tmp_path / "stderr"."""
    port = free_port()
    url = pg.create_role("app", "app-pw", database="shop").replace(
        "postgresql://", "postgresql+asyncpg://"
    )
    env = {
        **os.environ, **SETTINGS, "DATABASE_URL": url, "WEB_CONCURRENCY": str(workers),
        "LOAD_CONCURRENCY": load, "BURST_DIR": str(tmp_path),
        "PYTHONPATH": os.pathsep.join([str(REPO / "operator"), str(APP_DIR)]), **extra_env,
    }  # fmt: skip
    stderr = (tmp_path / "stderr").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "sampleapp:app", "--app-dir", str(APP_DIR),
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        start_new_session=True,  # its own group: a failed test kills the workers too
    )  # fmt: skip
    stderr.close()  # the child has its own copy
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


def pool_signals(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "stderr").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith('{"level"')]


def test_the_pool_monitor_warns_on_a_full_pool_without_a_log_storm(
    server: PostgresServer, tmp_path: Path
) -> None:
    """LOAD_CONCURRENCY=full keeps the whole pool (2 + 1) checked out. The lifespan's monitor
    samples every 0.1 s and warns for `saturated` and `overflow` on entering the state, then
    at most once per 12 samples (its repeat_every) while it lasts: about one line a second
    for each, where one line a sample would be ten."""
    started = time.monotonic()
    process, _ = start_app(server, tmp_path, workers=1, load="full", POOL_MONITOR_INTERVAL="0.1")
    try:

        def warned() -> set[str] | None:
            names = {s["pool_signal"] for s in pool_signals(tmp_path) if s["level"] == "WARNING"}
            return names if {"saturated", "overflow"} <= names else None

        wait_for(warned, timeout=15, what="the pool monitor's warnings on stderr")
        time.sleep(1.5)  # 15 more samples in the same state
        process.send_signal(signal.SIGTERM)
        # One worker: uvicorn runs it in its own process, shuts the lifespan down (the
        # monitor stops) and then re-raises the SIGTERM it caught.
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    finally:
        kill_group(process)
    samples = (time.monotonic() - started) / 0.1 + 1  # an upper bound
    assert "Traceback" not in (tmp_path / "stderr").read_text()
    warnings = [s for s in pool_signals(tmp_path) if s["level"] == "WARNING"]
    for name in ("saturated", "overflow"):
        count = [s["pool_signal"] for s in warnings].count(name)
        assert 1 <= count <= samples / 12 + 1, (name, count, samples)
        assert count < samples / 4, (name, count, samples)
    saturated = next(s for s in warnings if s["pool_signal"] == "saturated")
    assert saturated["application_name"] == "sample"
    assert (saturated["checked_out"], saturated["capacity"]) == (3, 3)
    assert "3 of 3 connections checked out" in saturated["message"]
