# The two commands of the README, and lint. Each builds .venv when it is missing or stale: the pinned runtime lock
# (requirements.txt), the test and lint tools (requirements-dev.txt), and this package (editable: `nbp-jax`).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= workdirs/demo
PYTEST_ARGS ?=
# Transparent huge pages for malloc's large (mmap'd) blocks: XLA:CPU's multi-GB temporaries then fault 2 MiB pages
# instead of 4 KiB ones (the 187M training benchmark: 18.0 -> 16.1 s per step). glibc >= 2.35 reads it; others, and
# kernels with THP off, ignore it.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

.PHONY: demo test lint venv clean

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

demo: venv
	$(PY) -m nbp_jax.main --config=configs/demo.py --workdir=$(WORKDIR) --mode=pipeline

# Everything, the slow end-to-end tests too (PYTEST_ARGS="-m 'not slow'" leaves those out), on TEST_WORKERS
# processes (pytest-xdist; TEST_WORKERS=0 runs in this process). A file's tests run on one worker, so its module
# fixtures are built once; the workers share the one end-to-end fixture (tests/conftest.py).
TEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) tests

lint: venv
	$(VENV)/bin/ruff check nbp_jax tests

clean:
	rm -rf $(VENV) workdirs build dist
