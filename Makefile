# dask-ec2-ansible: one command for a cluster, one for the tests.
#
#   make demo        local cluster "demo" (1 scheduler, 2 workers, Jupyter Lab)
#   make demo-down   remove it
#   make bake        a baked local image (bake.yml): make demo BASE_IMAGE=<the name it prints> installs nothing
#   make demo-aws    the aws flow with no AWS account: a local EC2 emulator, then site.yml -e provider=aws
#   make demo-aws-down  tear that cluster down and stop the emulator (nothing of either is left)
#   make status      every cluster and leftover of ours on AWS, priced (REGIONS=eu-west-1,us-east-1; default: all)
#   make ssh         a shell on the scheduler of CLUSTER (NODE=worker-1: a worker; CMD='...': run that instead)
#   make tunnel      Jupyter, dashboard, scheduler of CLUSTER on localhost until Ctrl-C (PORTS=18888,18787,18786)
#   make logs        the services' journals of CLUSTER, each line prefixed by machine and service
#                    (NODE=all|scheduler|worker-N SERVICE=all|scheduler|worker|jupyter|autoscaler SINCE=1h FOLLOW=1)
#   make ssh-config  .clusters/CLUSTER/ssh_config (ssh CLUSTER-worker-1, VS Code) and the Include line for ~/.ssh/config
#   make test        everything needed, then the whole test suite (CI runs this) but the slow-marked tests
#   make test-slow   the tests left out of make test for their time (pytest -m slow)
#   make sanity      ansible-test sanity on the collection, offline (make test runs it too)
#   make images      both local base images, Debian 12 and 13 (make image OS=debian-13: one)
#   make bench       time to a ready cluster, re-run cost, uv vs pip (not in make test)
#   make browser     the cluster tests, Jupyter Lab in Chromium among them

SHELL := /bin/bash
# No "make[1]: Entering directory" lines: make ssh CMD=... prints only what
# the command prints, also when run from another make (make test's tests).
MAKEFLAGS += --no-print-directory
VENV := .venv
PLAYBOOK := $(VENV)/bin/ansible-playbook
# Networks that intercept TLS: a PEM bundle with their CA, installed on the
# machines and used by uv. Defaults to the bundle this machine is told to
# trust through SSL_CERT_FILE, when that is set.
EXTRA_CA_BUNDLE ?= $(SSL_CERT_FILE)
CLUSTER ?= demo
WORKERS ?= 2
CA_ARG := $(if $(strip $(EXTRA_CA_BUNDLE)),-e extra_ca_bundle=$(EXTRA_CA_BUNDLE),)
# make test runs the test files on TEST_JOBS processes (pytest-xdist): each file
# on one process, in its order, with its own clusters and emulator (every file
# names its own), so two files can share the machine. Most of a cluster test
# is waiting (boots, services, SSH), which the other process fills.
# TEST_JOBS=1 runs them one after another.
TEST_JOBS ?= 2
PYTEST_PARALLEL := $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder,)
# The emulator's cluster is not called "demo": a docker and an aws cluster of
# one name would share an inventory group. CLUSTER=... still picks the name.
AWS_DEMO_CLUSTER := $(if $(filter command line environment,$(origin CLUSTER)),$(CLUSTER),demo-aws)
EMULATOR := $(VENV)/bin/python scripts/ec2-emulator
# The aws tools pointed at the emulator (and at nothing else), for one command.
EMULATOR_ENV := set -a && . .emulator/env.sh && set +a &&

.PHONY: help setup collection-link sanity docker image images test-tools demo demo-down bake demo-aws demo-aws-down status ssh tunnel logs ssh-config lint molecule test test-slow test-static browser bench clean

help:
	@sed -n 's/^#   //p' Makefile

## Controller: uv, .venv/ from uv.lock, collections check
setup: $(VENV)/.setup-done collection-link

## This checkout as the collection dask_ec2_ansible.cluster (ansible.cfg's
## collections_path): a link, checked on every make setup (cheap)
collection-link:
	@scripts/link-collection

$(VENV)/.setup-done: pyproject.toml uv.lock requirements.yml scripts/bootstrap
	scripts/bootstrap
	@touch $@

## A Docker engine that answers (started here where we can)
docker:
	scripts/ensure-docker

## The local provider's base image (debootstrap when no registry answers):
## the default os_family's (the Debian whose Python is .venv's), or OS=debian-13
image: docker
	scripts/build-base-image $(OS)

## Both Debian base images (Molecule tests on both)
images: docker
	scripts/build-base-image all

## Chromium and certutil (the browser test) and rsync (sync.yml's rsync path)
## from the distribution's packages
test-tools:
	scripts/ensure-test-tools

demo: setup image
	$(PLAYBOOK) site.yml -e provider=docker -e cluster_name=$(CLUSTER) -e worker_count=$(WORKERS) $(CA_ARG) \
		$(if $(strip $(BASE_IMAGE)),-e base_image=$(BASE_IMAGE),)

bake: setup image
	$(PLAYBOOK) bake.yml -e provider=docker $(CA_ARG)

demo-down: setup docker
	$(PLAYBOOK) teardown.yml -e provider=docker -e cluster_name=$(CLUSTER)

## The aws flow on a local EC2 emulator (scripts/ec2-emulator): moto answers the
## EC2 API on 127.0.0.1 and every instance is a local machine; no account, no bill
demo-aws: setup image
	$(EMULATOR) start --uv-cache .cache/uv
	$(EMULATOR_ENV) $(PLAYBOOK) site.yml -e @.emulator/vars.yml -e cluster_name=$(AWS_DEMO_CLUSTER) -e worker_count=$(WORKERS) $(CA_ARG)

demo-aws-down: setup docker
	if $(EMULATOR) status >/dev/null; then \
	  $(EMULATOR_ENV) $(PLAYBOOK) teardown.yml -e @.emulator/vars.yml -e cluster_name=$(AWS_DEMO_CLUSTER); fi
	$(EMULATOR) stop

## AWS: every cluster and leftover of this toolkit, priced (read-only; no provider needed)
status: setup
	$(PLAYBOOK) playbooks/status.yml $(if $(strip $(REGIONS)),-e regions=$(REGIONS),)

## A cluster's machines from here, for either provider (scripts/cluster-ssh reads
## .clusters/$(CLUSTER)/cluster.json and known_hosts): a shell, or one command
## (make fails when it fails), or the tunnel to Jupyter, dashboard and scheduler.
NODE ?= scheduler
ssh:
	@scripts/cluster-ssh $(CLUSTER) --node $(NODE) $(if $(strip $(value CMD)),-- '$(subst ','\'',$(value CMD))')

tunnel:
	@scripts/cluster-ssh $(CLUSTER) --tunnel $(if $(strip $(PORTS)),--ports $(PORTS))

## The journals of the cluster's services (all machines unless NODE= names one).
logs:
	@scripts/cluster-ssh $(CLUSTER) --logs --node $(if $(filter command line environment,$(origin NODE)),$(NODE),all) \
		--service $(or $(SERVICE),all) $(if $(strip $(SINCE)),--since '$(SINCE)') $(if $(filter 1 yes true,$(FOLLOW)),--follow)

## A Host entry per machine in .clusters/$(CLUSTER)/ssh_config (playbooks/ssh_config.yml, through the
## provider's inventory); INCLUDE=1 also adds the Include line to ~/.ssh/config. The provider is the
## one cluster.json names (an aws cluster on the emulator: . .emulator/env.sh first, as for any playbook).
CLUSTER_PROVIDER = $(shell sed -n 's/^  "provider": "\([a-z]*\)".*/\1/p' .clusters/$(CLUSTER)/cluster.json 2>/dev/null)
ssh-config: setup
	$(PLAYBOOK) playbooks/ssh_config.yml -e cluster_name=$(CLUSTER) $(if $(CLUSTER_PROVIDER),-e provider=$(CLUSTER_PROVIDER)) \
		$(if $(filter 1 yes true,$(INCLUDE)),-e ssh_config_include=true)

lint: setup
	$(VENV)/bin/yamllint --strict .
	$(VENV)/bin/ansible-lint

## Static checks only (no Docker needed)
test-static: setup
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/pytest -m "not cluster and not molecule"

## Every role's Molecule scenario, or one: make molecule ROLE=dask_worker
molecule: setup images
ifdef ROLE
	cd roles/$(ROLE) && PATH=$(CURDIR)/$(VENV)/bin:$$PATH EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) molecule test
else
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/pytest tests/test_molecule.py
endif

## The local cluster's tests, the browser test among them (one cluster, ~12 min)
browser: setup image test-tools
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/pytest tests/test_cluster.py

## ansible-test sanity on the built collection (scripts/sanity); its pip
## bootstrap script made from PyPI's pip wheel, not downloaded from the internet
sanity: setup
	scripts/sanity $(SANITY_ARGS)

## Everything
test: setup images test-tools
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/pytest $(PYTEST_PARALLEL)

## The tests marked slow (pyproject.toml leaves them out of every other run).
test-slow: setup images test-tools
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/pytest -m slow $(PYTEST_PARALLEL)

## Benchmark (slow, noisy: not part of make test): make bench BENCH_ARGS="--runs 1"
bench: setup image
	EXTRA_CA_BUNDLE=$(EXTRA_CA_BUNDLE) $(VENV)/bin/python scripts/bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache
