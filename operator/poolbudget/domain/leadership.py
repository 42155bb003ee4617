"""Leader election's arithmetic: the timings a replica is run with, and the write fence.

Pure: no clock is read unless one is passed in (adapters/leader.py passes
`time.monotonic`), so the rules are tested as functions.

The fence answers "may this replica still write?". It holds only while

    clock() < (when the last successful Lease create/update was SENT) + renew_deadline

A standby measures a lease from when it OBSERVED the holder's last update, which is after
that update was sent, and waits `lease_seconds` before taking over. So the old leader's
fence lapses at least `lease_seconds - renew_deadline_seconds` (the margin) before anyone
else may lead; the margin is for writes already past the fence check when it lapsed.
The clock must be CLOCK_MONOTONIC: it keeps counting while the process is stopped
(SIGSTOP, a frozen VM), so a resumed leader finds its fence lapsed before it writes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

# The Kubernetes client's elector refuses renew deadlines under 1.2 retry periods (its
# "jitter factor"): a renewal must get at least one retry before the deadline.
JITTER_FACTOR = 1.2


@dataclass(frozen=True)
class LeaderTimings:
    """How long a Lease lasts, how long a leader keeps trying to renew it, and how often
    anyone tries. Invalid combinations raise ValueError with the rule they break."""

    lease_seconds: int = 15
    renew_deadline_seconds: float = 10.0
    retry_seconds: float = 2.0

    def __post_init__(self) -> None:
        lease, deadline, retry = self.lease_seconds, self.renew_deadline_seconds, self.retry_seconds
        if problem := timing_problem(lease, deadline, retry):
            raise ValueError(problem)

    @property
    def margin_seconds(self) -> float:
        """Between the old leader's fence lapsing and the earliest takeover."""
        return self.lease_seconds - self.renew_deadline_seconds

    @property
    def request_timeout_seconds(self) -> float:
        """Each Lease call gives up after this long: a hung call costs one attempt, never
        the whole renew deadline."""
        return self.retry_seconds


def timing_problem(lease: float, renew_deadline: float, retry: float) -> str | None:
    """What is wrong with these timings, or None. The same rules as the client's elector
    (kubernetes.aio.leaderelection.electionconfig), checked before it runs."""
    values = {"lease": lease, "renew deadline": renew_deadline, "retry period": retry}
    for name, value in values.items():
        if not math.isfinite(value) or value < 1:
            return f"the {name} must be at least 1 second, got {value}"
    if lease != int(lease):
        return f"the lease is a whole number of seconds (Lease.spec), got {lease}"
    if lease <= renew_deadline:
        return f"the lease ({lease} s) must be longer than the renew deadline ({renew_deadline} s)"
    if renew_deadline <= JITTER_FACTOR * retry:
        return (
            f"the renew deadline ({renew_deadline} s) must be longer than {JITTER_FACTOR} "
            f"retry periods ({JITTER_FACTOR * retry:g} s)"
        )
    return None


class Fence:
    """May this replica write? True only within `renew_deadline` of sending the last
    request that successfully took or renewed the Lease (see the module docstring)."""

    def __init__(self, renew_deadline: float, clock: Callable[[], float]) -> None:
        self._renew_deadline = renew_deadline
        self._clock = clock
        self._until = -math.inf

    def renewed(self, sent: float) -> None:
        """A create/update of the Lease with us as holder, sent at `sent` (clock time),
        succeeded. An older success answered late never shortens the fence."""
        self._until = max(self._until, sent + self._renew_deadline)

    def revoke(self) -> None:
        """Stop writing now (shutting down, or giving the Lease up)."""
        self._until = -math.inf

    def holds(self) -> bool:
        return self._clock() < self._until

    def remaining(self) -> float:
        """Seconds until the fence lapses (0 when it has)."""
        return max(0.0, self._until - self._clock())
