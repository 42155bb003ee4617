"""Timeouts: the CRD, the renderer and the application's reader agree on one format and
one range. A PoolBudget with poolTimeoutSeconds 1e-9 was admitted, rendered as "1e-09",
which the client refused, and every reconcile of it failed."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from poolbudget.api.v1alpha1 import PoolBudgetSpec, describe_validation_error
from poolbudget.client import MIN_TIMEOUT_SECONDS, engine_kwargs_from_env, format_seconds
from poolbudget.domain.rendering import render_env
from poolbudget.domain.sizing import Allocation

ALLOCATION = Allocation(
    name="api", pods=3, workers=6, weight=1, pool_size=7, max_overflow=3,
    requested_max_overflow=3, at_max_pool_size=False,
)  # fmt: skip


def spec(pool_timeout: float, command_timeout: float) -> PoolBudgetSpec:
    return PoolBudgetSpec.model_validate({
        "database": {"maxConnectionsOverride": 200},
        "targets": [{"deploymentName": "api"}],
        "defaults": {"poolTimeoutSeconds": pool_timeout, "commandTimeoutSeconds": command_timeout},
    })  # fmt: skip


@given(
    pool_timeout=st.floats(min_value=MIN_TIMEOUT_SECONDS, max_value=3600),
    command_timeout=st.floats(min_value=MIN_TIMEOUT_SECONDS, max_value=86400),
)
def test_every_admitted_timeout_renders_to_what_the_client_reads(
    pool_timeout: float, command_timeout: float
) -> None:
    admitted = spec(pool_timeout, command_timeout)
    env = render_env(admitted, admitted.targets[0], ALLOCATION)
    kwargs = engine_kwargs_from_env(env)  # raises on anything the client would refuse
    assert kwargs["pool_timeout"] == pytest.approx(pool_timeout, abs=0.0005)
    assert kwargs["connect_args"]["command_timeout"] == pytest.approx(command_timeout, abs=0.0005)
    assert "e" not in env["DB_POOL_TIMEOUT"] + env["DB_COMMAND_TIMEOUT"]


@pytest.mark.parametrize("tiny", [1e-9, 0.00005, 0.0009])
@pytest.mark.parametrize("field", ["poolTimeoutSeconds", "commandTimeoutSeconds"])
def test_a_timeout_below_a_millisecond_is_refused_naming_the_field(field: str, tiny: float) -> None:
    values = {"poolTimeoutSeconds": 10.0, "commandTimeoutSeconds": 10.0, field: tiny}
    with pytest.raises(ValidationError) as refused:
        spec(values["poolTimeoutSeconds"], values["commandTimeoutSeconds"])
    message = describe_validation_error(refused.value)
    assert message == f"defaults.{field}: Input should be greater than or equal to 0.001"


@pytest.mark.parametrize(
    ("value", "text"),
    [(10.0, "10"), (2.5, "2.5"), (0.001, "0.001"), (0.25, "0.25"), (86400, "86400")],
)
def test_seconds_are_plain_decimals(value: float, text: str) -> None:
    assert format_seconds(value) == text
