"""The kubelet's probes: /healthz (liveness) and /readyz (readiness), as JSON.

* /healthz is answered on the operator's event loop: a wedged loop (a blocking call, a
  deadlock) does not answer, and the kubelet restarts the container. It also fails (500)
  when the report says so, e.g. an informer task has ended and the operator went blind.
* /readyz fails (503) until every informer has listed, and while one cannot list (its
  RBAC removed, the API unreachable): the pod shows not-Ready, `helm install --wait` and
  `kubectl rollout status` wait, and restarting would not help, so liveness stays green.
* A standby replica (leader election) answers both with 200 "standby" from a thread, before
  the event loop runs: it is healthy, and ready to take over.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    report: dict[str, Any]


Probe = Callable[[], ProbeResult]


class HealthServer:
    """/healthz and /readyz on the running event loop."""

    def __init__(self, address: str, port: int, *, liveness: Probe, readiness: Probe) -> None:
        self._address, self._port = address, port
        app = web.Application()
        app.router.add_get("/healthz", self._answer(liveness, failed=500))
        app.router.add_get("/readyz", self._answer(readiness, failed=503))
        self._runner = web.AppRunner(app, access_log=None)  # a line per probe is noise

    @staticmethod
    def _answer(probe: Probe, *, failed: int) -> Callable[[web.Request], Any]:
        async def handle(_: web.Request) -> web.Response:
            result = probe()
            return web.json_response(result.report, status=200 if result.ok else failed)

        return handle

    async def start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._address, self._port, reuse_address=True).start()

    async def stop(self) -> None:
        await self._runner.cleanup()


class _StandbyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        known = self.path in ("/healthz", "/readyz")
        body = json.dumps({"standby": True}).encode() if known else b""
        self.send_response(200 if known else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        del format, args  # probes every few seconds are not worth a log line


class StandbyHealth:
    """Both probes green while this replica waits for the Lease (a thread, no loop)."""

    def __init__(self, address: str, port: int) -> None:
        self._server = ThreadingHTTPServer((address, port), _StandbyHandler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
