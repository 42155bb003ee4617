"""An application's watch on its own SQLAlchemy pool: structured warnings, optional metrics.

    from poolbudget.client import engine_kwargs
    from poolbudget.pool_monitor import PoolMonitor

    engine = create_async_engine(DATABASE_URL, **engine_kwargs())
    async with PoolMonitor(engine):  # in the application's lifespan
        yield

Every `interval` seconds the monitor samples ``engine.pool`` (a QueuePool or
AsyncAdaptedQueuePool) and raises three signals, each logged as one WARNING with
``extra={"pool_signal": ..., ...}`` when it starts, again at most once per `repeat_every`
samples while it lasts, and as one INFO line when it clears:

* ``saturated``: checked out / (pool_size + max_overflow) >= `saturation` (0.85);
* ``overflow``: connections beyond pool_size are open (the steady pool is too small for
  the traffic, and each burst opens and closes connections);
* ``waits``: checkouts began while every connection was checked out, so they waited for
  one to come back (or timed out after pool_timeout). SQLAlchemy keeps no wait counter:
  the monitor counts these by wrapping the pool's ``connect`` (exact, no timing guess).

With ``metrics=True`` (the default registry) or a ``CollectorRegistry`` it also exports the
gauges and counters listed in METRICS, labelled by ``application_name`` (the ConfigMap's
``DB_APPLICATION_NAME``). prometheus_client is imported only then.

The decisions are pure functions (`conditions`, `step`); the class does the sampling.
SQLAlchemy is not imported here at run time, so `poolbudget.client` stays importable
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from sqlalchemy.engine import Engine
    from sqlalchemy.ext.asyncio import AsyncEngine

LOG = logging.getLogger("poolbudget.pool")

# name -> (type, help): what `metrics=` exports, each with one label, application_name.
METRICS: dict[str, tuple[str, str]] = {
    "poolbudget_client_pool_size": ("gauge", "pool_size: connections the pool keeps open"),
    "poolbudget_client_pool_capacity": ("gauge", "pool_size + max_overflow"),
    "poolbudget_client_pool_checked_out": ("gauge", "Connections checked out now"),
    "poolbudget_client_pool_overflow_in_use": ("gauge", "Open connections beyond pool_size"),
    "poolbudget_client_pool_checkout_waits_total": (
        "counter",
        "Checkouts that began with every connection checked out",
    ),
    "poolbudget_client_pool_checkout_timeouts_total": (
        "counter",
        "Checkouts that gave up after pool_timeout",
    ),
}


class Signal(enum.Enum):
    SATURATED = "saturated"
    OVERFLOW = "overflow"
    WAITS = "waits"


class Action(enum.Enum):
    NONE = "none"
    WARN = "warn"
    CLEAR = "clear"


@dataclass(frozen=True)
class PoolSample:
    pool_size: int
    max_overflow: int  # -1: unlimited (SQLAlchemy's convention)
    checked_out: int
    overflow_in_use: int
    waits: int  # checkouts that waited since the previous sample
    timeouts: int  # of those, the ones that timed out

    @property
    def capacity(self) -> int:
        return self.pool_size + max(self.max_overflow, 0)


def conditions(sample: PoolSample, saturation: float) -> dict[Signal, bool]:
    """Which signals this sample shows."""
    return {
        Signal.SATURATED: sample.capacity > 0
        and sample.checked_out / sample.capacity >= saturation,
        Signal.OVERFLOW: sample.overflow_in_use > 0,
        Signal.WAITS: sample.waits > 0 or sample.timeouts > 0,
    }


@dataclass(frozen=True)
class AlertState:
    warned: bool = False  # a warning is out and no clear has followed it
    since_warning: int | None = None  # samples since the last warning; None: never warned


def step(state: AlertState, active: bool, repeat_every: int) -> tuple[AlertState, Action]:
    """One sample of one signal: warn on entering (and once per `repeat_every` samples while
    it lasts), clear once when it ends; never more than one warning per `repeat_every`
    consecutive samples, however the signal flaps, and a clear only after a warning."""
    since = None if state.since_warning is None else state.since_warning + 1
    if active:
        if since is None or since >= repeat_every:
            return AlertState(warned=True, since_warning=0), Action.WARN
        return AlertState(warned=state.warned, since_warning=since), Action.NONE
    if state.warned:
        return AlertState(warned=False, since_warning=since), Action.CLEAR
    return AlertState(warned=False, since_warning=since), Action.NONE


def message(signal: Signal, sample: PoolSample, application: str, interval: float) -> str:
    """What a person reading the warning should know and do."""
    who = f"pool of {application!r}" if application else "pool"
    sizes = f"pool_size {sample.pool_size} + max_overflow {max(sample.max_overflow, 0)}"
    if signal is Signal.SATURATED:
        return (
            f"{who}: {sample.checked_out} of {sample.capacity} connections checked out "
            f"({sizes}); checkouts will wait soon. Look for slow queries and sessions held "
            "across awaits before asking the PoolBudget for a bigger share"
        )
    if signal is Signal.OVERFLOW:
        return (
            f"{who}: {sample.overflow_in_use} overflow connection(s) open beyond pool_size "
            f"{sample.pool_size}: the steady pool is smaller than the load, and each burst "
            "opens and closes connections"
        )
    return (
        f"{who}: {sample.waits} checkout(s) in the last {interval:g}s found every connection "
        f"checked out ({sizes}) and waited, {sample.timeouts} gave up after pool_timeout; "
        "requests are queueing for the database: shorten what holds connections, or raise "
        "this target's weight in the PoolBudget"
    )


@dataclass
class _Counts:
    waits: int = 0
    timeouts: int = 0


@dataclass
class _Metrics:
    gauges: dict[str, Any] = field(default_factory=dict)
    counters: dict[str, Any] = field(default_factory=dict)


def _metrics(registry: CollectorRegistry | None, application: str) -> _Metrics:
    try:
        import prometheus_client
    except ImportError:
        raise RuntimeError(
            "PoolMonitor(metrics=...) needs prometheus_client: pip install prometheus-client"
        ) from None
    target = prometheus_client.REGISTRY if registry is None else registry
    out = _Metrics()
    for name, (kind, text) in METRICS.items():
        if kind == "gauge":
            gauge = prometheus_client.Gauge(name, text, ["application_name"], registry=target)
            out.gauges[name] = gauge.labels(application)
        else:
            base = name.removesuffix("_total")
            counter = prometheus_client.Counter(base, text, ["application_name"], registry=target)
            out.counters[name] = counter.labels(application)
    return out


class PoolMonitor:
    """Watch `engine`'s pool from a background task; see the module doc."""

    def __init__(
        self,
        engine: AsyncEngine | Engine,
        *,
        interval: float = 5.0,
        saturation: float = 0.85,
        repeat_every: int = 12,
        logger: logging.Logger = LOG,
        metrics: bool | CollectorRegistry = False,
        application_name: str | None = None,
    ) -> None:
        if interval <= 0 or not 0 < saturation <= 1 or repeat_every < 1:
            raise ValueError("interval > 0, 0 < saturation <= 1 and repeat_every >= 1")
        self.engine = engine
        self.interval = interval
        self.saturation = saturation
        self.repeat_every = repeat_every
        self.logger = logger
        self.application = (
            os.environ.get("DB_APPLICATION_NAME", "")
            if application_name is None
            else application_name
        )
        self.states = {signal: AlertState() for signal in Signal}
        self._counts = _Counts()
        self._reported = _Counts()  # what the previous sample already counted
        self._hooked: Any = None  # the pool whose connect is wrapped
        self._task: asyncio.Task[None] | None = None
        self._metrics: _Metrics | None = None
        if metrics is not False:
            self._metrics = _metrics(None if metrics is True else metrics, self.application)

    # --- counting waits ---------------------------------------------------------------------

    def _hook(self) -> None:
        """Wrap the current pool's `connect` (engine.dispose() makes a new pool)."""
        pool = self.engine.pool
        if pool is self._hooked:
            return
        self._unhook()
        from sqlalchemy.exc import TimeoutError as PoolTimeout  # the application has it

        original: Callable[[], Any] = pool.connect
        counts = self._counts

        def connect() -> Any:
            sample = self._read(pool)
            full = (
                sample is not None
                and sample.max_overflow >= 0
                and (sample.checked_out >= sample.capacity)
            )
            if full:
                counts.waits += 1
            try:
                return original()
            except PoolTimeout:
                if full:
                    counts.timeouts += 1
                raise

        pool.connect = connect  # type: ignore[method-assign]
        self._hooked = pool

    def _unhook(self) -> None:
        if self._hooked is not None:
            with contextlib.suppress(AttributeError):
                del self._hooked.connect  # the class's method shows through again
            self._hooked = None

    # --- sampling ---------------------------------------------------------------------------

    @staticmethod
    def _read(pool: Any) -> PoolSample | None:
        """None for pools without a queue (NullPool, StaticPool): nothing to watch."""
        if not all(hasattr(pool, name) for name in ("size", "checkedout", "overflow")):
            return None
        return PoolSample(
            pool_size=int(pool.size()),
            max_overflow=int(getattr(pool, "_max_overflow", 0)),  # no public accessor
            checked_out=int(pool.checkedout()),
            overflow_in_use=max(int(pool.overflow()), 0),
            waits=0,
            timeouts=0,
        )

    def sample(self) -> PoolSample | None:
        """The pool now, with the waits counted since the previous sample."""
        self._hook()
        read = self._read(self.engine.pool)
        if read is None:
            return None
        waits = self._counts.waits - self._reported.waits
        timeouts = self._counts.timeouts - self._reported.timeouts
        self._reported = _Counts(self._counts.waits, self._counts.timeouts)
        return PoolSample(
            read.pool_size,
            read.max_overflow,
            read.checked_out,
            read.overflow_in_use,
            waits,
            timeouts,
        )

    def check(self) -> PoolSample | None:
        """One sample: update the metrics, log what starts, lasts or ends."""
        sample = self.sample()
        if sample is None:
            return None
        if self._metrics is not None:
            gauges, counters = self._metrics.gauges, self._metrics.counters
            gauges["poolbudget_client_pool_size"].set(sample.pool_size)
            gauges["poolbudget_client_pool_capacity"].set(sample.capacity)
            gauges["poolbudget_client_pool_checked_out"].set(sample.checked_out)
            gauges["poolbudget_client_pool_overflow_in_use"].set(sample.overflow_in_use)
            counters["poolbudget_client_pool_checkout_waits_total"].inc(sample.waits)
            counters["poolbudget_client_pool_checkout_timeouts_total"].inc(sample.timeouts)
        extra = {
            "application_name": self.application,
            "pool_size": sample.pool_size,
            "max_overflow": sample.max_overflow,
            "capacity": sample.capacity,
            "checked_out": sample.checked_out,
            "overflow_in_use": sample.overflow_in_use,
            "checkout_waits": sample.waits,
            "checkout_timeouts": sample.timeouts,
        }
        for signal, active in conditions(sample, self.saturation).items():
            self.states[signal], action = step(self.states[signal], active, self.repeat_every)
            fields = {"pool_signal": signal.value, "pool_action": action.value, **extra}
            if action is Action.WARN:
                text = message(signal, sample, self.application, self.interval)
                self.logger.warning(text, extra=fields)
            elif action is Action.CLEAR:
                who = f"pool of {self.application!r}" if self.application else "pool"
                self.logger.info(f"{who}: {signal.value} cleared", extra=fields)
        return sample

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            try:
                self.check()
            except Exception:  # a monitor must never take the application down
                self.logger.exception("pool monitor: sampling failed")
            await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start sampling in a task of the running loop (call from a lifespan startup)."""
        if self._task is None:
            self._hook()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling and unwrap the pool (call before engine.dispose())."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._unhook()

    async def __aenter__(self) -> PoolMonitor:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
