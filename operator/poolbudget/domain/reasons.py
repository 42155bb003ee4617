"""Every reason the operator gives: in conditions, Events and the `reason` label of metrics.

One enum, so a reason is spelled once, alerts and `kubectl get events --field-selector
reason=...` have a list to match on, and a typo is a type error instead of a new reason.
Values are CamelCase as Kubernetes conventions ask; they are an API: never rename one.
"""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    # Ready
    BUDGET_APPLIED = "BudgetApplied"
    INVALID_SPEC = "InvalidSpec"
    TARGET_CONFLICT = "TargetConflict"
    DEPLOYMENT_NOT_FOUND = "DeploymentNotFound"
    WRITE_REFUSED = "WriteRefused"  # the API server refused a ConfigMap or template write
    RECONCILE_FAILED = "ReconcileFailed"  # a reconcile raised: a bug, or an API outage

    # DatabaseObserved: where max_connections came from, or why it could not be read
    PROBED = "Probed"
    MAX_CONNECTIONS_OVERRIDE = "MaxConnectionsOverride"
    SECRET_NOT_FOUND = "SecretNotFound"  # noqa: S105 (a reason, not a secret)
    SECRET_KEY_MISSING = "SecretKeyMissing"  # noqa: S105 (a reason, not a secret)
    SECRET_UNREADABLE = "SecretUnreadable"  # noqa: S105 (a reason, not a secret)
    INVALID_DSN = "InvalidDsn"
    AUTHENTICATION_FAILED = "AuthenticationFailed"
    DATABASE_NOT_FOUND = "DatabaseNotFound"  # the server answers; the database does not exist
    DATABASE_UNREACHABLE = "DatabaseUnreachable"
    DATABASE_TIMEOUT = "DatabaseTimeout"
    DATABASE_ERROR = "DatabaseError"  # anything else, named by its class only

    # BudgetFeasible: the sizing verdict (domain/sizing.Verdict has the same values)
    FEASIBLE = "Feasible"
    OVERFLOW_REDUCED = "OverflowReduced"
    INFEASIBLE = "Infeasible"
    BUDGET_INFEASIBLE = "BudgetInfeasible"  # Ready's reason and the error metric's

    # RolloutComplete
    ROLLOUT_COMPLETE = "RolloutComplete"
    RESTARTS_DISABLED = "RestartsDisabled"
    ROLLOUT_IN_PROGRESS = "RolloutInProgress"
    ROLLOUT_PENDING = "RolloutPending"
    ROLLOUT_STALLED = "RolloutStalled"

    # DatabaseHealthy (the database watch); raised signals give their kind as the reason
    WITHIN_THRESHOLDS = "WithinThresholds"
    NOT_YET_OBSERVED = "NotYetObserved"
    ACTIVITY_UNREADABLE = "ActivityUnreadable"
    NOT_JUDGED = "NotJudged"  # no plan to judge the reading against (database, infeasible)

    # Events about what a reconcile did
    CONFIGMAP_UPDATED = "ConfigMapUpdated"
    CONFIGMAP_ADOPTED = "ConfigMapAdopted"
    ROLLOUT_RESTARTED = "RolloutRestarted"
    CONFIG_HASH_OVERWRITTEN = "ConfigHashOverwritten"


class SkipReason(StrEnum):
    """Why a target was not restarted this round (the `reason` label of
    poolbudget_restarts_skipped_total)."""

    UNCHANGED = "Unchanged"  # the pod template already runs these settings
    DISABLED = "Disabled"  # rollout.strategy None
    COOLDOWN = "Cooldown"  # minIntervalSeconds since its last restart
    MAX_CONCURRENT = "MaxConcurrent"  # maxConcurrent Deployments are rolling
    ROLLING = "Rolling"  # its own previous rollout is still in progress
    WAITING_FOR_SHRINK = "WaitingForShrink"  # its pool grows: others shrink first


# Why the database's limits could not be read (the DatabaseObserved=False reasons).
DATABASE_FAILURES = frozenset(
    {
        Reason.SECRET_NOT_FOUND,
        Reason.SECRET_KEY_MISSING,
        Reason.SECRET_UNREADABLE,
        Reason.INVALID_DSN,
        Reason.AUTHENTICATION_FAILED,
        Reason.DATABASE_NOT_FOUND,
        Reason.DATABASE_UNREACHABLE,
        Reason.DATABASE_TIMEOUT,
        Reason.DATABASE_ERROR,
    }
)
# The `reason` label of poolbudget_errors_total: problems a person may have to act on.
ERROR_REASONS = DATABASE_FAILURES | {
    Reason.BUDGET_INFEASIBLE,
    Reason.INVALID_SPEC,
    Reason.WRITE_REFUSED,
}
