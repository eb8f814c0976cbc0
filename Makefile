# Developer entry points; both work on a fresh machine (they install what is missing).
#   make run    the stack and the stages on local defaults
#   make test   the whole suite against the local stack
PYTHON ?= python3
SMI = $(PYTHON) -m smi.cli
export PATH := $(PATH):/usr/local/go/bin:$(HOME)/go/bin

.PHONY: install stack-up stack-down test run

install:
	./scripts/install-deps

stack-up: install
	$(SMI) stack up

stack-down:
	$(SMI) stack down

# A hard limit: a test that leaves a non-daemon thread behind must fail the run,
# not hang it until CI's own limit.
test: stack-up
	timeout --kill-after=30 30m $(PYTHON) -m pytest -q

run: stack-up
	PAYMENTS=local UPSCALER=local $(SMI) run all
