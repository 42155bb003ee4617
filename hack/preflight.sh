#!/bin/sh
# Pre-flight for CI: render a Helm chart and fail the build when a PoolBudget in it cannot
# fit its Deployments' worst case (replicas or HPA maxReplicas, plus rollout surge) into
# the database's connections.
#
#   hack/preflight.sh [NAME] CHART [HELM_TEMPLATE_ARGS...] -- POOLBUDGET_PLAN_ARGS...
#   hack/preflight.sh shop examples/shop --namespace shop -f values-prod.yaml -- --max-connections 200
#   PGDSN=postgresql://... hack/preflight.sh ./chart -- --dsn-env PGDSN --diff-cluster
#
# Everything before `--` goes to `helm template`, everything after it to
# `poolbudget plan -f -`. Exit status: poolbudget plan's (0 feasible, 1 infeasible,
# 2 bad input, 3 with --fail-on-restart: a Deployment would restart), and 2 when helm
# cannot render the chart. HELM and POOLBUDGET name the binaries (default: from PATH).
# POSIX sh: runs in any CI image with helm and the poolbudget-operator package.
set -eu

HELM=${HELM:-helm}
POOLBUDGET=${POOLBUDGET:-poolbudget}

if [ "$#" -eq 0 ]; then
    echo "usage: $0 [NAME] CHART [HELM_TEMPLATE_ARGS...] -- [POOLBUDGET_PLAN_ARGS...]" >&2
    exit 2
fi

rendered=$(mktemp)
trap 'rm -f "$rendered"' EXIT

# The arguments before `--` (no arrays in POSIX sh: rotate them to the end of "$@" and
# drop the rest).
helm_template() {
    separator_seen=
    for arg do
        shift
        if [ -z "$separator_seen" ]; then
            if [ "$arg" = "--" ]; then separator_seen=1; else set -- "$@" "$arg"; fi
        fi
    done
    "$HELM" template "$@"
}

# The arguments after `--`.
poolbudget_plan() {
    while [ "$#" -gt 0 ]; do
        arg=$1
        shift
        if [ "$arg" = "--" ]; then break; fi
    done
    "$POOLBUDGET" plan -f - "$@"
}

# Rendered to a file first: a pipe would hide helm's exit status (no pipefail in POSIX sh).
if ! helm_template "$@" > "$rendered"; then
    echo "preflight: helm template failed" >&2
    exit 2
fi
status=0
poolbudget_plan "$@" < "$rendered" || status=$?
if [ "$status" -ne 0 ]; then
    echo "preflight: poolbudget plan exited $status" >&2
fi
exit "$status"
