"""`make demo`: the main job end to end on local defaults, narrated.

PostgreSQL (max_connections 100) + the local control plane + the operator, then a shop
namespace with three Deployments (one with an HPA), a Secret and a PoolBudget. The demo
shows the plan, the ConfigMaps and rollouts, a scale-up that re-budgets with paced
restarts, an HPA-covered scale-up that restarts nothing, and the peak/usable figures.

    python -m devtools.demo [--keep]

A kubelet stand-in (devtools/podready.py) marks pods Ready, so rollouts really complete;
everything else is the real API server, controllers, PostgreSQL and operator.
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

from devtools.localcluster import LocalCluster, find_binaries
from devtools.operator_process import OperatorProcess, wait_for
from devtools.pgserver import PostgresServer
from devtools.podready import PodReadier

REPO = Path(__file__).resolve().parents[1]
NAMESPACE = "shop"
# name -> (replicas, processes per pod, HPA max or None)
FLEET = {"api": (2, 2, None), "worker": (1, 2, None), "web": (2, 1, 4)}


def say(message: str) -> None:
    print(f"\n==> {message}", flush=True)


def detail(message: str) -> None:
    print(f"    {message}", flush=True)


class Demo:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster

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
        detail(
            f"{'TARGET':8} {'PODS':>4} {'WORKERS':>7} {'POOL':>4} {'OVERFLOW':>8} {'PEAK':>5}  STATE"
        )
        for a in status.get("allocations") or []:
            detail(
                f"{a['deploymentName']:8} {a.get('podsWorstCase', '-'):>4} {a.get('workers', '-'):>7} "
                f"{a.get('poolSize', '-'):>4} {a.get('maxOverflow', '-'):>8} "
                f"{a.get('peakConnections', '-'):>5}  {a['state']}: {a.get('message', '')}"
            )
        detail(
            f"peak {status.get('peakConnections')} of {status.get('usableConnections')} usable "
            f"(headroom {status.get('headroom')}), verdict {status.get('verdict')}"
        )

    def watch_rollout(self, seconds: float = 90) -> None:
        """Print each change of the targets' states until the budget is Ready again."""
        deadline = time.monotonic() + seconds
        last = ""
        while time.monotonic() < deadline:
            status = self.status()
            states = ", ".join(
                f"{a['deploymentName']}={a['state']}" for a in status.get("allocations") or []
            )
            if states != last:
                detail(f"[{time.strftime('%H:%M:%S')}] {states}")
                last = states
            if self.ready() and "Rolling" not in states and "Pending" not in states:
                return
            time.sleep(0.3)
        raise SystemExit("the budget did not become Ready in time; see the operator log")


def manifests(dsn: str) -> str:
    documents: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "shop-db-monitor"},
         "stringData": {"dsn": dsn}},
    ]  # fmt: skip
    for name, (replicas, _, hpa_max) in FLEET.items():
        documents.append({
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{
                        "name": "app", "image": "example.invalid/shop:1",
                        "envFrom": [{"configMapRef": {"name": f"{name}-db-pool"}}],
                    }]},
                },
            },
        })  # fmt: skip
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


def run(keep: bool) -> None:
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="poolbudget-demo-"))
    state.chmod(0o755)  # PostgreSQL runs as the `postgres` OS user and must reach its dir
    say("PostgreSQL 16 with max_connections = 100")
    database = PostgresServer(
        major=16, settings={"max_connections": "100"}, state_dir=state / "postgres"
    )
    database.start()
    dsn = database.create_role("monitor", "demo-monitor-pw", database="shop")
    detail(f"PostgreSQL {database.sql('SHOW server_version')} on 127.0.0.1:{database.port}")

    say("Local control plane (etcd, kube-apiserver, kube-controller-manager)")
    # --keep: the control plane outlives this process (pids in cluster/pids.json for `down`).
    cluster = LocalCluster(state / "cluster", binaries=find_binaries(build=True), detach=keep)
    cluster.start()
    detail(f"started in {cluster.startup_seconds:.1f} s; KUBECONFIG={cluster.kubeconfig}")
    demo = Demo(cluster)
    operator = OperatorProcess(
        kubeconfig=cluster.kubeconfig, log_path=state / "operator.log", die_with_parent=not keep
    )
    readier = PodReadier(str(cluster.kubeconfig), [NAMESPACE])
    try:
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/poolbudgets.poolbudget.dev")
        cluster.kubectl("create", "namespace", NAMESPACE)
        readier.__enter__()

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

        say("Start the operator, then create 3 Deployments, an HPA, a Secret and a PoolBudget")
        operator.start()
        detail(f"operator running; metrics on {operator.metrics_url}; log {operator.log_path}")
        demo.kubectl("apply", "-f", "-", input=manifests(dsn))
        wait_for(demo.ready, timeout=120, what="the PoolBudget to be Ready")
        demo.allocations_table()
        for name in FLEET:
            data = demo.get("configmap", f"{name}-db-pool")["data"]
            detail(f"ConfigMap {name}-db-pool: DB_POOL_SIZE={data['DB_POOL_SIZE']} "
                   f"DB_MAX_OVERFLOW={data['DB_MAX_OVERFLOW']}")  # fmt: skip
        detail(
            f"ReplicaSets per Deployment (2 = rolled once to pick up the settings): {demo.replicasets()}"
        )

        say("Scale worker 1 -> 4: the budget is re-shared and the Deployments roll one at a time")
        before = demo.replicasets()
        demo.kubectl("scale", "deployment", "worker", "--replicas=4")
        wait_for(lambda: any(a["deploymentName"] == "worker" and a.get("podsWorstCase") == 5
                             for a in demo.status().get("allocations") or []),
                 timeout=60, what="the re-budget")  # fmt: skip
        demo.watch_rollout()
        demo.allocations_table()
        after = demo.replicasets()
        detail(f"new ReplicaSets: { {k: after[k] - before.get(k, 0) for k in after} }")

        say("Scale web 2 -> 4, inside its HPA's maxReplicas 4: already budgeted, nothing restarts")
        before = demo.replicasets()
        writes = operator.api_writes()
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

        status = demo.status()
        say(f"Done in {time.monotonic() - started:.0f} s: peak {status['peakConnections']} of "
            f"{status['usableConnections']} usable connections "
            f"(max_connections {status['database']['maxConnections']}), headroom {status['headroom']}")  # fmt: skip
        print(demo.kubectl("get", "pbud", "-o", "wide"))
        if keep:
            (state / "postgres" / "server.json").write_text(json.dumps(database.describe()))
            subprocess.Popen(  # the kubelet stand-in, detached, so new pods keep getting Ready
                [sys.executable, "-m", "devtools.podready", "--kubeconfig", str(cluster.kubeconfig),
                 "-n", NAMESPACE], start_new_session=True, cwd=REPO,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            detail("left running (--keep). Look around:")
            detail(f"  export KUBECONFIG={cluster.kubeconfig}")
            detail(f"  {cluster.kubectl_path} -n {NAMESPACE} get pbud,deploy,rs,cm")
            detail(f"  {cluster.kubectl_path} -n {NAMESPACE} describe pbud shop-db")
            detail(f"  operator log: {operator.log_path}; PostgreSQL: {database.admin_dsn()}")
            detail(f"stop: pkill -f 'poolbudget.cli run'; pkill -f devtools.podready; "
                   f"python -m devtools.localcluster down --dir {state / 'cluster'}; "
                   f"python -m devtools.pgserver down --dir {state / 'postgres'}")  # fmt: skip
    finally:
        readier.__exit__(None, None, None)
        if not keep:
            operator.stop()
            cluster.stop()
            database.stop()
            shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="poolbudget end-to-end demo")
    parser.add_argument("--keep", action="store_true", help="leave everything running")
    run(parser.parse_args().keep)


if __name__ == "__main__":
    main()
