"""Leader election's pure rules: the timings `poolbudget run` accepts, and the write fence
(the election itself runs against the real API server: tests/cluster/test_leader_election.py)."""

from __future__ import annotations

import math

import pytest

from poolbudget.cli import main
from poolbudget.domain.leadership import Fence, LeaderTimings, timing_problem


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_defaults_leave_a_five_second_margin() -> None:
    timings = LeaderTimings()
    assert (timings.lease_seconds, timings.renew_deadline_seconds, timings.retry_seconds) == (
        15,
        10.0,
        2.0,
    )
    assert timings.margin_seconds == 5.0
    assert timings.request_timeout_seconds == 2.0


@pytest.mark.parametrize(
    ("lease", "deadline", "retry", "problem"),
    [
        (15, 10, 2, None),
        (6, 4, 1, None),
        (10, 10, 2, "must be longer than the renew deadline"),
        (8, 10, 2, "must be longer than the renew deadline"),
        (15, 2.4, 2, "must be longer than 1.2 retry periods"),  # exactly 1.2 is refused
        (15, 2.5, 2, None),
        (15, 10, 0.5, "retry period must be at least 1 second"),
        (15.5, 10, 2, "whole number of seconds"),
        (math.inf, 10, 2, "lease must be at least 1 second"),
        (15, math.nan, 2, "renew deadline must be at least 1 second"),
    ],
)
def test_timings_are_checked_as_the_elector_checks_them(
    lease: float, deadline: float, retry: float, problem: str | None
) -> None:
    found = timing_problem(lease, deadline, retry)
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert problem in found


def test_invalid_timings_cannot_be_constructed() -> None:
    with pytest.raises(ValueError, match="renew deadline"):
        LeaderTimings(lease_seconds=10, renew_deadline_seconds=10, retry_seconds=2)


def test_run_refuses_invalid_timings_before_starting(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["run", "--leader-lease-seconds", "10", "--leader-renew-deadline-seconds", "12"])
    assert status == 2
    assert "leader election: the lease (10 s) must be longer" in capsys.readouterr().err


def test_a_fresh_fence_does_not_hold() -> None:
    clock = Clock()
    fence = Fence(10, clock)
    assert not fence.holds()
    assert fence.remaining() == 0


def test_the_fence_holds_for_the_renew_deadline_from_when_the_renewal_was_sent() -> None:
    clock = Clock()
    fence = Fence(10, clock)
    sent = clock.now
    clock.now += 3  # the answer took 3 s: the fence still counts from the sending
    fence.renewed(sent)
    assert fence.holds()
    assert fence.remaining() == pytest.approx(7)
    clock.now = sent + 9.999
    assert fence.holds()
    clock.now = sent + 10  # the deadline itself is out
    assert not fence.holds()


def test_each_renewal_pushes_the_fence_and_a_late_old_answer_never_shortens_it() -> None:
    clock = Clock()
    fence = Fence(10, clock)
    first = clock.now
    clock.now += 2
    second = clock.now
    fence.renewed(second)
    fence.renewed(first)  # answered after the second one
    clock.now = first + 11
    assert fence.holds()
    clock.now = second + 10
    assert not fence.holds()


def test_a_stopped_process_finds_its_fence_lapsed_when_it_resumes() -> None:
    """CLOCK_MONOTONIC counts while a process is stopped: 30 s of SIGSTOP are 30 s."""
    clock = Clock()
    fence = Fence(10, clock)
    fence.renewed(clock.now)
    clock.now += 30
    assert not fence.holds()
    assert fence.remaining() == 0


def test_a_revoked_fence_stops_writes_at_once() -> None:
    clock = Clock()
    fence = Fence(10, clock)
    fence.renewed(clock.now)
    fence.revoke()
    assert not fence.holds()
    fence.renewed(clock.now)  # only a new successful renewal lets writes through again
    assert fence.holds()
