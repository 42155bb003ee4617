"""`poolbudget run`: start Kopf with the handlers, metrics and health endpoints."""

from __future__ import annotations

import logging
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import kopf
from prometheus_client import start_http_server

from poolbudget import handlers
from poolbudget.adapters.leader import LeaderElector


def run_operator(
    *,
    namespaces: list[str],
    leader_election_namespace: str | None,
    metrics_port: int,
    health_port: int,
    bind_address: str,
    peering: str | None,
    priority: int,
    verbose: bool,
) -> int:
    assert handlers.budget_daemon is not None  # importing the module registered the handlers
    kopf.configure(verbose=verbose, log_prefix=True)
    # One line per HTTP request and per handled watch event is noise at INFO; our own
    # reconcile summary lines (logger "poolbudget.reconcile") say what happened.
    quiet = logging.DEBUG if verbose else logging.WARNING
    for noisy in ("httpx2", "httpx", "kopf.objects"):
        logging.getLogger(noisy).setLevel(quiet)
    if metrics_port:
        start_http_server(metrics_port, addr=bind_address)
    liveness = f"http://{bind_address}:{health_port}/healthz" if health_port else None
    elector = None
    if leader_election_namespace:
        # Several replicas: only the Lease holder runs Kopf (see adapters/leader.py). A
        # standby still answers /healthz, so the kubelet does not restart it in a loop.
        identity = f"{socket.gethostname()}-{os.getpid()}"
        elector = LeaderElector(leader_election_namespace, "poolbudget-operator", identity)
        standby = _standby_health(bind_address, health_port) if health_port else None
        try:
            elector.acquire()
        finally:
            if standby is not None:
                standby.shutdown()
                standby.server_close()
    try:
        kopf.run(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=peering is None,
            peering_name=peering,
            priority=priority,
            liveness_endpoint=liveness,
            memo=kopf.Memo(elector=elector, namespaces=namespaces),
        )
    finally:
        if elector is not None:
            elector.release()
    return 0


class _StandbyHealth(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b"standby\n")

    def log_message(self, format: str, *args: object) -> None:
        del format, args  # probes every few seconds are not worth a log line


def _standby_health(address: str, port: int) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer((address, port), _StandbyHealth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
