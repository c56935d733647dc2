# On a fresh machine:  `make demo`  (torch and the light [demo] extra),  `make test`  (the fast
# tier of the test suite, with the [test] extra) and  `make test-all`  (the whole suite, as CI).
# Each creates .venv on first use and installs only what it needs.
# TORCH_SPEC picks the torch build: the default is the CPU-machine release that ships
# torchvision wheels; on a GPU machine use e.g. `make test TORCH_SPEC=torch` or your own venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-all install clean

$(VENV)/.torch:
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e '.[demo]'
	touch $@

$(VENV)/.test: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.test

demo: $(VENV)/.demo
	$(PY) examples/demo.py

# The fast tier: every op family, both schedules, the contract, the CLI and slides, without
# the tests marked slow (tests/tiers.py). `make test-all` runs those too.
test: $(VENV)/.test
	$(PY) -m pytest -q -m "not slow"

test-all: $(VENV)/.test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
