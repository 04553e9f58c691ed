PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench docs clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	# the local-LR benchmark's baselines (its --quick mode is a test); --no-deps keeps the CPU torch
	$(PY) -m pip install --quiet --no-deps prodigyopt dadaptation pytorch-optimizer
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py --out runs/demo

test: $(STAMP)
	command -v chromium || (apt-get update -qq && apt-get install -y -qq chromium) || true
	$(PY) -m pytest -q -ra

docs: $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	$(VENV)/bin/mkdocs build --strict

lint: $(STAMP)
	$(PY) -m ruff check lightning_eos tests examples benchmarks

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	# --no-deps: the peers' own requirements would replace the CPU torch with a CUDA build.
	$(PY) -m pip install --quiet --no-deps pyhessian hessian-eigenthings curvlinops-for-pytorch \
		einops einconv opt-einsum linear_operator backpack-for-pytorch
	$(PY) benchmarks/bench_curvature.py
	$(PY) benchmarks/bench_twin.py

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
