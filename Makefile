# `make demo` and `make test` each create or refresh .venv, then run. `make test` = the suite + the mutation check.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test mutants bench clean

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dspark demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests
	$(PY) tests/mutants/run.py

mutants: $(STAMP)
	$(PY) tests/mutants/run.py

bench: $(STAMP)
	$(PY) benchmarks/bench_plain_decoding.py

clean:
	rm -rf $(VENV) build *.egg-info
