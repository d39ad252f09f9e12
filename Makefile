# cskd_ray — run `make help` for the targets.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export HF_HUB_OFFLINE ?= 1

.DEFAULT_GOAL := help
.PHONY: help setup browser proxy-weights bytecode demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

help: ## Show the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

setup: $(STAMP) browser proxy-weights ## Create .venv and install cskd_ray with dev tools (versions pinned by constraints.txt)

browser: ## Install Debian's chromium for the report's browser test (skipped when present or not root)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
		{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		echo "note: chromium not installed; the report's browser test will be skipped"

proxy-weights: $(STAMP) ## Build the demo's proxy CLIP once (~2 min; cached in ~/.cache/cskd_ray, sha256-verified)
	$(PY) -m cskd_ray.models.proxy_clip --ensure

demo: $(STAMP) proxy-weights ## Run the pipeline on generated demo data on a local Ray; outputs in runs/demo
	$(VENV)/bin/cskd-ray demo --workdir runs/demo

# Every test spawns hundreds of Ray worker processes that import cskd_ray. Where PYTHONDONTWRITEBYTECODE is set
# (this CI image sets it), none of them writes __pycache__, so each recompiles what it imports (0.2 s for the
# train/stage modules; no measurable change in a one-Train-run test). compileall writes the bytecode once; Python
# ignores a file whose source changed since.
bytecode: $(STAMP)
	$(PY) -m compileall -q cskd_ray tests

test: $(STAMP) browser proxy-weights bytecode ## Run the whole test suite, as CI does (CPU, local Ray, moto S3 on loopback)
	$(PY) -m pytest

test-fast: $(STAMP) proxy-weights bytecode ## The inner loop: every test not marked slow (no training runs, no multi-process fault tests)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP) ## Check style with ruff, and the package's floors (imports only downward) with import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

bench: $(STAMP) ## Run the speed benchmarks (side-by-side ratios, machine load recorded); ends with a table of targets
	$(PY) benchmarks/run_all.py

clean: ## Remove runs/ and caches (keeps .venv)
	rm -rf runs .pytest_cache .ruff_cache
