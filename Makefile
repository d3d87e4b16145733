# make run: start valet with config.yaml (options in ARGS, e.g. make run ARGS="--port
# 8081").  make test: run the test suite.  make clean: remove the virtual environment
# and caches (not the job database, valet.db).
# make bench: the benchmark (bench/bench_valet.py, about 5 minutes; make bench-quick:
# about 1.5; extra options in ARGS, e.g. make bench ARGS="--only submit").
# All first create a local virtual environment (.venv) holding PyYAML and pytest.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test bench bench-quick clean

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "PyYAML>=5.4" "pytest>=7"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python valet.py --config config.yaml $(ARGS)

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q test_valet.py

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py $(ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py --quick $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
