"""`make bench`: figures, not pass/fail. Printed as a table and written as JSON.

1. Reaction latency (p50/p95/p99 over --changes changes): Deployment scaled -> its
   ConfigMap updated and pod-template hash patched; PoolBudget edited -> the same.
2. Two floors, measured in the same run on the same API server, each a minimal client
   that watches Deployments and, per replicas change, in sequence: (one write) merge-
   patches one pod-template annotation; (two writes) server-side applies a ConfigMap,
   then merge-patches the annotation: the writes the operator must make per change.
   The operator's figures are printed as ratios to the two-write floor.
3. Writes and new database connections per no-op reconcile (expected 0).
4. Scale: N PoolBudgets over M Deployments (replicas 0, so no pods are needed): operator
   peak RSS, CPU seconds, time to converge from a cold start and after a restart.
5. Activity: the cost of the pg_stat_activity query (DatabaseProbe.activity) with 10 and
   with --activity-connections idle client connections open on one server (no cluster).

    python -m devtools.bench [--changes 50] [--budgets 100] [--deployments 1000] [--json PATH]
    python -m devtools.bench --parts activity [--activity-connections 1000] [--activity-runs 50]
    python -m devtools.bench --parts latency,noop,scale --baseline 109eb5a

--baseline REF measures an older commit's operator in the same run, on the same cluster:
its checkout and virtualenv are prepared once and cached (devtools/baseline.py); the
latency, noop and scale parts run first with it, then with this checkout's, never both at
once, each in namespaces of its own, the next starting only once the previous one's are
deleted. One table then sets the two side by side; the JSON holds the baseline's figures,
in the same shape, under "baseline".

Only the parts selected with --parts run; the local cluster is started only for those that
need one (latency, noop, floor, scale).

Stakater Reloader is not measured: `go list -m -versions github.com/stakater/Reloader`
answers "403 Forbidden: This module version is not available" from the module proxy here,
so it cannot be built on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from devtools.baseline import REPORTED_PACKAGES, Baseline, prepare
from devtools.localcluster import LocalCluster, find_binaries
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from devtools.podready import PodReadier
from poolbudget.adapters.postgres import DatabaseProbe

REPO = Path(__file__).resolve().parents[1]
CLUSTER_PARTS = {"latency", "noop", "floor", "scale"}
# What --baseline measures for both operators (the floors and activity involve neither).
BASELINE_PARTS = {"latency", "noop", "scale"}
# The activity part's fleet: a few application names, as a budget's targets would have.
ACTIVITY_APPLICATIONS = 20
ACTIVITY_CONNECT_BATCH = 50
HASH = "poolbudget.dev/config-hash"
FLOOR_ANNOTATION = "bench.poolbudget.dev/seen-replicas"
FLOOR_FIELD_MANAGER = "bench-floor"
# The floors: how many writes the minimal client makes per change.
FLOORS = {"one_write": "watch + patch annotation", "two_writes": "watch + apply CM + patch"}
MERGE_PATCH = "application/merge-patch+json"
KUBECTL_PATCH_RUNS = 10
APPLY_PATCH = "application/apply-patch+yaml"


@dataclass(frozen=True)
class Contender:
    """One operator under test: this checkout's, or --baseline's from its own venv."""

    key: str  # "head" or "baseline"
    label: str  # its column in the before/after table
    prefix: str  # of the namespaces its parts create
    python: str = sys.executable
    python_args: tuple[str, ...] = ()
    # Its own CRDs, installed before its parts: an operator rejects a spec field it does not
    # know (the CRD's defaults add new fields to every PoolBudget), so an older commit's
    # operator under this checkout's CRD would find every budget InvalidSpec.
    crds: Path = REPO / "crds"

    @classmethod
    def of(cls, baseline: Baseline) -> Contender:
        return cls("baseline", f"before ({baseline.ref})", "bench-base-", baseline.python, ("-I",),
                   baseline.root / "src" / "crds")  # fmt: skip

    def install_crds(self, cluster: LocalCluster) -> None:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(self.crds))
        cluster.wait_established("poolbudgets.poolbudget.dev")

    def operator(self, cluster: LocalCluster, state: Path, part: str) -> OperatorProcess:
        suffix = "" if self.key == "head" else f"-{self.key}"
        return OperatorProcess(
            kubeconfig=cluster.kubeconfig, log_path=state / f"operator{part}{suffix}.log",
            python=self.python, python_args=self.python_args,
        )  # fmt: skip

    def scale_namespaces(self, budgets: int) -> list[str]:
        return [f"{self.prefix}scale-{i}" for i in range(max(1, budgets // 50))]


HEAD = Contender("head", "after (HEAD)", "bench-")


class Kube:
    """The sync `kubernetes` client's few calls the bench makes (one connection pool)."""

    def __init__(self, kubeconfig: str) -> None:
        # kubernetes.config and .watch are not annotated (the generated client is).
        self.api: k8s.ApiClient = k8s_config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
        self.apps = k8s.AppsV1Api(self.api)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    def deployment(self, namespace: str, name: str) -> k8s.V1Deployment:
        return self.apps.read_namespaced_deployment(name, namespace)

    def patch_deployment(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.apps.patch_namespaced_deployment(name, namespace, patch, _content_type=MERGE_PATCH)

    def apply_configmap(self, namespace: str, name: str, data: dict[str, str]) -> None:
        body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}
        self.core.patch_namespaced_config_map(
            name, namespace, body, field_manager=FLOOR_FIELD_MANAGER, force=True,
            _content_type=APPLY_PATCH,
        )  # fmt: skip

    def patch_budget(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            "poolbudget.dev", "v1alpha1", namespace, "poolbudgets", name, patch,
            _content_type=MERGE_PATCH,
        )  # fmt: skip

    def close(self) -> None:
        self.api.close()  # type: ignore[no-untyped-call]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50) * 1000, 1),
        "p95_ms": round(percentile(values, 95) * 1000, 1),
        "p99_ms": round(percentile(values, 99) * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


class AnnotationWatch:
    """Records when a Deployment's pod-template annotation takes a new value."""

    def __init__(self, kube: Kube, namespace: str, name: str, key: str) -> None:
        self.kube, self.namespace, self.name, self.key = kube, namespace, name, key

    def current(self) -> str | None:
        deployment = self.kube.deployment(self.namespace, self.name)
        template = deployment.spec.template if deployment.spec else None
        annotations = (
            template.metadata.annotations if template and template.metadata else None
        ) or {}
        return annotations.get(self.key)

    def wait_change(self, before: str | None, timeout: float = 30) -> float:
        """Seconds until the annotation differs from `before` (polled every 5 ms)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.current() != before:
                return time.monotonic()
            time.sleep(0.005)
        raise TimeoutError(f"{self.name}: {self.key} did not change in {timeout}s")


def rollout_done(kube: Kube, namespace: str, name: str) -> bool:
    deployment = kube.deployment(namespace, name)
    status, spec, meta = deployment.status, deployment.spec, deployment.metadata
    if status is None or spec is None or meta is None:
        return False
    return bool(
        (status.observed_generation or 0) >= (meta.generation or 0)
        and (status.updated_replicas or 0) == (spec.replicas or 0)
        and (status.replicas or 0) == (status.updated_replicas or 0)
        and (status.ready_replicas or 0) == (spec.replicas or 0)
    )


def scale(kube: Kube, namespace: str, name: str, replicas: int) -> None:
    kube.patch_deployment(namespace, name, {"spec": {"replicas": replicas}})


def deployment_manifest(name: str, replicas: int) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
        "spec": {
            "replicas": replicas, "selector": {"matchLabels": {"app": name}},
            "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": {"app": name}},
                         "spec": {"containers": [{"name": "app", "image": "example.invalid/app:1"}]}},
        },
    }  # fmt: skip


def budget_manifest(name: str, targets: list[str], **database: Any) -> dict[str, Any]:
    return {
        "apiVersion": "poolbudget.dev/v1alpha1", "kind": "PoolBudget", "metadata": {"name": name},
        "spec": {
            "database": database or {"maxConnectionsOverride": 500},
            "reservedConnections": 10,
            "targets": [{"deploymentName": t, "processesPerPod": 2} for t in targets],
            "rollout": {"maxConcurrent": 100, "minIntervalSeconds": 0},
        },
    }  # fmt: skip


def apply(cluster: LocalCluster, namespace: str, documents: list[dict[str, Any]]) -> None:
    text = "---\n".join(yaml.safe_dump(d) for d in documents)
    cluster.kubectl("-n", namespace, "apply", "--server-side", "-f", "-", input=text, timeout=900)


def measure_reaction(
    cluster: LocalCluster, kube: Kube, changes: int, namespace: str = "bench-latency"
) -> dict[str, Any]:
    cluster.kubectl("create", "namespace", namespace)
    results: dict[str, Any] = {}
    with PodReadier(str(cluster.kubeconfig), [namespace]):
        apply(cluster, namespace, [deployment_manifest("api", 2), budget_manifest("shop", ["api"])])
        watch = AnnotationWatch(kube, namespace, "api", HASH)
        wait_for(lambda: watch.current() is not None and rollout_done(kube, namespace, "api"),
                 timeout=60, what="the first rollout")  # fmt: skip

        scaled: list[float] = []
        for i in range(changes):
            before = watch.current()
            started = time.monotonic()
            scale(kube, namespace, "api", 6 if i % 2 == 0 else 2)
            scaled.append(watch.wait_change(before) - started)
            wait_for(lambda: rollout_done(kube, namespace, "api"), timeout=60, what="rollout")
        results["deployment_scaled"] = summary(scaled)

        # The edits go through the same client as the scale. This bench once made them with
        # a `kubectl patch` child process, whose start-up counted as the operator's time:
        # timed that way too, after, for comparison.
        def edit_with_client(patch: dict[str, Any]) -> None:
            kube.patch_budget(namespace, "shop", patch)

        def edit_with_kubectl(patch: dict[str, Any]) -> None:
            cluster.kubectl(
                "-n", namespace, "patch", "pbud", "shop", "--type=merge", "-p", json.dumps(patch)
            )

        patches_before = budget_patches(cluster)
        # One alternation over both loops: with an odd --changes, the kubectl loop would
        # otherwise begin with the value the client loop ended on (no change, a timeout).
        sent = 10
        for key, edit in (("poolbudget_edited", edit_with_client),
                          ("poolbudget_edited_kubectl", edit_with_kubectl)):  # fmt: skip
            edited: list[float] = []
            for _ in range(changes):
                before = watch.current()
                started = time.monotonic()
                sent = 40 if sent == 10 else 10
                edit({"spec": {"reservedConnections": sent}})
                edited.append(watch.wait_change(before) - started)
                wait_for(lambda: rollout_done(kube, namespace, "api"), timeout=60, what="rollout")
            results[key] = summary(edited)
        # The API server's count, not the operator's: Kopf's own bookkeeping patches (it
        # makes none for an on.event handler) would show here next to the bench's edits.
        after = budget_patches(cluster)
        results["poolbudget_patches_during_edits"] = {
            key: after.get(key, 0) - patches_before.get(key, 0) for key in sorted(after)
        }
        # What the edits cost when made with `kubectl patch` (as this bench once did): the
        # same edit again, a no-op the API server answers without a write or an event.
        same = json.dumps({"spec": {"reservedConnections": sent}})
        kubectl_patch: list[float] = []
        for _ in range(KUBECTL_PATCH_RUNS):
            started = time.monotonic()
            cluster.kubectl("-n", namespace, "patch", "pbud", "shop", "--type=merge", "-p", same)
            kubectl_patch.append(time.monotonic() - started)
        results["kubectl_patch_noop"] = summary(kubectl_patch)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    return results


def budget_patches(cluster: LocalCluster) -> dict[str, float]:
    """PATCH requests the API server has served for PoolBudgets, by subresource ("object"
    is the object itself, "status" its status), from its own /metrics."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("apiserver_request_total{") or 'resource="poolbudgets"' not in line:
            continue
        if 'verb="PATCH"' not in line:
            continue
        subresource = line.split('subresource="')[1].split('"')[0] if "subresource=" in line else ""
        counts[subresource or "object"] = counts.get(subresource or "object", 0) + float(
            line.rsplit(" ", 1)[1]
        )
    return counts


def floor_agent(kubeconfig: str, namespace: str, writes: str) -> None:
    """A minimal client: watch Deployments and, per replicas change, patch one pod-template
    annotation (`one_write`), or first server-side apply a ConfigMap for it (`two_writes`)."""
    kube = Kube(kubeconfig)
    seen: dict[str, int] = {}
    watch = k8s_watch.Watch()  # type: ignore[no-untyped-call]
    stream = watch.stream(kube.apps.list_namespaced_deployment, namespace)  # type: ignore[no-untyped-call]
    for event in stream:
        deployment = event["object"]
        name = str(deployment.metadata.name) if deployment.metadata else ""
        replicas = deployment.spec.replicas if deployment.spec else None
        if replicas is None or seen.get(name) == replicas:
            continue
        seen[name] = replicas
        if writes == "two_writes":
            kube.apply_configmap(namespace, f"{name}-floor", {"REPLICAS": str(replicas)})
        patch = {
            "spec": {"template": {"metadata": {"annotations": {FLOOR_ANNOTATION: str(replicas)}}}}
        }
        kube.patch_deployment(namespace, name, patch)


def measure_floor(cluster: LocalCluster, kube: Kube, changes: int, writes: str) -> dict[str, Any]:
    namespace = f"bench-floor-{writes.replace('_', '-')}"
    cluster.kubectl("create", "namespace", namespace)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "devtools.bench",
            "--floor-agent",
            str(cluster.kubeconfig),
            namespace,
            writes,
        ],
        cwd=REPO,
    )
    try:
        with PodReadier(str(cluster.kubeconfig), [namespace]):
            apply(cluster, namespace, [deployment_manifest("api", 2)])
            watch = AnnotationWatch(kube, namespace, "api", FLOOR_ANNOTATION)
            wait_for(lambda: watch.current() == "2" and rollout_done(kube, namespace, "api"),
                     timeout=60, what="the floor agent's first patch")  # fmt: skip
            latencies: list[float] = []
            for i in range(changes):
                before = watch.current()
                started = time.monotonic()
                scale(kube, namespace, "api", 6 if i % 2 == 0 else 2)
                latencies.append(watch.wait_change(before) - started)
                wait_for(lambda: rollout_done(kube, namespace, "api"), timeout=60, what="rollout")
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    return {"deployment_scaled": summary(latencies)}


def measure_noop(
    cluster: LocalCluster, operator: OperatorProcess, rounds: int, namespace: str = "bench-noop"
) -> dict[str, Any]:
    cluster.kubectl("create", "namespace", namespace)
    with PostgresServer(major=16, settings={"max_connections": "100"}) as database, \
            PodReadier(str(cluster.kubeconfig), [namespace]):  # fmt: skip
        dsn = database.create_role("monitor", "bench-pw", database="shop")
        secret = cluster.kubectl("-n", namespace, "create", "secret", "generic", "db",
                                 f"--from-literal=dsn={dsn}", "--dry-run=client", "-o", "yaml").stdout  # fmt: skip
        cluster.kubectl("-n", namespace, "apply", "-f", "-", input=secret)
        apply(cluster, namespace, [deployment_manifest("api", 1),
                                   budget_manifest("shop", ["api"], connectionSecretRef={"name": "db"}, refreshSeconds=3600)])  # fmt: skip

        def ready() -> bool:
            status = (
                json.loads(
                    cluster.kubectl("-n", namespace, "get", "pbud", "shop", "-o", "json").stdout
                ).get("status")
                or {}
            )
            return any(
                c["type"] == "Ready" and c["status"] == "True"
                for c in status.get("conditions") or []
            )

        wait_for(ready, timeout=60, what="the budget Ready")

        # Only this namespace's writes: rollouts of the latency part may still be finishing.
        def writes_quiet(seconds: float = 3.0) -> bool:
            before = operator.api_writes(namespace)
            time.sleep(seconds)
            return operator.api_writes(namespace) == before

        # The first rollout's own status updates must be over before counting.
        wait_for(writes_quiet, timeout=60, what="the operator's writes to settle")

        def reconciles() -> float:
            return sum(v for k, v in operator.metrics().items()
                       if k.startswith("poolbudget_reconciles_total") and f'namespace="{namespace}"' in k)  # fmt: skip

        def backend_connections() -> int:
            count = database.sql(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'poolbudget-operator'"
            )
            return int(count)

        def reconciled_at_least(count: float) -> bool:
            return reconciles() >= count

        writes_before, reconciles_before = operator.api_writes(namespace), reconciles()
        pids_before = database.sql(
            "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name = 'poolbudget-operator'"
        )
        for i in range(rounds):
            # Annotating a Deployment bumps its generation: a real event, nothing to change.
            cluster.kubectl(
                "-n", namespace, "annotate", "--overwrite", "deployment", "api", f"bench/noop={i}"
            )
            wait_for(functools.partial(reconciled_at_least, reconciles_before + i + 1),
                     timeout=30, what="a reconcile")  # fmt: skip
        pids_after = database.sql(
            "SELECT string_agg(pid::text, ',') FROM pg_stat_activity WHERE application_name = 'poolbudget-operator'"
        )
        result = {
            "reconciles": reconciles() - reconciles_before,
            "api_writes": operator.api_writes(namespace) - writes_before,
            "api_writes_per_reconcile": (operator.api_writes(namespace) - writes_before)
            / max(1.0, reconciles() - reconciles_before),
            "operator_db_connections_open": backend_connections(),
            # A new connection means a new backend pid; the probe keeps its one open.
            "new_db_connections": len(
                set((pids_after or "").split(",")) - set((pids_before or "").split(","))
            ),
        }
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    return result


STEADY_SECONDS = 15.0


def process_figures(pid: int) -> tuple[float, float, float]:
    """(peak RSS MiB, RSS now MiB, CPU seconds) of a live process, from /proc."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    peak_kib, now_kib = (int(status[key].split()[0]) for key in ("VmHWM", "VmRSS"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return peak_kib / 1024, now_kib / 1024, ticks / 100


def wait_namespaces_gone(cluster: LocalCluster, namespaces: list[str]) -> float:
    """Seconds until none of `namespaces` exists any more (their objects collected too:
    the namespace controller removes a namespace only once it is empty)."""
    started = time.monotonic()

    def gone() -> bool:
        listed = cluster.kubectl("get", "namespaces", "-o", "name").stdout.split()
        return not {name.removeprefix("namespace/") for name in listed} & set(namespaces)

    wait_for(gone, timeout=3600, interval=2.0, what=f"namespaces deleted: {', '.join(namespaces)}")
    return time.monotonic() - started


def measure_scale(
    cluster: LocalCluster, state: Path, budgets: int, deployments: int, contender: Contender = HEAD
) -> dict[str, Any]:
    namespaces = contender.scale_namespaces(budgets)
    per_budget = max(1, deployments // budgets)
    for namespace in namespaces:
        cluster.kubectl("create", "namespace", namespace)
    started = time.monotonic()
    # One apply per namespace (about 300 objects): one kubectl per budget took 6 minutes
    # for 1,000 budgets, this about 25 s.
    documents: dict[str, list[dict[str, Any]]] = {namespace: [] for namespace in namespaces}
    for b in range(budgets):
        names = [f"d{b}-{t}" for t in range(per_budget)]
        documents[namespaces[b % len(namespaces)]] += [
            *(deployment_manifest(n, 0) for n in names),
            budget_manifest(f"b{b}", names),
        ]
    for namespace, manifests in documents.items():
        apply(cluster, namespace, manifests)
    created = time.monotonic() - started

    operator = contender.operator(cluster, state, "-scale")

    def converged() -> bool:
        # Every budget reconciled and the last pass wrote nothing: the level is reached.
        metrics = operator.metrics()
        budgets_seen = {k.split('poolbudget="')[1].split('"')[0] + k.split('namespace="')[1].split('"')[0]
                        for k in metrics if k.startswith("poolbudget_reconciles_total")}  # fmt: skip
        return len(budgets_seen) >= budgets

    def all_ready() -> bool:
        listed = json.loads(cluster.kubectl("get", "pbud", "-A", "-o", "json").stdout)["items"]
        ready = sum(
            any(c["type"] == "Ready" and c["status"] == "True"
                for c in (b.get("status") or {}).get("conditions") or [])
            for b in listed if b["metadata"]["namespace"] in namespaces
        )  # fmt: skip
        return ready >= budgets

    def settle(label: str) -> dict[str, Any]:
        begun = time.monotonic()
        operator.start()
        wait_for(converged, timeout=1800, interval=1.0, what=f"{label}: every budget reconciled")
        first_pass = time.monotonic() - begun
        # The level is reached when every budget says Ready (ConfigMaps written, every
        # Deployment rolled and its rollout finished), and then nothing more is written.
        # A lull in writes alone is not enough: under load the Deployment controller lags.
        wait_for(all_ready, timeout=1800, interval=5.0, what=f"{label}: every budget Ready")
        ready_s = time.monotonic() - begun
        last, quiet_since = operator.api_writes(), time.monotonic()
        while time.monotonic() - quiet_since < 5:
            time.sleep(1)
            now = operator.api_writes()
            if now != last:
                last, quiet_since = now, time.monotonic()
        settled = time.monotonic() - begun - 5
        # The peak so far and the CPU spent, once the writes have settled; what the process
        # holds STEADY_SECONDS later (the operator hands freed heap back every 10 s).
        peak, _, cpu = process_figures(operator.pid)
        time.sleep(STEADY_SECONDS)
        _, steady, _ = process_figures(operator.pid)
        return {"every_budget_reconciled_s": round(first_pass, 1), "every_budget_ready_s": round(ready_s, 1),
                "writes_settled_s": round(settled, 1), "peak_rss_mib": round(peak, 1),
                "steady_rss_mib": round(steady, 1), "cpu_s": round(cpu, 1),
                "api_writes": last, "api_writes_by_kind": operator.api_writes_by_kind()}  # fmt: skip

    cold = settle("cold start")
    operator.stop()
    restart = settle("after a restart")
    operator.stop()
    for namespace in namespaces:
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    return {"budgets": budgets, "deployments": budgets * per_budget, "create_objects_s": round(created, 1),
            "cold_start": cold, "after_restart": restart}  # fmt: skip


async def _time_activity(probe: DatabaseProbe, runs: int) -> tuple[list[float], int]:
    """Seconds per DatabaseProbe.activity() call on the warm connection, and rows returned."""
    rows = len((await probe.activity(5.0)).rows)  # warm: connect and log in first
    seconds: list[float] = []
    for _ in range(runs):
        started = time.perf_counter()
        await probe.activity(5.0)
        seconds.append(time.perf_counter() - started)
    return seconds, rows


async def _open_idle(dsn: str, count: int, first: int) -> list[asyncpg.Connection]:
    """`count` idle asyncpg connections, spread over ACTIVITY_APPLICATIONS names."""
    opened: list[asyncpg.Connection] = []
    for start in range(first, first + count, ACTIVITY_CONNECT_BATCH):
        batch = range(start, min(first + count, start + ACTIVITY_CONNECT_BATCH))
        opened += await asyncio.gather(
            *(
                asyncpg.connect(
                    dsn, server_settings={"application_name": f"app-{i % ACTIVITY_APPLICATIONS}"}
                )
                for i in batch
            )
        )
    return opened


async def _activity_cost(dsn: str, watcher_dsn: str, connections: int, runs: int) -> dict[str, Any]:
    probe = DatabaseProbe(watcher_dsn)
    opened: list[asyncpg.Connection] = []
    try:
        opened += await _open_idle(dsn, 10, 0)
        few, few_rows = await _time_activity(probe, runs)
        started = time.monotonic()
        opened += await _open_idle(dsn, connections - 10, 10)
        open_s = time.monotonic() - started
        many, many_rows = await _time_activity(probe, runs)
    finally:
        await asyncio.gather(*(c.close() for c in opened), return_exceptions=True)
        await probe.close()
    return {
        "few": {"connections": 10, "rows": few_rows, **summary(few)},
        "many": {"connections": connections, "rows": many_rows, **summary(many)},
        "open_connections_s": round(open_s, 1),
    }


def measure_activity(connections: int, runs: int) -> dict[str, Any]:
    """The activity query's cost with 10 and with `connections` idle clients open, on one
    server sized for the larger count (pg_stat_activity scans every backend slot, used
    or not, so both figures are taken at the same max_connections), read by a pg_monitor
    role as the README recommends."""
    settings = {"max_connections": str(connections + 20)}
    with PostgresServer(major=16, settings=settings) as server:
        dsn = server.create_role("app", "bench-app-pw", database="shop")
        server.create_role("watcher", "bench-watcher-pw")
        watcher_dsn = server.dsn("watcher", "bench-watcher-pw", "shop")
        server.sql("GRANT pg_monitor TO watcher")
        result = asyncio.run(_activity_cost(dsn, watcher_dsn, connections, runs))
        result["server"] = server.sql("SHOW server_version").split(" ")[0]
        result["max_connections"] = int(settings["max_connections"])
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.bench")
    parser.add_argument("--changes", type=int, default=50)
    parser.add_argument("--budgets", type=int, default=100)
    parser.add_argument("--deployments", type=int, default=1000)
    parser.add_argument("--noop-rounds", type=int, default=20)
    parser.add_argument("--json", type=Path, default=Path("bench-results.json"))
    parser.add_argument("--activity-connections", type=int, default=1000)
    parser.add_argument("--activity-runs", type=int, default=50)
    parser.add_argument(
        "--parts", default="latency,noop,floor,scale,activity", help="comma-separated subset"
    )
    parser.add_argument(
        "--baseline",
        metavar="REF",
        help="also measure this commit's operator (latency, noop, scale), first, in the same "
        "run on the same cluster; one table sets the two side by side",
    )
    parser.add_argument(
        "--floor-agent",
        nargs=3,
        metavar=("KUBECONFIG", "NAMESPACE", "WRITES"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args(argv)
    if args.floor_agent:
        floor_agent(*args.floor_agent)
        return 0

    parts = set(args.parts.split(","))
    if unknown := parts - CLUSTER_PARTS - {"activity"}:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    results: dict[str, Any] = {"machine": {"cpus": len(os.sched_getaffinity(0))}}
    baseline = None
    if args.baseline:
        if not parts & BASELINE_PARTS:
            parser.error(
                f"--baseline compares only these parts: {', '.join(sorted(BASELINE_PARTS))}"
            )
        print(f"baseline {args.baseline}: checkout and virtualenv ...", flush=True)
        baseline = prepare(args.baseline)
        print(f"  {baseline.sha} {'reused' if baseline.reused else 'prepared'} in "
              f"{baseline.seconds:.1f} s: {baseline.root}", flush=True)  # fmt: skip
        results["head"] = head_commit()
        results["baseline"] = {"commit": {
            "ref": baseline.ref, "sha": baseline.sha, "ran_first": True,
            "prepare_s": round(baseline.seconds, 1), "prepare_reused": baseline.reused,
            "packages": {k: v for k, v in baseline.packages.items() if k in REPORTED_PACKAGES},
        }}  # fmt: skip
    if parts & CLUSTER_PARTS:
        measure_on_cluster(args, parts, results, baseline)
    if "activity" in parts:
        print(f"activity query: 10 and {args.activity_connections} connections ...", flush=True)
        results["activity"] = measure_activity(args.activity_connections, args.activity_runs)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"\nJSON: {args.json}")
    return 0


def head_commit() -> dict[str, Any]:
    """The commit this checkout is at, and whether its files differ from it."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip()  # fmt: skip
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    return {"sha": sha, "uncommitted_changes": bool(changed)}


def measure_on_cluster(
    args: argparse.Namespace, parts: set[str], results: dict[str, Any], baseline: Baseline | None
) -> None:
    """Each contender's parts in turn (the baseline's first), one operator process at a time;
    the next one starts once the namespaces of the previous one are deleted."""
    contenders = [*([Contender.of(baseline)] if baseline else []), HEAD]
    # Where each one's figures go: this checkout's at the top level, as without --baseline.
    into = {HEAD.key: results, **({"baseline": results["baseline"]} if baseline else {})}
    tag = {c.key: f" [{c.label}]" if baseline else "" for c in contenders}
    state = Path(tempfile.mkdtemp(prefix="poolbudget-bench-"))
    state.chmod(0o755)
    with LocalCluster(state / "cluster", binaries=find_binaries(build=True)) as cluster:
        HEAD.install_crds(cluster)
        kube = Kube(str(cluster.kubeconfig))
        if parts & {"latency", "noop"}:
            for i, contender in enumerate(contenders):
                contender.install_crds(cluster)
                operator = contender.operator(cluster, state, "")
                operator.start()
                created = []
                try:
                    if "latency" in parts:
                        print(f"reaction latency{tag[contender.key]} ...", flush=True)
                        created.append(f"{contender.prefix}latency")
                        into[contender.key]["operator"] = measure_reaction(
                            cluster, kube, args.changes, created[-1]
                        )
                    if "noop" in parts:
                        print(f"no-op reconciles{tag[contender.key]} ...", flush=True)
                        created.append(f"{contender.prefix}noop")
                        into[contender.key]["noop"] = measure_noop(
                            cluster, operator, args.noop_rounds, created[-1]
                        )
                finally:
                    operator.stop()
                if i < len(contenders) - 1:
                    print(f"  waiting until {', '.join(created)} are deleted ...", flush=True)
                    wait_namespaces_gone(cluster, created)
        if "floor" in parts:
            results["floor"] = {}
            for writes, label in FLOORS.items():
                print(f"floor ({label}) ...", flush=True)
                results["floor"][writes] = measure_floor(cluster, kube, args.changes, writes)
        if "scale" in parts:
            for i, contender in enumerate(contenders):
                print(f"scale: {args.budgets} budgets over {args.deployments} deployments"
                      f"{tag[contender.key]} ...", flush=True)  # fmt: skip
                contender.install_crds(cluster)
                figures = measure_scale(cluster, state, args.budgets, args.deployments, contender)
                if i < len(contenders) - 1:
                    # Deleting thousands of Deployments (and their ReplicaSets, ConfigMaps,
                    # Events) keeps the API server and the garbage collector busy for a while:
                    # the next operator starts on a quiet cluster.
                    print("  waiting until its namespaces are deleted ...", flush=True)
                    gone = wait_namespaces_gone(cluster, contender.scale_namespaces(args.budgets))
                    figures["namespaces_deleted_s"] = round(gone, 1)
                into[contender.key]["scale"] = figures
        kube.close()


def print_table(results: dict[str, Any]) -> None:
    if "operator" in results and "floor" in results:
        print_latency(results)
    if "noop" in results:
        print_noop(results)
    if "scale" in results:
        print_scale(results)
    if "activity" in results:
        print_activity(results)
    if "baseline" in results:
        print_comparison(results)


def print_latency(results: dict[str, Any]) -> None:
    print("\nreaction latency (change -> ConfigMap updated and pod-template hash patched)")
    print(f"  {'':38} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    operator = results["operator"]
    floors = results["floor"]
    rows = [
        ("operator: Deployment scaled", operator["deployment_scaled"]),
        ("operator: PoolBudget edited", operator["poolbudget_edited"]),
        *(
            [("operator: PoolBudget edited (kubectl)", operator["poolbudget_edited_kubectl"])]
            if "poolbudget_edited_kubectl" in operator
            else []
        ),
        *((f"floor: {FLOORS[w]}", floors[w]["deployment_scaled"]) for w in FLOORS if w in floors),
    ]
    for label, s in rows:
        print(f"  {label:38} {s['n']:>4} {s['p50_ms']:>8} {s['p95_ms']:>8} {s['p99_ms']:>8}")
    if "two_writes" in floors:
        floor = floors["two_writes"]["deployment_scaled"]
        print("  operator / two-write floor (goal: p50 <= 1.25x, p99 <= 2x):")
        for label, key in (
            ("Deployment scaled", "deployment_scaled"),
            ("PoolBudget edited", "poolbudget_edited"),
        ):
            s = operator[key]
            print(f"    {label:20} p50 {s['p50_ms'] / max(0.1, floor['p50_ms']):.2f}x, "
                  f"p99 {s['p99_ms'] / max(0.1, floor['p99_ms']):.2f}x")  # fmt: skip
    if "kubectl_patch_noop" in operator:
        s = operator["kubectl_patch_noop"]
        print(f"  one `kubectl patch pbud` process alone (a no-op edit): p50 {s['p50_ms']} ms, "
              f"p99 {s['p99_ms']} ms")  # fmt: skip
    if "poolbudget_patches_during_edits" in operator:
        patches = ", ".join(
            f"{k} {v:.0f}" for k, v in operator["poolbudget_patches_during_edits"].items()
        )
        print(f"  PATCHes to the PoolBudget while it was edited {2 * operator['poolbudget_edited']['n']} times "
              f"(API server's count, every client): {patches or 'none'}")  # fmt: skip


def print_noop(results: dict[str, Any]) -> None:
    noop = results["noop"]
    print(f"\nno-op reconciles: {noop['reconciles']:.0f}, API writes {noop['api_writes']:.0f} "
          f"({noop['api_writes_per_reconcile']:.2f} per reconcile), new DB connections {noop['new_db_connections']}, "
          f"operator DB connections open {noop['operator_db_connections_open']}")  # fmt: skip


def print_scale(results: dict[str, Any]) -> None:
    scale_ = results["scale"]
    print(f"\nscale: {scale_['budgets']} PoolBudgets over {scale_['deployments']} Deployments")
    for label in ("cold_start", "after_restart"):
        s = scale_[label]
        print(f"  {label:14} every budget reconciled {s['every_budget_reconciled_s']:>6} s, "
              f"Ready {s['every_budget_ready_s']:>6} s, writes settled "
              f"{s['writes_settled_s']:>6} s, peak RSS {s['peak_rss_mib']:>6} MiB, "
              f"steady RSS {s['steady_rss_mib']:>6} MiB, CPU {s['cpu_s']:>6} s, API writes {s['api_writes']:.0f}")  # fmt: skip
        kinds = ", ".join(
            f"{k} {v:.0f}" for k, v in sorted(s.get("api_writes_by_kind", {}).items())
        )
        print(f"  {'':14} writes by kind: {kinds or 'none'}")


def print_activity(results: dict[str, Any]) -> None:
    activity = results["activity"]
    print(f"\nactivity query (one pg_stat_activity read, pg_monitor role, PostgreSQL {activity['server']}, "
          f"max_connections {activity['max_connections']})")  # fmt: skip
    print(
        f"  {'idle connections open':24} {'rows':>5} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}"
    )
    for s in (activity["few"], activity["many"]):
        print(
            f"  {s['connections']:<24} {s['rows']:>5} {s['n']:>4} {s['p50_ms']:>8} {s['p95_ms']:>8} {s['p99_ms']:>8}"
        )
    print(f"  (opening the extra connections took {activity['open_connections_s']} s)")


LATENCY_ROWS = {"deployment_scaled": "Deployment scaled", "poolbudget_edited": "PoolBudget edited",
                "poolbudget_edited_kubectl": "PoolBudget edited (kubectl)"}  # fmt: skip
NOOP_ROWS = {"reconciles": "reconciles", "api_writes": "API writes",
             "new_db_connections": "new DB connections"}  # fmt: skip
SCALE_ROWS = {"every_budget_reconciled_s": "every budget reconciled, s",
              "every_budget_ready_s": "every budget Ready, s", "writes_settled_s": "writes settled, s",
              "peak_rss_mib": "peak RSS (VmHWM), MiB", "steady_rss_mib": "steady RSS (VmRSS), MiB",
              "cpu_s": "CPU, s", "api_writes": "API writes"}  # fmt: skip


def comparison_rows(
    before: dict[str, Any], after: dict[str, Any]
) -> list[tuple[str, float | None, float | None]]:
    """(label, before, after) for every figure the two runs share a part for."""

    def pick(figures: dict[str, Any], *keys: str) -> float | None:
        value: Any = figures
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value)

    rows: list[tuple[str, float | None, float | None]] = []
    if "operator" in before and "operator" in after:
        for key, label in LATENCY_ROWS.items():
            for q in ("p50", "p95", "p99"):
                path = ("operator", key, f"{q}_ms")
                rows.append((f"latency: {label}, {q} ms", pick(before, *path), pick(after, *path)))
    if "noop" in before and "noop" in after:
        for key, label in NOOP_ROWS.items():
            rows.append((f"no-op: {label}", pick(before, "noop", key), pick(after, "noop", key)))
    if "scale" in before and "scale" in after:
        for phase, name in (("cold_start", "cold start"), ("after_restart", "restart")):
            for key, label in SCALE_ROWS.items():
                path = ("scale", phase, key)
                rows.append((f"{name}: {label}", pick(before, *path), pick(after, *path)))
            kinds = sorted({*before["scale"][phase].get("api_writes_by_kind", {}),
                            *after["scale"][phase].get("api_writes_by_kind", {})})  # fmt: skip
            for kind in kinds:
                by_kind = ("scale", phase, "api_writes_by_kind", kind)
                rows.append((f"{name}: API writes, {kind}", pick(before, *by_kind) or 0.0,
                             pick(after, *by_kind) or 0.0))  # fmt: skip
    return rows


def print_comparison(results: dict[str, Any]) -> None:
    before = results["baseline"]
    commit, head = before["commit"], results["head"]
    packages = ", ".join(f"{k} {v}" for k, v in sorted(commit["packages"].items()))
    dirty = " plus uncommitted changes" if head["uncommitted_changes"] else ""
    print(f"\nbefore/after, one run, one cluster, one operator process at a time:\n"
          f"  before = {commit['ref']} ({commit['sha'][:7]}; {packages}), ran first in each part\n"
          f"  after  = HEAD ({head['sha'][:7]}{dirty}), this checkout's interpreter")  # fmt: skip
    if "scale" in before and "scale" in results:
        print(f"  scale: {results['scale']['budgets']} budgets over {results['scale']['deployments']} "
              f"Deployments for each; the before namespaces took {before['scale'].get('namespaces_deleted_s', '?')} s "
              f"to be deleted before the after part began")  # fmt: skip
    left, right = f"before ({commit['ref']})", "after (HEAD)"
    print(f"  {'':44} {left:>18} {right:>14} {'after/before':>13}")

    def shown(value: float | None, counted: bool) -> str:
        return "-" if value is None else f"{value:.0f}" if counted else f"{value:.1f}"

    for label, old, new in comparison_rows(before, results):
        if old is None and new is None:
            continue
        counted = label.startswith("no-op") or "API writes" in label
        ratio = f"{new / old:.2f}x" if old and new is not None else "=" if old == new == 0 else "-"
        print(f"  {label:44} {shown(old, counted):>18} {shown(new, counted):>14} {ratio:>13}")


if __name__ == "__main__":
    sys.exit(main())
