"""Which ConfigMaps to write and which Deployments to restart now: pure decisions.

The rules, in the order they are applied:

* A restart happens only when the pod template's ``poolbudget.dev/config-hash`` differs
  from the hash of the settings the ConfigMap now holds; same hash, nothing happens. A
  replica change that leaves the settings unchanged therefore restarts nothing.
* Pools that grow wait until every other target of the budget has settled (ConfigMap
  current, pods restarted, rollout finished). Shrinking and unchanged targets go first, so
  during the change-over old big pools and new big pools never run side by side. A grown
  ConfigMap is not even written before then: a pod that restarts for its own reasons would
  otherwise pick up the bigger pool early.
* At most ``maxConcurrent`` Deployments of a budget are rolling at once (rollouts already
  in progress count), and a Deployment is not restarted again within
  ``minIntervalSeconds`` of its last restart by this operator. A rollout lasts until the
  Deployment controller calls it complete (every new pod available, no old pod left):
  old pods gone is not the end of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum

from pydantic import Field

from poolbudget.domain.facts import Frozen
from poolbudget.domain.reasons import SkipReason

# When a rollout is over, for the messages that wait on one.
ROLLOUT_DONE_WHEN = "every new pod available, no old pod left"


class TargetState(Frozen):
    """What is true now for one target, as read from the cluster."""

    name: str
    desired_hash: str
    desired_per_worker: int  # pool_size + max_overflow the plan wants
    configmap_hash: str | None = None  # hash of the existing ConfigMap's data; None = none
    configmap_per_worker: int | None = None  # pool_size + max_overflow it holds now
    deployment_exists: bool = True
    template_hash: str | None = None  # poolbudget.dev/config-hash on the pod template
    # A rollout of this Deployment is in progress: not finished by the Deployment
    # controller's definition (old pods left, or new pods not all available yet:
    # domain/observe.py).
    rolling: bool = False
    # A spec change the Deployment controller has not observed yet (maybe the start of a
    # rollout): holds a restart slot so maxConcurrent is never exceeded, but is not
    # reported as rolling.
    unobserved: bool = False
    stalled: bool = False  # ... and the Deployment controller gave up on it
    last_restart: datetime | None = None  # when this operator last restarted it

    @property
    def grows(self) -> bool:
        return (
            self.configmap_per_worker is not None
            and self.desired_per_worker > self.configmap_per_worker
        )


class RolloutPolicy(Frozen):
    restarts_enabled: bool = True  # rollout.strategy RollingRestart (False: None)
    max_concurrent: int = Field(default=1, ge=1)
    min_interval_seconds: int = Field(default=300, ge=0)


class TargetPhase(StrEnum):
    APPLIED = "Applied"  # ConfigMap current, pods restarted with it, rollout finished
    ROLLING = "Rolling"  # restarted, rollout in progress
    STALLED = "Stalled"  # rollout in progress but the Deployment reports no progress
    PENDING = "Pending"  # waiting: for a slot, the cooldown, or other targets to settle
    MISSING = "Missing"  # the Deployment does not exist; its ConfigMap is kept current


class TargetAction(Frozen):
    name: str
    write_configmap: bool
    restart: bool
    phase: TargetPhase
    message: str
    # Why it is not restarted this round (None: restarted, or its Deployment is missing).
    skipped: SkipReason | None = None


class RolloutPlan(Frozen):
    actions: tuple[TargetAction, ...]
    # Come back after this many seconds even if nothing else happens (cooldowns).
    recheck_after_seconds: float | None
    complete: bool

    def action(self, name: str) -> TargetAction:
        for action in self.actions:
            if action.name == name:
                return action
        raise KeyError(name)


def _settled(target: TargetState, policy: RolloutPolicy) -> bool:
    if target.configmap_hash != target.desired_hash:
        return False
    if not target.deployment_exists or not policy.restarts_enabled:
        return True
    # Unobserved: the template carries the hash, but the Deployment controller has not
    # seen it yet, so its rollout has not even shown as one (a grower written now would
    # run its big pool beside the old pods of this shrinker).
    return (
        target.template_hash == target.desired_hash and not target.rolling and not target.unobserved
    )


def _applied_phase(target: TargetState, policy: RolloutPolicy) -> tuple[TargetPhase, str]:
    """No restart is due (the template carries the hash, or restarts are off): how far the
    Deployment's own rollout has got."""
    if target.stalled:
        return TargetPhase.STALLED, "rollout is not progressing"
    if not policy.restarts_enabled:
        return (
            TargetPhase.APPLIED,
            "ConfigMap written; restarts are disabled (rollout.strategy None)",
        )
    if target.rolling:
        return TargetPhase.ROLLING, f"rollout in progress (done when {ROLLOUT_DONE_WHEN})"
    return TargetPhase.APPLIED, "settings applied"


def _cooldown_left(target: TargetState, policy: RolloutPolicy, now: datetime) -> float:
    """Seconds until minIntervalSeconds since this operator last restarted it (<= 0: none)."""
    if target.last_restart is None:
        return 0.0
    return policy.min_interval_seconds - (now - target.last_restart).total_seconds()


def plan_rollout(
    targets: Sequence[TargetState], policy: RolloutPolicy, now: datetime
) -> RolloutPlan:
    """Decide this round's ConfigMap writes and restarts for one budget."""
    growers = {t.name for t in targets if t.grows}
    unsettled_others = sorted(
        t.name for t in targets if t.name not in growers and not _settled(t, policy)
    )
    # Without restarts there is no pod turnover to order: write everything at once.
    hold_growers = bool(unsettled_others) and policy.restarts_enabled

    # The Deployments holding restart slots: rolling already, or restarted this round.
    busy = [t.name for t in targets if t.rolling or t.unobserved]
    slots = policy.max_concurrent - len(busy)
    recheck: float | None = None
    actions: list[TargetAction] = []
    # Non-growers first so they take the restart slots; name order for determinism.
    for target in sorted(targets, key=lambda t: (t.name in growers, t.name)):
        write = target.configmap_hash != target.desired_hash
        restart = False
        skipped: SkipReason | None = None
        if write and target.name in growers and hold_growers:
            write = False
            skipped = SkipReason.WAITING_FOR_SHRINK
            phase = TargetPhase.PENDING
            message = (
                f"pool grows; waits for {', '.join(unsettled_others)} to finish rolling out first"
            )
        elif not target.deployment_exists:
            phase, message = (
                TargetPhase.MISSING,
                "Deployment not found; its ConfigMap is kept current",
            )
        elif not policy.restarts_enabled or target.template_hash == target.desired_hash:
            skipped = SkipReason.UNCHANGED if policy.restarts_enabled else SkipReason.DISABLED
            phase, message = _applied_phase(target, policy)
        elif (remaining := _cooldown_left(target, policy, now)) > 0:
            skipped = SkipReason.COOLDOWN
            recheck = remaining if recheck is None else min(recheck, remaining)
            phase = TargetPhase.PENDING
            message = f"restart due; cooldown (minIntervalSeconds) ends in {int(remaining) + 1}s"
        elif target.rolling or slots <= 0:
            skipped = SkipReason.ROLLING if target.rolling else SkipReason.MAX_CONCURRENT
            reason = (
                f"its own rollout is still in progress (done when {ROLLOUT_DONE_WHEN})"
                if target.rolling
                else f"maxConcurrent ({policy.max_concurrent}) reached, "
                f"{', '.join(sorted(busy))} still rolling out (done when {ROLLOUT_DONE_WHEN})"
            )
            phase, message = TargetPhase.PENDING, f"restart due; waits: {reason}"
        else:  # the pod template runs other settings, and a slot is free: restart now
            slots -= 1
            busy.append(target.name)
            restart = True
            phase, message = TargetPhase.ROLLING, "restarted to pick up new pool settings"
        actions.append(
            TargetAction(
                name=target.name,
                write_configmap=write,
                restart=restart,
                phase=phase,
                message=message,
                skipped=skipped,
            )
        )

    by_name = {a.name: a for a in actions}
    ordered = tuple(by_name[t.name] for t in targets)
    complete = all(
        a.phase in (TargetPhase.APPLIED, TargetPhase.MISSING) for a in ordered
    ) and not any(a.write_configmap or a.restart for a in ordered)
    return RolloutPlan(actions=ordered, recheck_after_seconds=recheck, complete=complete)
