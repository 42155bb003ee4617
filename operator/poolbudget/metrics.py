"""Prometheus metrics the operator serves (on --metrics-port, default 8080).

Process-wide metrics are prometheus_client objects. Per-budget and per-target series are
`BudgetFamily`s: plain values in one dict per budget, served by a collector at scrape time.
prometheus_client keeps an object with its own lock per series (about 650 bytes; 20 MiB at
1,000 budgets of 5 targets), and removing one series scans them all; here a series is a
dict entry (about 100 bytes) and a deleted budget's series, counters too, go in one step.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import Literal

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

BUDGET = ["namespace", "poolbudget"]
TARGET = [*BUDGET, "deployment"]

BudgetKey = tuple[str, str]


@dataclass
class BudgetFamily:
    """One metric whose series all start with the (namespace, poolbudget) labels."""

    name: str
    documentation: str
    kind: Literal["gauge", "counter"]
    extra_labels: tuple[str, ...] = ()
    by_budget: dict[BudgetKey, dict[tuple[str, ...], float]] = field(default_factory=dict)

    def labels(self, namespace: str, poolbudget: str, **extra: str) -> BudgetSeries:
        if set(extra) != set(self.extra_labels):
            raise ValueError(f"{self.name} takes labels {self.extra_labels}, got {sorted(extra)}")
        rest = tuple(extra[label] for label in self.extra_labels)
        return BudgetSeries(self, (namespace, poolbudget), rest)

    def forget(self, budget: BudgetKey) -> None:
        self.by_budget.pop(budget, None)

    def family(self) -> Metric:
        labels = [*BUDGET, *self.extra_labels]
        metric: Metric
        if self.kind == "counter":
            metric = CounterMetricFamily(self.name, self.documentation, labels=labels)
        else:
            metric = GaugeMetricFamily(self.name, self.documentation, labels=labels)
        # Scrapes run in the HTTP server's thread: copy each dict before walking it (a copy
        # of a dict of str tuples and floats is one step under the GIL).
        for budget, series in list(self.by_budget.items()):
            for rest, value in list(series.items()):
                metric.add_metric([*budget, *rest], value)
        return metric


@dataclass(frozen=True, slots=True)
class BudgetSeries:
    """One series of a BudgetFamily, as `.labels(...)` returns it (made per call)."""

    family: BudgetFamily
    budget: BudgetKey
    rest: tuple[str, ...]

    def set(self, value: float) -> None:
        self.family.by_budget.setdefault(self.budget, {})[self.rest] = float(value)

    def inc(self, amount: float = 1.0) -> None:
        series = self.family.by_budget.setdefault(self.budget, {})
        series[self.rest] = series.get(self.rest, 0.0) + amount


class BudgetCollector(Collector):
    """Serves every BudgetFamily at scrape time."""

    def __init__(self) -> None:
        self.families: list[BudgetFamily] = []

    def add(self, family: BudgetFamily) -> BudgetFamily:
        self.families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()


BUDGET_FAMILIES = BudgetCollector()
REGISTRY.register(BUDGET_FAMILIES)


def _budget(name: str, documentation: str, *extra: str) -> BudgetFamily:
    return BUDGET_FAMILIES.add(BudgetFamily(name, documentation, "gauge", extra))


def _budget_counter(name: str, documentation: str, *extra: str) -> BudgetFamily:
    # Named without _total, as prometheus_client names counter families; samples get it.
    return BUDGET_FAMILIES.add(BudgetFamily(name, documentation, "counter", extra))


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
RECONCILES = _budget_counter(
    "poolbudget_reconciles", "PoolBudget reconciles, by outcome.", "outcome"
)
RECONCILE_SECONDS = Histogram(
    "poolbudget_reconcile_duration_seconds",
    "Time to reconcile one PoolBudget (facts, plan, apply).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
ERRORS = _budget_counter(
    "poolbudget_errors",
    "Problems met while reconciling, by reason (DatabaseUnreachable, SecretNotFound, ...).",
    "reason",
)
RESTARTS = _budget_counter(
    "poolbudget_restarts",
    "Deployments restarted because their pool settings changed.",
    "deployment",
)
RESTARTS_SKIPPED = _budget_counter(
    "poolbudget_restarts_skipped",
    "Reconciles that did not restart a target, by reason: Unchanged (its pods run these "
    "settings), Disabled (rollout.strategy None), Cooldown (minIntervalSeconds), "
    "MaxConcurrent, Rolling (its own rollout is not finished), WaitingForShrink (its pool "
    "grows: others shrink first).",
    "deployment",
    "reason",
)
DATABASE_PROBES = _budget_counter(
    "poolbudget_database_probes", "Reads of the database's limits, by result.", "result"
)
MAX_CONNECTIONS = _budget("poolbudget_database_max_connections", "max_connections as last read.")
USABLE_CONNECTIONS = _budget(
    "poolbudget_usable_connections", "Connections the budget may hand out."
)
CONNECTIONS_IN_USE = _budget(
    "poolbudget_database_connections_in_use",
    "Client connections open on the database at the last probe.",
)
PEAK_CONNECTIONS = _budget(
    "poolbudget_peak_connections", "Worst-case connections of the applied plan."
)
HEADROOM = _budget("poolbudget_headroom_connections", "Usable minus peak connections.")
POOL_SIZE = _budget("poolbudget_pool_size", "pool_size allocated to a target.", "deployment")
MAX_OVERFLOW = _budget(
    "poolbudget_max_overflow", "max_overflow allocated to a target.", "deployment"
)
TARGET_PEAK = _budget(
    "poolbudget_target_peak_connections", "Worst-case connections of one target.", "deployment"
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
FEASIBLE = _budget("poolbudget_budget_feasible", "1 if the budget fits, 0 if not.")

# The database watch (spec.database.watch), set on each refresh. `state` is one of
# active, idle, idle_in_transaction, unknown; `signal` one of the four SignalKinds: the
# label sets stay bounded by the budget's targets.
ACTIVITY_READS = _budget_counter(
    "poolbudget_activity_reads", "Reads of pg_stat_activity (one per refresh), by result.", "result"
)
TARGET_LIVE = _budget(
    "poolbudget_target_live_connections",
    "Live connections of one target (its application_name) by state at the last refresh.",
    "deployment",
    "state",
)
UNBUDGETED = _budget(
    "poolbudget_unbudgeted_connections",
    "Client connections on the server that belong to no target of the budget (nor the operator).",
)
SIGNALS = _budget(
    "poolbudget_signals_raised",
    "Raised database-watch signals by kind (OverAllocation counts Deployments, "
    "StaleTransactions applications; the others are 0 or 1).",
    "signal",
)


WATCH_FAMILIES = (UNBUDGETED, SIGNALS, TARGET_LIVE)
TARGET_FAMILIES = tuple(
    family for family in BUDGET_FAMILIES.families if family.extra_labels[:1] == ("deployment",)
)


def forget_budget(namespace: str, name: str) -> None:
    """Drop a deleted budget's series, counters included, so dashboards show no ghosts."""
    for family in BUDGET_FAMILIES.families:
        family.forget((namespace, name))


def forget_watch(namespace: str, name: str) -> None:
    """Drop a budget's database-watch series (deleted, or its watch turned off)."""
    for family in WATCH_FAMILIES:
        family.forget((namespace, name))


def keep_targets(namespace: str, name: str, deployments: Collection[str]) -> None:
    """Drop the series of Deployments that are no longer this budget's targets (removed
    from its spec, or now claimed by another budget), counters included."""
    for family in TARGET_FAMILIES:
        series = family.by_budget.get((namespace, name))
        if series:
            for rest in [rest for rest in series if rest[0] not in deployments]:
                del series[rest]
