# make run: start valet with config.yaml (options in ARGS, e.g. make run ARGS="--port
# 8081").  make test: run the test suite (as three processes; make test-serial: one).
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

# The suite as $(SHARDS) pytest processes at once, each on every SHARDS-th test (see
# the end of test_valet.py): its tests wait on servers, processes and PostgreSQL more
# than they compute, so three keep two cores busier than two do. The other parts'
# reports are printed after the first's. make test-serial runs it as one process.
SHARDS ?= 3

test: $(STAMP)
	@dir=$$(mktemp -d); pids=""; \
	for i in $$(seq 2 $(SHARDS)); do \
	    VALET_SHARD=$$i/$(SHARDS) $(VENV)/bin/python -m pytest -q test_valet.py > $$dir/$$i 2>&1 & \
	    pids="$$pids $$!"; \
	done; \
	VALET_SHARD=1/$(SHARDS) $(VENV)/bin/python -m pytest -q test_valet.py; code=$$?; \
	for pid in $$pids; do wait $$pid || code=1; done; \
	for i in $$(seq 2 $(SHARDS)); do echo "-- part $$i of $(SHARDS):"; cat $$dir/$$i; done; \
	rm -rf $$dir; exit $$code

test-serial: $(STAMP)
	$(VENV)/bin/python -m pytest -q test_valet.py

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py $(ARGS)

bench-quick: $(STAMP)
	$(VENV)/bin/python bench/bench_valet.py --quick $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache __pycache__
