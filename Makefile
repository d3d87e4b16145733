# make run: start valet with config.yaml (options in ARGS, e.g. make run ARGS="--port
# 8081").  make test: run the test suite (as two processes; make test-serial: one).
# make clean: remove the virtual environment and caches (not the job database).
# make bench: the benchmark (bench/bench_valet.py, about 11 minutes; make bench-quick:
# about 4; extra options in ARGS, e.g. make bench ARGS="--only submit"). Its postgres
# section needs the PostgreSQL server and .venv/bin/pip install "psycopg[binary]".
# All first create a local virtual environment (.venv) holding PyYAML and pytest.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: run test test-serial bench bench-quick clean

$(STAMP): Makefile
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check "PyYAML>=5.4" "pytest>=7"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/python valet.py --config config.yaml $(ARGS)

# The suite as two pytest processes at once (one per core), each on every other test
# (see the end of test_valet.py); the first half's report is printed after the
# second's. make test-serial runs it as one process.
test: $(STAMP)
	@half=$$(mktemp); \
	VALET_SHARD=1/2 $(VENV)/bin/python -m pytest -q test_valet.py > $$half 2>&1 & \
	VALET_SHARD=2/2 $(VENV)/bin/python -m pytest -q test_valet.py; second=$$?; \
	wait $$!; first=$$?; \
	echo "-- the other half:"; cat $$half; rm -f $$half; \
	exit $$(( first || second ))

test-serial: $(STAMP)
	$(VENV)/bin/python -m pytest -q test_valet.py

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py $(ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py --quick $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
