"""Prometheus metrics the operator serves (on --metrics-port, default 8080)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BUDGET = ["namespace", "poolbudget"]
TARGET = [*BUDGET, "deployment"]

API_WRITES = Counter(
    "poolbudget_api_writes_total",
    "Writes this operator sent to the Kubernetes API, by kind of write and namespace.",
    ["kind", "namespace"],
)
CONFIGMAP_READS = Counter(
    "poolbudget_configmap_reads_total",
    "Managed ConfigMaps read by reconciles: from the operator's watch cache, or from the "
    "API server (a ConfigMap not in the cache: absent, or not labelled as managed).",
    ["source"],
)
API_WRITES_REFUSED = Counter(
    "poolbudget_api_writes_refused_total",
    "Writes not sent because this replica may not write (reason NotLeader: it does not "
    "hold the leader Lease), by kind of write.",
    ["kind", "reason"],
)
RECONCILES = Counter(
    "poolbudget_reconciles_total",
    "PoolBudget reconciles, by outcome.",
    [*BUDGET, "outcome"],
)
RECONCILE_SECONDS = Histogram(
    "poolbudget_reconcile_duration_seconds",
    "Time to reconcile one PoolBudget (facts, plan, apply).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ERRORS = Counter(
    "poolbudget_errors_total",
    "Problems met while reconciling, by reason (DatabaseUnreachable, SecretNotFound, ...).",
    [*BUDGET, "reason"],
)
RESTARTS = Counter(
    "poolbudget_restarts_total",
    "Deployments restarted because their pool settings changed.",
    TARGET,
)
RESTARTS_SKIPPED = Counter(
    "poolbudget_restarts_skipped_total",
    "Reconciles of a target whose settings hash was unchanged (no restart needed).",
    TARGET,
)
DATABASE_PROBES = Counter(
    "poolbudget_database_probes_total",
    "Reads of the database's limits, by result.",
    [*BUDGET, "result"],
)
MAX_CONNECTIONS = Gauge(
    "poolbudget_database_max_connections", "max_connections as last read.", BUDGET
)
USABLE_CONNECTIONS = Gauge(
    "poolbudget_usable_connections", "Connections the budget may hand out.", BUDGET
)
CONNECTIONS_IN_USE = Gauge(
    "poolbudget_database_connections_in_use",
    "Client connections open on the database at the last probe.",
    BUDGET,
)
PEAK_CONNECTIONS = Gauge(
    "poolbudget_peak_connections", "Worst-case connections of the applied plan.", BUDGET
)
HEADROOM = Gauge("poolbudget_headroom_connections", "Usable minus peak connections.", BUDGET)
POOL_SIZE = Gauge("poolbudget_pool_size", "pool_size allocated to a target.", TARGET)
MAX_OVERFLOW = Gauge("poolbudget_max_overflow", "max_overflow allocated to a target.", TARGET)
TARGET_PEAK = Gauge(
    "poolbudget_target_peak_connections", "Worst-case connections of one target.", TARGET
)
WATCH_RELISTS = Counter(
    "poolbudget_watch_relists_total",
    "Full LISTs by the operator's informers: one at start-up, then one per expired "
    "resourceVersion or broken watch.",
    ["resource"],
)
WATCHED_OBJECTS = Gauge(
    "poolbudget_watched_objects",
    "Objects held in an informer's cache (Deployments, HPAs, PoolBudgets).",
    ["resource", "scope"],
)
FEASIBLE = Gauge("poolbudget_budget_feasible", "1 if the budget fits, 0 if not.", BUDGET)

# The database watch (spec.database.watch), set on each refresh. `state` is one of
# active, idle, idle_in_transaction, unknown; `signal` one of the four SignalKinds: the
# label sets stay bounded by the budget's targets.
ACTIVITY_READS = Counter(
    "poolbudget_activity_reads_total",
    "Reads of pg_stat_activity (one per refresh), by result.",
    [*BUDGET, "result"],
)
TARGET_LIVE = Gauge(
    "poolbudget_target_live_connections",
    "Live connections of one target (its application_name) by state at the last refresh.",
    [*TARGET, "state"],
)
UNBUDGETED = Gauge(
    "poolbudget_unbudgeted_connections",
    "Client connections on the server that belong to no target of the budget (nor the operator).",
    BUDGET,
)
SIGNALS = Gauge(
    "poolbudget_signals_raised",
    "Raised database-watch signals by kind (OverAllocation counts Deployments, "
    "StaleTransactions applications; the others are 0 or 1).",
    [*BUDGET, "signal"],
)


def forget_budget(namespace: str, name: str) -> None:
    """Drop a deleted budget's series so dashboards do not show ghosts."""
    for gauge in (MAX_CONNECTIONS, USABLE_CONNECTIONS, CONNECTIONS_IN_USE, PEAK_CONNECTIONS):
        gauge.remove(namespace, name) if _has(gauge, namespace, name) else None
    for gauge in (HEADROOM, FEASIBLE):
        gauge.remove(namespace, name) if _has(gauge, namespace, name) else None
    _forget_series((POOL_SIZE, MAX_OVERFLOW, TARGET_PEAK), namespace, name)
    forget_watch(namespace, name)


def forget_watch(namespace: str, name: str) -> None:
    """Drop a budget's database-watch series (deleted, or its watch turned off)."""
    _forget_series((UNBUDGETED, SIGNALS, TARGET_LIVE), namespace, name)


def _forget_series(gauges: tuple[Gauge, ...], namespace: str, name: str) -> None:
    """Every series of these gauges labelled with this budget, whatever their other labels."""
    for gauge in gauges:
        for labels in list(gauge._metrics):  # prometheus_client keeps label tuples here
            if labels[:2] == (namespace, name):
                gauge.remove(*labels)


def _has(gauge: Gauge, namespace: str, name: str) -> bool:
    return (namespace, name) in gauge._metrics
