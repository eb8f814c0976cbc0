# Developer entry points; both work on a fresh machine (they install what is missing).
#   make run    the stack and the stages on local defaults
#   make test   the whole suite against the local stack
PYTHON ?= python3
SMI = $(PYTHON) -m smi.cli
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin

.PHONY: install stack-up stack-down test test-scale run demo-check

install:
	./scripts/install-deps

stack-up: install
	$(SMI) stack up

stack-down:
	$(SMI) stack down

# A hard limit: a test that leaves a non-daemon thread behind must fail the run,
# not hang it until CI's own limit. The limits leave room for a slow day of the
# shared 2-core VM (on 2 December, 2.3 times slower at every baseline, the suite
# took 14 minutes and the scaled-out run 6.5, against 11 and 6 on a usual day, and
# one run's first minutes pointed at 30); with the install, both stay under CI's
# 90 minutes.
# The whole suite (the CI-sized chaos run included), then the end-to-end suite
# once more scaled out.
test: stack-up
	timeout --kill-after=30 45m $(PYTHON) -m pytest -q
	$(SCALE_OUT) timeout --kill-after=30 30m $(PYTHON) -m pytest -q tests/e2e

# The end-to-end suite scaled out (issue 7): two processes per Faust stage in each
# consumer group, and the job table on a throwaway 3-node Redis Cluster
# (tests/e2e/conftest.py: E2E_WORKERS, E2E_REDIS_CLUSTER).
SCALE_OUT = E2E_WORKERS=2 E2E_REDIS_CLUSTER=1
test-scale: stack-up
	$(SCALE_OUT) timeout --kill-after=30 30m $(PYTHON) -m pytest -q tests/e2e

# Local defaults: the built-in payment provider and the Pillow upscaler; the demo's
# sample image is served by the gateway on loopback, hence the allow-list entry.
DEMO_ENV = PAYMENTS=local UPSCALER=local URL_ALLOW_HOSTS=127.0.0.1/32

run: stack-up
	$(DEMO_ENV) $(SMI) run all --demo

# The `make run` path without the terminal: exits 0 once the demo job completed,
# its email is in var/mail and its download link works.
demo-check: stack-up
	$(DEMO_ENV) timeout --kill-after=30 10m $(SMI) run all --demo --once

# The pipeline under load (issue 7), not part of `make test`: starts its own
# `smi run all` on the stack, publishes and pays BENCH_JOBS jobs, and writes a
# JSON report to var/bench/ (BENCH_ARGS, e.g. --million; `smi bench --help`).
BENCH_JOBS ?= 20000
.PHONY: bench
bench: stack-up
	$(PYTHON) -m bench.run --jobs $(BENCH_JOBS) $(BENCH_ARGS)

# Exactly-once outcomes under crashes (issue 7), not part of `make test` (its CI-sized
# run is tests/chaos): CHAOS_JOBS jobs through every stage as its own process on a
# stack of the run's own (free ports in 29000-29999, never the shared stack, which
# it would kill), SIGKILLing stages, Redis and restarting Kafka; a table and a JSON
# report in var/chaos/ (CHAOS_ARGS, e.g. --seed 7; `python -m chaos.run --help`).
CHAOS_JOBS ?= 2000
.PHONY: chaos
chaos: install
	$(PYTHON) -m chaos.run --jobs $(CHAOS_JOBS) $(CHAOS_ARGS)
