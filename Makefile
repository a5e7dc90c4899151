# Developer entry points. Every target does its own set-up: a fresh machine
# needs only Python 3.11, Go 1.26 and root (to install RabbitMQ from Debian).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
KUBECTL ?= kubectl

.PHONY: venv binaries env-up env-down test unit lint bench bench-env-up bench-scaler bench-agent demo install run deploy

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,demo]'
	touch $@

venv: $(INSTALLED)

## binaries: build (or reuse cached) etcd, kube-apiserver and kube-controller-manager;
## uses $KUBEBUILDER_ASSETS instead when it is set.
binaries: venv
	$(PY) -m openchecker_testenv binaries

## env-up: start the local control plane and RabbitMQ, or keep them when already running;
## writes .local/kubeconfig and .local/env (load it with `source .local/env`).
env-up: venv
	$(PY) -m openchecker_testenv up

## env-down: stop everything env-up started (a broker from $RABBITMQ_URL keeps running).
env-down: venv
	$(PY) -m openchecker_testenv down

## lint: ruff and mypy (strict).
lint: venv
	$(VENV)/bin/ruff check operator agent testenv tests bench
	$(VENV)/bin/mypy

## unit: tests that need no server.
unit: venv
	$(PY) -m pytest tests/unit

## test: the whole suite; reuses a running env-up environment, else starts its own servers.
test: venv lint
	$(PY) -m pytest

## bench: every benchmark under bench/; each adds itself as a prerequisite.
bench: bench-env-up bench-agent bench-scaler

## bench-env-up: warm start time of the control plane and the broker.
bench-env-up: venv
	$(PY) bench/env_up.py

## bench-agent: agent throughput against a bare pika consumer, and idle memory.
bench-agent: venv
	$(PY) bench/agent_throughput.py

## bench-scaler: scaler cost per poll cycle for 1 to 1,000 resources, and publish-to-replicas time.
bench-scaler: venv
	$(PY) bench/scaler_cycle.py
	$(PY) bench/scaler_reaction.py

## install: install the CRD into the cluster of the current KUBECONFIG.
install:
	$(KUBECTL) apply -k crds/

## run: run the operator locally against the current KUBECONFIG, in all namespaces
## (run `make install` first).
run: venv
	$(PY) -m openchecker_operator --all-namespaces --standalone

## deploy: install the CRD, the RBAC rules and the operator Deployment (needs its image).
deploy:
	$(KUBECTL) apply -k manifests/

## demo: the whole flow on this machine: environment, operator, a batch of check
## requests, agents that follow the scaler, a summary and docs/demo.png.
demo: venv
	$(PY) -m openchecker_testenv.demo
