# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both create .venv and install fxstream with its test extra on first use.
# TORCH_SPEC picks the torch build: the default is the CPU-machine release that ships
# torchvision wheels; on a GPU machine use e.g. `make test TORCH_SPEC=torch` or your own venv.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test install clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) examples/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
