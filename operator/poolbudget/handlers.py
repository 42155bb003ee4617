"""Kopf handlers: a thin shell that observes, wakes and delegates to reconcile.py.

How the pieces fit:
* Deployments, HPAs and PoolBudget claims are cached by our own informers
  (adapters/informer.py: list once, then watch), not by `@kopf.index`, whose start-up
  cost grows with the square of the objects listed. They write nothing to the objects
  (no Kopf annotations on user Deployments). Kopf itself watches PoolBudgets only.
* Each PoolBudget has one daemon that reconciles, then sleeps until woken by a relevant
  change (a target's replicas/strategy/hash/rollout, its HPA's maxReplicas, a rival
  claim, the budget's spec) or until the database's limits are due for a re-read
  (`refreshSeconds`). Its first reconcile waits until every informer has listed, so a
  restart never mistakes a not-yet-listed Deployment for a missing one.
* Changes that alter nothing relevant (status heartbeats, labels) wake nobody: the
  informers compare slim views and report only differences.
* Every handler is `async def`, even those that never await: Kopf runs plain functions in
  a thread pool, where setting an asyncio.Event is not thread-safe (a wake-up could sit
  unseen until the loop woke for something else), and each event paid a thread hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import kopf

from poolbudget import metrics
from poolbudget.adapters.informer import (
    DeploymentResource,
    HpaResource,
    Informer,
    WatchClient,
    watch_client,
)
from poolbudget.adapters.kube import KubeGateway, PoolBudgetResource
from poolbudget.adapters.leader import LeaderElector
from poolbudget.adapters.postgres import DatabaseProbe
from poolbudget.api.v1alpha1 import GROUP, PLURAL, VERSION
from poolbudget.domain.cluster_view import ClusterView, Key, budget_claims
from poolbudget.domain.observe import deployment_state, hpa_target
from poolbudget.reconcile import BudgetMemory, BudgetObject, Reconciler

logger = logging.getLogger("poolbudget")

# A ClusterView method: records one change, returns the budgets to wake.
ViewUpdate = Callable[[Key, Any, Any], set[Key]]


@dataclass
class Runtime:
    """Process-wide state, created at startup and kept in Kopf's memo."""

    kube: KubeGateway
    reconciler: Reconciler
    view: ClusterView = field(default_factory=ClusterView)
    informers: list[Informer[Any]] = field(default_factory=list)
    informer_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    watch_clients: list[WatchClient] = field(default_factory=list)
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    memories: dict[Key, BudgetMemory] = field(default_factory=dict)
    last_generations: dict[Key, int] = field(default_factory=dict)

    def wakeup(self, key: Key) -> asyncio.Event:
        return self.wakeups.setdefault(key, asyncio.Event())

    def wake(self, budgets: Iterable[Key]) -> None:
        for budget in budgets:
            self.wakeup(budget).set()

    def start_informers(self, namespaces: list[str]) -> None:
        """One informer per kind and namespace (one per kind when watching all)."""
        view = self.view
        kinds: list[tuple[Any, str, Callable[[Any], Any], ViewUpdate]] = [
            (DeploymentResource, "Deployment", deployment_state, view.deployment_changed),
            (HpaResource, "HorizontalPodAutoscaler", hpa_target, view.hpa_changed),
            (PoolBudgetResource, "PoolBudget", budget_claims, view.claims_changed),
        ]
        scopes: list[str | None] = list(namespaces) or [None]
        for namespace in scopes:
            client = watch_client()
            self.watch_clients.append(client)
            for resource, kind, parse, update in kinds:
                informer: Informer[Any] = Informer(
                    client,
                    resource,
                    kind=kind,
                    namespace=namespace,
                    parse=parse,
                    on_change=self._waking(update),
                )
                self.informers.append(informer)
        self.informer_tasks = [
            asyncio.create_task(informer.run(), name=f"informer {informer.kind}")
            for informer in self.informers
        ]

    def _waking(self, update: ViewUpdate) -> Callable[[Key, Any, Any], None]:
        """Apply a change to the view, then wake the budgets it concerns."""
        return lambda key, before, after: self.wake(update(key, before, after))

    async def synced(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()


def _ns(namespace: str | None) -> str:
    """Everything watched here is namespaced; Kopf types the argument as optional."""
    assert namespace is not None
    return namespace


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime = memo.get("runtime")
    assert isinstance(runtime, Runtime), "startup handler did not run"
    return runtime


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's own bookkeeping goes under our prefix, on PoolBudgets only.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Re-open watches periodically: a silently dead stream then heals itself (Kopf #1276).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.posting.enabled = False  # we post the Events users should see ourselves
    kube = KubeGateway()
    elector = memo.get("elector")
    if isinstance(elector, LeaderElector):
        # Renew the Lease on this loop: lightkube must not run in a second thread.
        memo["lease_task"] = asyncio.create_task(elector.hold(), name="lease")
    runtime = Runtime(kube=kube, reconciler=Reconciler(kube=kube, prober_factory=DatabaseProbe))
    namespaces = memo.get("namespaces")
    runtime.start_informers(list(namespaces) if isinstance(namespaces, list) else [])
    memo["runtime"] = runtime


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    lease_task = memo.get("lease_task")
    if isinstance(lease_task, asyncio.Task):
        lease_task.cancel()
    runtime = _runtime(memo)
    for task in runtime.informer_tasks:
        task.cancel()
    await asyncio.gather(*runtime.informer_tasks, return_exceptions=True)
    for client in runtime.watch_clients:
        await client.close()
    for memory in runtime.memories.values():
        if memory.prober is not None:
            await memory.prober.close()
    await runtime.kube.close()


@kopf.on.probe(id="budgets")
async def probe_budgets(memo: kopf.Memo, **_: Any) -> int:
    return len(_runtime(memo).memories)


@kopf.on.probe(id="informers")
async def probe_informers(memo: kopf.Memo, **_: Any) -> dict[str, int | str]:
    return informer_health(_runtime(memo))


def informer_health(runtime: Runtime) -> dict[str, int | str]:
    """Objects cached per informer. An informer that stopped fails /healthz (HTTP 500), so
    the liveness probe restarts an operator that would otherwise go blind to changes."""
    for informer, task in zip(runtime.informers, runtime.informer_tasks, strict=True):
        if task.done():
            raise kopf.PermanentError(f"the {informer.kind} informer ({informer.scope}) stopped")
    return {
        f"{informer.kind} ({informer.scope})": len(informer.items)
        if informer.synced.is_set()
        else "listing"
        for informer in runtime.informers
    }


@kopf.on.event(GROUP, VERSION, PLURAL)
async def budget_changed(
    type: str, namespace: str | None, name: str, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> None:
    """Wake the budget when its spec changes (our own status patches do not bump generation).

    This rides on Kopf's watch, not the PoolBudget informer: the daemon reads its spec from
    Kopf's body, which is fresh by the time this handler runs.
    """
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    generation = int(meta.get("generation") or 0)
    if type == "DELETED":
        runtime.last_generations.pop(key, None)  # budgets come and go; forget them
    elif runtime.last_generations.get(key) == generation:
        return
    else:
        runtime.last_generations[key] = generation
    runtime.wakeup(key).set()


# --- the reconcile loop, one per PoolBudget ----------------------------------------------


# The backoff lets a stopped daemon leave between reconciles (it waits on `stopped`)
# rather than be cancelled in the middle of one.
@kopf.daemon(
    GROUP, VERSION, PLURAL, id="reconcile", cancellation_backoff=5, cancellation_timeout=10
)
async def budget_daemon(
    stopped: kopf.DaemonStopped,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    logger: kopf.Logger,
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    wake = runtime.wakeup(key)
    memory = runtime.memories.setdefault(key, BudgetMemory())
    try:
        await _first_of(runtime.synced(), stopped.wait(), delay=None)
        while not stopped:
            wake.clear()
            claims = budget_claims(body)
            observed = runtime.view.observe(key, claims.created, claims.deployments)
            budget = BudgetObject(
                namespace=key[0],
                name=name,
                uid=str(body.metadata.uid),
                generation=int(body.metadata.get("generation") or 0),
                created=claims.created,
                spec=dict(body.spec),
                status=dict(body.status),
            )
            delay: float | None
            try:
                outcome = await runtime.reconciler.reconcile(budget, observed, memory)
                delay = outcome.next_check_seconds
            except Exception:  # the loop must survive anything; the next round retries
                logger.exception("reconcile failed; retrying")
                delay = 10.0
            await _first_of(wake.wait(), stopped.wait(), delay=delay)
    finally:
        runtime.memories.pop(key, None)
        if memory.prober is not None:
            await memory.prober.close()
        metrics.forget_budget(key[0], name)


async def _first_of(*waits: Awaitable[Any], delay: float | None) -> None:
    """Wait for whichever comes first: one of `waits`, or `delay` seconds (None: no limit).

    The daemon always waits on `stopped` too: a budget being deleted (its namespace
    terminating) must stop at once, not reconcile on every wake-up until Kopf cancels it.
    """
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
