# The README's commands. Each target sets the environment up first (idempotent, seconds when nothing changed).
SHELL := /bin/bash
ENV := . scripts/env.sh &&

.PHONY: setup demo test bench lint colcon-check
setup:
	@bash scripts/setup.sh

demo: setup
	@$(ENV) irevla demo

test: setup
	@$(ENV) ruff check . && ruff format --check --quiet irevla_ros || { echo "lint failed: run 'ruff check --fix . && ruff format irevla_ros'"; exit 1; }
	@$(ENV) python -m pytest

bench: setup
	@$(ENV) python -m irevla_ros.bench.run_all

lint: setup
	@$(ENV) ruff check . && ruff format --check irevla_ros
