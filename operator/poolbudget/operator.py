"""`poolbudget run`: start Kopf with the handlers, metrics and health endpoints."""

from __future__ import annotations

import logging

import kopf
from prometheus_client import start_http_server

from poolbudget import handlers


def run_operator(
    *,
    namespaces: list[str],
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
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )
    return 0
