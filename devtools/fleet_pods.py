"""The fleet proof on real pods: the operator sizes the pools, the pods burst, PostgreSQL
counts.

    python -m devtools.fleet_pods [--scale small|full] [--json out.json] [--plot out.png]

A PostgreSQL server (max_connections 40 or 100), the local cluster with a node, the
operator, and the sample application (images/sampleapp) as Deployments: every worker of
every pod builds its engine from the ConfigMap the operator wrote. Each Deployment runs at
its worst case (maxSurge 0, no HPA: the pods running are all the pods the budget allows),
so the burst fills the whole budget. At one common wall-clock time every worker runs
3 x (pool_size + max_overflow) concurrent ``SELECT pg_sleep(0.3)``, while
``pg_stat_activity`` is sampled every 50 ms. Then the same Deployments, in a namespace of
their own, with the classic pool_size=50, max_overflow=20 written by hand, burst on the
same server.

Exit 0 when the budgeted fleet had no 53300 and stayed within `usable` while the naive one
hit 53300; 1 otherwise. The process-per-worker variant without a cluster is
devtools/fleet.py (`make fleet`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devtools import apps
from devtools.fleet import (
    ADMIN_CONNECTIONS,
    BURST_FACTOR,
    NAIVE_MAX_OVERFLOW,
    NAIVE_POOL_SIZE,
    Proof,
    RunResult,
    report,
    sample_connections,
)
from devtools.images import Builder as ImageBuilder
from devtools.localcluster import LocalCluster, find_binaries
from devtools.node import POD_NETWORK
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer, quote_literal
from devtools.plots import plot_connections

REPO = Path(__file__).resolve().parents[1]
MONITOR_PASSWORD, APP_PASSWORD = "fleet-pods-monitor-pw", "fleet-pods-app-pw"
HOLD_SECONDS = 0.3
START_DELAY = 2.0  # seconds from the schedule to the burst: every pod has its schedule by then


@dataclass(frozen=True)
class PodScale:
    max_connections: int
    reserved_connections: int
    # name -> (replicas, processes per pod, weight)
    deployments: dict[str, tuple[int, int, int]]


SCALES: dict[str, PodScale] = {
    # 2 x 2 + 1 x 1 = 5 workers in 3 pods: the size `make test` runs.
    "small": PodScale(40, 5, {"api": (2, 2, 2), "worker": (1, 1, 1)}),
    # 4 x 3 + 3 x 2 + 1 x 2 = 20 workers in 8 pods.
    "full": PodScale(100, 5, {"api": (4, 3, 2), "worker": (3, 2, 1), "cron": (1, 2, 1)}),
}


def _namespace_manifests(
    scale: PodScale, image: str, app_url: str, configmaps: dict[str, dict[str, str]] | None
) -> list[dict[str, Any]]:
    """Secret + Deployments; with `configmaps`, hand-written ConfigMaps (the naive fleet)."""
    documents: list[dict[str, Any]] = [apps.app_secret("fleet-app", app_url)]
    for name, data in (configmaps or {}).items():
        documents.append({"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": f"{name}-db-pool"}, "data": data})  # fmt: skip
    for name, (replicas, processes, _) in scale.deployments.items():
        documents.append(apps.sampleapp_deployment(
            name, image=image, replicas=replicas, processes=processes,
            database_secret="fleet-app", max_surge=0,
        ))  # fmt: skip
    return documents


def _budget(scale: PodScale, monitor_dsn: str) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "fleet-monitor"},
         "stringData": {"dsn": monitor_dsn}},
        {"apiVersion": "poolbudget.dev/v1alpha1", "kind": "PoolBudget",
         "metadata": {"name": "fleet"},
         "spec": {
             "database": {"connectionSecretRef": {"name": "fleet-monitor", "key": "dsn"}},
             "reservedConnections": scale.reserved_connections,
             "defaults": {"maxOverflow": 2},
             "targets": [{"deploymentName": n, "processesPerPod": p, "weight": w}
                         for n, (_, p, w) in scale.deployments.items()],
             "rollout": {"maxConcurrent": len(scale.deployments), "minIntervalSeconds": 0},
         }},
    ]  # fmt: skip


class Fleet:
    """One namespace of the sample app on the cluster."""

    def __init__(self, cluster: LocalCluster, namespace: str, scale: PodScale) -> None:
        self.cluster, self.namespace, self.scale = cluster, namespace, scale

    def apply(self, documents: list[dict[str, Any]]) -> None:
        text = "---\n".join(yaml.safe_dump(d) for d in documents)
        self.cluster.kubectl("-n", self.namespace, "apply", "-f", "-", input=text)

    def get(self, *args: str) -> Any:
        return json.loads(
            self.cluster.kubectl("-n", self.namespace, "get", *args, "-o", "json").stdout
        )

    def all_rolled_out(self) -> bool:
        for name, (replicas, _, _) in self.scale.deployments.items():
            status = self.get("deployment", name)["status"]
            counts = (status.get(k) for k in ("replicas", "updatedReplicas", "readyReplicas"))
            if any(c != replicas for c in counts):
                return False
            # Every pod of the app, terminating ones too: an old pod keeps its pool's
            # connections until its process ends, and they would count in the burst's peak
            # (35 of 32 once in CI: the 3 old pods' idle readiness connections).
            pods = self.get("pods", "-l", f"app={name}")["items"]
            if len(pods) != replicas:
                return False
            if len(apps.pod_ips(self.cluster.kubectl, self.namespace, name)) != replicas:
                return False  # not all Ready yet
        return True

    def burst(
        self, label: str, server: PostgresServer, usable: int
    ) -> tuple[RunResult, apps.ConnectionTimeline]:
        ips = {
            n: apps.pod_ips(self.cluster.kubectl, self.namespace, n) for n in self.scale.deployments
        }
        configmaps = {
            n: self.get("configmap", f"{n}-db-pool")["data"] for n in self.scale.deployments
        }
        result = RunResult(
            label=label,
            processes=sum(r * p for r, p, _ in self.scale.deployments.values()),
            per_worker={n: f"{d['DB_POOL_SIZE']}+{d['DB_MAX_OVERFLOW']}" for n, d in configmaps.items()},
            usable=usable,
        )  # fmt: skip
        timeline = apps.ConnectionTimeline(list(self.scale.deployments))
        at = time.time() + START_DELAY
        every_ip = [ip for pod_ips in ips.values() for ip in pod_ips]
        apps.burst(every_ip, at=at, factor=BURST_FACTOR, hold=HOLD_SECONDS)
        timeline.mark(f"{label}: burst scheduled")
        outputs = asyncio.run(self._collect_while_sampling(server, result, timeline, ips))
        # Count the fleet's own connections (the operator's probe connection is a client
        # backend too, one of the reserved ones): the table's "+1" is the sampler.
        result.peak_server_connections = timeline.peak_total() + ADMIN_CONNECTIONS
        for output in outputs:
            result.add_worker(output)
        result.errors = dict(sorted(result.errors.items()))
        if len(outputs) != result.processes:
            result.worker_failures.append(f"{len(outputs)} of {result.processes} workers reported")
        return result, timeline

    async def _collect_while_sampling(
        self,
        server: PostgresServer,
        result: RunResult,
        timeline: apps.ConnectionTimeline,
        ips: dict[str, list[str]],
    ) -> list[dict[str, Any]]:
        stop = asyncio.Event()
        sampler = asyncio.create_task(
            sample_connections(server.admin_dsn(), result, stop, timeline)
        )
        try:
            outputs: list[dict[str, Any]] = []
            for name, pod_ips in ips.items():
                processes = self.scale.deployments[name][1]
                outputs += await asyncio.to_thread(
                    apps.burst_results, pod_ips, processes, timeout=120
                )
            return outputs
        finally:
            stop.set()
            await sampler


def run_pod_proof(
    scale_name: str = "small",
    *,
    cluster: LocalCluster | None = None,
    major: int = 16,
    progress: bool = False,
    plot: Path | None = None,
) -> Proof:
    """Both bursts on one server. Without `cluster`, a cluster with a node and an operator
    of its own are started (and stopped); with one, it must have a node and an operator
    running (the tests' session cluster)."""
    scale = SCALES[scale_name]

    def say(message: str) -> None:
        if progress:
            print(message, flush=True)

    image = ImageBuilder().sampleapp()
    with tempfile.TemporaryDirectory(prefix="poolbudget-fleet-pods-") as tmp:
        state = Path(tmp)
        own_cluster = cluster is None
        if cluster is None:
            say("starting the local cluster with a node ...")
            cluster = LocalCluster(state / "cluster", binaries=find_binaries(build=True),
                                   node=True, images=[image])  # fmt: skip
            cluster.start()
        else:
            cluster.import_image(image)
        operator = None
        try:
            if own_cluster:
                cluster.kubectl("apply", "-f", str(REPO / "crds"))
                cluster.wait_established("poolbudgets.poolbudget.dev")
                operator = OperatorProcess(
                    kubeconfig=cluster.kubeconfig, log_path=state / "operator.log"
                )
                operator.start()
            return _prove(cluster, scale, scale_name, image.ref, major, say, plot)
        finally:
            if operator is not None:
                operator.stop()
            if own_cluster:
                cluster.stop()


def _prove(
    cluster: LocalCluster, scale: PodScale, scale_name: str, image: str, major: int,
    say: Any, plot: Path | None,
) -> Proof:  # fmt: skip
    assert cluster.node_ip is not None
    settings = {"max_connections": str(scale.max_connections)}
    suffix = f"{int(time.time() * 1000) % 10**6}"
    budgeted_ns, naive_ns = f"fleet-budgeted-{suffix}", f"fleet-naive-{suffix}"
    with PostgresServer(major=major, settings=settings,
                        pod_access=(cluster.node_ip, POD_NETWORK)) as server:  # fmt: skip
        monitor_dsn = server.create_role("monitor", MONITOR_PASSWORD)
        server.create_role("app", APP_PASSWORD, database="shop")
        app_url = server.pod_dsn("app", APP_PASSWORD, "shop")
        for namespace in (budgeted_ns, naive_ns):
            cluster.kubectl("create", "namespace", namespace)
        try:
            budgeted = Fleet(cluster, budgeted_ns, scale)
            say(
                f"budgeted fleet: PoolBudget + {len(scale.deployments)} Deployments in {budgeted_ns}"
            )
            budgeted.apply(
                _namespace_manifests(scale, image, app_url, None) + _budget(scale, monitor_dsn)
            )
            wait_for(lambda: _ready(budgeted), timeout=180, what="PoolBudget fleet Ready")
            wait_for(budgeted.all_rolled_out, timeout=300, what="the budgeted pods Ready")
            status = budgeted.get("poolbudget", "fleet")["status"]
            usable = int(status["usableConnections"])
            for a in status["allocations"]:
                say(f"  {a['deploymentName']}: {a['podsWorstCase']} pods, {a['workers']} workers, "
                    f"pool {a['poolSize']} + overflow {a['maxOverflow']}")  # fmt: skip
            say(f"budgeted burst: every worker of every pod, {BURST_FACTOR}x its pool ...")
            budgeted_run, budgeted_timeline = budgeted.burst("budgeted", server, usable)

            for name in scale.deployments:
                cluster.kubectl("-n", budgeted_ns, "scale", "deployment", name, "--replicas=0")
            wait_for(lambda: not budgeted.get("pods")["items"], timeout=120,
                     what="the budgeted pods gone")  # fmt: skip
            _wait_for_their_backends(server, list(scale.deployments), say)

            naive = Fleet(cluster, naive_ns, scale)
            say(f"naive fleet ({NAIVE_POOL_SIZE}+{NAIVE_MAX_OVERFLOW} per worker) in {naive_ns}")
            naive_configmaps = {
                n: {**budgeted.get("configmap", f"{n}-db-pool")["data"],
                    "DB_POOL_SIZE": str(NAIVE_POOL_SIZE), "DB_MAX_OVERFLOW": str(NAIVE_MAX_OVERFLOW)}
                for n in scale.deployments
            }  # fmt: skip
            for data in naive_configmaps.values():
                data.pop("sqlalchemy.json", None)
            naive.apply(_namespace_manifests(scale, image, app_url, naive_configmaps))
            wait_for(naive.all_rolled_out, timeout=300, what="the naive pods Ready")
            say("naive burst ...")
            naive_run, naive_timeline = naive.burst("naive", server, usable)
        finally:
            for namespace in (budgeted_ns, naive_ns):
                cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
    if plot is not None:
        plot_connections(
            [("budgeted by the operator (real pods)", budgeted_timeline),
             (f"naive {NAIVE_POOL_SIZE}+{NAIVE_MAX_OVERFLOW} per worker", naive_timeline)],
            usable=usable, max_connections=scale.max_connections, path=plot,
        )  # fmt: skip
        say(f"picture: {plot}")
    return Proof(
        scale=f"pods-{scale_name}",
        max_connections=int(status["database"]["maxConnections"]),
        usable=usable,
        planned_peak=int(status["peakConnections"]),
        workers={a["deploymentName"]: int(a["workers"]) for a in status["allocations"]},
        budgeted=budgeted_run,
        naive=naive_run,
    )


def _wait_for_their_backends(server: PostgresServer, applications: list[str], say: Any) -> None:
    """Once the pods are gone their backends end too, normally at once. One CI run kept
    some for minutes after every pod had gone (no FIN reached the server): the server's
    TCP keepalives end those (pgserver.py). If any are still there after 30 s, show them
    and end them, so the naive burst starts from none."""
    names = ", ".join(quote_literal(a) for a in applications)
    where = "backend_type = 'client backend' AND application_name IN "
    where += f"({names})"  # quoted literals
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not sum(apps.live_connections(server, applications).values()):
            return
        time.sleep(0.5)
    show = "SELECT application_name, client_addr, state, backend_start, state_change "
    show += "FROM pg_stat_activity WHERE "
    rows = server.sql(show + where)
    print(f"backends left 30 s after their pods had gone:\n{rows}", flush=True)
    say(f"ending {len(rows.splitlines())} backends whose pods are gone")
    end = "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
    server.sql(end + where)
    wait_for(lambda: not sum(apps.live_connections(server, applications).values()),
             timeout=30, what="the budgeted pods' backends ended")  # fmt: skip


def _ready(fleet: Fleet) -> bool:
    conditions = fleet.get("poolbudget", "fleet").get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devtools.fleet_pods", description=__doc__)
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--major", type=int, choices=[15, 16], default=16)
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--plot", type=Path, default=REPO / "out" / "fleet-pods.png",
                        help="the picture of connections over time (%(default)s)")  # fmt: skip
    args = parser.parse_args(argv)
    return report(
        run_pod_proof(args.scale, major=args.major, progress=True, plot=args.plot), args.json
    )


if __name__ == "__main__":
    sys.exit(main())
