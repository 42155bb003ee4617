"""domain/events.py: the Events of one reconcile, one per (type, reason), every target named."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from poolbudget.domain.events import MESSAGE_LIMIT, PendingEvent, aggregate


def updated(target: str, old: int, new: int) -> PendingEvent:
    return PendingEvent(
        "Normal",
        "ConfigMapUpdated",
        f"ConfigMap {target}-db-pool updated: pool_size {old} -> {new}",
        subject=target,
        heading="ConfigMaps updated",
        entry=f"{target}-db-pool pool_size {old} -> {new}",
    )


def test_one_change_reads_as_it_always_did() -> None:
    (event,) = aggregate([updated("api", 5, 6)])
    assert (event.type, event.reason) == ("Normal", "ConfigMapUpdated")
    assert event.message == "ConfigMap api-db-pool updated: pool_size 5 -> 6"
    assert event.subjects == ("api",)


def test_several_changes_are_one_event_listing_each() -> None:
    restarted = PendingEvent("Normal", "RolloutRestarted", "Deployment api restarted", "api")
    events = aggregate([updated("api", 5, 6), restarted, updated("worker", 3, 2)])
    assert [(e.reason, e.subjects) for e in events] == [
        ("ConfigMapUpdated", ("api", "worker")),
        ("RolloutRestarted", ("api",)),
    ]
    assert events[0].message == (
        "ConfigMaps updated (2): api-db-pool pool_size 5 -> 6; worker-db-pool pool_size 3 -> 2"
    )


def test_the_same_reason_as_normal_and_warning_stays_two_events() -> None:
    events = aggregate(
        [
            PendingEvent("Normal", "X", "a", "a"),
            PendingEvent("Warning", "X", "b", "b"),
            PendingEvent("Normal", "X", "c", "c"),
        ]
    )
    assert [(e.type, e.subjects) for e in events] == [("Normal", ("a", "c")), ("Warning", ("b",))]


def test_a_long_list_is_cut_with_and_n_more() -> None:
    changes = [updated(f"deployment-{i:04d}", 5, 6) for i in range(500)]
    (event,) = aggregate(changes)
    assert len(event.message.encode()) <= MESSAGE_LIMIT
    assert event.message.startswith("ConfigMaps updated (500): deployment-0000-db-pool")
    assert event.message.endswith(f"; and {500 - event.listed} more")
    assert event.message.count("-db-pool pool_size") == event.listed
    assert event.subjects == tuple(f"deployment-{i:04d}" for i in range(500))


def test_an_entry_too_long_for_the_limit_is_cut_too() -> None:
    huge = [PendingEvent("Warning", "TargetConflict", "x" * 5000, str(i)) for i in range(2)]
    (event,) = aggregate(huge)
    assert len(event.message.encode()) <= MESSAGE_LIMIT
    assert event.message.endswith("...; and 1 more")
    (alone,) = aggregate(huge[:1])
    assert len(alone.message.encode()) == MESSAGE_LIMIT
    assert alone.message.endswith("...")


def test_the_limit_counts_bytes_not_characters() -> None:
    (event,) = aggregate([PendingEvent("Normal", "R", "→" * 1000)])
    assert len(event.message.encode()) <= MESSAGE_LIMIT
    assert event.message.endswith("...")


pending_events = st.builds(
    PendingEvent,
    type=st.sampled_from(["Normal", "Warning"]),
    reason=st.sampled_from(["ConfigMapUpdated", "RolloutRestarted", "TargetConflict"]),
    message=st.text(min_size=1, max_size=300),
    subject=st.text(alphabet="abcdefghij-", min_size=1, max_size=12),
    heading=st.sampled_from(["", "Things changed"]),
    entry=st.text(max_size=120),
)


@given(st.lists(pending_events, max_size=60), st.integers(min_value=60, max_value=2048))
def test_every_change_is_in_exactly_one_event_and_each_type_reason_posts_once(
    pending: list[PendingEvent], limit: int
) -> None:
    events = aggregate(pending, limit)
    keys = [(e.type, e.reason) for e in events]
    assert len(keys) == len(set(keys))
    for event in events:
        mine = [p for p in pending if (p.type, p.reason) == (event.type, event.reason)]
        # Each noted change is covered by the one event of its (type, reason), in order...
        assert event.subjects == tuple(p.subject for p in mine)
        assert len(event.message.encode()) <= limit
        assert 1 <= event.listed <= len(mine)
        if len(mine) == 1:
            continue
        # ...and named in its message, or counted in its "and N more".
        hidden = len(mine) - event.listed
        if hidden:
            assert re.search(rf"; and {hidden} more$", event.message)
        if event.listed == 1 and mine[0].listed not in event.message:
            assert "..." in event.message  # the first entry alone did not fit: cut
            continue
        listed = [p.listed for p in mine[: event.listed]]
        expected = "; ".join(listed) + (f"; and {hidden} more" if hidden else "")
        assert event.message.endswith(expected)
    assert sum(len(e.subjects) for e in events) == len(pending)
