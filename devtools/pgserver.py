"""Real PostgreSQL servers for tests and the demo, with the settings a test chooses.

    with PostgresServer(major=16, settings={"max_connections": "37"}) as server:
        dsn = server.create_role("monitor", "secret", database="shop")  # unprivileged role
        ...
        server.restart({"max_connections": "50"})

PostgreSQL 15 comes from Debian (/usr/lib/postgresql/15/bin, `hack/install-postgres.sh`);
PostgreSQL 16 from the `pgserver` wheel, which ships server binaries (16.2 in 0.1.4). A
server listens on 127.0.0.1 only, on a free port, with scram-sha-256 password
authentication for TCP (so a wrong password really fails) and trust on a private Unix
socket for the admin's `sql()`.

PostgreSQL refuses to run as root, so under root the server runs as the `postgres` OS
user. Its files (data, socket, log) live in a private directory under the system temp dir,
because that user cannot reach a root-owned home such as /root/.cache. `stop()` always
removes that directory and leaves no process behind. A server started without a
`state_dir` also dies with the process that started it (a watchdog notices the parent is
gone), so a killed pytest run leaves no server behind; one recorded in a `state_dir` (the
CLI's `up`, the demo's --keep) may outlive it until `down`.

`PgBouncer` puts a stock PgBouncer (Debian's, transaction pooling) in front of a server,
for the client tests of `pooling: PgBouncerTransaction`; it, too, runs as `postgres`.

    python -m devtools.pgserver up [--major 16] [--dir DIR] [-c max_connections=100]
    python -m devtools.pgserver down [--dir DIR]

DIR defaults to ${POOLBUDGET_CACHE:-~/.cache/poolbudget}/postgres and holds server.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

DEBIAN_BIN = "/usr/lib/postgresql/{major}/bin"
SERVICE_USER = "postgres"
ADMIN = "postgres"
RECORD = "server.json"
COMMAND_TIMEOUT_SECONDS = 120
STOP_TIMEOUT_SECONDS = 30.0

# The watchdog blocks on a pipe whose only write end this process holds: when this process
# ends, however it ends, the read returns EOF and the watchdog signals the pid in the pid
# file (SIGQUIT is PostgreSQL's immediate shutdown; the postmaster takes its children
# along) and removes the files. After a normal stop() it finds nothing left to do.
_WATCHDOG = """# devtools.pgserver watchdog
import os, shutil, signal, sys, time
fd, home, pid_file, signum = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
signal.signal(signal.SIGINT, signal.SIG_IGN)
while os.read(fd, 64):
    pass
try:
    with open(os.path.join(home, pid_file)) as f:
        pid = int(f.readline())
    os.kill(pid, signum)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat") as f:  # gone: OSError; a zombie has exited
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
except (OSError, ValueError):
    pass
shutil.rmtree(home, ignore_errors=True)
"""


class Watchdog:
    """Stops a process (by its pid file) and removes its directory if we die first."""

    def __init__(self, home: Path, pid_file: str, signum: int) -> None:
        read_fd, self._fd = os.pipe()  # both ends non-inheritable: no other child holds them
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-I", "-c", _WATCHDOG, str(read_fd), str(home), pid_file,
                 str(int(signum))],
                pass_fds=(read_fd,),
                start_new_session=True,  # a Ctrl-C meant for pytest must not kill it first
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        except BaseException:
            os.close(self._fd)
            raise
        finally:
            os.close(read_fd)

    def release(self) -> None:
        """Call after a normal stop: the watchdog finds the files gone and exits."""
        if self._fd < 0:
            return
        os.close(self._fd)
        self._fd = -1
        try:
            self._process.wait(timeout=STOP_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


class PostgresError(RuntimeError):
    """A PostgreSQL tool failed; the message carries its output."""


def bin_dir(major: int) -> Path:
    """Where the server binaries of a major version are."""
    debian = Path(DEBIAN_BIN.format(major=major))
    if (debian / "postgres").exists():
        return debian
    # The wheel ships one version (16.x). Found without importing it: its __init__ pulls
    # in platformdirs, which warns when XDG_RUNTIME_DIR is unset.
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        raise PostgresError(
            f"no PostgreSQL {major}: run `make postgres` (15) or install the pgserver wheel (16)"
        )
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


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _service_user() -> pwd.struct_passwd | None:
    """The OS user the server runs as: None when we are not root (then it is us)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise PostgresError(
            f"PostgreSQL cannot run as root and there is no {SERVICE_USER!r} OS user: "
            "run `make postgres` (hack/install-postgres.sh)"
        ) from None


def _chown_tree(path: Path, user: pwd.struct_passwd | None) -> None:
    if user is None:
        return
    for root, dirs, files in os.walk(path):
        for name in [root, *(os.path.join(root, n) for n in dirs + files)]:
            os.chown(name, user.pw_uid, user.pw_gid)


def _process_alive(pid: int) -> bool:
    """Still running; a zombie (exited, waiting for init to reap it) is not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class PostgresServer:
    """One throwaway PostgreSQL server; a context manager that always cleans up."""

    def __init__(
        self,
        major: int = 15,
        settings: Mapping[str, str] | None = None,
        state_dir: Path | None = None,
        *,
        die_with_parent: bool | None = None,
        pod_access: tuple[str, str] | None = None,
    ) -> None:
        """`pod_access=(host_ip, pod_cidr)`: also listen on `host_ip` and accept password
        logins from `pod_cidr`, so pods on the local node reach the server."""
        self.major = major
        self.pod_access = pod_access
        self.settings = dict(settings or {})
        self.bin = bin_dir(major)
        # Where server.json is recorded for `down`; None for a server owned by this process.
        self.state_dir = state_dir
        self.die_with_parent = state_dir is None if die_with_parent is None else die_with_parent
        self.port = free_port()
        self.admin_password = secrets.token_hex(12)
        self._user = _service_user()
        self._home: Path | None = None
        self._watchdog: Watchdog | None = None

    # --- where things are --------------------------------------------------------------

    @property
    def home(self) -> Path:
        """The server's private directory (data, socket, log); exists while started."""
        if self._home is None:
            raise PostgresError("the server is not started")
        return self._home

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def socket_dir(self) -> Path:
        return self.home / "socket"

    @property
    def log_file(self) -> Path:
        return self.home / "postgres.log"

    # --- lifecycle -----------------------------------------------------------------------

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        """initdb, configure, start; on any failure everything started so far is undone."""
        if self._home is not None:
            raise PostgresError("already started")
        self._home = Path(tempfile.mkdtemp(prefix=f"poolbudget-pg{self.major}-"))
        try:
            if self.die_with_parent:
                self._watchdog = Watchdog(self.home, "data/postmaster.pid", signal.SIGQUIT)
            self.socket_dir.mkdir()
            password_file = self.home / "admin-password"
            password_file.write_text(self.admin_password + "\n")
            _chown_tree(self.home, self._user)
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data_dir), "-U", ADMIN,
                f"--pwfile={password_file}", "--auth-local=trust", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--no-instructions",
            )  # fmt: skip
            password_file.unlink()
            if self.pod_access is not None:
                with (self.data_dir / "pg_hba.conf").open("a") as hba:
                    hba.write(f"host all all {self.pod_access[1]} scram-sha-256\n")
            self._start_on_a_free_port()
            if self.state_dir is not None:
                self.state_dir.mkdir(parents=True, exist_ok=True)
                (self.state_dir / RECORD).write_text(json.dumps(self.describe(), indent=2) + "\n")
        except BaseException:
            self.stop()
            raise

    def _start_on_a_free_port(self) -> None:
        # free_port() cannot reserve the port: another process may bind it before the
        # postmaster does (parallel test runs). Then try another one.
        for attempt in range(3):
            self._write_settings()
            try:
                self.ctl("start")
                return
            except PostgresError:
                log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
                if attempt == 2 or "could not bind" not in log:
                    raise
                self.port = free_port()

    def restart(self, settings: Mapping[str, str] | None = None) -> None:
        """Restart with changed settings (max_connections needs a restart)."""
        self.settings.update(settings or {})
        self._write_settings()
        self.ctl("restart")

    def stop(self) -> None:
        """Stop the server and remove its files; safe to call twice or after a failed start."""
        home, self._home = self._home, None
        if home is None:
            return
        try:
            pid_file = home / "data" / "postmaster.pid"
            if pid_file.exists():
                try:
                    self._pg_ctl(home, "stop")
                except (PostgresError, subprocess.TimeoutExpired):
                    _kill_postmaster(pid_file)
        finally:
            shutil.rmtree(home, ignore_errors=True)
            self._release_watchdog()
            if self.state_dir is not None:
                (self.state_dir / RECORD).unlink(missing_ok=True)

    # --- using it ------------------------------------------------------------------------

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run SQL as the admin over the private socket; returns psql's unaligned output."""
        return self._run(
            str(self.bin / "psql"), "-h", str(self.socket_dir), "-p", str(self.port),
            "-U", ADMIN, "-d", database, "-v", "ON_ERROR_STOP=1", "-AtX", "-c", statement,
        ).strip()  # fmt: skip

    def dsn(
        self, user: str, password: str, database: str = "postgres", *, host: str = "127.0.0.1"
    ) -> str:
        return f"postgresql://{user}:{password}@{host}:{self.port}/{database}"

    def pod_dsn(self, user: str, password: str, database: str = "postgres") -> str:
        """The DSN for pods on the local node (the server must have `pod_access`)."""
        if self.pod_access is None:
            raise PostgresError("this server does not listen for pods (pod_access)")
        return self.dsn(user, password, database, host=self.pod_access[0])

    def admin_dsn(self, database: str = "postgres") -> str:
        return self.dsn(ADMIN, self.admin_password, database)

    def create_role(self, name: str, password: str, database: str | None = None) -> str:
        """An unprivileged login role (and optionally a database it owns); returns its DSN."""
        self.sql(f"CREATE ROLE {quote_ident(name)} LOGIN PASSWORD {quote_literal(password)}")
        if database:
            self.sql(f"CREATE DATABASE {quote_ident(database)} OWNER {quote_ident(name)}")
        return self.dsn(name, password, database or "postgres")

    def describe(self) -> dict[str, object]:
        return {
            "major": self.major,
            "version": self.sql("SHOW server_version"),
            "port": self.port,
            "home": str(self.home),
            "bin": str(self.bin),
            "admin_dsn": self.admin_dsn(),
        }

    @classmethod
    def from_record(cls, state_dir: Path) -> PostgresServer:
        """The server a `state_dir` records (started by `up` or the demo), to stop it."""
        record = json.loads((state_dir / RECORD).read_text())
        server = cls(major=int(record["major"]), state_dir=state_dir, die_with_parent=False)
        server.port = int(record["port"])
        # Records written before the server's files moved out of the state dir had none.
        server._home = Path(record.get("home", state_dir))
        return server

    # --- plumbing ------------------------------------------------------------------------

    def _run(self, *argv: str) -> str:
        prefix = ["runuser", "-u", SERVICE_USER, "--"] if self._user is not None else []
        result = subprocess.run(
            [*prefix, *argv],
            capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT_SECONDS,
        )  # fmt: skip
        if result.returncode != 0:
            raise PostgresError(f"{Path(argv[0]).name} failed: {result.stderr or result.stdout}")
        return result.stdout

    def _write_settings(self) -> None:
        base = {
            "listen_addresses": ",".join(
                ["127.0.0.1", *([self.pod_access[0]] if self.pod_access else [])]
            ),
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "fsync": "off",  # throwaway test data: speed over durability
            "shared_buffers": "16MB",
        }
        if self.pod_access is not None:
            # A pod's connection can end without a FIN reaching the server (its network
            # namespace torn down with the pod): without keepalives the backend would wait
            # for the kernel's default 2 hours. Probe idle peers after 5 s, give up after 3 s.
            base |= {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "1",
                     "tcp_keepalives_count": "3"}  # fmt: skip
        # Every value quoted: postgresql.conf accepts quotes around numbers too.
        lines = [f"{k} = {quote_literal(str(v))}" for k, v in {**base, **self.settings}.items()]
        conf = self.data_dir / "postgresql.auto.conf"
        conf.write_text("\n".join(lines) + "\n")
        _chown_tree(conf, self._user)

    def ctl(self, action: str) -> None:
        """pg_ctl start|stop|restart on this server, keeping its files (tests stop it to see
        what clients do meanwhile); `stop()` is the one that cleans up."""
        self._pg_ctl(self.home, action)

    def _pg_ctl(self, home: Path, action: str) -> None:
        self._run(
            str(self.bin / "pg_ctl"), action, "-D", str(home / "data"), "-w",
            "-t", str(int(STOP_TIMEOUT_SECONDS)), "-l", str(home / "postgres.log"), "-m", "fast",
        )  # fmt: skip

    def _release_watchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.release()


def _kill_postmaster(pid_file: Path) -> None:
    """pg_ctl could not stop it: immediate shutdown by signal, then SIGKILL."""
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS / 2
        while time.monotonic() < deadline and _process_alive(pid):
            time.sleep(0.05)
        if not _process_alive(pid):
            return


def pgbouncer_binary() -> Path:
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not Path(found).exists():
        raise PostgresError("no pgbouncer: run `make postgres` (hack/install-postgres.sh)")
    return Path(found)


class PgBouncer:
    """PgBouncer in front of a PostgresServer, with its stock settings otherwise (so a
    client that works here works with a default PgBouncer): for client tests.

        with PgBouncer(server, "shop", {"app": "pw"}, pool_size=2) as bouncer:
            url = bouncer.dsn("app", "pw", "shop")
    """

    def __init__(
        self,
        server: PostgresServer,
        database: str,
        users: Mapping[str, str],
        *,
        pool_mode: str = "transaction",
        pool_size: int = 2,
    ) -> None:
        self.server = server
        self.database = database
        self.users = dict(users)
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.binary = pgbouncer_binary()
        self.port = free_port()
        self._user = _service_user()
        self._home: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._watchdog: Watchdog | None = None

    @property
    def home(self) -> Path:
        if self._home is None:
            raise PostgresError("pgbouncer is not started")
        return self._home

    @property
    def log_file(self) -> Path:
        return self.home / "pgbouncer.log"

    def dsn(self, user: str, password: str, database: str) -> str:
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def __enter__(self) -> PgBouncer:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def start(self) -> None:
        if self._home is not None:
            raise PostgresError("already started")
        self._home = Path(tempfile.mkdtemp(prefix="poolbudget-pgbouncer-"))
        try:
            self._watchdog = Watchdog(self.home, "pgbouncer.pid", signal.SIGTERM)
            # PgBouncer authenticates clients with SCRAM from these plain passwords and
            # logs in to PostgreSQL with them.
            users = "".join(f'"{u}" "{p}"\n' for u, p in self.users.items())
            (self.home / "users.txt").write_text(users)
            (self.home / "pgbouncer.ini").write_text(
                "[databases]\n"
                f"{self.database} = host=127.0.0.1 port={self.server.port} dbname={self.database}\n"
                "[pgbouncer]\n"
                f"listen_addr = 127.0.0.1\nlisten_port = {self.port}\nunix_socket_dir =\n"
                f"auth_type = scram-sha-256\nauth_file = {self.home / 'users.txt'}\n"
                f"pool_mode = {self.pool_mode}\ndefault_pool_size = {self.pool_size}\n"
                f"logfile = {self.log_file}\npidfile = {self.home / 'pgbouncer.pid'}\n"
            )
            _chown_tree(self.home, self._user)
            self._process = subprocess.Popen(
                [str(self.binary), str(self.home / "pgbouncer.ini")],
                user=None if self._user is None else self._user.pw_uid,
                group=None if self._user is None else self._user.pw_gid,
                extra_groups=None if self._user is None else [],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            self._wait_until_listening()
        except BaseException:
            self.stop()
            raise

    def _wait_until_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                log = self.log_file.read_text() if self.log_file.exists() else ""
                raise PostgresError(f"pgbouncer exited with {self._process.returncode}: {log}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise PostgresError(f"pgbouncer did not listen on {self.port} in time")

    def stop(self) -> None:
        home, self._home = self._home, None
        process, self._process = self._process, None
        try:
            if process is not None and process.poll() is None:
                process.terminate()  # SIGTERM: PgBouncer's immediate shutdown
                try:
                    process.wait(timeout=STOP_TIMEOUT_SECONDS)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        finally:
            if home is not None:
                shutil.rmtree(home, ignore_errors=True)
            watchdog, self._watchdog = self._watchdog, None
            if watchdog is not None:
                watchdog.release()


def _default_dir() -> Path:
    cache = Path(os.environ.get("POOLBUDGET_CACHE", Path.home() / ".cache" / "poolbudget"))
    return cache / "postgres"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.pgserver")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--dir", type=Path, default=_default_dir(), help="where server.json is")
    parser.add_argument("--major", type=int, default=15, choices=[15, 16])
    parser.add_argument("-c", dest="settings", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    record = args.dir / RECORD
    if args.action == "down":
        if not record.exists():
            print(f"no server recorded in {args.dir}")
            return 0
        server = PostgresServer.from_record(args.dir)
        version = json.loads(record.read_text()).get("version", "?")
        server.stop()
        shutil.rmtree(args.dir, ignore_errors=True)
        print(f"stopped PostgreSQL {version} (port {server.port}) and removed {args.dir}")
        return 0
    if record.exists():
        print(f"already running, see {record} (or run down first)", file=sys.stderr)
        return 1
    settings: dict[str, str] = {}
    for item in args.settings:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"-c expects NAME=VALUE, got {item!r}")
        settings[name] = value
    try:
        server = PostgresServer(major=args.major, settings=settings, state_dir=args.dir)
        server.start()
    except PostgresError as exc:
        print(f"pgserver: {exc}", file=sys.stderr)
        return 1
    print(record.read_text(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
