"""`make demo`: the main job end to end on local defaults, narrated.

PostgreSQL (max_connections 100) + the local cluster (control plane and a node that runs
pods) + the operator, then a shop namespace with three Deployments of the sample
application (images/sampleapp: uvicorn workers, one SQLAlchemy pool each, configured from
the operator's ConfigMap), an HPA, Secrets and a PoolBudget. Every worker keeps its whole
pool busy, so PostgreSQL's pg_stat_activity shows what the fleet really holds. The demo
shows the plan, the ConfigMaps and rollouts, a scale-up that re-budgets with paced
restarts (old and new pods side by side), an HPA-covered scale-up that restarts nothing,
and, sampled twice a second all along, the live connections of each Deployment against
`usable`; the picture goes to out/demo-connections.png.

    python -m devtools.demo [--keep] [--plot PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import yaml

from devtools import apps
from devtools.images import Builder as ImageBuilder
from devtools.localcluster import LocalCluster, find_binaries
from devtools.node import POD_NETWORK, node_ip
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from devtools.plots import plot_connections

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "shop"
# name -> (replicas, processes per pod, HPA max or None)
FLEET = {"api": (2, 2, None), "worker": (1, 2, None), "web": (2, 1, 4)}


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def detail(message: str) -> None:
    print(f"    {message}", flush=True)


class Demo:
    def __init__(self, cluster: LocalCluster, sampler: apps.TimelineSampler) -> None:
        self.cluster = cluster
        self.sampler = sampler

    def kubectl(self, *args: str, input: str | None = None) -> str:
        return self.cluster.kubectl("-n", NAMESPACE, *args, input=input).stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def status(self) -> dict[str, Any]:
        return dict(self.get("poolbudget", "shop-db").get("status") or {})

    def ready(self) -> bool:
        return any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in self.status().get("conditions") or []
        )

    def replicasets(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self.get("replicasets")["items"]:
            app = item["metadata"]["labels"]["app"]
            counts[app] = counts.get(app, 0) + 1
        return counts

    def allocations_table(self) -> None:
        status = self.status()
        live = self.sampler.timeline.latest()
        detail(
            f"{'TARGET':8} {'PODS':>4} {'WORKERS':>7} {'POOL':>4} {'OVERFLOW':>8} {'PEAK':>5} {'LIVE':>5}  STATE"
        )
        for a in status.get("allocations") or []:
            detail(
                f"{a['deploymentName']:8} {a.get('podsWorstCase', '-'):>4} {a.get('workers', '-'):>7} "
                f"{a.get('poolSize', '-'):>4} {a.get('maxOverflow', '-'):>8} "
                f"{a.get('peakConnections', '-'):>5} {live.get(a['deploymentName'], '-'):>5}  "
                f"{a['state']}: {a.get('message', '')}"
            )
        detail("PEAK = the worst case the budget allows (pods x processes x (pool + overflow)); "
               "LIVE = connections in pg_stat_activity now")  # fmt: skip
        detail(
            f"peak {status.get('peakConnections')} of {status.get('usableConnections')} usable "
            f"(headroom {status.get('headroom')}), verdict {status.get('verdict')}"
        )

    def pods(self) -> dict[str, int]:
        """Pods per Deployment that are not terminating (old and new side by side)."""
        counts = dict.fromkeys(FLEET, 0)
        for pod in self.get("pods")["items"]:
            if pod["metadata"].get("deletionTimestamp") is None:
                app = pod["metadata"]["labels"].get("app", "")
                counts[app] = counts.get(app, 0) + 1
        return counts

    def watch_rollout(self, seconds: float = 180) -> None:
        """Print each change of the targets' states, pods and live connections until the
        budget is Ready again."""
        deadline = time.monotonic() + seconds
        last = ""
        usable = self.status().get("usableConnections")
        while time.monotonic() < deadline:
            status = self.status()
            states = ", ".join(
                f"{a['deploymentName']}={a['state']}" for a in status.get("allocations") or []
            )
            pods = self.pods()
            line = f"{states}; pods {pods}"
            if line != last:
                live = self.sampler.timeline.latest()
                detail(f"[{time.strftime('%H:%M:%S')}] {line}; live connections "
                       f"{sum(live.values())} of {usable} usable")  # fmt: skip
                last = line
            if self.ready() and "Rolling" not in states and "Pending" not in states:
                return
            time.sleep(0.3)
        raise SystemExit("the budget did not become Ready in time; see the operator log")


def manifests(monitor_dsn: str, app_dsn: str, image: str) -> str:
    documents: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db-monitor"},
         "stringData": {"dsn": monitor_dsn}},
        apps.app_secret("shop-db-app", app_dsn),
    ]  # fmt: skip
    for name, (replicas, processes, hpa_max) in FLEET.items():
        documents.append(apps.sampleapp_deployment(
            name, image=image, replicas=replicas, processes=processes,
            database_secret="shop-db-app", load="full",
        ))  # fmt: skip
        if hpa_max:
            documents.append({
                "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                "metadata": {"name": name},
                "spec": {
                    "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                    "minReplicas": replicas, "maxReplicas": hpa_max,
                    "metrics": [{"type": "Resource", "resource": {
                        "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}],
                },
            })  # fmt: skip
    documents.append(budget_document())
    return "---\n".join(yaml.safe_dump(d, sort_keys=False) for d in documents)


def budget_document() -> dict[str, Any]:
    return {
        "apiVersion": "poolbudget.dev/v1alpha1",
        "kind": "PoolBudget",
        "metadata": {"name": "shop-db"},
        "spec": {
            "database": {"connectionSecretRef": {"name": "shop-db-monitor", "key": "dsn"},
                         "refreshSeconds": 30},
            "reservedConnections": 10,
            "defaults": {"maxOverflow": 2},
            "targets": [
                {"deploymentName": name, "processesPerPod": processes, "weight": 2 if name == "api" else 1}
                for name, (_, processes, _) in FLEET.items()
            ],
            "rollout": {"strategy": "RollingRestart", "maxConcurrent": 1, "minIntervalSeconds": 0},
        },
    }  # fmt: skip


def run(keep: bool, plot_path: Path) -> None:
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="poolbudget-demo-"))
    state.chmod(0o755)  # PostgreSQL runs as the `postgres` OS user and must reach its dir
    say("Images: the sample application, built here from images/sampleapp/Dockerfile")
    image = ImageBuilder().sampleapp()
    detail(f"{image.ref} ({image.archive.stat().st_size / 2**20:.0f} MiB, cached by content)")

    host = node_ip()
    say(f"PostgreSQL 16 with max_connections = 100 (on 127.0.0.1 and, for the pods, {host})")
    database = PostgresServer(
        major=16, settings={"max_connections": "100"}, state_dir=state / "postgres",
        pod_access=(host, POD_NETWORK),
    )  # fmt: skip
    database.start()
    monitor_dsn = database.create_role("monitor", "demo-monitor-pw", database="shop")
    database.sql("GRANT pg_monitor TO monitor")  # the watch sees every session's state
    database.create_role("app", "demo-app-pw")  # connects to shop (PUBLIC may)
    app_dsn = database.pod_dsn("app", "demo-app-pw", "shop")
    detail(f"PostgreSQL {database.sql('SHOW server_version')} on port {database.port}")

    say("Local cluster: etcd, kube-apiserver, kube-controller-manager, kube-scheduler and a "
        "node (containerd + kubelet) with the image imported")  # fmt: skip
    # --keep: the cluster outlives this process (pids in cluster/pids.json for `down`).
    cluster = LocalCluster(
        state / "cluster", binaries=find_binaries(build=True), detach=keep, node=True,
        images=[image],
    )  # fmt: skip
    cluster.start()
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in cluster.startup_phases.items())
    detail(f"started in {cluster.startup_seconds:.1f} s ({phases})")
    detail(f"KUBECONFIG={cluster.kubeconfig}")
    sampler = apps.TimelineSampler(database, list(FLEET), interval=0.5)
    demo = Demo(cluster, sampler)
    operator = OperatorProcess(
        kubeconfig=cluster.kubeconfig, log_path=state / "operator.log", die_with_parent=not keep
    )
    try:
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.wait_established("poolbudgets.poolbudget.dev")
        cluster.kubectl("create", "namespace", NAMESPACE)
        sampler.__enter__()

        say("What `poolbudget plan` says for this fleet (no cluster needed)")
        plan_file = state / "budget.yaml"
        spec = budget_document()
        spec["spec"]["database"]["maxConnectionsOverride"] = 100
        plan_file.write_text(yaml.safe_dump(spec))
        replicas = [f"--replicas={n}={r}" for n, (r, _, _) in FLEET.items()]
        hpas = [f"--hpa-max={n}={h}" for n, (_, _, h) in FLEET.items() if h]
        plan = subprocess.run(
            [sys.executable, "-m", "poolbudget.cli", "plan", "-f", str(plan_file), *replicas, *hpas],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        print(textwrap.indent(plan.stdout, "    "))

        say("Start the operator, then create 3 Deployments, an HPA, two Secrets and a PoolBudget")
        operator.start()
        detail(f"operator running; metrics on {operator.metrics_url}; log {operator.log_path}")
        sampler.timeline.mark("applied")
        demo.kubectl("apply", "-f", "-", input=manifests(monitor_dsn, app_dsn, image.ref))
        detail("pods wait for their ConfigMap (envFrom); the operator writes it, then rolls")
        wait_for(demo.ready, timeout=180, what="the PoolBudget to be Ready")
        demo.watch_rollout()
        wait_for(lambda: all(
            demo.get("deployment", n)["status"].get("readyReplicas") == r
            for n, (r, _, _) in FLEET.items()), timeout=180, what="every pod Ready")  # fmt: skip
        time.sleep(2)  # a few samples with every pool busy
        sampler.timeline.mark("ready")
        demo.allocations_table()
        for name in FLEET:
            data = demo.get("configmap", f"{name}-db-pool")["data"]
            detail(f"ConfigMap {name}-db-pool: DB_POOL_SIZE={data['DB_POOL_SIZE']} "
                   f"DB_MAX_OVERFLOW={data['DB_MAX_OVERFLOW']}")  # fmt: skip
        detail(
            f"ReplicaSets per Deployment (2 = rolled once to pick up the settings): {demo.replicasets()}"
        )

        for name in FLEET:
            ip = apps.pod_ips(cluster.kubectl, NAMESPACE, name)[0]
            pool = apps.pool_of(ip)
            detail(f"one {name} pod ({ip}) built its engine with pool_size={pool['pool_size']} "
                   f"max_overflow={pool['max_overflow']}")  # fmt: skip

        say("Scale worker 1 -> 4: the budget is re-shared and the Deployments roll one at a time")
        before = demo.replicasets()
        sampler.timeline.mark("scale worker 1->4")
        demo.kubectl("scale", "deployment", "worker", "--replicas=4")
        wait_for(lambda: any(a["deploymentName"] == "worker" and a.get("podsWorstCase") == 5
                             for a in demo.status().get("allocations") or []),
                 timeout=60, what="the re-budget")  # fmt: skip
        demo.watch_rollout()
        wait_for(lambda: all(
            (d := demo.get("deployment", n)["status"]).get("readyReplicas") == d.get("replicas")
            and d.get("updatedReplicas") == d.get("replicas") for n in FLEET),
            timeout=180, what="every rollout finished")  # fmt: skip
        time.sleep(2)
        demo.allocations_table()
        after = demo.replicasets()
        detail(f"new ReplicaSets: { {k: after[k] - before.get(k, 0) for k in after} }")

        say("Scale web 2 -> 4, inside its HPA's maxReplicas 4: already budgeted, nothing restarts")
        before = demo.replicasets()
        writes = operator.api_writes()
        sampler.timeline.mark("scale web 2->4")
        demo.kubectl("scale", "deployment", "web", "--replicas=4")
        wait_for(lambda: demo.get("deployment", "web")["status"].get("readyReplicas") == 4,
                 timeout=60, what="web at 4 ready replicas")  # fmt: skip
        time.sleep(2)
        detail(f"ReplicaSets before {before}, after {demo.replicasets()}; "
               f"operator API writes during the scale: {operator.api_writes() - writes:.0f}")  # fmt: skip

        say("Events the operator posted on the PoolBudget")
        print(textwrap.indent(demo.kubectl("get", "events", "--sort-by=.lastTimestamp",
              "--field-selector=involvedObject.kind=PoolBudget",
              "-o", "custom-columns=TYPE:.type,REASON:.reason,MESSAGE:.message"), "    "))  # fmt: skip

        time.sleep(3)
        sampler.__exit__(None, None, None)
        status = demo.status()
        timeline = sampler.timeline
        say("Live connections, sampled from pg_stat_activity every 0.5 s through it all")
        for name in FLEET:
            detail(f"{name:8} peak {timeline.peak(name):>3} live connections")
        detail(f"all      peak {timeline.peak_total():>3} of {status['usableConnections']} usable "
               f"({len(timeline.samples)} samples); never over: "
               f"{timeline.peak_total() <= status['usableConnections']}")  # fmt: skip
        plot_connections(
            [("shop: live connections per Deployment (real pods)", timeline)],
            usable=status["usableConnections"],
            max_connections=status["database"]["maxConnections"], path=plot_path,
        )  # fmt: skip
        detail(f"picture: {plot_path}")

        say("What the operator itself saw at its last refresh (status.activity, DatabaseHealthy)")
        activity = status.get("activity") or {}
        for entry in status.get("allocations") or []:
            live = entry.get("liveConnections") or {}
            detail(f"{entry['deploymentName']:8} live {live.get('total', '-'):>3} of its "
                   f"{entry['peakConnections']:>3} (active {live.get('active', '-')}, "
                   f"idle {live.get('idle', '-')})")  # fmt: skip
        detail(f"in use {activity.get('connectionsInUse', '-')} of {status['usableConnections']} "
               f"usable, unbudgeted {activity.get('unbudgetedConnections', '-')}, "
               f"visibility {activity.get('visibility', '-')}")  # fmt: skip
        healthy = next((c for c in status.get("conditions") or []
                        if c["type"] == "DatabaseHealthy"), None)  # fmt: skip
        if healthy is not None:
            detail(f"DatabaseHealthy={healthy['status']} ({healthy['reason']}): "
                   f"{healthy['message']}")  # fmt: skip
        say(f"Done in {time.monotonic() - started:.0f} s: budgeted peak {status['peakConnections']} of "
            f"{status['usableConnections']} usable connections "
            f"(max_connections {status['database']['maxConnections']}), headroom {status['headroom']}")  # fmt: skip
        print(demo.kubectl("get", "pbud", "-o", "wide"))
        if keep:
            (state / "postgres" / "server.json").write_text(json.dumps(database.describe()))
            detail("left running (--keep). Look around:")
            detail(f"  export KUBECONFIG={cluster.kubeconfig}")
            detail(f"  {cluster.kubectl_path} -n {NAMESPACE} get pbud,deploy,rs,cm")
            detail(f"  {cluster.kubectl_path} -n {NAMESPACE} describe pbud shop-db")
            detail(f"  operator log: {operator.log_path}; PostgreSQL: {database.admin_dsn()}")
            detail(f"stop: pkill -f 'poolbudget.cli run'; "
                   f"python -m devtools.localcluster down --dir {state / 'cluster'}; "
                   f"python -m devtools.pgserver down --dir {state / 'postgres'}")  # fmt: skip
    finally:
        sampler.__exit__(None, None, None)
        if not keep:
            operator.stop()
            cluster.stop()
            database.stop()
            shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="poolbudget end-to-end demo")
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    parser.add_argument("--plot", type=Path, default=REPO / "out" / "demo-connections.png",
                        help="where the picture of connections over time goes (%(default)s)")  # fmt: skip
    args = parser.parse_args()
    run(args.keep, args.plot)


if __name__ == "__main__":
    main()
