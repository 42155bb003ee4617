"""Watches expired: the operator frozen (SIGSTOP) while etcd is compacted and kube-apiserver
closes every watch; Deployments are scaled, deleted and created before it runs again. Its
watches resume from a resourceVersion that no longer exists (410 Gone) and it must relist,
missing nothing.

How the 410 is made. etcd is compacted at its current revision and restarted: kube-apiserver's
own etcd watches reconnect from revisions now compacted, so each of its watch caches starts
over and ends every client watch cleanly; the operator's next watch, from its last
resourceVersion, gets 410. Two ways that looked likely give no 410 (tried here): SIGKILLing
kube-apiserver breaks the operator's streams mid-response (RemoteProtocolError: it relists
after 1 s, never asking for the old version), and compaction alone leaves its streams open,
delivering every change once it runs again."""

from __future__ import annotations

import contextlib
import random
import re
import time
from pathlib import Path
from typing import Any

import pytest

from devtools.localcluster import LocalCluster, wait_for
from devtools.operator_process import OperatorProcess
from tests.chaos.conftest import TRIALS, unreflected
from tests.e2e.support import Cluster, budget, deployment

pytestmark = [pytest.mark.cluster, pytest.mark.chaos]

# What the informer logs on a 410 from its watch, naming the kind.
EXPIRED = re.compile(r"\] (\w+) watch \([^)]*\): resourceVersion expired, relisting")


def deployment_watches_closed(cluster: LocalCluster) -> int:
    """How often kube-apiserver's Deployment watch cache has started over with a watch
    open, closing every client's watch of Deployments (its log says so)."""
    log = (cluster.log_dir / "kube-apiserver.log").read_text(errors="replace")
    return log.count("Terminating all watchers from cacher deployments.apps")


def expire_watches(cluster: LocalCluster, ns: Cluster, *, attempts: int = 3) -> tuple[int, int]:
    """Compact etcd at its current revision, SIGKILL it and start it again, until
    kube-apiserver's Deployment watch cache starts over and closes the watches open on it.

    It does when its own etcd watch resumes from a compacted revision: the revision after
    the last Deployment event it saw. Two other writes just before the compaction put the
    compaction past that. Once, after a minute of polling reads and no such writes, the
    Deployment cache did not start over (etcd's progress notifications move that revision
    on, most likely): if it happens anyway, another try. The revision compacted at last,
    and how many restarts it took."""
    closed = deployment_watches_closed(cluster)
    for attempt in range(1, attempts + 1):
        ns.kubectl("create", "configmap", "compaction-filler")
        ns.kubectl("delete", "configmap", "compaction-filler")
        revision = cluster.compact_etcd()
        cluster.kill_component("etcd")
        cluster.revive_component("etcd")
        wait_for(lambda: cluster.kubectl("get", "--raw", "/readyz", check=False).returncode == 0,
                 timeout=60, what="kube-apiserver ready with etcd back")  # fmt: skip
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: deployment_watches_closed(cluster) > closed, timeout=10,
                     what="kube-apiserver to close the Deployment watches")  # fmt: skip
            return revision, attempt
    raise AssertionError(f"{attempts} etcd restarts and the Deployment watches stay open")


def test_watches_expired_while_frozen_no_change_is_missed(
    own_cluster: LocalCluster, tmp_path: Path, chaos_report: dict[str, Any]
) -> None:
    """Each trial, while the operator is stopped and after its watches have expired: three
    Deployments scaled, one deleted, one that the budget targets created. Nothing writes to
    them after that (kube-controller-manager is stopped), so only a relist can show them.
    Within 5 s of SIGCONT the budget must show all of it (the deleted one Missing, budgeted
    as one pod), and the operator's log must say its Deployment watch expired (410)."""
    ns = Cluster(own_cluster, "default")
    names = ["api", "web", "worker", "cron", "report"]
    replicas = dict.fromkeys(names[:4], 1)  # the Deployments that exist; `report` does not
    for name in replicas:
        ns.apply(deployment(name, 1))
    ns.apply(budget("shop", [{"deploymentName": n} for n in names], rollout={"strategy": "None"}))
    operator = OperatorProcess(kubeconfig=own_cluster.kubeconfig, log_path=tmp_path / "op.log")
    rng = random.Random(20261205)
    revisions: list[int] = []
    etcd_restarts: list[int] = []
    seconds: list[float] = []
    expired: list[list[str]] = []
    missed: list[str] = []
    try:
        operator.start()
        wait_for(lambda: not unreflected(ns, "shop", replicas, missing=["report"]), timeout=60,
                 what="the operator to budget four Deployments and one Missing")  # fmt: skip
        # The Deployment controller's status writes after each change would reach the
        # operator through its new watch and hide a relist that keeps stale objects (such a
        # relist, tried here, passed that way). Without it only the relist can show them.
        own_cluster.kill_component("kube-controller-manager")
        for trial in range(1, TRIALS + 1):
            logged = len(operator.log())
            operator.pause()
            try:
                revision, restarts = expire_watches(own_cluster, ns)
                revisions.append(revision)
                etcd_restarts.append(restarts)
                gone = rng.choice(sorted(replicas))
                created = next(n for n in names if n not in replicas)
                del replicas[gone]
                for name in replicas:
                    replicas[name] = rng.choice([n for n in range(1, 9) if n != replicas[name]])
                    ns.kubectl("scale", "deployment", name, f"--replicas={replicas[name]}")
                ns.kubectl("delete", "deployment", gone)
                replicas[created] = rng.randint(1, 8)
                ns.apply(deployment(created, replicas[created]))
            finally:
                operator.resume()
            resumed = time.monotonic()
            while (left := unreflected(ns, "shop", replicas, missing=[gone])) and (
                time.monotonic() - resumed < 60
            ):
                time.sleep(0.1)
            seconds.append(round(time.monotonic() - resumed, 2))
            missed += [f"trial {trial}: {name}" for name in left]
            expired.append(sorted(EXPIRED.findall(operator.log()[logged:])))
            print(f"\ntrial {trial}: etcd compacted at {revisions[-1]} (restarts: {restarts}); {gone} deleted, "
                  f"{created} created, the rest scaled; shown {seconds[-1]:.1f} s after SIGCONT; "
                  f"watches expired: {expired[-1]}" + (f"; never shown: {left}" if left else ""))  # fmt: skip
        running = operator.running
    finally:
        operator.resume()  # never leave it stopped: stop() would wait out SIGTERM
        operator.stop()
        chaos_report.update(trials=TRIALS, compacted_revisions=revisions, etcd_restarts=etcd_restarts,
                            applied_after_resume_seconds=seconds, expired_watches=expired,
                            changes_missed=len(missed))  # fmt: skip
    assert running, "the operator exited"
    assert not missed, f"changes made while it was stopped never shown (60 s): {missed}"
    assert all("Deployment" in kinds for kinds in expired), f"410s logged per trial: {expired}"
    assert max(seconds) < 5, f"seconds from SIGCONT to every change shown: {seconds}"
