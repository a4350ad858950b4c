# synthfed: `make demo` and `make test` set up .venv on first use (a second run installs nothing).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck pytest bench clean-demo

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: any other spec pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m node.demo

lint: $(STAMP)
	$(BIN)/ruff check node coordinator privacy protocols tests bench

typecheck: $(STAMP)
	$(BIN)/mypy privacy protocols node coordinator bench

pytest: $(STAMP)
	$(BIN)/python -m pytest

test: lint typecheck pytest

# Long measurements (minutes to an hour each; results appended to bench/RESULTS.md).
# Each script's --help says its subcommands; the generator and comparison ones need trained
# models and ../shared/data.
bench: $(STAMP)
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_guard.py catch --per-alteration 200

clean-demo:
	rm -rf runs/demo
