"""The sample application the demo and the fleet proof run as pods.

What a real service on the operator's ConfigMap does, and nothing else: uvicorn starts
`WEB_CONCURRENCY` worker processes (the target's `processesPerPod`), and each worker builds
its own SQLAlchemy async engine from the ConfigMap's environment (`envFrom`) in two lines:

    engine = create_async_engine(os.environ["DATABASE_URL"], **engine_kwargs())

Endpoints (plain ASGI, no framework):

* ``GET /ready``   readiness: checks a pooled connection out and runs ``SELECT 1``, so a
  pod is Ready only when its pool can reach the database.
* ``POST /burst?at=<unix time>&factor=3&hold=0.3``  schedules a burst in *every* worker of
  the pod: at `at`, each worker runs factor x (pool_size + max_overflow) concurrent
  ``SELECT pg_sleep(hold)`` through its pool. One request reaches one worker, so the
  schedule goes through a file the workers poll (they share the container's /tmp).
* ``GET /results`` the burst results of every worker that has finished (JSON list).
* ``GET /pool``    this worker's pool settings and its checked-out connections.

``LOAD_CONCURRENCY=<n>`` keeps n queries (``SELECT pg_sleep(LOAD_HOLD)``, 1 s by default)
in flight in each worker all the time (``full``: pool_size + max_overflow, ``pool``:
pool_size), so the pools hold their connections and `pg_stat_activity` shows what a busy
fleet holds. SIGTERM: uvicorn stops accepting, the lifespan shutdown
cancels the load, stops the pool monitor and disposes the engine, and the process exits 0.

Each worker runs `poolbudget.pool_monitor.PoolMonitor` on its pool from the lifespan
(every ``POOL_MONITOR_INTERVAL`` seconds, 5 by default) and writes its warnings and clears
to stderr as JSON lines. Logs only: the image has no prometheus_client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from poolbudget.client import engine_kwargs
from poolbudget.pool_monitor import LOG as POOL_LOG
from poolbudget.pool_monitor import PoolMonitor

SCHEDULE = Path(os.environ.get("BURST_DIR", "/tmp")) / "burst-schedule.json"  # noqa: S108
RESULTS = SCHEDULE.parent / "burst-results"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Worker:
    """One worker process: its engine, its background load and its burst watcher."""

    def __init__(self) -> None:
        self.kwargs = engine_kwargs()
        self.engine: AsyncEngine = create_async_engine(os.environ["DATABASE_URL"], **self.kwargs)
        self.pool_capacity = int(self.kwargs["pool_size"]) + int(self.kwargs["max_overflow"])
        interval = float(os.environ.get("POOL_MONITOR_INTERVAL", "5"))
        self.monitor = PoolMonitor(self.engine, interval=interval)
        self.tasks: list[asyncio.Task[None]] = []
        self.last_burst: float | None = None

    def start(self) -> None:
        self.monitor.start()
        self.tasks.append(asyncio.create_task(self._watch_schedule()))
        load = os.environ.get("LOAD_CONCURRENCY", "0")
        named = {"full": self.pool_capacity, "pool": int(self.kwargs["pool_size"])}
        for _ in range(named[load] if load in named else int(load)):
            self.tasks.append(asyncio.create_task(self._steady_load()))

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.monitor.stop()
        await self.engine.dispose()

    async def ready(self) -> bool:
        try:
            async with self.engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
        except (sa_exc.SQLAlchemyError, OSError):
            return False
        return True

    async def _steady_load(self) -> None:
        hold = float(os.environ.get("LOAD_HOLD", "1.0"))
        while True:
            try:
                async with self.engine.connect() as connection:
                    await connection.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})
            except (sa_exc.SQLAlchemyError, OSError):
                await asyncio.sleep(1.0)

    async def _watch_schedule(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            try:
                schedule = json.loads(SCHEDULE.read_text())
            except (OSError, ValueError):
                continue
            if schedule["at"] == self.last_burst:
                continue
            self.last_burst = schedule["at"]
            result = await self.burst(schedule["at"], schedule["factor"], schedule["hold"])
            RESULTS.mkdir(exist_ok=True)
            out = RESULTS / f"{os.getpid()}.json"
            out.with_suffix(".tmp").write_text(json.dumps(result))
            out.with_suffix(".tmp").replace(out)

    async def burst(self, at: float, factor: int, hold: float) -> dict[str, Any]:
        """factor x pool capacity concurrent queries from `at` on; what happened to each,
        by outcome: ok, pool timeout (waited pool_timeout for a pooled connection), or the
        error's SQLSTATE (53300: the server refused a new connection)."""
        concurrency = factor * self.pool_capacity
        ok = pool_timeouts = 0
        errors: dict[str, int] = {}

        async def one() -> None:
            nonlocal ok, pool_timeouts
            try:
                async with self.engine.connect() as connection:
                    await connection.execute(text("SELECT pg_sleep(:hold)"), {"hold": hold})
                ok += 1
            except sa_exc.TimeoutError:
                pool_timeouts += 1
            except Exception as error:
                key = sqlstate(error) or type(error).__name__
                errors[key] = errors.get(key, 0) + 1

        await asyncio.sleep(max(0.0, at - time.time()))
        started = time.time()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        return {
            "pid": os.getpid(),
            "pod": os.environ.get("HOSTNAME", ""),
            "application_name": os.environ.get("DB_APPLICATION_NAME", ""),
            "pool_size": self.kwargs["pool_size"],
            "max_overflow": self.kwargs["max_overflow"],
            "queries": concurrency,
            "ok": ok,
            "pool_timeouts": pool_timeouts,
            "errors": errors,
            "start_skew": started - at,
            "seconds": time.time() - started,
        }

    def pool(self) -> dict[str, Any]:
        pool = self.engine.pool
        return {
            "pid": os.getpid(),
            "pool_size": self.kwargs["pool_size"],
            "max_overflow": self.kwargs["max_overflow"],
            "checked_out": pool.checkedout(),  # type: ignore[attr-defined]
        }


_RECORD_FIELDS = {*vars(logging.makeLogRecord({})), "message", "asctime"}


class JsonLines(logging.Formatter):
    """One JSON object a line: level, logger, message, pid and the record's `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in vars(record).items() if k not in _RECORD_FIELDS}
        return json.dumps({
            "level": record.levelname, "logger": record.name,
            "message": record.getMessage(), "pid": record.process, **extra,
        })  # fmt: skip


def log_pool_signals() -> None:
    """The pool monitor's warnings and clears to stderr (uvicorn leaves them unhandled)."""
    if not POOL_LOG.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonLines())
        POOL_LOG.addHandler(handler)
        POOL_LOG.setLevel(logging.INFO)
        POOL_LOG.propagate = False


def sqlstate(error: BaseException) -> str | None:
    """The SQLSTATE anywhere in the chain (SQLAlchemy wraps the asyncpg error)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state
        orig = getattr(current, "orig", None)
        current = orig if isinstance(orig, BaseException) else current.__cause__
    return None


def schedule_burst(query: dict[str, list[str]]) -> dict[str, Any]:
    schedule = {
        "at": float(query.get("at", [str(time.time() + 0.5)])[0]),
        "factor": int(query.get("factor", ["3"])[0]),
        "hold": float(query.get("hold", ["0.3"])[0]),
    }
    for stale in RESULTS.glob("*.json") if RESULTS.exists() else ():
        stale.unlink(missing_ok=True)
    tmp = SCHEDULE.with_suffix(".tmp")
    tmp.write_text(json.dumps(schedule))
    tmp.replace(SCHEDULE)
    return schedule


def results() -> list[dict[str, Any]]:
    if not RESULTS.exists():
        return []
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]


async def respond(send: Send, status: int, body: object) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(scope, receive, send)
        return
    worker: Worker = scope["state"]["worker"]
    route = (scope["method"], scope["path"])
    query = parse_qs(scope.get("query_string", b"").decode())
    if route == ("GET", "/ready"):
        ok = await worker.ready()
        await respond(send, 200 if ok else 503, {"ready": ok})
    elif route == ("POST", "/burst"):
        await respond(send, 202, schedule_burst(query))
    elif route == ("GET", "/results"):
        await respond(send, 200, results())
    elif route == ("GET", "/pool"):
        await respond(send, 200, worker.pool())
    else:
        await respond(send, 404, {"error": f"no route {scope['method']} {scope['path']}"})


async def lifespan(scope: Scope, receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            log_pool_signals()
            worker = Worker()
            worker.start()
            scope["state"]["worker"] = worker
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await scope["state"]["worker"].stop()
            await send({"type": "lifespan.shutdown.complete"})
            return
