"""API-server outages with the operator running through them.

Two replicas: someone must be leading and acting within seconds of the API server's return.
Before, the standby crashed at its first failed Lease read (connection refused) and the
leader exited after 15 s without renewing, so after a 30 s outage no operator was left.
Now the standby waits the outage out and takes the expired Lease when the API is back.

One operator, Deployments scaled just before the API server is killed and again just
after it is back: no change may be lost, whichever moment the kill hits."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster, wait_for
from devtools.operator_process import OperatorProcess
from tests.chaos.conftest import OUTAGE_SECONDS, TRIALS, unreflected
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]


def outage_then_scale(cluster: LocalCluster, ns: Cluster) -> float:
    """Kill kube-apiserver for OUTAGE_SECONDS, start it again, scale `api` 1 -> 3: the
    seconds from the API server being ready to the budget showing the scale-up."""
    cluster.kill_component("kube-apiserver")
    time.sleep(OUTAGE_SECONDS)
    cluster.revive_component("kube-apiserver")
    back = time.monotonic()
    ns.kubectl("scale", "deployment", "api", "--replicas=3")
    wait_for(
        lambda: (ns.allocation("shop", "api") or {}).get("podsWorstCase") == 4,
        timeout=60, what="an operator to re-budget the scale-up after the outage",
    )  # fmt: skip
    return time.monotonic() - back


def test_after_an_api_outage_a_replica_leads_and_acts_within_seconds(
    own_cluster: LocalCluster, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    ns = Cluster(own_cluster, "default")
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api"}], rollout={"strategy": "None"}))
    args = ["--leader-election-namespace", "default"]
    replicas = [
        OperatorProcess(
            kubeconfig=own_cluster.kubeconfig, log_path=tmp_path / f"{n}.log", extra_args=args
        )
        for n in ("first", "second")
    ]
    try:
        for replica in replicas:
            replica.start()
        wait_for(lambda: ns.configmap("api-db-pool"), timeout=60, what="the leader to act")

        recovery = outage_then_scale(own_cluster, ns)
        alive = [r for r in replicas if r.running]
        chaos_report.update(outage_seconds=OUTAGE_SECONDS, applied_after_api_ready_seconds=
                            round(recovery, 2), replicas_running=len(alive))  # fmt: skip
        print(f"\napi outage {OUTAGE_SECONDS} s: change applied {recovery:.1f} s after the "
              f"API server was ready; replicas still running: {len(alive)} of 2")  # fmt: skip
        assert alive, "no operator process survived the outage"
        assert recovery < 5, f"{recovery:.1f} s to act after the API server came back"
        logs = "".join(r.log() for r in replicas)
        assert "cannot reach the Lease" in logs  # the standby waited it out
    finally:
        for replica in replicas:
            replica.stop()


def test_after_an_api_outage_a_single_operator_acts_within_seconds(
    own_cluster: LocalCluster, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    """No leader election: the same process lives through the outage. Its watches and
    retries back off while the API server is down; that backoff must be short enough
    that it acts within seconds of the return (after a minute's outage it took 11-16 s)."""
    ns = Cluster(own_cluster, "default")
    ns.apply(deployment("api", 1))
    ns.apply(budget("shop", [{"deploymentName": "api"}], rollout={"strategy": "None"}))
    operator = OperatorProcess(kubeconfig=own_cluster.kubeconfig, log_path=tmp_path / "op.log")
    try:
        operator.start()
        wait_for(lambda: ns.configmap("api-db-pool"), timeout=60, what="the operator to act")
        recovery = outage_then_scale(own_cluster, ns)
        chaos_report.update(outage_seconds=OUTAGE_SECONDS,
                            applied_after_api_ready_seconds=round(recovery, 2))  # fmt: skip
        print(f"\napi outage {OUTAGE_SECONDS:.0f} s, one operator: change applied "
              f"{recovery:.1f} s after the API server was ready")  # fmt: skip
        assert operator.running
        assert recovery < 5, f"{recovery:.1f} s to act after the API server came back"
    finally:
        operator.stop()


def scale(ns: Cluster, rng: random.Random, replicas: dict[str, int], names: list[str]) -> None:
    """Scale each of `names` to a new random replica count (recorded in `replicas`)."""
    for name in names:
        replicas[name] = rng.choice([n for n in range(1, 9) if n != replicas[name]])
        ns.kubectl("scale", "deployment", name, f"--replicas={replicas[name]}")


def until_applied(
    ns: Cluster, replicas: dict[str, int], *, since: float, timeout: float
) -> tuple[float, list[str]]:
    """Poll until the budget shows every replica count: the seconds from `since` until it
    did, and the Deployments it still did not show `timeout` seconds on (lost updates)."""
    while (left := unreflected(ns, "shop", replicas)) and time.monotonic() - since < timeout:
        time.sleep(0.1)
    return time.monotonic() - since, left


def test_api_server_killed_while_deployments_scale_no_update_is_lost(
    own_cluster: LocalCluster, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    """Four Deployments are scaled, kube-apiserver is SIGKILLed 0-0.5 s later (the
    operator may be reading the changes or writing its own), kept down for 1-3 s or, in
    the last trial, OUTAGE_SECONDS, and two of them are scaled again once it is back.
    Every last count must be budgeted, within 5 s of the API server being ready."""
    ns = Cluster(own_cluster, "default")
    names = ["api", "web", "worker", "cron"]
    replicas = dict.fromkeys(names, 1)
    for name in names:
        ns.apply(deployment(name, 1))
    ns.apply(budget("shop", [{"deploymentName": n} for n in names], rollout={"strategy": "None"}))
    operator = OperatorProcess(kubeconfig=own_cluster.kubeconfig, log_path=tmp_path / "op.log")
    rng = random.Random(20261204)
    outages: list[float] = []
    kills: list[float] = []
    recoveries: list[float] = []
    lost: list[str] = []
    try:
        operator.start()
        wait_for(lambda: not unreflected(ns, "shop", replicas), timeout=60,
                 what="the operator to budget the four Deployments")  # fmt: skip
        for trial in range(1, TRIALS + 1):
            down_for = OUTAGE_SECONDS if trial == TRIALS else rng.uniform(1.0, 3.0)
            scale(ns, rng, replicas, names)
            kill_after = rng.uniform(0.0, 0.5)
            time.sleep(kill_after)  # the moment of the fault, not a wait for a condition
            own_cluster.kill_component("kube-apiserver")
            killed = time.monotonic()
            time.sleep(down_for)  # the outage itself
            own_cluster.revive_component("kube-apiserver")  # returns once /readyz is ok
            back = time.monotonic()
            scale(ns, rng, replicas, rng.sample(names, 2))  # changes landing just after
            seconds, left = until_applied(ns, replicas, since=back, timeout=60)
            outages.append(round(back - killed, 1))
            kills.append(round(kill_after, 3))
            recoveries.append(round(seconds, 2))
            lost += [f"trial {trial}: {name} (replicas {replicas[name]})" for name in left]
            print(f"\ntrial {trial}: killed {kill_after:.2f} s after the scale, API back after "
                  f"{back - killed:.1f} s; all applied {seconds:.1f} s after it was ready"
                  + (f"; never applied: {left}" if left else ""))  # fmt: skip
        running = operator.running
    finally:
        operator.stop()
        chaos_report.update(trials=TRIALS, outage_seconds=outages, kill_after_seconds=kills,
                            applied_after_api_ready_seconds=recoveries, lost_updates=len(lost))  # fmt: skip
    assert running, "the operator exited during the outages"
    assert not lost, f"updates never applied (60 s after the API server was back): {lost}"
    assert max(recoveries) < 5, f"seconds to apply after the API server was ready: {recoveries}"
