"""Real PostgreSQL servers for tests and the demo, with the settings a test chooses.

    with PostgresServer(major=16, settings={"max_connections": "37"}) as server:
        dsn = server.create_role("monitor", "secret")     # unprivileged login role
        ...
        server.restart({"max_connections": "50"})

PostgreSQL 15 comes from Debian (/usr/lib/postgresql/15/bin, `hack/install-postgres.sh`);
PostgreSQL 16 from the `pgserver` wheel, which ships server binaries. Servers listen on
127.0.0.1 only, on a free port, with scram-sha-256 password authentication for TCP (so a
wrong password really fails) and trust on a private Unix socket for the admin.
PostgreSQL refuses to run as root; under root the server runs as the `postgres` OS user.

    python -m devtools.pgserver up [--major 16] [--dir DIR] [-c max_connections=100]
    python -m devtools.pgserver down [--dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DEBIAN_BIN = Path("/usr/lib/postgresql/{major}/bin")
SERVICE_USER = "postgres"
ADMIN = "postgres"


class PostgresError(RuntimeError):
    pass


def bin_dir(major: int) -> Path:
    """Where the server binaries of a major version are."""
    debian = Path(str(DEBIAN_BIN).format(major=major))
    if (debian / "postgres").exists():
        return debian
    # The wheel ships one version (16.x). Found without importing it: its __init__ pulls
    # in platformdirs, which warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(f"no PostgreSQL {major}: install the pgserver wheel")
    wheel = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    version = subprocess.run(
        [str(wheel / "postgres"), "--version"], capture_output=True, text=True, check=True
    ).stdout
    if f" {major}." not in version:
        raise PostgresError(f"no PostgreSQL {major} here (Debian: none; pgserver: {version})")
    return wheel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_service_user() -> list[str]:
    return ["runuser", "-u", SERVICE_USER, "--"] if os.geteuid() == 0 else []


def _chown_to_service_user(path: Path) -> None:
    if os.geteuid() == 0:
        entry = pwd.getpwnam(SERVICE_USER)
        for root, dirs, files in os.walk(path):
            for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
                os.chown(name, entry.pw_uid, entry.pw_gid)


class PostgresServer:
    def __init__(
        self,
        major: int = 15,
        settings: dict[str, str] | None = None,
        state_dir: Path | None = None,
    ) -> None:
        self.major = major
        self.settings = dict(settings or {})
        self.bin = bin_dir(major)
        self._owns_dir = state_dir is None
        self.state_dir = state_dir or Path(tempfile.mkdtemp(prefix=f"pg{major}-"))
        self.port = free_port()
        self.admin_password = secrets.token_hex(12)

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def socket_dir(self) -> Path:
        return self.state_dir / "socket"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "postgres.log"

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _run(self, *argv: str, input: str | None = None) -> str:
        result = subprocess.run(
            [*_as_service_user(), *argv],
            capture_output=True, text=True, input=input, check=False, timeout=120,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(f"{Path(argv[0]).name} failed: {result.stderr or result.stdout}")
        return result.stdout

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(exist_ok=True)
        password_file = self.state_dir / "admin-password"
        password_file.write_text(self.admin_password + "\n")
        _chown_to_service_user(self.state_dir)
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", ADMIN,
            f"--pwfile={password_file}", "--auth-local=trust", "--auth-host=scram-sha-256",
            "--encoding=UTF8", "--no-instructions",
        )  # fmt: skip
        password_file.unlink()
        self._write_settings()
        self._ctl("start")

    def _write_settings(self) -> None:
        base = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": f"'{self.socket_dir}'",
            "fsync": "off",  # throwaway test data: speed over durability
            "shared_buffers": "16MB",
        }
        lines = [f"{k} = {v}" for k, v in {**base, **self.settings}.items()]
        (self.data_dir / "postgresql.auto.conf").write_text("\n".join(lines) + "\n")
        _chown_to_service_user(self.data_dir / "postgresql.auto.conf")

    def _ctl(self, action: str) -> None:
        self._run(
            str(self.bin / "pg_ctl"), action, "-D", str(self.data_dir), "-w", "-t", "60",
            "-l", str(self.log_file), "-m", "fast",
        )  # fmt: skip

    def restart(self, settings: dict[str, str] | None = None) -> None:
        """Restart with changed settings (max_connections needs a restart)."""
        self.settings.update(settings or {})
        self._write_settings()
        self._ctl("restart")

    def stop(self) -> None:
        if (self.data_dir / "postmaster.pid").exists():
            self._ctl("stop")
        if self._owns_dir:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL as the admin over the private socket; returns psql's unaligned output."""
        return self._run(
            str(self.bin / "psql"), "-h", str(self.socket_dir), "-p", str(self.port),
            "-U", ADMIN, "-d", database, "-v", "ON_ERROR_STOP=1", "-AtX", "-c", statement,
        ).strip()  # fmt: skip

    def dsn(self, user: str, password: str, database: str = "postgres") -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def admin_dsn(self, database: str = "postgres") -> str:
        return self.dsn(ADMIN, self.admin_password, database)

    def create_role(self, name: str, password: str, database: str | None = None) -> str:
        """An unprivileged login role (and optionally its own database); returns its DSN."""
        self.sql(f"CREATE ROLE {name} LOGIN PASSWORD '{password}'")
        if database:
            self.sql(f"CREATE DATABASE {database} OWNER {name}")
        return self.dsn(name, password, database or "postgres")

    def describe(self) -> dict[str, object]:
        return {
            "major": self.major,
            "port": self.port,
            "state_dir": str(self.state_dir),
            "admin_dsn": self.admin_dsn(),
            "version": self.sql("SHOW server_version"),
        }


def _default_dir() -> Path:
    cache = Path(os.environ.get("POOLBUDGET_CACHE", Path.home() / ".cache" / "poolbudget"))
    return cache / "postgres"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.pgserver")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=_default_dir())
    parser.add_argument("--major", type=int, default=15)
    parser.add_argument("-c", dest="settings", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    info_file = args.dir / "server.json"
    if args.action == "down":
        if not info_file.exists():
            print(f"no server recorded in {args.dir}")
            return 0
        info = json.loads(info_file.read_text())
        server = PostgresServer(major=int(info["major"]), state_dir=args.dir)
        server.stop()
        shutil.rmtree(args.dir, ignore_errors=True)
        print(f"stopped PostgreSQL {info['version']} and removed {args.dir}")
        return 0
    if info_file.exists():
        print(f"already running: {info_file.read_text()}", file=sys.stderr)
        return 1
    settings = dict(item.split("=", 1) for item in args.settings)
    server = PostgresServer(major=args.major, settings=settings, state_dir=args.dir)
    server.start()
    info_file.write_text(json.dumps(server.describe(), indent=2))
    print(json.dumps(server.describe(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
