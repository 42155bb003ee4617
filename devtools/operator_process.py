"""`poolbudget run` as a child process, for the e2e tests and the demo.

The operator runs exactly as users run it, with its metrics and health endpoints on free
loopback ports and its log captured to a file; `metrics()` parses its /metrics endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from devtools.localcluster import _die_with_parent, free_port

T = TypeVar("T")


def wait_for(
    probe: Callable[[], T | None], *, timeout: float = 60.0, interval: float = 0.2, what: str = ""
) -> T:
    """Poll until `probe` returns something truthy; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout:.0f}s waiting for {what or probe}; last: {last!r}"
    )


@dataclass
class OperatorProcess:
    """`poolbudget run` as a child process, with its log captured to a file."""

    kubeconfig: Path
    log_path: Path
    metrics_port: int = field(default_factory=free_port)
    health_port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    # The interpreter that runs `poolbudget.cli`: this checkout's by default; the bench's
    # --baseline passes the python of a virtualenv holding an older commit, with
    # `python_args=("-I",)` so neither PYTHONPATH nor the working directory can put this
    # checkout's package in front of that one.
    python: str = sys.executable
    python_args: tuple[str, ...] = ()
    # Killed if the process that started it dies (a crashed test or bench leaves no orphan);
    # `make demo DEMO_ARGS=--keep` turns this off.
    die_with_parent: bool = True
    _process: subprocess.Popen[bytes] | None = None

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self, *, wait_healthy: bool = True) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig)}
        with self.log_path.open("ab") as log:  # the child keeps its own copy of the descriptor
            self._process = subprocess.Popen(
                [
                    self.python, *self.python_args, "-m", "poolbudget.cli", "run",
                    "--metrics-port", str(self.metrics_port),
                    "--health-port", str(self.health_port),
                    "--bind-address", "127.0.0.1",
                    *self.extra_args,
                ],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )  # fmt: skip
        if wait_healthy:
            wait_for(self._healthy, timeout=60, what="the operator's health endpoint")

    def _healthy(self) -> bool:
        if self._process is not None and self._process.poll() is not None:
            raise AssertionError(f"operator exited {self._process.returncode}:\n{self.log()}")
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.health_port}/healthz", timeout=2
            ) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    def health(self) -> dict[str, Any]:
        """/healthz as JSON: {"budgets": n, "informers": {name: count or state}}."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.health_port}/healthz", timeout=5
        ) as response:
            result: dict[str, Any] = json.loads(response.read())
        return result

    @property
    def pid(self) -> int:
        assert self._process is not None, "not started"
        return self._process.pid

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGTERM)
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
                self._process.wait(timeout=10)
        self._process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL, as the OOM killer or a node failure would: no cleanup, no Lease release."""
        if self._process is not None and self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait(timeout=10)
        self._process = None

    def pause(self) -> None:
        """SIGSTOP, as a frozen process or a long GC pause would: its connections stay
        open, nothing reads them. `resume` continues it."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self.running:  # a no-op otherwise, for `finally` blocks
            os.kill(self.pid, signal.SIGCONT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Prometheus text format -> {'name{labels}': value} (comments dropped)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:  # noqa: S310
            text = response.read().decode()
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values

    def api_writes_by_kind(self) -> dict[str, float]:
        """Writes sent so far per kind (configmap, deployment, status, event)."""
        kinds: dict[str, float] = {}
        for key, value in self.metrics().items():
            if key.startswith("poolbudget_api_writes_total") and 'kind="' in key:
                kind = key.split('kind="', 1)[1].split('"', 1)[0]
                kinds[kind] = kinds.get(kind, 0.0) + value
        return kinds

    def api_writes(self, namespace: str | None = None) -> float:
        """Writes sent so far, all of them or only those into one namespace."""
        label = f'namespace="{namespace}"'
        return sum(
            v
            for k, v in self.metrics().items()
            if k.startswith("poolbudget_api_writes_total") and (namespace is None or label in k)
        )
