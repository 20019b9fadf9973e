# Every target builds .venv from nothing first, so a fresh clone needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench venv system-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Debian's chromium, for the test that opens the session report in a real browser.
system-deps:
	bash deploy/install-system-deps.sh

test: $(STAMP) system-deps
	$(PY) -m pytest -q

# Benchmarks run as modules from the root, so benchmarks/drivers.py cannot shadow `drivers`.
BENCHMARKS := simulators correlation drivers protocols service session

bench: $(STAMP)
	@mkdir -p benchmarks/out
	@for b in $(BENCHMARKS); do \
		echo "== $$b"; \
		$(PY) -m benchmarks.$$b > benchmarks/out/$$b.json || exit 1; \
		cat benchmarks/out/$$b.json; \
	done

demo: $(STAMP)
	$(PY) -m daemon.demo

clean:
	rm -rf $(VENV) build *.egg-info
