# The two commands of the README: `make main` runs the main job, `make test` the tests.
# Each creates and fills .venv on first use (see scripts/env.sh).
SHELL := /bin/bash
PYTEST_ARGS ?=

.PHONY: main test bench clean

main:
	source scripts/env.sh && python -m kdfast demo --config configs/demo.yaml --out runs/demo

test:
	source scripts/env.sh && python -m pytest -q $(PYTEST_ARGS)

bench:
	source scripts/env.sh && python -m benchmarks.cpu_core

clean:
	rm -rf .venv build *.egg-info
