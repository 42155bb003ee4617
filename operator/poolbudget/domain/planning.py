"""From a PoolBudget spec and observed facts to the sizing engine's inputs and its plan."""

from __future__ import annotations

from collections.abc import Mapping

from poolbudget.api.v1alpha1 import PoolBudgetSpec, Target
from poolbudget.domain.facts import DatabaseFacts, DeploymentFacts
from poolbudget.domain.sizing import BudgetLimits, BudgetPlan, TargetDemand, plan_budget

# PostgreSQL's default superuser_reserved_connections, assumed when the database is not asked.
POSTGRES_DEFAULT_SUPERUSER_RESERVED = 3


def limits_for(spec: PoolBudgetSpec, database: DatabaseFacts) -> BudgetLimits:
    """The budget's limits and how it is shared; spec.database.maxConnectionsOverride wins
    over the server."""
    max_connections = spec.database.max_connections_override or database.max_connections
    return BudgetLimits(
        max_connections=max_connections,
        withheld_by_server=database.withheld_by_server,
        reserved_connections=spec.reserved_connections,
        share_by=spec.share_by,
    )


def demand_for(spec: PoolBudgetSpec, target: Target, deployment: DeploymentFacts) -> TargetDemand:
    max_overflow = (
        target.max_overflow if target.max_overflow is not None else spec.defaults.max_overflow
    )
    return TargetDemand(
        name=target.deployment_name,
        pods=deployment.pods_worst_case(spec.replica_basis, spec.terminating_pods),
        processes_per_pod=target.processes_per_pod,
        weight=target.weight,
        min_pool_size=target.min_pool_size,
        max_pool_size=target.max_pool_size,
        max_overflow=max_overflow,
    )


def plan_for(
    spec: PoolBudgetSpec,
    database: DatabaseFacts,
    deployments: Mapping[str, DeploymentFacts],
) -> BudgetPlan:
    """Plan every target of the spec; each target must have its Deployment's facts."""
    demands = [demand_for(spec, t, deployments[t.deployment_name]) for t in spec.targets]
    return plan_budget(limits_for(spec, database), demands)
