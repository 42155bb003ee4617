"""The README's metrics table is the operator's metrics, no more, no fewer."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from poolbudget import metrics
from poolbudget.domain.reasons import ERROR_REASONS, Reason, SkipReason

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def served_metric_names() -> set[str]:
    families = [
        family
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.collect()
    ]
    families += metrics.BUDGET_FAMILIES.collect()
    # Counter families are named without the _total their samples carry.
    return {f.name + ("_total" if f.type == "counter" else "") for f in families}


def test_every_metric_is_documented_and_every_documented_metric_exists() -> None:
    section = README.split("### Metrics", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(poolbudget_[a-z_]+)` \|", section, flags=re.MULTILINE))
    served = served_metric_names()
    assert len(served) >= 10
    assert documented == served


def test_the_documented_error_reasons_are_the_ones_counted() -> None:
    # A Decision refuses an error reason outside ERROR_REASONS (test_decide checks that),
    # so the set is what can be counted.
    row = next(line for line in README.splitlines() if "`poolbudget_errors_total`" in line)
    documented = set(re.findall(r"`([A-Z]\w+)`", row))
    assert documented == {reason.value for reason in ERROR_REASONS}


def test_the_documented_skip_reasons_are_the_ones_counted() -> None:
    row = next(
        line for line in README.splitlines() if "`poolbudget_restarts_skipped_total`" in line
    )
    assert set(re.findall(r"`([A-Z]\w+)`", row)) == {reason.value for reason in SkipReason}


def test_the_readme_lists_every_reason_and_no_other() -> None:
    section = README.split("### Conditions, Events and their reasons", 1)[1].split("\n### ", 1)[0]
    rows = [line.split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    listed = {name for row in rows for name in re.findall(r"`([A-Z][A-Za-z]+)`", row[2])}
    assert listed == {reason.value for reason in Reason}
