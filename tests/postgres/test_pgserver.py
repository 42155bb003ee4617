"""devtools/pgserver.py: the servers the tests and the demo stand on start, restart and
always clean up, even when the process that started them is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from devtools.pgserver import PgBouncer, PostgresError, PostgresServer, main

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
WAIT_SECONDS = 30.0


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {WAIT_SECONDS}s waiting for {what}")
        time.sleep(0.05)


def postmaster_pid(home: Path) -> int:
    return int((home / "data" / "postmaster.pid").read_text().splitlines()[0])


def alive(pid: int) -> bool:
    """Running: a zombie waiting for init to reap it holds nothing any more."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("major", [15, 16])
def test_settings_restart_and_cleanup(major: int) -> None:
    with PostgresServer(major=major, settings={"max_connections": "23"}) as server:
        home, pid = server.home, postmaster_pid(server.home)
        assert server.sql("SHOW max_connections") == "23"
        assert server.sql("SHOW server_version").startswith(f"{major}.")
        assert server.sql("SHOW listen_addresses") == "127.0.0.1"
        assert server.sql("SHOW password_encryption") == "scram-sha-256"
        if os.geteuid() == 0:
            assert home.stat().st_uid != 0  # PostgreSQL refuses root; it runs as `postgres`
        server.restart({"max_connections": "29"})
        assert server.sql("SHOW max_connections") == "29"
        assert postmaster_pid(home) != pid  # a new postmaster, not a reload
        old, pid = pid, postmaster_pid(home)
        wait_for(lambda: not alive(old), "the old postmaster to exit")
    wait_for(lambda: not alive(pid), "the postmaster to exit")
    assert not home.exists()


@pytest.fixture
def private_tmp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A temp dir only this test uses (the `postgres` user must be able to enter it)."""
    path = Path(tempfile.mkdtemp(prefix="poolbudget-test-"))
    path.chmod(0o755)
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_failed_start_leaves_nothing_behind(private_tmp: Path) -> None:
    server = PostgresServer(major=16, settings={"max_connections": "not-a-number"})
    with pytest.raises(PostgresError, match="pg_ctl failed"):
        server.start()
    assert list(private_tmp.iterdir()) == []
    server.stop()  # a second stop is harmless


def test_a_killed_owner_takes_its_server_along(tmp_path: Path) -> None:
    """SIGKILL gives no teardown a chance: the watchdog still stops the server."""
    script = (
        "import sys, time\n"
        "from devtools.pgserver import PostgresServer\n"
        "server = PostgresServer(major=15)\n"
        "server.start()\n"
        "print(server.home, flush=True)\n"
        "time.sleep(300)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    ) as owner:
        try:
            assert owner.stdout is not None
            home = Path(owner.stdout.readline().strip())
            pid = postmaster_pid(home)
            assert alive(pid)
        finally:
            owner.send_signal(signal.SIGKILL)
            owner.wait()
    wait_for(lambda: not alive(pid) and not home.exists(), "the server to go with its owner")


def test_cli_up_and_down(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "postgres"
    assert main(["up", "--dir", str(state), "--major", "16", "-c", "max_connections=41"]) == 0
    record = json.loads((state / "server.json").read_text())
    home = Path(record["home"])
    pid = postmaster_pid(home)
    try:
        assert record["major"] == 16
        assert record["version"].startswith("16.")
        assert main(["up", "--dir", str(state)]) == 1  # one at a time per directory
        server = PostgresServer.from_record(state)
        assert server.sql("SHOW max_connections") == "41"
    finally:
        assert main(["down", "--dir", str(state)]) == 0
    assert "stopped PostgreSQL 16" in capsys.readouterr().out
    wait_for(lambda: not alive(pid), "the postmaster to exit")
    assert not home.exists()
    assert not state.exists()
    assert main(["down", "--dir", str(state)]) == 0  # nothing recorded: nothing to do


def test_pgbouncer_runs_unprivileged_and_cleans_up() -> None:
    with PostgresServer(major=16) as server:
        server.create_role("app", "app-pw", database="shop")
        with PgBouncer(server, "shop", {"app": "app-pw"}) as bouncer:
            home = bouncer.home
            pid = int((home / "pgbouncer.pid").read_text())
            assert alive(pid)
            if os.geteuid() == 0:
                assert Path(f"/proc/{pid}").stat().st_uid != 0  # PgBouncer refuses root too
        wait_for(lambda: not alive(pid), "pgbouncer to exit")
        assert not home.exists()
