# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv with pip when it
# is missing and install voxseq with its dependencies (torch pinned through constraints.txt).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.voxseq-installed
PYTEST_ARGS ?=

.PHONY: demo test bench setup clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/voxseq demo

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_ar.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
