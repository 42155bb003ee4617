"""Kopf handlers: a thin shell that observes, wakes and delegates to reconcile.py.

How the pieces fit:
* Deployments, HPAs and PoolBudget claims are cached by our own informers
  (adapters/informer.py: list once, then watch), not by `@kopf.index`, whose start-up
  cost grows with the square of the objects listed. They write nothing to the objects
  (no Kopf annotations on user Deployments). Kopf itself watches PoolBudgets only.
* Each PoolBudget has one loop (a task) that reconciles, then sleeps until woken by a relevant
  change (a target's replicas/strategy/hash/rollout, its HPA's maxReplicas, a rival
  claim, the budget's spec) or until the database's limits are due for a re-read
  (`refreshSeconds`). Its first reconcile waits until every informer has listed, so a
  restart never mistakes a not-yet-listed Deployment for a missing one.
* The loops are tasks of ours, started and stopped by the PoolBudget event handler, not
  `@kopf.daemon`s: Kopf puts a finalizer on every object with a daemon (to stop it on
  deletion), and after `helm uninstall` that finalizer would block deleting a budget or its
  namespace. Nothing needs cleaning up when a budget goes (its ConfigMaps stay, on purpose),
  so there is no finalizer; Kopf removes the one earlier versions added on its next event.
* Changes that alter nothing relevant (status heartbeats, labels) wake nobody: the
  informers compare slim views and report only differences.
* Every handler is `async def`, even those that never await: Kopf runs plain functions in
  a thread pool, where setting an asyncio.Event is not thread-safe (a wake-up could sit
  unseen until the loop woke for something else), and each event paid a thread hop.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.aio.client import Configuration

from poolbudget import metrics
from poolbudget.adapters import credentials, heap
from poolbudget.adapters.apiclient import close_client
from poolbudget.adapters.health import HealthServer, ProbeResult
from poolbudget.adapters.informer import (
    WATCH_SECONDS,
    ConfigMapResource,
    DeploymentResource,
    HpaResource,
    Informer,
    WatchClient,
    listed_informer,
    watch_client,
)
from poolbudget.adapters.kube import (
    ConfigMapView,
    KubeError,
    KubeGateway,
    PoolBudgetResource,
    configmap_view,
)
from poolbudget.adapters.postgres import CONNECTION_LIFETIME_SECONDS, DatabaseProbe
from poolbudget.admission import AdmissionParams
from poolbudget.api.v1alpha1 import GROUP, PLURAL, VERSION
from poolbudget.domain.cluster_view import ClusterView, Key, budget_claims, referenced_secrets
from poolbudget.domain.leadership import Fence, LeaderTimings
from poolbudget.domain.observe import DeploymentState, deployment_state, hpa_target
from poolbudget.domain.rendering import LABEL_BUDGET, LABEL_MANAGED_BY, MANAGED_BY
from poolbudget.reconcile import BudgetMemory, BudgetObject, Reconciler

logger = logging.getLogger("poolbudget")

MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY}"

# A ClusterView method: records one change, returns the budgets to wake.
ViewUpdate = Callable[[Key, Any, Any], set[Key]]

# Liveness fails when an informer has made no progress (a list completed, a watch stream
# ended by the server, an event or a bookmark) for this long. The API server ends every
# watch after WATCH_SECONDS (300 s), so an idle but healthy informer progresses at least
# that often; twice that leaves a slow relist and a re-open room without false restarts.
INFORMER_STALL_SECONDS = 600.0

# PoolBudgets per page of Kopf's start-up list (Kopf lists in one request by default). A
# budget the operator has written to carries its status and managedFields as large again;
# after a restart at 1,000 budgets they were all parsed at once: short-lived objects whose
# freed memory the allocator keeps (see reconcile.ROUNDS_IN_FLIGHT).
BUDGET_LIST_CHUNK = 100


@dataclass
class ManagedConfigMaps:
    """The gateway's ConfigMapCache: one label-selected ConfigMap informer per scope.

    Until its informer has listed, a scope answers nothing from the cache (the gateway
    then reads from the API server)."""

    by_scope: dict[str | None, Informer[ConfigMapView]] = field(default_factory=dict)

    def cached(self, namespace: str, name: str) -> ConfigMapView | None:
        informer = listed_informer(self.by_scope, namespace)
        return None if informer is None else informer.items.get((namespace, name))

    def remember(self, namespace: str, name: str, view: ConfigMapView) -> None:
        informer = listed_informer(self.by_scope, namespace)
        if informer is not None:
            informer.remember((namespace, name), view)


@dataclass
class WatchedDeployments:
    """The gateway's DeploymentCache: the Deployment informer per scope and the cluster view
    the budgets observe through."""

    view: ClusterView
    by_scope: dict[str | None, Informer[DeploymentState]] = field(default_factory=dict)

    def restarted(self, namespace: str, name: str, view: DeploymentState) -> None:
        """Our pod-template patch, as the API server answered it, until the watch shows it.
        A round after the restart that comes before the watch event would see the old
        template on a Deployment not rolling, and restart it again (minIntervalSeconds 0;
        with a cooldown it would say "restart due"). A bench cold start of 1,000 budgets
        under load restarted 3 Deployments twice, as this allows. Only while the watch
        still shows another config hash: the event for our patch is then still to come,
        and replaces this with what the controller made of it. Nobody is woken: the
        change is ours."""
        key = (namespace, name)
        informer = listed_informer(self.by_scope, namespace)
        if informer is None:
            return
        held = informer.items.get(key)
        if held is None or held.template_hash == view.template_hash:
            return
        informer.remember(key, view)
        self.view.deployment_changed(key, held, view)


def budgets_writing(
    key: Key, before: ConfigMapView | None, after: ConfigMapView | None
) -> set[Key]:
    """The budgets named on a managed ConfigMap before and after someone else changed it
    (our own writes are remembered silently): that budget looks again at once."""
    namespace = key[0]
    return {
        (namespace, budget)
        for view in (before, after)
        if view is not None and (budget := view.labels.get(LABEL_BUDGET))
    }


@dataclass
class Runtime:
    """Process-wide state, created at startup and kept in Kopf's memo."""

    kube: KubeGateway
    reconciler: Reconciler
    configmaps: ManagedConfigMaps = field(default_factory=ManagedConfigMaps)
    deployments: WatchedDeployments | None = None  # its view is `view`
    configuration: Configuration | None = None  # credentials for the informers' clients
    informer_stall_seconds: float = INFORMER_STALL_SECONDS
    watch_seconds: float = WATCH_SECONDS  # how often the informers' watches are re-opened
    view: ClusterView = field(default_factory=ClusterView)
    informers: list[Informer[Any]] = field(default_factory=list)
    informer_tasks: list[asyncio.Task[None]] = field(default_factory=list)
    watch_clients: list[WatchClient] = field(default_factory=list)
    wakeups: dict[Key, asyncio.Event] = field(default_factory=dict)
    memories: dict[Key, BudgetMemory] = field(default_factory=dict)
    last_generations: dict[Key, int] = field(default_factory=dict)
    bodies: dict[Key, dict[str, Any]] = field(default_factory=dict)
    loops: dict[Key, BudgetLoop] = field(default_factory=dict)
    admission: AdmissionParams | None = None  # the admission guard's parameters, if kept

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
            (ConfigMapResource, "ConfigMap", configmap_view, budgets_writing),
        ]
        scopes: list[str | None] = list(namespaces) or [None]
        assert self.configuration is not None, "the informers need credentials"
        for namespace in scopes:
            client = watch_client(self.configuration)
            self.watch_clients.append(client)
            for resource, kind, parse, update in kinds:
                informer: Informer[Any] = Informer(
                    client,
                    resource,
                    kind=kind,
                    namespace=namespace,
                    parse=parse,
                    on_change=self._waking(update),
                    watch_seconds=self.watch_seconds,
                    # Only the ConfigMaps we manage: a cluster's others are none of ours.
                    label_selector=MANAGED_SELECTOR if resource is ConfigMapResource else None,
                )
                self.informers.append(informer)
                if resource is ConfigMapResource:
                    self.configmaps.by_scope[namespace] = informer
                if resource is DeploymentResource and self.deployments is not None:
                    self.deployments.by_scope[namespace] = informer
        self.informer_tasks = [
            asyncio.create_task(informer.run(), name=f"informer {informer.kind}")
            for informer in self.informers
        ]

    def _waking(self, update: ViewUpdate) -> Callable[[Key, Any, Any], None]:
        """Apply a change to the view, then wake the budgets it concerns."""
        return lambda key, before, after: self.wake(update(key, before, after))

    def is_synced(self) -> bool:
        return all(informer.synced.is_set() for informer in self.informers)

    async def synced(self) -> None:
        for informer in self.informers:
            await informer.synced.wait()

    def ensure_loop(self, key: Key) -> None:
        """A loop for this budget, unless one runs. A budget deleted and created again at
        once gets a new loop and memory while the old loop finishes its round."""
        running = self.loops.get(key)
        if running is not None and not running.task.done():
            return
        memory = self.memories[key] = BudgetMemory()
        loop = BudgetLoop(memory=memory)
        # A fresh context, not a copy of the Kopf handler's that calls this: Kopf's context
        # variables hold the event (its whole raw body, the patch, the cause), and a task
        # keeps its context for as long as it runs (1,000 loops held 15 MiB of events).
        loop.task = asyncio.create_task(
            budget_loop(self, key, loop), name=f"budget {key}", context=contextvars.Context()
        )
        self.loops[key] = loop

    def forget_status(self, key: Key) -> None:
        """Drop the status from a budget's kept body once its loop remembers its own (see
        kept_body); the next PoolBudget event keeps a body without one anyway."""
        kept = self.bodies.get(key)
        if kept is not None:
            kept["status"] = b""

    def stop_loop(self, key: Key) -> None:
        """Let the budget's loop leave after its current round (never mid-write)."""
        self.bodies.pop(key, None)
        loop = self.loops.pop(key, None)
        if loop is not None:
            loop.stopped = True
            # Wakes it if it sleeps. A loop started again for the key at once (a budget
            # deleted and created again) shares the event: one extra round at most.
            self.wakeup(key).set()

    async def stop_loops(self, grace: float) -> None:
        """Operator shutdown: every loop leaves; one still writing after `grace` seconds
        is cancelled."""
        loops = list(self.loops.values())
        for key in list(self.loops):
            self.stop_loop(key)
        tasks = [loop.task for loop in loops]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(eq=False)
class BudgetLoop:
    """One budget's reconcile loop: its task, its stop signal, what it remembers."""

    memory: BudgetMemory
    stopped: bool = False  # set by stop_loop, which wakes the loop to see it
    task: asyncio.Task[None] = field(init=False)


def _ns(namespace: str | None) -> str:
    """Everything watched here is namespaced; Kopf types the argument as optional."""
    assert namespace is not None
    return namespace


def _runtime(memo: kopf.Memo) -> Runtime:
    runtime = memo.get("runtime")
    assert isinstance(runtime, Runtime), "startup handler did not run"
    return runtime


@kopf.on.login()
async def login(**_: Any) -> kopf.ConnectionInfo:
    """Kopf connects as our own clients do: the same Configuration (adapters/credentials.py)
    converted. In a pod that is the API server at KUBERNETES_SERVICE_HOST:PORT (IPv6 in
    brackets) with the mounted token, as client-go finds it; Kopf's built-in service-account
    login asks DNS for kubernetes.default.svc instead, which a cluster without DNS cannot
    answer, and would split the operator between two endpoints. Elsewhere: the kubeconfig.
    Kopf logs in again after a 401, which reads the rotated token afresh."""
    return await connection_info(await credentials.load_configuration())


async def connection_info(configuration: Configuration) -> kopf.ConnectionInfo:
    """Kopf's ConnectionInfo for the server and identity of a kubernetes.aio Configuration."""
    ca_data = configuration.ca_cert_data
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        ca_data=ca_data.encode() if isinstance(ca_data, str) else ca_data,
        insecure=True if not configuration.verify_ssl else None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        token=await credentials.bearer_token(configuration),
        default_namespace=credentials.pod_namespace(),
    )


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Kopf's own bookkeeping goes under our prefix, on PoolBudgets only. No handler needs a
    # finalizer; naming the one operator versions with a daemon added lets Kopf remove it.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    # Re-open watches periodically: a silently dead stream then heals itself (Kopf #1276).
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.chunk_size = BUDGET_LIST_CHUNK
    settings.posting.enabled = False  # we post the Events users should see ourselves
    # Retry failed API calls within 2 s at most (Kopf's default backoffs grow to 21 s, so
    # after a long API outage Kopf's own watch came back seconds after the API server).
    settings.networking.error_backoffs = (0.5, 1, 2, 2, 2, 2, 2, 2, 2, 2)
    configuration = await credentials.load_configuration()
    configmaps = ManagedConfigMaps()
    deployments = WatchedDeployments(ClusterView())
    fence, timings = memo.get("fence"), memo.get("leader_timings")
    if isinstance(fence, Fence) and isinstance(timings, LeaderTimings):
        # Leader election: no write once the Lease may be lost, and a write that passed
        # the fence reaches the API server within the margin or not at all (its whole
        # request, connecting included, is bounded by half the margin; see leader.py).
        kube = KubeGateway(
            configuration,
            configmaps=configmaps,
            deployments=deployments,
            may_write=fence.holds,
            timeout=timings.margin_seconds / 2,
        )
    else:
        kube = KubeGateway(configuration, configmaps=configmaps, deployments=deployments)
    lifetime = memo.get("database_connection_lifetime", CONNECTION_LIFETIME_SECONDS)

    def prober(dsn: str) -> DatabaseProbe:
        return DatabaseProbe(dsn, max_lifetime=float(lifetime))

    admission = (
        AdmissionParams(kube, clock=lambda: datetime.now(UTC))
        if memo.get("admission_params")
        else None
    )
    runtime = Runtime(
        kube=kube,
        reconciler=Reconciler(kube=kube, prober_factory=prober, admission=admission),
        admission=admission,
        configmaps=configmaps,
        deployments=deployments,
        view=deployments.view,
        configuration=configuration,
        informer_stall_seconds=float(memo.get("informer_stall_seconds", INFORMER_STALL_SECONDS)),
    )
    namespaces = memo.get("namespaces")
    runtime.start_informers(list(namespaces) if isinstance(namespaces, list) else [])
    memo["runtime"] = runtime
    memo["heap_task"] = asyncio.create_task(release_memory(runtime), name="heap trim")
    secret_check = float(memo.get("secret_check_seconds", 10.0))
    if secret_check > 0:
        memo["secret_task"] = asyncio.create_task(
            watch_secrets(runtime, secret_check), name="secret check"
        )
    health = memo.get("health")
    if isinstance(health, tuple):
        address, port = health
        server = HealthServer(
            address, port, liveness=lambda: liveness(runtime), readiness=lambda: readiness(runtime)
        )
        await server.start()
        memo["health_server"] = server


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    for name in ("secret_task", "heap_task"):
        task = memo.get(name)
        if isinstance(task, asyncio.Task):
            task.cancel()
    server = memo.get("health_server")
    if isinstance(server, HealthServer):
        await server.stop()
    runtime = _runtime(memo)
    await runtime.stop_loops(grace=10.0)
    for task in runtime.informer_tasks:
        task.cancel()
    await asyncio.gather(*runtime.informer_tasks, return_exceptions=True)
    for client in runtime.watch_clients:
        await close_client(client)
    await runtime.kube.close()


def informer_states(runtime: Runtime) -> dict[str, int | str]:
    """Per informer: the objects it holds once listed, else what is wrong or going on."""
    states: dict[str, int | str] = {}
    now = time.monotonic()
    for informer, task in zip(runtime.informers, runtime.informer_tasks, strict=True):
        name = f"{informer.kind} ({informer.scope})"
        problems = []
        stalled = informer.stalled_for(now)
        if stalled > runtime.informer_stall_seconds:
            problems.append(f"stalled: no list or watch progress for {stalled:.0f} s")
        if informer.failing is not None:
            problems.append(f"failing: {informer.failing}")
        if task.done():
            states[name] = "stopped"
        elif problems:
            states[name] = "; ".join(problems)
        elif not informer.synced.is_set():
            states[name] = "listing"
        else:
            states[name] = len(informer.items)
    return states


def liveness(runtime: Runtime) -> ProbeResult:
    """Fails when an informer task has ended, or has made no progress for longer than
    `informer_stall_seconds` (a watch that died silently, a list that cannot succeed):
    the operator is blind to changes, and a restart is the cure (or, for a missing RBAC
    rule, the CrashLoopBackOff that makes it visible). A failing list alone is readiness."""
    states = informer_states(runtime)
    report = {"budgets": len(runtime.memories), "informers": states}
    alive = all(
        not (isinstance(state, str) and (state == "stopped" or state.startswith("stalled")))
        for state in states.values()
    )
    return ProbeResult(ok=alive, report=report)


def readiness(runtime: Runtime) -> ProbeResult:
    """Ready once every informer has listed, and while none is failing to list or watch."""
    states = informer_states(runtime)
    report = {"budgets": len(runtime.memories), "informers": states}
    return ProbeResult(ok=all(isinstance(n, int) for n in states.values()), report=report)


KEPT_METADATA = ("name", "namespace", "uid", "generation", "creationTimestamp")


def kept_body(body: Mapping[str, Any], *, with_status: bool = True) -> dict[str, Any]:
    """What a budget's loop reads of its PoolBudget, copied: the spec, the status and five
    metadata fields. Not managedFields, annotations or labels: with the status the
    operator writes, managedFields alone is about as large as the status again, and a
    copy per budget is kept for as long as the budget exists. The status as compact JSON
    (`kept_status` reads it), and not at all once the loop remembers the one it wrote
    (`BudgetMemory.knows_status`): as dicts about 10 KiB a budget, as JSON about 2.5, and
    after a restart every budget keeps one until its first round."""
    metadata = body.get("metadata") or {}
    status = body.get("status") if with_status else None
    return {
        "metadata": {k: metadata[k] for k in KEPT_METADATA if k in metadata},
        "spec": _interned_copy(dict(body.get("spec") or {})),
        "status": json.dumps(dict(status), separators=(",", ":")).encode() if status else b"",
    }


def _interned_copy(value: Any) -> Any:
    """A deep copy of parsed JSON whose strings are interned: every spec repeats the same
    keys (deploymentName, processesPerPod...), and each parse made its own (1,000 specs
    of 5 targets with the CRD's defaults: 5.2 MiB deep-copied, 3.1 interned)."""
    if isinstance(value, str):
        return sys.intern(value)
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): _interned_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interned_copy(v) for v in value]
    return value


def kept_status(kept: Mapping[str, Any]) -> dict[str, Any]:
    """The PoolBudget's status as `kept_body` kept it ({} once dropped)."""
    encoded = kept.get("status")
    return dict(json.loads(encoded)) if encoded else {}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def budget_changed(
    type: str,
    namespace: str | None,
    name: str,
    body: kopf.Body,
    meta: kopf.Meta,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    """Start, feed and stop each budget's loop; wake it when its spec changes (our own
    status patches do not bump generation).

    This rides on Kopf's watch, not the PoolBudget informer: Kopf's body is fresh by the
    time this handler runs, and the loop reads its spec from the copy kept here.
    """
    runtime = _runtime(memo)
    key = (_ns(namespace), name)
    if type == "DELETED" or meta.get("deletionTimestamp"):
        runtime.last_generations.pop(key, None)  # budgets come and go; forget them
        runtime.stop_loop(key)
        if type == "DELETED" and runtime.admission is not None:
            await runtime.admission.forget(*key)
        return
    memory = runtime.memories.get(key)
    runtime.bodies[key] = kept_body(body, with_status=memory is None or not memory.knows_status)
    runtime.ensure_loop(key)
    generation = int(meta.get("generation") or 0)
    if runtime.last_generations.get(key) == generation:
        return
    runtime.last_generations[key] = generation
    runtime.wakeup(key).set()


# --- the reconcile loop, one per PoolBudget ----------------------------------------------


async def watch_secrets(runtime: Runtime, interval: float) -> None:
    """Wake a budget soon after the Secret its DSN comes from changes (a rotated password,
    a new host), not at its next refreshSeconds. The operator may `get` Secrets but not
    list or watch them (that would let it read every Secret in scope), so each referenced
    Secret's resourceVersion is read every `interval`: one GET per Secret, however many
    budgets share it. A Secret that appears, changes or goes away wakes its budgets."""
    seen: dict[Key, str | None] = {}
    while True:
        await asyncio.sleep(interval)
        references = referenced_secrets(runtime.bodies)
        for secret in list(seen):
            if secret not in references:
                del seen[secret]  # no budget uses it any more
        for secret, budgets in references.items():
            try:
                version = await runtime.kube.secret_version(*secret)
            except KubeError as exc:  # the budget's own reconcile reports what is wrong
                logger.debug("Secret %s/%s: not checked: %s", *secret, exc)
                continue
            if secret in seen and seen[secret] != version:
                logger.info("Secret %s/%s changed: reconciling %d budget(s)", *secret, len(budgets))
                runtime.wake(budgets)
            seen[secret] = version


HEAP_TRIM_SECONDS = 10.0


async def release_memory(runtime: Runtime) -> None:
    """Give the heap the start-up no longer uses back to the OS (adapters/heap.py), every
    HEAP_TRIM_SECONDS once every informer has listed: after the first reconciles, after
    relists and write storms. One trim of a 200 MiB heap takes a few milliseconds."""
    await runtime.synced()
    while True:
        await asyncio.sleep(HEAP_TRIM_SECONDS)
        heap.release_free_memory()


async def budget_loop(runtime: Runtime, key: Key, loop: BudgetLoop) -> None:
    """Reconcile, then sleep until woken or until the reconciler asks to look again."""
    namespace, name = key
    wake = runtime.wakeup(key)
    try:
        while not loop.stopped:
            # Every round, not just the first: after a broken watch the cache is stale
            # until relisted, and a decision on it can cost an extra restart.
            if not runtime.is_synced():
                wake.clear()  # what woke it so far is seen once synced
                await _first_of(runtime.synced(), wake.wait())
                continue
            if (body := runtime.bodies.get(key)) is None:
                break
            wake.clear()
            delay = await _reconcile_once(runtime, key, body, loop)
            await _sleep(wake, delay)
    finally:
        if runtime.memories.get(key) is loop.memory:
            del runtime.memories[key]
            metrics.forget_budget(namespace, name)
        if loop.memory.prober is not None:
            await loop.memory.prober.close()


async def _reconcile_once(
    runtime: Runtime, key: Key, body: Mapping[str, Any], loop: BudgetLoop
) -> float | None:
    """One round; returns when to look again (None: when woken). A function of its own so
    that what the round built (the budget's copy, its view of the cluster, the decided
    status: about 16 KiB a budget) is freed before the loop sleeps, not held by 1,000
    sleeping loops (tracemalloc at 1,000 budgets: 12 MiB held so)."""
    namespace, name = key
    claims = budget_claims(body)
    metadata = body.get("metadata") or {}
    budget = BudgetObject(
        namespace=namespace,
        name=name,
        uid=str(metadata.get("uid", "")),
        generation=int(metadata.get("generation") or 0),
        created=claims.created,
        spec=dict(body.get("spec") or {}),
        status=kept_status(body),
    )
    try:
        result = await runtime.reconciler.reconcile(
            budget,
            lambda: runtime.view.observe(key, claims.created, claims.deployments),
            loop.memory,
        )
    except Exception as error:  # the loop must survive anything; the next round retries
        logger.exception("PoolBudget %s/%s: reconcile failed; retrying", namespace, name)
        try:
            await runtime.reconciler.report_failure(budget, loop.memory, error)
        except Exception:  # the API server may be what failed; the log has it
            logger.warning("PoolBudget %s/%s: could not report the failure", *key)
        return 10.0
    if loop.memory.knows_status and body.get("status"):
        runtime.forget_status(key)
    return result.next_check_seconds


async def _sleep(wake: asyncio.Event, delay: float | None) -> None:
    """Until `wake` is set (stop_loop sets it too) or `delay` seconds pass (None: no
    limit). A timeout around one wait, not `_first_of`: its two tasks a sleeper, with their
    coroutines and futures, were about 3 KiB for each of 1,000 sleeping loops."""
    try:
        async with asyncio.timeout(delay):
            await wake.wait()
    except TimeoutError:
        pass


async def _first_of(*waits: Awaitable[Any]) -> None:
    """Wait for whichever of `waits` comes first. A loop waiting for the informers to list
    waits on its wake event too, which stop_loop sets: a budget being deleted (its
    namespace terminating) must stop at once."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
