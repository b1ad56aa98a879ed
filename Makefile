# mixbatch: `make demo` runs the main job end to end offline; `make test` runs every check.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch==2.13.0 first, in its own call: that pin takes the CPU wheel on this disk, where any
# other spec (or letting a dependency pull torch in) would download a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,gpu]'
	touch $@

demo: $(STAMP)
	$(BIN)/mixbatch demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy .

test: lint
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/enqueue.py

clean:
	rm -rf $(VENV) .mixbatch .pytest_cache .mypy_cache .ruff_cache
