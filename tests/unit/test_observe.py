"""deployment_state on Deployment bodies as the API server returns them: a Deployment is
mid-rollout (`rolling`) until the Deployment controller calls its rollout finished (issue
13: pacing used to count a rollout as finished once its old pods were gone, while new ones
were still unavailable)."""

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


def test_observed_generation_behind_holds_a_slot_as_unobserved() -> None:
    """The counts were written for the previous generation (just after the operator patched
    the template, say): `unobserved` holds a pacing slot (domain/rollout.py) until the
    controller has looked, without reporting a metadata-only edit as a rollout."""
    state = deployment_state(body(generation=3, status=COMPLETE))
    assert state.unobserved
    assert not state.rolling
    behind = COMPLETE | {"replicas": 5, "updatedReplicas": 1}
    assert deployment_state(body(generation=3, status=behind)).rolling


def test_a_scale_up_after_a_finished_rollout_is_not_a_rollout() -> None:
    """The controller keeps NewReplicaSetAvailable while it scales the new ReplicaSet: pods
    an HPA adds do not make the Deployment mid-rollout (nor RolloutComplete flap)."""
    scaling = COMPLETE | {"replicas": 6, "updatedReplicas": 6, "availableReplicas": 4}
    assert not deployment_state(body(replicas=6, status=scaling)).rolling
    # Without that reason (no progress deadline, or a rollout still under way) the counts
    # decide: not all available, not finished.
    mid = scaling | {"conditions": [progressing("ReplicaSetUpdated")]}
    assert deployment_state(body(replicas=6, status=mid)).rolling
    bare = {k: v for k, v in scaling.items() if k != "conditions"}
    assert deployment_state(body(replicas=6, status=bare)).rolling


def test_scaled_down_mid_rollout_is_rolling_until_the_smaller_count_is_complete() -> None:
    """Scaled from 4 to 2 while rolling: old pods and surplus new pods are still there."""
    updating = {"conditions": [progressing("ReplicaSetUpdated")]}
    during = COMPLETE | updating | {"replicas": 4, "updatedReplicas": 3, "availableReplicas": 3}
    assert deployment_state(body(replicas=2, status=during)).rolling
    surplus = COMPLETE | updating | {"replicas": 3, "updatedReplicas": 3, "availableReplicas": 2}
    assert deployment_state(body(replicas=2, status=surplus)).rolling
    done = COMPLETE | updating | {"replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}
    assert not deployment_state(body(replicas=2, status=done)).rolling


def test_zero_replicas() -> None:
    """At 0 the controller omits the zero counts: complete once observed."""
    assert not deployment_state(body(replicas=0, status={"observedGeneration": 2})).rolling
    # Scaled to 0 mid-rollout: pods of both ReplicaSets are still going away.
    going = {"observedGeneration": 2, "replicas": 2, "updatedReplicas": 1}
    assert deployment_state(body(replicas=0, status=going)).rolling
    # Created, not yet seen by the controller (no status at all): it holds a slot.
    assert deployment_state(body(replicas=0, generation=1, status={})).unobserved


def test_spec_replicas_defaults_to_one() -> None:
    one = {"observedGeneration": 2, "replicas": 1, "updatedReplicas": 1, "availableReplicas": 1}
    assert not deployment_state(body(replicas=None, status=one)).rolling


def test_pods_shutting_down_do_not_hold_a_finished_rollout() -> None:
    """The status cannot tell a rollout's terminating pods from a scale-down's, and the
    budget covers them per Deployment (terminatingPods: Counted)."""
    assert not deployment_state(body(status=COMPLETE | {"terminatingReplicas": 2})).rolling


def test_stalled_only_while_rolling() -> None:
    deadline = [progressing("ProgressDeadlineExceeded", status="False")]
    stuck = COMPLETE | {"replicas": 5, "updatedReplicas": 2, "conditions": deadline}
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
def test_finished_only_when_the_controller_says_so(deployment: dict[str, Any]) -> None:
    """Old pods left always means mid-rollout (the old test is kept); not rolling means the
    controller's DeploymentComplete holds, or it reported the last rollout complete and
    has been scaling the new ReplicaSet since."""
    state = deployment_state(deployment)
    status = deployment["status"]
    replicas = deployment["spec"].get("replicas", 1)
    assert state.unobserved == (
        count(status, "observedGeneration") < deployment["metadata"]["generation"]
    )
    if count(status, "replicas") > count(status, "updatedReplicas"):
        assert state.rolling
    if not state.rolling:
        assert not state.stalled
        counts_complete = (
            count(status, "updatedReplicas")
            == count(status, "replicas")
            == count(status, "availableReplicas")
            == replicas
        )
        progressing = [c for c in status.get("conditions", []) if c["type"] == "Progressing"]
        reported = bool(progressing) and progressing[0] == {
            "type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"
        }  # fmt: skip
        assert counts_complete or reported
