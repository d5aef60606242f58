# Two commands for a fresh machine:  make demo  |  make test
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: demo test lint bench clean chromium

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) -e '.[dev]'
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/ichscan demo --out demo_out

# The browser end-to-end tests drive Debian's Chromium (Playwright never downloads a browser).
# Installed here when missing and apt is usable; otherwise those tests skip and say why.
chromium:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } \
	  || echo "chromium not installed: browser e2e tests will skip"; }

test: $(VENV)/.installed chromium
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest -n 2 -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/preprocess.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache .ruff_cache
