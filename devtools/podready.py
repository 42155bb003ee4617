"""Stand in for the kubelet: mark every new pod Running and Ready.

Only the scale bench uses this: its 5,000 Deployments' pods cannot fit on the local node
(110 pods), so it runs the control plane without one (`LocalCluster(node=False)`) and
this loop writes the status a kubelet would write once containers are up. Everything
else (e2e tests, the demo, the fleet proof) runs real pods on the local node. The API
server, the ReplicaSet and Deployment controllers stay the real ones either way.

    python -m devtools.podready --kubeconfig PATH -n NAMESPACE [-n NAMESPACE ...]
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config


def _ready_status() -> dict[str, object]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    conditions = [
        {"type": kind, "status": "True", "lastTransitionTime": now}
        for kind in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
    ]
    return {"status": {"phase": "Running", "conditions": conditions, "startTime": now}}


def mark_ready(api: CoreV1Api, namespaces: list[str], stop: threading.Event) -> None:
    """Poll pods of the namespaces and mark each Pending one Ready, until `stop` is set.

    One thread, in a child process (PodReadier): the synchronous client blocks, and the
    caller is often an asyncio test that must not.
    """
    while not stop.wait(0.2):
        for namespace in namespaces:
            try:
                pods = api.list_namespaced_pod(namespace=namespace).items
            except ApiException:
                continue  # namespace being deleted or API hiccup: try again next round
            for pod in pods:
                metadata = pod.metadata
                if metadata is None or metadata.deletion_timestamp is not None:
                    continue
                if pod.status is not None and pod.status.phase == "Running":
                    continue
                try:
                    api.patch_namespaced_pod_status(
                        name=str(metadata.name),
                        namespace=namespace,
                        body=_ready_status(),
                        _content_type="application/merge-patch+json",
                    )
                except ApiException as exc:
                    if exc.status not in (404, 409, 422):
                        raise


class PodReadier:
    """Run the kubelet stand-in for some namespaces in a child process (context manager)."""

    def __init__(self, kubeconfig: str, namespaces: list[str]) -> None:
        self._argv = [sys.executable, "-m", "devtools.podready", "--kubeconfig", kubeconfig]
        for namespace in namespaces:
            self._argv += ["-n", namespace]
        self._process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> PodReadier:
        repo = Path(__file__).resolve().parents[1]
        self._process = subprocess.Popen(self._argv, cwd=repo)
        return self

    def __exit__(self, *_: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
            self._process = None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("-n", "--namespace", action="append", required=True)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # kubernetes.config is not annotated: the cast states what it returns.
    load = cast(Callable[..., ApiClient], new_client_from_config)
    client = load(config_file=args.kubeconfig, persist_config=False)
    try:
        mark_ready(CoreV1Api(client), args.namespace, stop)
    finally:
        cast(Callable[[], None], client.close)()


if __name__ == "__main__":
    main()
