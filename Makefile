# The two commands of a fresh machine (see README.md): `make run` and `make test`.
PYTHON ?= python3

.PHONY: setup run test test-fast

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job on the embedded default: GRPO on the tiny model, one CPU box.
run: setup
	$(PYTHON) jobs/rl.py

test: setup
	$(PYTHON) -m pytest -q

# Without the multi-process / end-to-end tier.
test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"
