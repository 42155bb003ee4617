"""Kopf handlers: a thin shell that observes, wakes and delegates to reconcile.py.

How the pieces fit:
* Deployments, HPAs and PoolBudgets are observed with `@kopf.index` and `@kopf.on.event`,
  which write nothing to the objects (no Kopf annotations on user Deployments).
* Each PoolBudget has one daemon that reconciles, then sleeps until woken by a relevant
  change (a target's replicas/strategy/hash/rollout, its HPA's maxReplicas, the budget's
  spec) or until the database's limits are due for a re-read (`refreshSeconds`).
* Events that change nothing relevant (status heartbeats, labels) wake nobody: the slim
  views the indexes keep are compared, and only a difference wakes the budgets concerned.
* Every handler is `async def`, even those that never await: Kopf runs plain functions in
  a thread pool, where setting an asyncio.Event is not thread-safe (a wake-up could sit
  unseen until the loop woke for something else), and each event paid a thread hop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from poolbudget import metrics
from poolbudget.adapters.kube import KubeGateway
from poolbudget.adapters.leader import LeaderElector
from poolbudget.adapters.postgres import DatabaseProbe
from poolbudget.api.v1alpha1 import GROUP, PLURAL, VERSION
from poolbudget.domain.observe import DeploymentState, deployment_state, hpa_target
from poolbudget.reconcile import BudgetMemory, BudgetObject, Key, Observed, Reconciler

logger = logging.getLogger("poolbudget")

# (namespace, deploymentName) -> (creationTimestamp, PoolBudget name) of every claimant
ClaimIndex = kopf.Index[Key, tuple[str, str]]


@dataclass
class Runtime:
    """Process-wide state, created at startup and kept in Kopf's memo."""

    kube: KubeGateway
    reconciler: Reconciler
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    memories: dict[Key, BudgetMemory] = field(default_factory=dict)
    last_deployments: dict[Key, DeploymentState] = field(default_factory=dict)
    last_hpas: dict[Key, tuple[str, int] | None] = field(default_factory=dict)
    last_generations: dict[Key, int] = field(default_factory=dict)

    def wakeup(self, key: Key) -> asyncio.Event:
        return self.wakeups.setdefault(key, asyncio.Event())

    def wake_claimants(self, key: Key, claims: ClaimIndex) -> None:
        namespace, _ = key
        for _, budget_name in claims.get(key, []):
            self.wakeup((namespace, budget_name)).set()


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
    memo["runtime"] = Runtime(
        kube=kube, reconciler=Reconciler(kube=kube, prober_factory=DatabaseProbe)
    )


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    lease_task = memo.get("lease_task")
    if isinstance(lease_task, asyncio.Task):
        lease_task.cancel()
    runtime = _runtime(memo)
    for memory in runtime.memories.values():
        if memory.prober is not None:
            await memory.prober.close()
    await runtime.kube.close()


@kopf.on.probe(id="budgets")
async def probe_budgets(memo: kopf.Memo, **_: Any) -> int:
    return len(_runtime(memo).memories)


# --- observation: indexes (what is) and events (what changed) ----------------------------


@kopf.index("apps", "v1", "deployments")
async def deployment_index(
    namespace: str | None, name: str, body: kopf.Body, **_: Any
) -> dict[Key, DeploymentState]:
    return {(_ns(namespace), name): deployment_state(body)}


@kopf.index("autoscaling", "v2", "horizontalpodautoscalers")
async def hpa_index(namespace: str | None, body: kopf.Body, **_: Any) -> dict[Key, int]:
    target = hpa_target(body)
    return {} if target is None else {(_ns(namespace), target[0]): target[1]}


@kopf.index(GROUP, VERSION, PLURAL)
async def claim_index(
    namespace: str | None, name: str, spec: kopf.Spec, meta: kopf.Meta, **_: Any
) -> dict[Key, tuple[str, str]]:
    created = str(meta.get("creationTimestamp") or "")
    targets = spec.get("targets") or []
    return {
        (_ns(namespace), str(t.get("deploymentName"))): (created, name)
        for t in targets
        if isinstance(t, Mapping) and t.get("deploymentName")
    }


@kopf.on.event("apps", "v1", "deployments")
async def deployment_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    claim_index: ClaimIndex | None = None,
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    if type == "DELETED":
        runtime.last_deployments.pop(key, None)
    else:
        state = deployment_state(body)
        if runtime.last_deployments.get(key) == state:
            return
        runtime.last_deployments[key] = state
    assert claim_index is not None  # Kopf passes every index by its function's name
    runtime.wake_claimants(key, claim_index)


@kopf.on.event("autoscaling", "v2", "horizontalpodautoscalers")
async def hpa_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    memo: kopf.Memo,
    claim_index: ClaimIndex | None = None,
    **_: Any,
) -> None:
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    before = runtime.last_hpas.get(key)
    after = None if type == "DELETED" else hpa_target(body)
    if key in runtime.last_hpas and before == after:
        return
    runtime.last_hpas[key] = after
    assert claim_index is not None
    for target in {before, after}:
        if target is not None:
            runtime.wake_claimants((_ns(namespace), target[0]), claim_index)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def budget_changed(
    type: str, namespace: str | None, name: str, meta: kopf.Meta, memo: kopf.Memo, **_: Any
) -> None:
    """Wake the budget when its spec changes (our own status patches do not bump generation)."""
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    generation = int(meta.get("generation") or 0)
    if type != "DELETED" and runtime.last_generations.get(key) == generation:
        return
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
    deployment_index: kopf.Index[Key, DeploymentState] | None = None,
    hpa_index: kopf.Index[Key, int] | None = None,
    claim_index: ClaimIndex | None = None,
    **_: Any,
) -> None:
    assert deployment_index is not None
    assert hpa_index is not None
    assert claim_index is not None
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    wake = runtime.wakeup(key)
    memory = runtime.memories.setdefault(key, BudgetMemory())
    try:
        while not stopped:
            wake.clear()
            observed = _observe(body, key[0], deployment_index, hpa_index, claim_index)
            budget = BudgetObject(
                namespace=key[0],
                name=name,
                uid=str(body.metadata.uid),
                generation=int(body.metadata.get("generation") or 0),
                created=str(body.metadata.get("creationTimestamp") or ""),
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
            await _sleep_until_woken(wake, stopped, delay)
    finally:
        runtime.memories.pop(key, None)
        if memory.prober is not None:
            await memory.prober.close()
        metrics.forget_budget(key[0], name)


def _observe(
    body: kopf.Body,
    namespace: str,
    deployment_index: kopf.Index[Key, DeploymentState],
    hpa_index: kopf.Index[Key, int],
    claim_index: ClaimIndex,
) -> Observed:
    """The index entries of this budget's own targets only: O(targets), not O(cluster)."""
    keys = [
        (namespace, str(t.get("deploymentName")))
        for t in body.spec.get("targets") or []
        if isinstance(t, Mapping)
    ]
    return Observed(
        deployments={k: v for k in keys for v in deployment_index.get(k, [])},
        hpa_max_replicas={k: max(hpa_index[k]) for k in keys if k in hpa_index},
        claims={k: list(claim_index.get(k, [])) for k in keys},
    )


async def _sleep_until_woken(
    wake: asyncio.Event, stopped: kopf.DaemonStopped, delay: float | None
) -> None:
    """Wait for a wake-up, the delay or the daemon's stop, whichever first.

    Waiting on `stopped` too matters: a budget being deleted (its namespace terminating)
    must stop at once, not reconcile on every wake-up until Kopf cancels it.
    """
    waits = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stopped.wait())]
    try:
        await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiting in waits:
            waiting.cancel()
