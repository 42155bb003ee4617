"""Leader election over the coordination.k8s.io Lease `poolbudget-operator`, so replicas
never both write.

The election is the official client's (`kubernetes.aio.leaderelection`: acquire, renew,
the standby's view of expiry). A standby judges expiry by its OWN clock, from when it
last saw the Lease change, never by comparing the holder's renewTime with its clock, so
clock skew between nodes cannot shorten a lease. Where the library falls short, this
module adds what is missing:

* Every Lease call carries `_request_timeout` (and an asyncio timeout around it): the
  library passes none, so one hung call blocked the renew loop past its deadline.
* A timeout, a connection error or any other non-ApiException from a Lease call is
  turned into a failed attempt (the library catches ApiException only; anything else
  crashed `run()`, and its error path reads `.reason` of what it got).
* The write FENCE (domain/leadership.py): the send time (time.monotonic) of every
  successful Lease create/update is recorded, and KubeGateway refuses every write
  (NotLeaderError) unless `now < last_success_sent + renew_deadline`. The library only
  cancels the leading task once a renew deadline has passed in its own loop; a leader
  stopped (SIGSTOP) past its lease and resumed ran its reconcile loops, which wrote
  before the renew loop noticed anything. CLOCK_MONOTONIC counts while a process is
  stopped, so a resumed leader finds its fence lapsed before its first write.
  Standbys wait `lease` seconds from their observation of the last renewal, which came
  after it was sent, so the fence lapses at least `lease - renew deadline` (5 s by
  default) before anyone else may act. That margin is for writes already past the fence
  check; handlers.py keeps the write client's connect, write and pool timeouts inside it.
  What no client-side fence covers: a write the API server received before the lapse
  and committed after the takeover (etcd stalled for seconds), and a standby whose wall
  clock jumps forward (the library reads time.time() for its observations).
* Lost leadership = the fence lapsed or the library's renew loop gave up, whichever
  comes first. The process then EXITS (status 1) at once, without cleanup, and the
  kubelet restarts it as a standby. Stepping down in-process was the alternative; it
  would need Kopf's operator, our informers, per-budget loops and database probes torn
  down and rebuilt in a process that just proved it can stall, while a new process
  starts clean with a new identity, which is what the standby path is tested for. The
  fence keeps writes off while it exits. (This was also the behaviour before.)
* A clean shutdown (SIGTERM: Kopf stops, then this module) revokes the fence and
  releases the Lease (holderIdentity cleared): a standby takes over within one retry
  period instead of a whole lease. The library has no release.
* Identity: `<hostname>-<random>`. With `<hostname>-<pid>` a restarted container
  (PID 1 again) held the same identity and renewed its predecessor's Lease as its own.

How it runs: `poolbudget run` does `asyncio.run(run_elected(...))`. A standby answers its
probes from a thread (StandbyHealth) while the election waits; once leading, that server
stops and `lead(fence)` runs Kopf (`kopf.operator`, whose startup handler starts the real
probes on the same port and hands the fence to the KubeGateway).

Timings (`poolbudget run --leader-*`): lease 15 s, renew deadline 10 s, retry 2 s.

Kopf's own peering was the alternative to a Lease; it needs extra CRDs and freezes every
replica when two share a priority, which a Deployment's identical pods always do.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable, Coroutine
from http import HTTPStatus
from typing import Any, TypeVar

from kubernetes.aio import client
from kubernetes.aio.client.api_client import ApiClient
from kubernetes.aio.client.exceptions import ApiException
from kubernetes.aio.leaderelection.electionconfig import Config
from kubernetes.aio.leaderelection.leaderelection import LeaderElection
from kubernetes.aio.leaderelection.leaderelectionrecord import LeaderElectionRecord
from kubernetes.aio.leaderelection.resourcelock.leaselock import LeaseLock
from prometheus_client import Counter

from poolbudget import metrics
from poolbudget.adapters import credentials
from poolbudget.adapters.apiclient import close_client
from poolbudget.domain.leadership import Fence, LeaderTimings

logger = logging.getLogger(__name__)
T = TypeVar("T")

LEASE_NAME = "poolbudget-operator"
EXIT_LOST = 1
# How often an unreachable API server is mentioned while a standby waits it out.
QUIET_SECONDS = 30.0


class _Retold(logging.Filter):
    """Drops the elector's line per failed Lease read (one per retry period for as long as
    the API server is away); FencedLeaseLock says it once in QUIET_SECONDS instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Error retrieving resource lock")


logging.getLogger(LeaderElection.__module__).addFilter(_Retold())


def new_identity() -> str:
    """Unique per process: a restarted container never mistakes the old Lease for its own."""
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


class FencedLeaseLock(LeaseLock):
    """LeaseLock with a timeout on every call, every failure reported as a failed
    attempt, the fence fed on each success, and a release."""

    def __init__(
        self,
        name: str,
        namespace: str,
        identity: str,
        api_client: ApiClient,
        *,
        fence: Fence,
        request_timeout: float,
    ) -> None:
        super().__init__(name, namespace, identity, api_client)
        self.fence = fence
        self.request_timeout = request_timeout
        self._unreachable_since: float | None = None
        self._last_mentioned = -QUIET_SECONDS

    async def _call(self, call: Callable[[float], Coroutine[Any, Any, T]]) -> T:
        """One API call, bounded both by the client (`_request_timeout`) and around it
        (token refresh, reading the body); non-API failures become ApiException(0)."""
        try:
            async with asyncio.timeout(self.request_timeout + 0.5):
                result = await call(self.request_timeout)
        except ApiException:
            raise
        except Exception as exc:  # timeouts, aiohttp/TLS errors, a token that cannot refresh
            self._unreachable(exc)
            raise ApiException(status=0, reason=f"{type(exc).__name__}: {exc}") from None
        self._unreachable_since = None
        return result

    def _unreachable(self, exc: Exception) -> None:
        now = time.monotonic()
        if self._unreachable_since is None:
            self._unreachable_since = now
        if now - self._last_mentioned >= QUIET_SECONDS:
            self._last_mentioned = now
            if isinstance(exc, ApiException):
                problem = f"cannot read the Lease ({exc.status} {exc.reason})"
            else:
                problem = f"cannot reach the Lease ({type(exc).__name__})"
            elapsed = now - self._unreachable_since
            logger.warning("%s for %.0f s; still trying", problem, elapsed)

    async def get(
        self, name: str, namespace: str
    ) -> tuple[bool, LeaderElectionRecord] | tuple[bool, Exception] | tuple[bool, None]:
        try:
            lease = await self._call(
                lambda timeout: self.api_instance.read_namespaced_lease(
                    name, namespace, _request_timeout=timeout
                )
            )
        except ApiException as exc:
            if exc.status != HTTPStatus.NOT_FOUND:
                self._unreachable(exc)  # 403 (RBAC), 5xx: said now and then, not per retry
            return False, exc
        self.lease_reference = lease
        return True, self.election_record(lease)

    async def create(
        self, name: str, namespace: str, election_record: LeaderElectionRecord
    ) -> bool:
        body = client.V1Lease(
            metadata=client.V1ObjectMeta(name=name), spec=self.update_lease(election_record)
        )
        sent = time.monotonic()
        try:
            await self._call(
                lambda timeout: self.api_instance.create_namespaced_lease(
                    namespace, body, _request_timeout=timeout
                )
            )
        except ApiException as exc:
            logger.debug("creating the Lease failed: %s %s", exc.status, exc.reason)
            return False
        self.fence.renewed(sent)
        return True

    async def update(self, name: str, namespace: str, updated_record: LeaderElectionRecord) -> bool:
        lease = self.lease_reference
        if lease is None:
            return False
        lease.spec = self.update_lease(updated_record, lease.spec)
        sent = time.monotonic()
        try:
            # The body carries metadata.resourceVersion: a concurrent writer gets a 409.
            await self._call(
                lambda timeout: self.api_instance.replace_namespaced_lease(
                    name, namespace, lease, _request_timeout=timeout
                )
            )
        except ApiException as exc:
            logger.debug("updating the Lease failed: %s %s", exc.status, exc.reason)
            return False
        self.fence.renewed(sent)
        return True

    async def release(self) -> None:
        """Clear holderIdentity if we still hold the Lease (a 409 means someone else
        changed it: then it is not ours to release)."""
        try:
            lease = await self._call(
                lambda timeout: self.api_instance.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=timeout
                )
            )
            if lease.spec is None or lease.spec.holder_identity != self.identity:
                return
            lease.spec.holder_identity = None
            lease.spec.renew_time = None
            await self._call(
                lambda timeout: self.api_instance.replace_namespaced_lease(
                    self.name, self.namespace, lease, _request_timeout=timeout
                )
            )
            logger.info("released the Lease")
        except ApiException as exc:
            logger.warning("could not release the Lease (%s); it expires on its own", exc.reason)


async def api_client() -> ApiClient:
    """The Lease's own client, from the credentials every other client uses
    (adapters/credentials.py: the service account in a pod, else the kubeconfig)."""
    return ApiClient(await credentials.load_configuration())


def _total(counter: Counter) -> int:
    return int(
        sum(
            sample.value
            for family in counter.collect()
            for sample in family.samples
            if sample.name.endswith("_total")
        )
    )


def _writes() -> tuple[int, int]:
    """(writes sent, writes refused) by this process so far, from its own metrics."""
    return _total(metrics.API_WRITES), _total(metrics.API_WRITES_REFUSED)


async def run_elected(
    *,
    namespace: str,
    timings: LeaderTimings,
    lead: Callable[[Fence], Coroutine[Any, Any, None]],
    standby: Callable[[], Callable[[], None]] | None = None,
    identity: str | None = None,
) -> int:
    """Wait for the Lease, then run `lead(fence)` while holding it.

    `standby()` starts what a waiting replica serves (its probes) and returns how to stop
    it; it runs until this replica leads. Returns the exit status: 0 after a clean stop
    (SIGTERM/SIGINT, or `lead` returning), 1 when `lead` failed. Losing the Lease never
    returns: the process exits with status 1 at once (see the module docstring)."""
    identity = identity or new_identity()
    fence = Fence(timings.renew_deadline_seconds, time.monotonic)
    api = await api_client()
    lock = FencedLeaseLock(
        LEASE_NAME,
        namespace,
        identity,
        api,
        fence=fence,
        request_timeout=timings.request_timeout_seconds,
    )
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str] = loop.create_future()

    def settle(reason: str) -> None:
        if not outcome.done():
            outcome.set_result(reason)

    for signum in (signal.SIGTERM, signal.SIGINT):  # Kopf installs its own once it runs
        loop.add_signal_handler(signum, settle, signal.Signals(signum).name)
    stop_standby = standby() if standby is not None else None
    leading = asyncio.Event()
    lead_task: asyncio.Task[Any] | None = None

    async def started() -> None:
        nonlocal lead_task
        lead_task = asyncio.current_task()
        leading.set()
        logger.info("leading as %s (Lease %s/%s)", identity, namespace, LEASE_NAME)
        if stop_standby is not None:
            await asyncio.to_thread(stop_standby)
        try:
            await lead(fence)
        except Exception:
            logger.exception("the operator failed")
            settle("failed")
        else:
            settle("stopped")

    async def stopped() -> None:
        settle("lost")

    async def watch_fence() -> None:
        await leading.wait()
        while True:  # wakes when the fence would lapse; each renewal pushes that later
            await asyncio.sleep(fence.remaining() + 0.01)
            if not fence.holds():
                settle("lost")
                return

    logger.info("waiting to lead (Lease %s/%s) as %s", namespace, LEASE_NAME, identity)
    election_config = Config(
        lock,
        lease_duration=timings.lease_seconds,
        renew_deadline=timings.renew_deadline_seconds,
        retry_period=timings.retry_seconds,
        onstarted_leading=started,
        onstopped_leading=stopped,
    )
    election = asyncio.create_task(LeaderElection(election_config).run(), name="election")
    watchdog = asyncio.create_task(watch_fence(), name="fence watchdog")
    election.add_done_callback(
        lambda task: settle("failed") if not task.cancelled() and task.exception() else None
    )
    reason = await outcome
    if reason == "lost":
        lose(timings)
    fence.revoke()
    for task in (election, watchdog):
        task.cancel()
    if lead_task is not None and not lead_task.done():
        lead_task.cancel()  # a signal before Kopf took over the signal handlers
        await asyncio.gather(lead_task, return_exceptions=True)
    await asyncio.gather(election, watchdog, return_exceptions=True)
    if leading.is_set():
        sent, refused = _writes()
        logger.info(
            "stopped leading (%s): %d API writes sent, %d refused by the fence",
            reason,
            sent,
            refused,
        )
        await lock.release()
    elif stop_standby is not None:
        stop_standby()
    await close_client(api)
    return 1 if reason == "failed" else 0


def lose(timings: LeaderTimings) -> None:
    """The Lease is (or may be) someone else's: say so, and exit before doing anything."""
    sent, refused = _writes()
    logger.error(
        "lost the Lease (no renewal within the %g s renew deadline); exiting: "
        "%d API writes sent, %d refused by the fence",
        timings.renew_deadline_seconds,
        sent,
        refused,
    )
    logging.shutdown()  # flush the log: os._exit skips it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_LOST)  # no cleanup: nothing may run that could act as a leader
