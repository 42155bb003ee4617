# poolbudget-operator — every entry point a developer or CI uses.
#   make demo   fresh machine -> local cluster (control plane + a node) + PostgreSQL + operator,
#               the sample application as pods, a worked example
#   make test   everything CI runs (lint, types, architecture, unit, PostgreSQL, cluster tests)
# Slow artefacts (Go-built binaries, Go module cache, container images) are cached outside
# the repo under $(POOLBUDGET_CACHE); the virtualenv lives in .venv and is rebuilt when
# pyproject changes. Needs root: the node runs containers (see README, "A fresh machine").

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
export POOLBUDGET_CACHE ?= $(HOME)/.cache/poolbudget
export GOTOOLCHAIN := local
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: help venv postgres node-deps images image fleet-pods binaries crds manifests chart-docs lint typecheck archcheck unit test test-fast chaos cluster-up cluster-down demo fleet bench clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(VENV)/.stamp: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $@

venv: $(VENV)/.stamp ## create/refresh the virtualenv with the package and dev tools

postgres: ## make sure a PostgreSQL 15 server (Debian) is installed for the tests
	bash hack/install-postgres.sh

node-deps: ## make sure runc, the CNI plugins, buildah and debootstrap (Debian) are installed
	bash hack/install-node.sh

binaries: ## build (or reuse from cache) etcd, kube-*, kubelet, containerd, ctr, helm
	bash hack/build-binaries.sh

images: venv node-deps binaries ## build (or reuse from cache) the pause, base, sample app and operator images
	$(PY) -m devtools.images

image: venv node-deps binaries ## the operator image from ./Dockerfile, as a docker-archive tarball
	$(PY) -m devtools.images operator

crds: venv ## regenerate crds/ (and the chart's copy) from the pydantic models; tests check both
	$(PY) -m poolbudget.api.crd > crds/poolbudget.dev_poolbudgets.yaml
	cp crds/poolbudget.dev_poolbudgets.yaml charts/poolbudget-operator/crds/

manifests: binaries ## regenerate manifests/install.yaml and install-namespaced.yaml from the chart (tests check them)
	bash hack/render-install-manifest.sh > manifests/install.yaml
	bash hack/render-install-manifest.sh default > manifests/install-namespaced.yaml

chart-docs: venv ## regenerate the values table in the chart README from values.yaml's comments (a test checks it)
	$(PY) hack/chart-values-table.py --write

lint: venv ## ruff
	$(VENV)/bin/ruff check operator devtools tests images hack
	$(VENV)/bin/ruff format --check operator devtools tests images hack

typecheck: venv ## mypy --strict
	$(VENV)/bin/mypy operator/poolbudget devtools tests images/sampleapp/sampleapp.py hack/chart-values-table.py

archcheck: venv ## import-linter: the domain stays pure
	$(VENV)/bin/lint-imports

unit: venv ## pure tests only (no PostgreSQL, no cluster)
	$(PY) -m pytest -m "not postgres and not cluster and not e2e"

test: venv postgres node-deps binaries images lint typecheck archcheck ## everything CI runs
	$(PY) -m pytest

test-fast: venv lint typecheck archcheck unit ## the quick loop while editing

chaos: venv postgres node-deps binaries images ## the fault suite with more trials, longer outages; figures in out/chaos.json
	POOLBUDGET_CHAOS_TRIALS=$${POOLBUDGET_CHAOS_TRIALS:-20} \
	POOLBUDGET_OUTAGE_SECONDS=$${POOLBUDGET_OUTAGE_SECONDS:-90} $(PY) -m pytest -m chaos

cluster-up: venv node-deps binaries images ## start a local cluster with a node (CLUSTER_ARGS=--no-node)
	$(PY) -m devtools.localcluster up $(CLUSTER_ARGS)

cluster-down: venv ## stop the local control plane started by cluster-up
	$(PY) -m devtools.localcluster down

demo: venv postgres node-deps binaries images ## the worked example end to end (DEMO_ARGS=--keep leaves it running)
	$(PY) -m devtools.demo $(DEMO_ARGS)

fleet: venv postgres ## the fleet proof: one process per worker bursts 3x its pool; budgeted vs naive 50+20 (FLEET_ARGS=--scale small)
	$(PY) -m devtools.fleet $(FLEET_ARGS)

fleet-pods: venv postgres node-deps binaries images ## the fleet proof on real pods with the operator (FLEET_ARGS=--scale small); writes out/fleet-pods.png
	$(PY) -m devtools.fleet_pods $(FLEET_ARGS)

bench: venv postgres binaries ## figures: reaction latency vs a minimal client, no-op cost, scale, activity query cost (BENCH_ARGS=...)
	$(PY) -m devtools.bench $(BENCH_ARGS)

clean: ## remove the virtualenv and tool caches inside the repo (not the Go build cache)
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis .import_linter_cache
