"""Per-budget series: served at scrape time in Prometheus' text format, and gone, counters
included, when their budget is forgotten."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import REGISTRY, generate_latest

from poolbudget import metrics


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_budget_series_are_scraped_with_their_labels_and_types() -> None:
    budget = {"namespace": "ns-metrics-1", "poolbudget": "shop"}
    metrics.POOL_SIZE.labels(**budget, deployment="api").set(7)
    metrics.RECONCILES.labels(**budget, outcome="ok").inc()
    metrics.RECONCILES.labels(**budget, outcome="ok").inc(2)
    assert sample("poolbudget_pool_size", **budget, deployment="api") == 7
    assert sample("poolbudget_reconciles_total", **budget, outcome="ok") == 3
    text = generate_latest(REGISTRY).decode()
    assert "# TYPE poolbudget_reconciles_total counter" in text
    assert "# TYPE poolbudget_pool_size gauge" in text
    line = 'poolbudget_pool_size{deployment="api",namespace="ns-metrics-1",poolbudget="shop"} 7.0'
    assert line in text.splitlines()


def test_forgetting_a_budget_drops_every_series_of_it_and_no_other() -> None:
    gone = {"namespace": "ns-metrics-2", "poolbudget": "gone"}
    kept = {"namespace": "ns-metrics-2", "poolbudget": "kept"}
    for budget in (gone, kept):
        metrics.FEASIBLE.labels(**budget).set(1)
        metrics.RESTARTS_SKIPPED.labels(**budget, deployment="api", reason="Unchanged").inc()
        metrics.ERRORS.labels(**budget, reason="DatabaseUnreachable").inc()
        metrics.TARGET_LIVE.labels(**budget, deployment="api", state="idle").set(3)
    metrics.forget_budget(gone["namespace"], gone["poolbudget"])
    assert sample("poolbudget_budget_feasible", **gone) is None
    assert (
        sample("poolbudget_restarts_skipped_total", **gone, deployment="api", reason="Unchanged")
        is None
    )
    assert sample("poolbudget_errors_total", **gone, reason="DatabaseUnreachable") is None
    assert sample("poolbudget_target_live_connections", **gone, deployment="api", state="idle") is None  # fmt: skip
    assert sample("poolbudget_budget_feasible", **kept) == 1
    assert (
        sample("poolbudget_restarts_skipped_total", **kept, deployment="api", reason="Unchanged")
        == 1
    )
    metrics.forget_watch(kept["namespace"], kept["poolbudget"])  # the watch's series only
    assert sample("poolbudget_target_live_connections", **kept, deployment="api", state="idle") is None  # fmt: skip
    assert sample("poolbudget_errors_total", **kept, reason="DatabaseUnreachable") == 1


def test_a_series_needs_exactly_its_family_labels() -> None:
    with pytest.raises(ValueError, match="deployment"):
        metrics.POOL_SIZE.labels(namespace="n", poolbudget="b")
    with pytest.raises(ValueError, match="deployment"):
        metrics.FEASIBLE.labels(namespace="n", poolbudget="b", deployment="api")


def test_scrapes_in_another_thread_while_budgets_come_and_go() -> None:
    failures: list[BaseException] = []
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            try:
                generate_latest(REGISTRY)
            except BaseException as exc:  # any failure is the finding
                failures.append(exc)
                return

    thread = threading.Thread(target=scrape)
    thread.start()
    try:
        for round_ in range(300):
            for n in range(20):
                budget = {"namespace": "ns-metrics-3", "poolbudget": f"b{n}"}
                metrics.POOL_SIZE.labels(**budget, deployment=f"d{round_}").set(round_)
            for n in range(0, 20, 2):
                metrics.forget_budget("ns-metrics-3", f"b{n}")
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert sample("poolbudget_pool_size", namespace="ns-metrics-3", poolbudget="b1", deployment="d299") == 299  # fmt: skip


def test_keeping_targets_drops_the_series_of_the_others_counters_included() -> None:
    budget = {"namespace": "ns-metrics-4", "poolbudget": "shop"}
    other = {"namespace": "ns-metrics-4", "poolbudget": "other"}
    for name in ("api", "cron"):
        metrics.POOL_SIZE.labels(**budget, deployment=name).set(4)
        metrics.RESTARTS.labels(**budget, deployment=name).inc()
        metrics.TARGET_LIVE.labels(**budget, deployment=name, state="active").set(2)
    metrics.POOL_SIZE.labels(**other, deployment="cron").set(9)
    metrics.FEASIBLE.labels(**budget).set(1)
    metrics.keep_targets("ns-metrics-4", "shop", {"api"})
    assert sample("poolbudget_pool_size", **budget, deployment="cron") is None
    assert sample("poolbudget_restarts_total", **budget, deployment="cron") is None
    assert sample("poolbudget_target_live_connections", **budget, deployment="cron", state="active") is None  # fmt: skip
    assert sample("poolbudget_pool_size", **budget, deployment="api") == 4
    assert sample("poolbudget_restarts_total", **budget, deployment="api") == 1
    assert sample("poolbudget_pool_size", **other, deployment="cron") == 9  # another budget's
    assert sample("poolbudget_budget_feasible", **budget) == 1  # per-budget series stay
