# Everything a fresh machine needs: `make demo` runs the main job, `make test` the suite.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: the CPU build on disk; a looser pin would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray,lightning]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/pipesparse demo

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/stream.py
	$(PY) benchmarks/loader.py
	$(PY) benchmarks/shards.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
