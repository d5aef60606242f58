# Two commands for a fresh machine:  make demo  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ichscan demo --out demo_out

test: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
