# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv, installs torch==2.13.0 first (the CPU build on local disk; a later resolver
# would otherwise pull a multi-GB CUDA build), then the package with its extras.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: bench demo test system-deps clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[sim,train,test]'
	touch $(STAMP)

system-deps:
	bash scripts/install-system-deps.sh

bench: $(STAMP)
	$(VENV)/bin/vla-opt bench

demo: $(STAMP)
	$(VENV)/bin/vla-opt demo

test: system-deps $(STAMP)
	MUJOCO_GL=egl $(PY) -m pytest

clean:
	rm -rf $(VENV)
