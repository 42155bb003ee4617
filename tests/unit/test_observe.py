"""deployment_state on Deployment bodies as the API server returns them: a Deployment is
mid-rollout (`rolling`) until the Deployment controller calls it complete and the pods it
replaced have exited (issue 13: pacing used to count a rollout as finished once its old
pods were gone, while new ones were still unavailable)."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from poolbudget.domain.observe import deployment_state


def body(
    *,
    replicas: int | None = 4,
    generation: int = 2,
    status: dict[str, Any] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"strategy": {"type": "RollingUpdate"}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {
        "metadata": {"name": "api", "generation": generation},
        "spec": spec,
        "status": {} if status is None else status,
    }


def progressing(reason: str, status: str = "True") -> dict[str, str]:
    return {"type": "Progressing", "status": status, "reason": reason}


COMPLETE = {
    "observedGeneration": 2, "replicas": 4, "updatedReplicas": 4, "availableReplicas": 4,
    "readyReplicas": 4, "terminatingReplicas": 0,
    "conditions": [progressing("NewReplicaSetAvailable")],
}  # fmt: skip


def test_complete_is_not_rolling() -> None:
    state = deployment_state(body(status=COMPLETE))
    assert not state.rolling
    assert not state.unobserved
    assert not state.stalled


def test_new_pods_not_yet_available_is_still_rolling() -> None:
    """The body of issue 13: the old pods are gone (replicas == updated), one new pod is not
    available yet, and the controller still says ReplicaSetUpdated. The old test
    (replicas > updated) called this finished and restarted the next Deployment."""
    status = {
        "observedGeneration": 2, "replicas": 6, "updatedReplicas": 6, "readyReplicas": 6,
        "availableReplicas": 5, "unavailableReplicas": 1,
        "conditions": [progressing("ReplicaSetUpdated")],
    }  # fmt: skip
    assert deployment_state(body(replicas=6, status=status)).rolling


def test_old_pods_left_is_rolling() -> None:
    status = COMPLETE | {"replicas": 5, "updatedReplicas": 2, "availableReplicas": 4}
    assert deployment_state(body(status=status)).rolling


def test_observed_generation_behind_is_rolling_whatever_the_counts() -> None:
    """The counts were written for the previous generation (just after the operator patched
    the template, say): they say nothing about this one."""
    state = deployment_state(body(generation=3, status=COMPLETE))
    assert state.unobserved
    assert state.rolling


def test_a_scale_up_in_progress_is_rolling() -> None:
    status = COMPLETE | {"replicas": 4, "updatedReplicas": 4, "availableReplicas": 4}
    assert deployment_state(body(replicas=6, status=status)).rolling


def test_scaled_down_mid_rollout_is_rolling_until_the_smaller_count_is_complete() -> None:
    """Scaled from 4 to 2 while rolling: old pods and surplus new pods are still there."""
    during = COMPLETE | {"replicas": 4, "updatedReplicas": 3, "availableReplicas": 3}
    assert deployment_state(body(replicas=2, status=during)).rolling
    surplus = COMPLETE | {"replicas": 3, "updatedReplicas": 3, "availableReplicas": 3}
    assert deployment_state(body(replicas=2, status=surplus)).rolling
    done = COMPLETE | {"replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert not deployment_state(body(replicas=2, status=done)).rolling


def test_zero_replicas() -> None:
    """At 0 the controller omits the zero counts: complete once observed."""
    assert not deployment_state(body(replicas=0, status={"observedGeneration": 2})).rolling
    # Scaled to 0 mid-rollout: pods of both ReplicaSets are still going away.
    going = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1}
    assert deployment_state(body(replicas=0, status=going)).rolling
    # Created, not yet seen by the controller (no status at all).
    assert deployment_state(body(replicas=0, generation=1, status={})).rolling


def test_spec_replicas_defaults_to_one() -> None:
    one = {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    assert not deployment_state(body(replicas=None, status=one)).rolling


def test_pods_still_shutting_down_are_rolling() -> None:
    """Replaced pods hold their pools until their processes exit; the controller no longer
    counts them in `replicas`, only in `terminatingReplicas` (when its feature is on)."""
    assert deployment_state(body(status=COMPLETE | {"terminatingReplicas": 1})).rolling
    without_the_field = {k: v for k, v in COMPLETE.items() if k != "terminatingReplicas"}
    assert not deployment_state(body(status=without_the_field)).rolling


def test_stalled_only_while_rolling() -> None:
    deadline = [progressing("ProgressDeadlineExceeded", status="False")]
    stuck = COMPLETE | {"availableReplicas": 3, "conditions": deadline}
    assert deployment_state(body(status=stuck)).stalled
    # A Deployment that completed after all: the counts win over a stale condition.
    assert not deployment_state(body(status=COMPLETE | {"conditions": deadline})).stalled


COUNTS = st.none() | st.integers(0, 8)
REASONS = st.sampled_from(
    [
        "NewReplicaSetAvailable",
        "ReplicaSetUpdated",
        "ProgressDeadlineExceeded",
        "NewReplicaSetCreated",
    ]
)


@st.composite
def bodies(draw: st.DrawFn) -> dict[str, Any]:
    """Deployment bodies with arbitrary counts (a missing count is how the API says 0)."""
    status: dict[str, Any] = {}
    for key in ("observedGeneration", "replicas", "updatedReplicas", "availableReplicas",
                "terminatingReplicas"):  # fmt: skip
        value = draw(COUNTS)
        if value is not None:
            status[key] = value
    conditions = draw(st.lists(st.builds(progressing, REASONS, st.sampled_from(["True", "False"]))))
    if conditions:
        status["conditions"] = conditions
    return body(
        replicas=draw(st.none() | st.integers(0, 8)),
        generation=draw(st.integers(1, 8)),
        status=status,
    )


def count(status: dict[str, Any], key: str) -> int:
    return int(status.get(key, 0))


@settings(max_examples=2000, deadline=None)
@given(bodies())
def test_not_rolling_only_when_the_controller_calls_it_complete(deployment: dict[str, Any]) -> None:
    """Each way a rollout can be unfinished keeps it rolling; not rolling means the
    controller's DeploymentComplete holds and nothing is shutting down."""
    state = deployment_state(deployment)
    status = deployment["status"]
    replicas = deployment["spec"].get("replicas", 1)
    if count(status, "observedGeneration") < deployment["metadata"]["generation"]:
        assert state.rolling
        assert state.unobserved
    if count(status, "replicas") > count(status, "updatedReplicas"):  # the old test
        assert state.rolling
    if count(status, "availableReplicas") < count(status, "updatedReplicas"):
        assert state.rolling
    if count(status, "updatedReplicas") != replicas:
        assert state.rolling
    if count(status, "terminatingReplicas") > 0:
        assert state.rolling
    if not state.rolling:
        assert (
            count(status, "updatedReplicas")
            == count(status, "replicas")
            == count(status, "availableReplicas")
            == replicas
        )
        assert not state.stalled
