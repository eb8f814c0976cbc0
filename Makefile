# Developer entry points. `make install` once, then `make test` (brings the local
# stack up first) or `make run`. `make stack-down` stops what the stack started.
PYTHON ?= python3
SMI = $(PYTHON) -m smi.cli

.PHONY: install stack-up stack-down test run

install:
	$(PYTHON) -m pip install -e '.[dev]'

stack-up:
	$(SMI) stack up

stack-down:
	$(SMI) stack down

# The integration tests talk to the stack on the default ports.
test: stack-up
	$(PYTHON) -m pytest -q

run: install stack-up
	@echo "The local stack is up (smi stack status). The pipeline stages (checkout,"
	@echo "processor, notifier, janitor, gateway) are not written yet: 'smi run' comes"
	@echo "with them in later issues."
