"""Stand in for the kubelet: mark every new pod Running and Ready.

The local control plane has no scheduler and no kubelet, so pods stay Pending and a
Deployment rollout never completes. Rollout pacing (maxConcurrent, shrink-first) depends
on rollouts completing, so e2e tests and the demo run this loop: it watches pods in the
given namespaces and writes the status a kubelet would write once containers are up. The
API server, the ReplicaSet and Deployment controllers stay the real ones.

    python -m devtools.podready --kubeconfig PATH -n NAMESPACE [-n NAMESPACE ...]
"""

from __future__ import annotations

import argparse
import threading
from datetime import UTC, datetime

from lightkube import ApiError, Client, KubeConfig
from lightkube.resources.core_v1 import Pod
from lightkube.types import PatchType


def _ready_status() -> dict[str, object]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [
        {"type": kind, "status": "True", "lastTransitionTime": now}
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    return {"status": {"phase": "Running", "conditions": conditions, "startTime": now}}


def mark_ready(client: Client, namespace: str, stop: threading.Event) -> None:
    """Poll pods of one namespace and mark each Pending one Ready, until `stop` is set.

    Polling (every 0.2 s) rather than watching keeps this trivially stoppable; a pod
    waits at most that long for its "kubelet".
    """
    while not stop.wait(0.2):
        try:
            pods = list(client.list(Pod, namespace=namespace))
        except ApiError:
            continue  # namespace being deleted or API hiccup: try again next round
        for pod in pods:
            metadata = pod.metadata
            if metadata is None or metadata.deletionTimestamp is not None:
                continue
            if pod.status is not None and pod.status.phase == "Running":
                continue
            try:
                client.patch(
                    Pod.Status,
                    str(metadata.name),
                    _ready_status(),
                    namespace=namespace,
                    patch_type=PatchType.MERGE,
                )
            except ApiError as exc:
                if exc.status.code not in (404, 409, 422):
                    raise


class PodReadier:
    """Run `mark_ready` for some namespaces in daemon threads (context manager)."""

    def __init__(self, kubeconfig: str, namespaces: list[str]) -> None:
        self._client = Client(config=KubeConfig.from_file(kubeconfig))
        self._namespaces = namespaces
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> PodReadier:
        for namespace in self._namespaces:
            thread = threading.Thread(
                target=mark_ready, args=(self._client, namespace, self._stop), daemon=True
            )
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("-n", "--namespace", action="append", required=True)
    args = parser.parse_args()
    with PodReadier(args.kubeconfig, args.namespace):
        threading.Event().wait()


if __name__ == "__main__":
    main()
