# The two commands of a fresh machine (see README.md): `make run` and `make test`.
PYTHON ?= python3

.PHONY: setup run test test-fast

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

# The main job on the embedded default: GRPO on the tiny model after its cold start (built once),
# one CPU box, with tcmalloc preloaded where installed (deepeyes/allocator.py: faster CPU steps).
run: setup
	$(PYTHON) -m deepeyes.allocator $(PYTHON) jobs/rl.py

test: setup
	$(PYTHON) -m pytest -q

# Without the multi-process / end-to-end tier.
test-fast: setup
	$(PYTHON) -m pytest -q -m "not slow"
