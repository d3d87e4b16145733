"""Tests for valet: real servers on free ports, real SQLite files, real processes.

Sections follow valet.py: config, job records, storage (a contract every store
must keep, then the SQLite store's own), the lifecycle, workers, scheduler, HTTP,
the Valet facade; then the process, the shipped tasks and the docs. Every
behaviour that touches storage runs on every store (the `storage` and `store`
fixtures). Nothing waits a fixed time: tests wait on events set by their tasks or
poll a condition with a deadline (wait_until).
"""

import collections
import contextlib
import dataclasses
import datetime
import errno
import glob
import hashlib
import http.client
import importlib
import json
import logging
import math
import os
import pickle
import queue
import random
import re
import select
import selectors
import shutil
import signal
import socket
import sqlite3
import string
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid

import pytest

import valet

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------ helpers --

def wait_until(predicate, timeout=10.0, what="the condition"):
    """Return predicate()'s first truthy value; fail the test if none comes in time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def run_together(fn, count):
    """Call fn(0) .. fn(count - 1) on as many threads, released at once by a barrier."""
    barrier = threading.Barrier(count)

    def body(i):
        barrier.wait()
        fn(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
        assert not t.is_alive(), "a thread did not finish"


class Response:
    def __init__(self, status, body, headers):
        self.status, self.body, self.headers = status, body, headers

    def __repr__(self):
        return f"Response({self.status}, {self.body!r})"


def request(conn, method, path, body=None, headers=None, raw=None):
    """One request on an http.client connection: a Response with the parsed JSON body
    (or the text of another type), checked against the API's OpenAPI document."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data:  # as every client must: valet answers a body of any other type with 415
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read()
    kind = resp.getheader("Content-Type", "")
    answer = Response(resp.status, (json.loads(text) if kind == "application/json" else
                                    text.decode()) if text else None,
                      dict(resp.getheaders()))
    if not os.environ.get("NOCHECK"): check_documented(method, path, answer, kind)
    return answer


# Every answer the suite gets through request() is checked against the OpenAPI
# document (GET /openapi.json): its status code is documented for its route, and
# its body matches the documented schema. (The document of a valet with a token,
# which documents the 401s too.)
API = valet._openapi([], True)


def check_documented(method, path, answer, kind):
    path = urllib.parse.urlsplit(path).path
    operation = next((API["paths"][pattern].get(method.lower())
                      for m, regex, _, _, pattern in valet._COMPILED_ROUTES
                      if regex.fullmatch(path) and m == method), None)
    if operation is None:  # no route: a 404, 405 or an error of the protocol
        if answer.body is not None and kind == "application/json":
            assert_matches(answer.body, {"$ref": "#/components/schemas/Error"})
        return
    response = operation["responses"].get(str(answer.status))
    assert response is not None, f"{method} {path}: {answer.status} is not documented"
    response = resolve(response)
    content = response.get("content", {})
    if not content:
        assert answer.body is None, f"{method} {path}: {answer.status} has a body"
        return
    assert kind.split(";")[0] in content, f"{method} {path}: {kind} is not documented"
    if kind == "application/json":
        assert_matches(answer.body, content["application/json"]["schema"],
                       f"{method} {path} {answer.status}")


def resolve(schema):
    while "$ref" in schema:
        where = API
        for part in schema["$ref"].lstrip("#/").split("/"):
            where = where[part]
        schema = where
    return schema


_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def schema_problems(value, schema, at="body"):
    """What is wrong with `value` under a JSON Schema (the subset the document uses)."""
    schema = resolve(schema)
    if "anyOf" in schema:
        if all(schema_problems(value, option, at) for option in schema["anyOf"]):
            return [f"{at}: {value!r:.80} matches none of {schema['anyOf']}"]
        return []
    problems = []
    kind = schema.get("type")
    if kind in ("number", "integer"):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
            kind == "number" or isinstance(value, int))
    elif kind is not None:
        ok = isinstance(value, _TYPES[kind])
    else:
        ok = True
    if not ok:
        return [f"{at}: {value!r:.80} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{at}: {value!r} is not one of {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        problems.append(f"{at}: {value!r} is not {schema['const']!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < schema.get("minimum", -math.inf) or value > schema.get("maximum", math.inf):
            problems.append(f"{at}: {value} is out of range")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{at}: {value!r:.80} does not match {schema['pattern']}")
        if schema.get("format") == "date-time" and not valet._RFC3339.fullmatch(value):
            problems.append(f"{at}: {value!r:.80} is not a date-time")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{at}: {key} is missing")
        properties = schema.get("properties", {})
        for key, item in value.items():
            if key in properties:
                problems += schema_problems(item, properties[key], f"{at}.{key}")
            elif schema.get("additionalProperties") is False:
                problems.append(f"{at}: {key} is not a documented property")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            problems += schema_problems(item, schema["items"], f"{at}[{i}]")
    return problems


def assert_matches(value, schema, what="body"):
    problems = schema_problems(value, schema)
    assert not problems, f"{what} does not match its documented schema: {problems[:5]}"


def call(app_or_port, method, path, body=None, headers=None, raw=None):
    port = app_or_port if isinstance(app_or_port, int) else app_or_port.port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        return request(conn, method, path, body, headers, raw)
    finally:
        conn.close()


def submit(app, task_name="echo", metadata=None, **fields):
    resp = call(app, "POST", "/jobs", {"name": f"{task_name} job", "task_name": task_name,
                                       "metadata": metadata, **fields})
    assert resp.status == 202, resp
    return resp.body


def job_status(app, job_id):
    return call(app, "GET", f"/jobs/{job_id}").body["status"]


def wait_for_status(app, job_id, *statuses):
    wait_until(lambda: job_status(app, job_id) in statuses,
               what=f"job {job_id} to be {' or '.join(statuses)}")
    return call(app, "GET", f"/jobs/{job_id}").body


def epoch(rfc3339):
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def at(clock, seconds=0):
    """An RFC 3339 time `seconds` after the fake clock's now."""
    return valet._rfc3339(clock.now + seconds)


class FakeClock:
    """A wall clock (epoch seconds) that moves only when the test moves it."""

    def __init__(self, now=1_800_000_000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds
        return self.now


class Gate:
    """A task that blocks until the test opens the gate, and says when it has started."""

    def __init__(self):
        self.entered = threading.Event()
        self.opened = threading.Event()
        self.returned = threading.Event()
        self.thread = None

    def task(self, metadata):
        self.thread = threading.current_thread()
        self.entered.set()
        assert self.opened.wait(20), "the test never opened the gate"
        self.returned.set()
        return {"gate": "passed"}


def make_tasks(gate, ran):
    def echo(metadata):
        ran.append(metadata)
        return metadata

    def fail(metadata):
        raise ValueError("boom")

    return {
        "echo": echo,
        "fail": fail,
        "gate": gate.task,
        "returns_set": lambda metadata: {1, 2},
        "returns_nan": lambda metadata: float("nan"),
        "exits": lambda metadata: sys.exit(3),
    }


class Flaky:
    """Wraps a store: the first call of the method named `fails` raises, as a full
    disk would; everything else goes to the real store."""

    def __init__(self, store, fails):
        self._store, self._fails, self.failed = store, fails, False

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name != self._fails.replace("transition", "transitions") or self.failed:
            return method  # (the lifecycle writes a transition() with transitions())

        def fail_once(*args, **kwargs):
            self.failed = True
            raise valet.StorageError("disk is full")
        return fail_once


class Hooked:
    """Wraps a store: hook(*args) runs before each call of the method named `method`
    (returning True skips the real call and raises OSError, as a full disk would).
    For "transition", it runs for each move of transitions(), which the lifecycle
    calls; True for any move fails the whole write."""

    def __init__(self, store, method, hook):
        self._store, self._method, self._hook = store, method, hook

    def __getattr__(self, name):
        method = getattr(self._store, name)
        if name == "transitions" and self._method == "transition":
            def hooked_moves(*moves):
                if any([self._hook(*move) for move in moves]):  # (a hook for each move)
                    raise OSError("disk full")
                return method(*moves)
            return hooked_moves
        if name != self._method:
            return method

        def hooked(*args, **kwargs):
            if self._hook(*args, **kwargs):
                raise OSError("disk full")
            return method(*args, **kwargs)
        return hooked


def stage(task_name="echo", metadata=None, **fields):
    """One job of a pipeline body."""
    return {"name": f"{task_name} stage", "task_name": task_name, "metadata": metadata,
            **fields}


def submit_pipeline(app, *jobs, **fields):
    resp = call(app, "POST", "/pipelines", {"name": "pipeline", "jobs": list(jobs), **fields})
    assert resp.status == 202, resp
    return resp.body


def get_pipeline(app, pipeline_id):
    resp = call(app, "GET", f"/pipelines/{pipeline_id}")
    assert resp.status == 200, resp
    return resp.body


def wait_for_pipeline(app, pipeline_id, *statuses):
    wait_until(lambda: get_pipeline(app, pipeline_id)["status"] in statuses,
               what=f"pipeline {pipeline_id} to be {' or '.join(statuses)}")
    return get_pipeline(app, pipeline_id)


def job_statuses(pipeline):
    return [job["status"] for job in pipeline["jobs"]]


class Counted:
    """A task that records the arguments of every call and fails the first `failures`;
    each call lasts at least `lasts` seconds, so that its start and end differ even
    in milliseconds."""

    def __init__(self, failures=0, lasts=0.0):
        self.failures, self.lasts, self.calls = failures, lasts, []

    def task(self, *args):
        called = time.time()
        wait_until(lambda: time.time() >= called + self.lasts, what="time to pass")
        self.calls.append(args)
        if len(self.calls) <= self.failures:
            raise RuntimeError(f"failure {len(self.calls)}")
        return {"call": len(self.calls)}


# ----------------------------------------------------------------- fixtures --

# PostgreSQL: a throwaway server for the session (initdb and pg_ctl, in a temporary
# folder, on a free port; as the user nobody when the tests run as root, which
# PostgreSQL refuses to be), and a schema of its own for each test.
POSTGRES_HINT = ("the PostgreSQL tests need the PostgreSQL server and psycopg: "
                 "apt-get install postgresql; pip install \"psycopg[binary]\"")


def _postgres_programs():
    """The folder of initdb and pg_ctl: on PATH, or Debian's; None if missing."""
    found = shutil.which("initdb")
    if found:
        return os.path.dirname(os.path.realpath(found))
    folders = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda f: int(
        f.split("/")[-2]) if f.split("/")[-2].isdigit() else 0)
    return folders[-1] if folders else None


@pytest.fixture(scope="session")
def postgres_server():
    """A DSN of a PostgreSQL server started for this session; skips without one."""
    programs = _postgres_programs()
    try:
        import psycopg  # noqa: F401 (only the PostgreSQL tests need it)
    except ImportError:
        programs = None
    if programs is None:
        print(f"\n{POSTGRES_HINT}", file=sys.__stderr__)  # (once: a session fixture)
        pytest.skip(POSTGRES_HINT)
    folder = tempfile.mkdtemp(prefix="valet-test-pg-")
    user = {"user": "nobody"} if os.geteuid() == 0 else {}
    if user:
        import pwd  # (POSIX only, as PostgreSQL's refusal to run as root is)
        os.chown(folder, pwd.getpwnam("nobody").pw_uid, -1)
    data, port = os.path.join(folder, "data"), free_port()

    def run(*args):
        subprocess.run([os.path.join(programs, args[0]), *args[1:]], check=True,
                       capture_output=True, timeout=60, **user)

    run("initdb", "-D", data, "-U", "valet", "--auth=trust", "-E", "UTF8", "--no-sync")
    run("pg_ctl", "-D", data, "-l", os.path.join(folder, "log"), "-w", "-o",
        f"-p {port} -h 127.0.0.1 -k {folder} -c fsync=off -c max_connections=300", "start")
    try:
        yield f"host=127.0.0.1 port={port} user=valet dbname=postgres"
    finally:
        run("pg_ctl", "-D", data, "-m", "immediate", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def _postgres_tests(postgres_server):
    """A connection to the session's server, once its schema "tests" is made."""
    import psycopg
    valet.PostgresStore(postgres_server, "tests").close()
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        yield conn


@pytest.fixture
def postgres(postgres_server, _postgres_tests):
    """The dsn and schema of an empty PostgresStore for this test. (One schema, emptied
    for each test: making a schema anew takes ten times as long.)"""
    _postgres_tests.execute("; ".join(f"DELETE FROM tests.{table}" for table in (
        "jobs", "results", "pipelines", "periodic", "keys", "nodes", "job_counts")))
    return {"dsn": postgres_server, "schema": "tests"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Sections whose tests exercise the HTTP layer alone (framing, access checks,
# hostile clients, the API's description): they run on memory and SQLite, not also
# on PostgreSQL, which they would reach no differently. Every other test that uses
# a store (through the `storage` fixture) runs on all three.
HTTP_ONLY = ("# -- access:", "# -- hostile clients:", "# -- the API's description")


def _http_only_tests():
    """The names of the tests in the HTTP_ONLY sections of this file."""
    names, section = set(), ""
    with open(__file__, encoding="utf-8") as f:
        for line in f:
            if line.startswith("# -"):
                section = line
            elif line.startswith("def test_") and section.startswith(HTTP_ONLY):
                names.add(line[4:line.index("(")])
    return names


_HTTP_ONLY_TESTS = _http_only_tests()


def pytest_generate_tests(metafunc):
    """Every test that uses the `storage` fixture runs once per store (unless it names
    its stores itself, as SQLITE_ONLY does)."""
    named = any("storage" in marker.args[0] for marker in
                metafunc.definition.iter_markers("parametrize"))
    if "storage" in metafunc.fixturenames and not named:
        http_only = metafunc.function.__name__ in _HTTP_ONLY_TESTS
        metafunc.parametrize("storage", ["memory", "sqlite"] + ([] if http_only else [
            "postgres"]), indirect=True)


@pytest.fixture
def storage(request, tmp_path):
    """The storage section of a config: each store's, in turn (pytest_generate_tests)."""
    return {"storage": {"option": request.param,
                        "sqlite": {"path": str(tmp_path / "valet.db")},
                        **({"postgres": request.getfixturevalue("postgres")}
                           if request.param == "postgres" else {})}}


@pytest.fixture
def gate():
    return Gate()


@pytest.fixture
def ran():
    """Metadata of every echo job that ran, in order."""
    return []


@pytest.fixture
def make_app(storage, gate, ran):
    apps = []

    def make(clock=time.time, tasks=None, start=True, **overrides):
        """A started Valet on a free port (dotted config overrides); `tasks` adds to
        make_tasks(); start=False leaves it unstarted. `clock` replaces the wall
        clock: then the scheduler's thread is stopped, and only the test's calls of
        app.scheduler.tick(now) run what is due."""
        config = valet.load_config(storage, {
            "server.port": 0, "worker_pool.workers": 2, "worker_pool.queue_capacity": 20,
            "worker_pool.shutdown_grace": 5, **overrides})
        app = valet.Valet(config, tasks={**make_tasks(gate, ran), **(tasks or {})},
                          clock=clock)
        apps.append(app)
        if start:
            app.start()
            if clock is not time.time:
                app.scheduler.stop()
        return app

    yield make
    gate.opened.set()
    for app in apps:
        app.stop()


@pytest.fixture
def app(make_app):
    return make_app()


# The stores the storage contract is checked on: name -> a function that opens an
# empty store, given a temporary folder and the test's request (for its fixtures).
# A new backend adds itself here.
STORES = {
    "memory": lambda folder, request: valet.MemoryStore(),
    "sqlite": lambda folder, request: valet.SqliteStore(folder / "valet.db"),
    "postgres": lambda folder, request: valet.PostgresStore(
        **request.getfixturevalue("postgres")),
}


@pytest.fixture(params=list(STORES))
def store(request, tmp_path):
    store = STORES[request.param](tmp_path, request)
    yield store
    store.close()


@contextlib.contextmanager
def reopened(app):
    """The store of a stopped app, opened anew (a closed MemoryStore can still be read)."""
    store = app.lifecycle.store
    if isinstance(store, valet.SqliteStore):
        store = valet.SqliteStore(store.path)
    elif isinstance(store, valet.PostgresStore):
        store = valet.PostgresStore(store.dsn, store.schema)
    try:
        yield store
    finally:
        store.close()


def run_one(app):
    """Run one ready job of an unstarted app, as one worker would (with several nodes,
    its node first starts it in the store)."""
    if app.node is not None:
        app.node.claim_once(limit=1)
    return app.pool.run_once(block=False)


def new_record(name="job", status=valet.PENDING):
    job = valet._new_job({"name": name, "task_name": "echo", "metadata": {"n": name}},
                         {"echo": None}, "second", time.time())
    job["status"] = status
    return job


@pytest.fixture
def pool(store, gate, ran):
    """A worker pool (and its lifecycle) that is not started: tests drive run_once
    and tick directly; its fake monotonic clock is pool.clock."""
    pool = make_pool(store, make_tasks(gate, ran), clock=[1000.0])
    yield pool
    gate.opened.set()


def make_pool(store, tasks, clock=None):
    """An unstarted pool with its lifecycle on `store`; `clock`, a list of one number,
    is its monotonic clock, which the test moves (pool.clock)."""
    lifecycle = valet._Lifecycle(store, valet._Scheduler())
    pool = valet._WorkerPool(lifecycle, tasks, workers=1, capacity=5, timeout_unit="second",
                             monotonic=(lambda: clock[0]) if clock else time.monotonic)
    lifecycle.pool = pool
    pool.clock = clock
    return pool


def queue_job(pool, store, task_name, timeout=None):
    job = valet._new_job({"name": "j", "task_name": task_name, "timeout": timeout},
                         {task_name: None}, "second", time.time())
    pool.reserve()
    store.add(job)
    pool.enqueue(job)
    return job["id"]


def hooked_pool(store, method, hook, tasks):
    """An unstarted pool on a Hooked store; its fake monotonic clock is pool.clock."""
    return make_pool(Hooked(store, method, hook), tasks, clock=[1000.0])


def a_start_held(store, task_name, gate, ran):
    """A pool whose worker thread has taken a job of `task_name` and is held while it
    writes the start: (pool, job id, the worker, an Event that lets the write go)."""
    holding, release = threading.Event(), threading.Event()

    def hold_the_start(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.IN_PROGRESS:
            holding.set()
            assert release.wait(10)
    pool = hooked_pool(store, "transition", hold_the_start, make_tasks(gate, ran))
    job_id = queue_job(pool, store, task_name)
    worker = threading.Thread(target=pool.run_once)
    worker.start()
    assert holding.wait(10)
    return pool, job_id, worker, release


# ------------------------------------------------------------------- config --

def test_config_yaml_documents_every_key_with_its_default():
    with open(os.path.join(HERE, "config.yaml")) as f:
        text = f.read()
    assert valet.load_config(os.path.join(HERE, "config.yaml")) == valet.load_config(None)
    for key in valet._SCHEMA:
        assert f"{key.rsplit('.', 1)[-1]}:" in text, key


@pytest.mark.parametrize("source, message", [
    ({"server": {"prot": 80}}, "server.prot: unknown key"),
    ({"worker_pool": {"workers": "4"}},
     'worker_pool.workers: "4" is not allowed; expected an integer from 1 to 256'),
    ({"worker_pool": {"workers": 0}}, "worker_pool.workers: 0 is not allowed"),
    ({"storage": {"option": "redis"}},
     'storage.option: "redis" is not allowed; expected sqlite or memory'),
    ({"timeout_unit": "minute"}, 'timeout_unit: "minute" is not allowed'),
    ({"server": 5}, "server: 5 is not allowed; expected a mapping"),
    ({"server": {"port": True}}, "server.port: true is not allowed"),
    ({"storage": {"sqlite": {"path": ":memory:"}}}, "use storage.option: memory"),
])
def test_invalid_config_names_key_value_and_what_is_allowed(source, message):
    with pytest.raises(valet.ConfigError) as caught:
        valet.load_config(source)
    assert message in str(caught.value)


def test_config_accepts_nested_sections_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9000\nstorage:\n  sqlite:\n    path: x.db\n")
    config = valet.load_config(path, {"server.port": 0})
    assert config["server.port"] == 0
    assert config["storage.sqlite.path"] == "x.db"
    assert config["storage.option"] == "sqlite"


def test_a_config_error_names_every_key_at_fault():
    with pytest.raises(valet.ConfigError) as caught:
        valet.load_config({"server": {"prot": 80, "port": -1},
                           "storage": {"sqlite": {"path": ":memory:"}}})
    for problem in ("server.prot: unknown key", "server.port: -1 is not allowed",
                    "storage.sqlite.path: \":memory:\" is not allowed"):
        assert problem in str(caught.value)


def test_overrides_may_be_nested_like_the_file_or_dotted():
    config = valet.load_config({"server": {"port": 9000}},
                               {"server": {"port": 0}, "worker_pool.workers": 2})
    assert config["server.port"] == 0 and config["worker_pool.workers"] == 2
    with pytest.raises(valet.ConfigError, match="server.prot: unknown key"):
        valet.load_config(None, {"server": {"prot": 1}})


def test_relative_paths_are_found_in_the_config_file_s_folder(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    (folder / "config.yaml").write_text("storage:\n  sqlite:\n    path: data/jobs.db\n"
                                        "tasks_module: project_tasks_beside_config\n")
    (folder / "data").mkdir()
    (folder / "project_tasks_beside_config.py").write_text(
        "TASKS = {'here': lambda metadata: 'found beside the config'}\n")
    monkeypatch.chdir(elsewhere)
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo what valet adds to it
    app = valet.Valet(str(folder / "config.yaml"))
    try:
        assert sorted(app.tasks) == ["here"]
        assert app.lifecycle.store.path == str(folder / "data" / "jobs.db")
    finally:
        app.stop()
    assert (folder / "data" / "jobs.db").exists() and os.listdir(elsewhere) == []


# -------------------------------------------------------------- job records --

def test_duration_is_milliseconds_from_start_to_end():
    job = dict(new_record(), started_at=1.0, completed_at=3.5)
    assert valet._job_json(job)["duration"] == 2500
    assert valet._job_json(job)["started_at"] == "1970-01-01T00:00:01.000000Z"


@pytest.mark.parametrize("text, expected", [
    ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00.000000Z"),
    ("2026-11-28T10:00:00", "2026-11-28T10:00:00.000000Z"),  # no offset: UTC
    ("2026-11-28T12:00:00+02:00", "2026-11-28T10:00:00.000000Z"),
    ("2026-11-28t05:30:00.250-04:30", "2026-11-28T10:00:00.250000Z"),
    ("2026-11-28 10:00:00.123456789z", "2026-11-28T10:00:00.123457Z"),
])
def test_run_at_is_rfc3339_with_an_offset_or_utc_without_one(text, expected):
    assert valet._rfc3339(valet._parse_time(text)) == expected


def test_metadata_defaults_to_null_and_task_params_is_its_old_name(app, ran):
    job = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo"}).body
    assert job["metadata"] is None
    old = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo",
                                      "task_params": {"k": "v"}}).body
    assert old["metadata"] == {"k": "v"}
    wait_for_status(app, old["id"], valet.COMPLETED)
    assert call(app, "GET", f"/jobs/{old['id']}/results").body["metadata"] == {"k": "v"}


@pytest.mark.parametrize("raw, message", [
    (b'{"name": "n", ', "body is not valid JSON: Expecting property name"),
    (b"[1, 2]", "body must be a JSON object, got array"),
    (b"", "body is empty"),
    (b'{"name": "n", "task_name": "echo", "metadata": NaN}', "NaN is not valid JSON"),
    (b'{"name": "\xff"}', "body is not valid UTF-8"),
    (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    (b'{"task_name": "echo"}', "name is required"),
    (b'{"name": "", "task_name": "echo"}', "name must be a non-empty string"),
    (b'{"name": 7, "task_name": "echo"}', "name must be a non-empty string, got 7"),
    (b'{"name": "n"}', "task_name is required"),
    (b'{"name": "n", "task_name": 3}', "task_name must be a string"),
    (b'{"name": "n", "task_name": "nope"}',
     "task_name 'nope' is not a registered task; registered tasks: echo, exits, fail, gate"),
    (b'{"name": "n", "task_name": "echo", "description": 5}',
     "description must be a string or null"),
    (b'{"name": "n", "task_name": "echo", "timeout": 0}', "timeout must be a number greater than 0"),
    (b'{"name": "n", "task_name": "echo", "timeout": "5"}', "timeout must be a number"),
    (b'{"name": "n", "task_name": "echo", "timeout": true}', "timeout must be a number"),
    (b'{"name": "n", "task_name": "echo", "timeout": 1e10}', "and at most 31622400"),
    (b'{"name": "n", "task_name": "echo", "metadata": [1e400]}', "1e400 is out of range"),
    (b'{"name": "\\ud800", "task_name": "echo"}', "lone surrogate"),
    (b'{"name": "a", "task_name": "echo", "name": "b"}', "the key 'name' appears twice"),
    (b'{"name": "n", "task_name": "echo", "metadata": 1' + b"0" * 1000 + b"}",
     "an integer of 1001 digits is too long"),
    (b'{"name": ["' + b"x" * 5000 + b'"], "task_name": "echo"}',
     'name must be a non-empty string, got ["xxxxxxxx'),
    (b'{"name": "n", "task_name": "echo", "timout": 5}', "unknown field 'timout'"),
    (b'{"name": "n", "task_name": "echo", "metadata": 1, "task_params": 2}',
     "give metadata or task_params"),
])
def test_rejected_post_names_the_problem_and_stores_nothing(app, raw, message):
    resp = call(app, "POST", "/jobs", raw=raw)
    assert resp.status == 400
    assert resp.body["error"] is True and resp.body["code"] == 400
    assert message in resp.body["message"]
    assert call(app, "GET", "/jobs").body["jobs"] == []


@pytest.mark.parametrize("run_at, message", [
    ("tomorrow", 'run_at must be an RFC 3339 time such as "2026-11-28T09:30:00Z", got '
                 '"tomorrow"'),
    (1800000000, "run_at must be an RFC 3339 time"),
    ("2026-11-28T10:00Z", "run_at must be an RFC 3339 time"),
    ("2026-11-28T10:00:00+2", "run_at must be an RFC 3339 time"),
    ("2026-13-01T00:00:00Z", 'run_at "2026-13-01T00:00:00Z" is not a real time: month must '
                             'be in 1..12'),
    ("2026-02-30T00:00:00Z", 'run_at "2026-02-30T00:00:00Z" is not a real time: day is out '
                             'of range for month'),
    ("9999-12-31T23:59:59-01:00", 'run_at "9999-12-31T23:59:59-01:00" is not a real time'),
    ("0001-01-01T00:00:00+01:00", 'run_at "0001-01-01T00:00:00+01:00" is not a real time'),
])
def test_bad_run_at_is_400_and_stores_nothing(app, run_at, message):
    resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo", "run_at": run_at})
    assert resp.status == 400
    assert resp.body["message"].startswith(message), resp
    assert call(app, "GET", "/jobs").body["jobs"] == []


@pytest.mark.parametrize("field, value, message", [
    ("priority", 1.5, "priority must be an integer from -1000000 to 1000000"),
    ("priority", 10 ** 7, "priority must be an integer from -1000000 to 1000000"),
    ("max_retries", -1, "max_retries must be an integer from 0 to 100"),
    ("max_retries", True, "max_retries must be an integer from 0 to 100"),
    ("retry_backoff", -0.5, "retry_backoff must be a number of seconds from 0 to 3600"),
    ("retry_backoff", "1s", "retry_backoff must be a number of seconds from 0 to 3600"),
    ("use_previous_results", True, "unknown field 'use_previous_results'"),
])
def test_bad_priority_or_retry_fields_are_400_and_store_nothing(app, field, value, message):
    resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo", field: value})
    assert resp.status == 400 and resp.body["message"].startswith(message), resp
    assert call(app, "GET", "/jobs").body["jobs"] == []


@pytest.mark.parametrize("body, message", [
    ({"status": "COMPLETED"}, "field 'status' cannot be changed"),
    ({"name": "ok", "timout": 1}, "unknown field 'timout'"),
    ({"name": "ok", "metadata": {}}, "field 'metadata' cannot be changed"),
    ({"name": ""}, "name must be a non-empty string"),
    ({"description": []}, "description must be a string or null"),
])
def test_patch_rejects_other_fields_and_changes_nothing(app, body, message):
    job = submit(app, "gate")
    resp = call(app, "PATCH", f"/jobs/{job['id']}", body)
    assert resp.status == 400 and message in resp.body["message"]
    got = call(app, "GET", f"/jobs/{job['id']}").body
    assert got["name"] == job["name"] and got["metadata"] == job["metadata"]


def test_pipeline_of_100_jobs_is_accepted(make_app):
    clock = FakeClock()
    app = make_app(clock=clock)  # scheduled ahead, so that none of them runs
    pipeline = submit_pipeline(app, *[stage("echo", i) for i in range(100)],
                               run_at=valet._rfc3339(clock.now + 60))
    assert [job["metadata"] for job in pipeline["jobs"]] == list(range(100))
    listed = call(app, "GET", f"/pipelines/{pipeline['id']}/jobs").body["jobs"]
    assert [job["id"] for job in listed] == [job["id"] for job in pipeline["jobs"]]


def _too_many_jobs():
    return [stage() for _ in range(101)]


@pytest.mark.parametrize("body, message", [
    ({"name": "p"}, "jobs must be a list of 2 to 100 jobs, got null"),
    ({"name": "p", "jobs": {"a": stage()}}, "jobs must be a list of 2 to 100 jobs"),
    ({"name": "p", "jobs": [stage()]},
     "jobs must be a list of 2 to 100 jobs, got 1 job; submit a single job with POST /jobs"),
    ({"name": "p", "jobs": [stage(), stage("echo", use_previous_results=True)]},
     "jobs[1]: task 'echo' cannot take the previous result: with use_previous_results it "
     "is called as fn(metadata, previous_result)"),
    ({"name": "p", "jobs": _too_many_jobs()}, "jobs must be a list of 2 to 100 jobs"),
    ({"name": "p", "jobs": [stage(), 5]}, "jobs[1]: a job must be a JSON object, got 5"),
    ({"name": "p", "jobs": [stage(), stage(priority=1)]}, "jobs[1]: unknown field 'priority'"),
    ({"name": "p", "jobs": [stage(), stage(run_at="2030-01-01T00:00:00Z")]},
     "jobs[1]: unknown field 'run_at'"),
    ({"name": "p", "jobs": [stage(), stage("nope")]},
     "jobs[1]: task_name 'nope' is not a registered task"),
    ({"name": "p", "jobs": [stage(), {"task_name": "echo"}]}, "jobs[1]: name is required"),
    ({"name": "p", "jobs": [stage(), stage(timeout=0)]},
     "jobs[1]: timeout must be a number greater than 0"),
    ({"name": "p", "jobs": [stage(use_previous_results=True), stage()]},
     "jobs[0]: use_previous_results cannot be true for the first job"),
    ({"name": "p", "jobs": [stage(), stage(use_previous_results="yes")]},
     "jobs[1]: use_previous_results must be true or false"),
    ({"name": "p", "timeout": 5, "jobs": [stage(), stage()]},
     "unknown field 'timeout'; a pipeline takes name, description, priority, run_at, jobs"),
    ({"name": "p", "run_at": "tomorrow", "jobs": [stage(), stage()]},
     "run_at must be an RFC 3339 time"),
    ({"name": "p", "priority": "high", "jobs": [stage(), stage()]},
     "priority must be an integer"),
    ({"jobs": [stage(), stage()]}, "name is required"),
])
def test_rejected_pipeline_names_the_problem_and_stores_nothing(app, body, message):
    resp = call(app, "POST", "/pipelines", body)
    assert resp.status == 400, resp
    assert resp.body["error"] is True and resp.body["code"] == 400
    assert message in resp.body["message"]
    assert call(app, "GET", "/pipelines").body["pipelines"] == []
    assert call(app, "GET", "/jobs").body["jobs"] == []
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0


def test_jobs_list_newest_first_with_a_cursor_and_filters(app):
    ids = [submit(app, "echo" if i % 3 else "fail", name=f"n{i % 2}")["id"]
           for i in range(7)]
    seen, cursor = [], None
    while True:
        query = "order=desc&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = call(app, "GET", f"/jobs?{query}").body
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ids[::-1]
    fails = call(app, "GET", "/jobs?task_name=fail").body["jobs"]
    assert [job["id"] for job in fails] == [ids[0], ids[3], ids[6]]
    named = call(app, "GET", "/jobs?name=n1&order=DESC").body["jobs"]
    assert [job["id"] for job in named] == [ids[5], ids[3], ids[1]]
    between = valet._rfc3339((epoch(app.job(ids[2])["created_at"])
                              + epoch(app.job(ids[3])["created_at"])) / 2)
    after = call(app, "GET", f"/jobs?created_after={between}").body["jobs"]
    assert [job["id"] for job in after] == ids[3:]
    before = call(app, "GET", f"/jobs?created_before={between}&task_name=echo").body["jobs"]
    assert [job["id"] for job in before] == [ids[1], ids[2]]


@pytest.mark.parametrize("path, query, message", [
    *(("/jobs", query, message) for query, message in [
        ("status=DONE", "status must be one of SCHEDULED, PENDING, IN_PROGRESS, COMPLETED, "
                        "FAILED, CANCELLED"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("limit=1001", "limit must be an integer from 1 to 1000"),
        ("limit=ten", "limit must be an integer"),
        ("cursor=abc", "cursor must be a next_cursor"),
        ("cursor=99999999999999999999", "cursor must be a next_cursor"),
        ("limit=%C2%B2", "limit must be an integer"),  # '²' passes str.isdigit()
        ("sort=name", "unknown query parameter 'sort'; it takes status, limit, cursor, "
                      "task_name, name, created_after, created_before, order"),
        ("limit=1&limit=2", "query parameter 'limit' is given more than once"),
        ("order=newest", 'order must be asc or desc, got "newest"'),
        ("created_after=yesterday", "created_after must be an RFC 3339 time"),
        ("created_after=2026-01-02T00:00:00Z&created_before=2026-01-01T00:00:00Z",
         "created_after must be earlier than created_before"),
        ("created_before=2026-02-30T00:00:00Z", "created_before \"2026-02-30T00:00:00Z\" is "
                                               "not a real time"),
    ]),
    *(("/pipelines", query, message) for query, message in [
        ("status=DONE", "status must be one of SCHEDULED, PENDING, IN_PROGRESS"),
        ("limit=0", "limit must be an integer from 1 to 1000"),
        ("cursor=abc", "cursor must be a next_cursor"),
        ("sort=name", "unknown query parameter 'sort'; it takes status, limit, cursor"),
    ]),
])
def test_listings_reject_bad_query_parameters(app, path, query, message):
    resp = call(app, "GET", f"{path}?{query}")
    assert resp.status == 400 and message in resp.body["message"]


@pytest.mark.parametrize("method, path, body, problems", [
    ("POST", "/jobs", {"description": 5, "timeout": -1},
     ["name is required", "task_name is required", "description must be a string or null",
      "timeout must be a number greater than 0"]),
    ("POST", "/jobs", {"name": "n", "task_name": "nope", "priority": "high", "sort": 1},
     ["unknown field 'sort'", "task_name 'nope' is not a registered task",
      "priority must be an integer"]),
    ("POST", "/pipelines", {"name": "", "jobs": [{"task_name": "nope"}, 5]},
     ["name must be a non-empty string", "jobs[0]: name is required",
      "jobs[0]: task_name 'nope' is not a registered task",
      "jobs[1]: a job must be a JSON object"]),
    ("POST", "/pipelines", {"name": "p", "jobs": [
        stage(), stage("echo", colour="red", use_previous_results=True)]},
     ["jobs[1]: unknown field 'colour'", "jobs[1]: task 'echo' cannot take the previous"]),
    ("PATCH", "/jobs/{id}", {"name": "", "status": "DONE", "colour": "red"},
     ["field 'status' cannot be changed", "unknown field 'colour'",
      "name must be a non-empty string"]),
    ("GET", "/jobs?status=DONE&limit=0&cursor=x", None,
     ["status must be one of", "limit must be an integer", "cursor must be a next_cursor"]),
    ("GET", "/jobs?sort=name&verbose=1&limit=1&limit=2", None,
     ["unknown query parameters 'sort', 'verbose'; it takes status, limit, cursor",
      "query parameter 'limit' is given more than once"]),
])
def test_an_error_names_every_field_at_fault_and_changes_nothing(app, method, path, body,
                                                                 problems):
    job = submit(app, "echo", "kept")
    resp = call(app, method, path.format(id=job["id"]), body)
    assert resp.status == 400
    for problem in problems:
        assert problem in resp.body["message"], (problem, resp.body["message"])
    assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [job["id"]]
    assert call(app, "GET", f"/jobs/{job['id']}").body["name"] == job["name"]


# ---------------------------------- storage: the contract every store keeps --

def test_store_returns_none_for_missing_job(store):
    assert store.get("nope") is None
    assert store.result("nope") is None
    assert store.delete("nope", lambda job: True) is None
    assert store.update("nope", {"name": "x"}) is False
    assert store.transition("nope", (valet.PENDING,), valet.IN_PROGRESS) is None


def test_store_transition_moves_once_and_stores_the_result_with_it(store):
    job = new_record()
    store.add(job)
    moved = store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS,
                             {"started_at": 1.5})
    assert moved["status"] == valet.IN_PROGRESS and moved["started_at"] == 1.5
    assert store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS) is None
    done = store.transition(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED,
                            {"completed_at": 2.0}, result=({"ok": 1}, None))
    assert done["status"] == valet.COMPLETED
    assert store.result(job["id"]) == {"value": {"ok": 1}, "error": None}


def test_store_transition_race_has_exactly_one_winner(store):
    job = new_record(status=valet.IN_PROGRESS)
    store.add(job)
    winners = []

    def finish(i):
        status = valet.COMPLETED if i % 2 else valet.FAILED
        if store.transition(job["id"], (valet.IN_PROGRESS,), status,
                            result=(i, None)) is not None:
            winners.append((i, status))

    run_together(finish, 8)
    assert len(winners) == 1
    i, status = winners[0]
    assert store.get(job["id"])["status"] == status
    assert store.result(job["id"])["value"] == i


def test_store_lists_in_submission_order_by_status_with_cursor(store):
    jobs = [new_record(f"j{i}") for i in range(7)]
    for job in jobs:
        store.add(job)
    for job in jobs[::2]:
        store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS)
    page = store.list(None, after=0, limit=3)
    assert [j["name"] for j in page] == ["j0", "j1", "j2"]
    rest = store.list(None, after=page[-1]["seq"], limit=10)
    assert [j["name"] for j in rest] == ["j3", "j4", "j5", "j6"]
    running = store.list(valet.IN_PROGRESS, after=0, limit=10)
    assert [j["name"] for j in running] == ["j0", "j2", "j4", "j6"]
    pending = store.list(valet.PENDING, after=0, limit=10)
    assert [j["id"] for j in pending] == [jobs[1]["id"], jobs[3]["id"], jobs[5]["id"]]


def test_store_lists_newest_first_and_by_task_name_and_creation_time(store):
    jobs = [new_record(f"j{i}") for i in range(6)]
    for i, job in enumerate(jobs):
        job["created_at"] = 1000.0 + i
        job["task_name"] = "even" if i % 2 == 0 else "odd"
        store.add(job)
    names = lambda page: [j["name"] for j in page]  # noqa: E731
    newest = store.list(None, after=0, limit=4, newest_first=True)
    assert names(newest) == ["j5", "j4", "j3", "j2"]
    older = store.list(None, after=newest[-1]["seq"], limit=10, newest_first=True)
    assert names(older) == ["j1", "j0"]
    assert names(store.list(None, 0, 10, task_name="even")) == ["j0", "j2", "j4"]
    assert names(store.list(None, 0, 10, newest_first=True, task_name="odd")) == [
        "j5", "j3", "j1"]
    assert names(store.list(None, 0, 10, name="j3")) == ["j3"]
    assert names(store.list(None, 0, 10, created_after=1001.0, created_before=1004.0)) == [
        "j2", "j3"]
    store.transition(jobs[4]["id"], (valet.PENDING,), valet.IN_PROGRESS)
    assert names(store.list(valet.PENDING, 0, 10, newest_first=True, task_name="even")) == [
        "j2", "j0"]
    assert store.list(None, 0, 10, task_name="none") == []


def test_store_delete_only_in_allowed_states(store):
    pending, running = new_record("p"), new_record("r", valet.IN_PROGRESS)

    def pending_only(job):
        return job["status"] == valet.PENDING

    store.add(pending)
    store.add(running)
    assert store.delete(running["id"], pending_only)["status"] == valet.IN_PROGRESS
    assert store.get(running["id"]) is not None
    assert store.delete(pending["id"], pending_only)["status"] == valet.PENDING
    assert store.get(pending["id"]) is None
    assert [j["name"] for j in store.list(None, 0, 10)] == ["r"]


def test_store_keeps_metadata_apart_from_callers(store):
    job = new_record()
    store.add(job)
    job["metadata"]["n"] = "changed by the caller"
    got = store.get(job["id"])
    got["metadata"]["n"] = "changed again"
    assert store.get(job["id"])["metadata"] == {"n": "job"}


def test_store_deleting_one_pipeline_job_leaves_the_others_listed(store):
    first, second = new_record("first"), new_record("second")
    for job in (first, second):
        job["pipeline_id"] = "p"
    store.add(first, second, pipeline={"id": "p", "name": "p", "description": None,
                                       "priority": 0, "run_at": None, "created_at": 1.0})
    assert store.delete(first["id"], lambda job: True)["status"] == valet.PENDING
    assert [j["id"] for j in store.get_pipeline("p")["jobs"]] == [second["id"]]
    deleted = store.delete_pipeline("p", lambda pipeline: True)
    assert valet._pipeline_status(deleted["jobs"]) == valet.PENDING
    assert store.get_pipeline("p") is None


def test_store_records_each_firing_once_with_its_job(store):
    first, again, earlier, later, other = (new_record(n) for n in "abcde")
    assert store.add(first, fired=("nightly", 160.0)) is True
    assert store.add(again, fired=("nightly", 160.0)) is False
    assert store.add(earlier, fired=("nightly", 100.0)) is False
    assert store.get(again["id"]) is None and store.get(earlier["id"]) is None
    assert store.add(later, fired=("nightly", 220.0)) is True
    assert store.add(other, fired=("hourly", 160.0)) is True  # names are apart
    assert [j["id"] for j in store.list()] == [first["id"], later["id"], other["id"]]
    assert store.periodic_last("nightly", 999.0) == 220.0


def test_store_periodic_last_anchors_now_on_first_sight(store):
    assert store.periodic_last("nightly", 100.0) == 100.0
    assert store.periodic_last("nightly", 200.0) == 100.0
    assert store.add(new_record(), fired=("nightly", 100.0)) is False  # the anchor counts
    assert store.add(new_record(), fired=("nightly", 160.0)) is True
    assert store.periodic_last("nightly", 300.0) == 160.0


def test_store_add_that_fails_records_no_firing(store):
    bad = new_record("bad")
    bad["metadata"] = {"since": datetime.date(2026, 1, 1)}  # JSON cannot hold it
    with pytest.raises(TypeError):
        store.add(bad, fired=("nightly", 100.0))
    assert store.list() == []
    assert store.add(new_record("good"), fired=("nightly", 100.0)) is True


def new_pipeline(store, pipeline_id, *statuses):
    """Store a pipeline whose jobs have these statuses; its jobs' records, in order."""
    jobs = [new_record(f"{pipeline_id}{i}", status) for i, status in enumerate(statuses)]
    for job in jobs:
        job["pipeline_id"] = pipeline_id
    store.add(*jobs, pipeline={"id": pipeline_id, "name": pipeline_id, "description": None,
                               "priority": 0, "run_at": None, "created_at": 1.0})
    return jobs


def test_store_adds_a_pipeline_with_its_jobs_in_order(store):
    store.add(new_record("before"))
    jobs = new_pipeline(store, "p", valet.PENDING, valet.PENDING, valet.PENDING)
    got = store.get_pipeline("p")
    assert {k: got[k] for k in ("id", "name", "priority", "run_at", "created_at")} == {
        "id": "p", "name": "p", "priority": 0, "run_at": None, "created_at": 1.0}
    assert [j["id"] for j in got["jobs"]] == [j["id"] for j in jobs]
    assert [j["seq"] for j in got["jobs"]] == sorted(j["seq"] for j in got["jobs"])
    assert got["jobs"][1] == store.get(jobs[1]["id"])
    assert [j["name"] for j in store.list()] == ["before", "p0", "p1", "p2"]
    assert store.get_pipeline("nope") is None


def test_store_lists_pipelines_in_submission_order_each_with_its_jobs(store):
    for name in "abc":
        new_pipeline(store, name, valet.PENDING, valet.PENDING)
    first = store.list_pipelines(0, limit=1)
    assert [p["id"] for p in first] == ["a"]
    rest = store.list_pipelines(first[0]["seq"], limit=10)
    assert [p["id"] for p in rest] == ["b", "c"]
    assert [[j["name"] for j in p["jobs"]] for p in rest] == [["b0", "b1"], ["c0", "c1"]]


def test_store_transition_writes_the_status_and_only_the_fields_it_is_given(store):
    job = new_record()
    store.add(job)
    moved = store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS,
                             {"attempts": 3, "started_at": 5.0})
    assert {k: moved[k] for k in ("status", "attempts", "started_at", "completed_at")} == {
        "status": valet.IN_PROGRESS, "attempts": 3, "started_at": 5.0, "completed_at": None}
    assert {k: v for k, v in moved.items() if k not in ("status", "attempts", "started_at")} \
        == {k: v for k, v in store.get(job["id"]).items()
            if k not in ("status", "attempts", "started_at")}
    for fields in ({"name": "x"}, {"status": valet.COMPLETED}, {"seq": 99}):
        with pytest.raises(ValueError):
            store.transition(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED, fields)
    assert store.get(job["id"]) == moved  # a refused transition wrote nothing


def test_store_transition_makes_its_further_moves_only_where_they_match(store):
    first, waiting, finished = new_pipeline(store, "p", valet.IN_PROGRESS, valet.PENDING,
                                            valet.COMPLETED)
    then = [(job["id"], (valet.SCHEDULED, valet.PENDING), valet.CANCELLED,
             {"failure_reason": "before it failed"}) for job in (waiting, finished)]
    assert store.transition(first["id"], (valet.PENDING,), valet.FAILED, then=then) is None
    assert store.get(waiting["id"])["status"] == valet.PENDING  # nothing, as it missed
    store.transition(first["id"], (valet.IN_PROGRESS,), valet.FAILED,
                     result=(None, "boom"), then=then)
    statuses = [j["status"] for j in store.get_pipeline("p")["jobs"]]
    assert statuses == [valet.FAILED, valet.CANCELLED, valet.COMPLETED]
    assert store.get(waiting["id"])["failure_reason"] == "before it failed"
    assert store.get(finished["id"])["failure_reason"] is None
    assert store.result(first["id"]) == {"value": None, "error": "boom"}


def test_store_update_writes_only_name_and_description(store):
    job = new_record()
    store.add(job)
    new_pipeline(store, "p", valet.PENDING, valet.PENDING)
    assert store.update(job["id"], {"description": "d"}) is True
    assert store.update("p", {"name": "renamed"}, kind="pipeline") is True
    assert store.update("p", {"name": "x"}) is False  # no job has that id
    assert store.get(job["id"])["description"] == "d"
    assert store.get_pipeline("p")["name"] == "renamed"
    for fields in ({"status": valet.COMPLETED}, {"name": "ok", "attempts": 5}):
        with pytest.raises(ValueError):
            store.update(job["id"], fields)
    assert store.get(job["id"])["status"] == valet.PENDING
    assert store.get(job["id"])["name"] == "job" and store.get(job["id"])["attempts"] == 0


def test_store_delete_asks_its_predicate_about_the_record_as_it_is(store):
    job = new_record()
    store.add(job)
    store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS, {"attempts": 1})
    store.transition(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED, result=(1, None))
    seen = []
    kept = store.delete(job["id"], lambda record: seen.append(record["status"]) or False)
    assert kept["status"] == valet.COMPLETED and kept["attempts"] == 1
    assert set(seen) == {valet.COMPLETED} and store.get(job["id"]) is not None
    assert store.delete(job["id"], lambda record: True)["id"] == job["id"]
    assert store.get(job["id"]) is None and store.result(job["id"]) is None
    assert store.delete(job["id"], lambda record: True) is None


def test_store_delete_pipeline_removes_it_with_its_jobs_and_results_when_allowed(store):
    done, later = new_pipeline(store, "p", valet.IN_PROGRESS, valet.PENDING)
    store.transition(done["id"], (valet.IN_PROGRESS,), valet.COMPLETED, result=("r", None))
    other = new_record("other")
    store.add(other)
    kept = store.delete_pipeline("p", lambda pipeline: False)
    assert [j["status"] for j in kept["jobs"]] == [valet.COMPLETED, valet.PENDING]
    assert store.get_pipeline("p") is not None
    store.delete_pipeline("p", lambda pipeline: pipeline["id"] == "p")
    assert store.get_pipeline("p") is None and store.list_pipelines() == []
    assert store.get(done["id"]) is None and store.result(done["id"]) is None
    assert [j["id"] for j in store.list()] == [other["id"]]
    assert store.delete_pipeline("p", lambda pipeline: True) is None


def test_store_result_is_kept_until_deleted_and_the_job_stays(store):
    job = new_record(status=valet.IN_PROGRESS)
    store.add(job)
    assert store.result(job["id"]) is None and store.delete_result(job["id"]) is False
    store.transition(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED,
                     result=({"nested": [1, "two", None]}, None))
    assert store.result(job["id"]) == {"value": {"nested": [1, "two", None]}, "error": None}
    assert store.delete_result(job["id"]) is True and store.delete_result(job["id"]) is False
    assert store.result(job["id"]) is None
    assert store.get(job["id"])["status"] == valet.COMPLETED


def test_store_reports_its_health_and_closes_twice(store):
    assert store.health() is None
    store.close()
    store.close()


def test_store_gives_back_every_value_as_it_was_given(store):
    job = dict(new_record("round trip"), description="d", timeout=5, retry_backoff=0.5,
               priority=-3, max_retries=2, metadata={"nested": [1, 2.5, "x", None]},
               use_previous_results=True, previous_job_id="before", next_job_id="after",
               pipeline_id="p")
    store.add(job, pipeline={"id": "p", "name": "p", "description": "pd", "priority": -3,
                             "run_at": 12.5, "created_at": 10.0})
    got = store.get(job["id"])
    assert got == {**job, "seq": got["seq"]}
    assert type(got["timeout"]) is int and got["use_previous_results"] is True
    assert _is_seq(got["seq"])
    pipeline = store.get_pipeline("p")
    assert {k: v for k, v in pipeline.items() if k not in ("seq", "jobs")} == {
        "id": "p", "name": "p", "description": "pd", "priority": -3, "run_at": 12.5,
        "created_at": 10.0}
    assert _is_seq(pipeline["seq"]) and pipeline["jobs"] == [got]


def _is_seq(value):
    return type(value) is int and 0 < value < 10 ** 18


def test_store_never_uses_a_seq_again_not_even_the_newest_one_s(store):
    first, newest = new_record("first"), new_record("newest")
    store.add(first)
    store.add(newest)
    seq = store.get(newest["id"])["seq"]
    store.delete(newest["id"], lambda job: True)
    again = new_record("again")
    store.add(again)
    assert store.get(again["id"])["seq"] > seq


def test_store_add_that_fails_part_way_stores_nothing_of_it(store):
    stored = new_record("stored")
    store.add(stored)
    first, clash = new_record("first"), new_record("clash")
    clash["id"] = stored["id"]
    for job in (first, clash):
        job["pipeline_id"] = "p"
    pipeline = {"id": "p", "name": "p", "description": None, "priority": 0, "run_at": None,
                "created_at": 1.0}
    with pytest.raises(Exception):
        store.add(first, clash, pipeline=pipeline, fired=("nightly", 100.0))
    twice = new_record("twice")
    with pytest.raises(Exception):
        store.add(twice, dict(twice))
    assert [j["id"] for j in store.list()] == [stored["id"]]
    assert store.get_pipeline("p") is None and store.list_pipelines() == []
    assert store.add(new_record(), fired=("nightly", 100.0)) is True  # no firing was kept


def test_store_transition_that_misses_or_is_refused_writes_nothing(store):
    job, later = new_record("job"), new_record("later")
    store.add(job)
    store.add(later)
    then = [(later["id"], (valet.PENDING,), valet.CANCELLED, {})]
    assert store.transition(job["id"], (valet.IN_PROGRESS,), valet.FAILED,
                            result=(None, "boom"), then=then) is None
    for bad_then in ([(later["id"], (valet.PENDING,), valet.CANCELLED, {"name": "x"})],
                     [(later["id"], (valet.PENDING,), "DONE", {})]):
        with pytest.raises(ValueError):
            store.transition(job["id"], (valet.PENDING,), valet.IN_PROGRESS, then=bad_then)
    assert store.result(job["id"]) is None
    assert [j["status"] for j in store.list()] == [valet.PENDING, valet.PENDING]


def test_store_fills_a_page_whenever_enough_follow(store):
    jobs = [new_record(f"j{i}") for i in range(5)]
    for job in jobs:
        store.add(job)
    store.delete(jobs[1]["id"], lambda job: True)  # a gap in the seqs
    assert [j["name"] for j in store.list(None, 0, 3)] == ["j0", "j2", "j3"]
    assert [j["name"] for j in store.list(valet.PENDING, 0, 4)] == ["j0", "j2", "j3", "j4"]
    assert store.list("NOT A STATUS", 0, 3) == []
    for name in "abc":
        new_pipeline(store, name, valet.PENDING, valet.PENDING)
    assert [p["id"] for p in store.list_pipelines(0, 2)] == ["a", "b"]


def test_store_update_of_a_missing_pipeline_is_false_and_of_an_unknown_kind_an_error(store):
    assert store.update("nope", {"name": "x"}, kind="pipeline") is False
    with pytest.raises(ValueError):
        store.update("nope", {"name": "x"}, kind="pipelines")


def test_every_store_implements_the_whole_interface(store):
    methods = [name for name, value in vars(valet.Store).items()  # (transition() is
               if callable(value) and not name.startswith("_") and name != "transition"]
    assert len(methods) == 17  # transitions() of one move, in Store itself)
    assert isinstance(store, valet.Store) and store.option
    for name in methods:
        assert getattr(type(store), name) is not getattr(valet.Store, name), \
            f"{type(store).__name__} does not implement {name}"
        assert getattr(valet.Store, name).__doc__, name


# ---------------------------------------------------------- storage: SQLite --

def test_sqlite_store_shares_commits_between_concurrent_writers(tmp_path):
    store = valet.SqliteStore(tmp_path / "valet.db")
    jobs = [new_record(f"j{i}") for i in range(200)]

    def add(i):
        for job in jobs[i::20]:
            store.add(job)

    run_together(add, 20)
    assert store.commits < 200  # concurrent writes shared commits
    store.close()
    reopened = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert len(reopened.list(None, 0, 1000)) == 200
    finally:
        reopened.close()


def test_sqlite_finish_writes_status_and_result_in_one_commit(tmp_path):
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        job = new_record(status=valet.IN_PROGRESS)
        store.add(job)
        before = store.commits
        store.transition(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED, result=(1, None))
        assert store.commits == before + 1
    finally:
        store.close()


@pytest.mark.parametrize("setting, level", [("full", 2), ("normal", 1)])
def test_sqlite_synchronous_setting_reaches_every_connection(tmp_path, setting, level):
    store = valet.SqliteStore(tmp_path / "valet.db", setting)
    try:
        assert store._conn.execute("PRAGMA synchronous").fetchone()["synchronous"] == level
        with store._reading() as conn:
            assert conn.execute("PRAGMA synchronous").fetchone()["synchronous"] == level
    finally:
        store.close()


class InterruptedWait:
    """A write's done-signal whose wait is interrupted (as by Ctrl-C) once `ready()`
    returns true."""

    def __init__(self, ready):
        self.ready = ready
        self.lock = threading.Lock()
        self.lock.acquire()

    def acquire(self, blocking=True):
        if not blocking:
            return self.lock.acquire(blocking=False)
        wait_until(self.ready, what="the moment to interrupt")
        raise KeyboardInterrupt  # before the lock is taken, even if it was released

    def release(self):
        self.lock.release()


@pytest.mark.parametrize("handed_the_lead", [False, True])
def test_sqlite_interrupted_write_does_not_strand_the_lead(tmp_path, monkeypatch,
                                                            handed_the_lead):
    """A caller interrupted while its write waits (for the leader's commit, or after
    being handed the lead) must not take the lead away with it: every later write
    would wait forever."""
    store = valet.SqliteStore(tmp_path / "valet.db")
    entered, go_on = threading.Event(), threading.Event()

    def slow(conn):
        entered.set()
        assert go_on.wait(10)

    leader = threading.Thread(target=store._write, args=(slow,))
    leader.start()
    assert entered.wait(10)  # the leader is inside its batch: the next write queues
    waiting = valet._Write(lambda conn: "written")
    if handed_the_lead:  # the leader finishes first and hands this write the lead
        waiting.done = InterruptedWait(lambda: go_on.set() or waiting.leads)
    else:  # interrupted while the leader is still busy: the write is withdrawn
        waiting.done = InterruptedWait(lambda: True)
    monkeypatch.setattr(valet, "_Write", lambda fn: waiting)
    with pytest.raises(KeyboardInterrupt):
        store._write(waiting.fn)
    monkeypatch.undo()
    go_on.set()
    leader.join(10)
    assert waiting.value == ("written" if handed_the_lead else None)
    later = threading.Thread(target=store._write, args=(lambda conn: None,), daemon=True)
    later.start()
    later.join(10)
    assert not later.is_alive(), "a later write hangs: the lead went to nobody"
    store.close()


def test_sqlite_writer_isolates_a_failing_write_from_its_batch(tmp_path):
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        good, other = new_record("good"), new_record("other")

        def insert(job):
            values = dict(job, metadata=json.dumps(job["metadata"]))
            columns = [c for c in valet._JOB_COLUMNS if c != "seq"]
            return lambda conn: conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES "
                f"({', '.join('?' * len(columns))})", [values[c] for c in columns]).rowcount

        def broken(conn):
            conn.execute("DELETE FROM jobs")
            raise RuntimeError("a bug in one write")

        writes = [valet._Write(insert(good)), valet._Write(broken), valet._Write(insert(other))]
        commits = store.commits
        store._apply(writes)
        assert all(write.done.acquire(blocking=False) for write in writes)  # all answered
        assert isinstance(writes[1].error, RuntimeError) and writes[1].value is None
        assert [(w.value, w.error) for w in (writes[0], writes[2])] == [(1, None), (1, None)]
        assert [j["name"] for j in store.list(None, 0, 10)] == ["good", "other"]
        assert store.commits == commits + 1  # the batch still shares one commit
    finally:
        store.close()


def test_sqlite_file_from_valet_0_1_0_opens_and_runs_its_jobs(tmp_path, gate, ran):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE jobs (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
            name TEXT NOT NULL, description TEXT, task_name TEXT NOT NULL,
            metadata TEXT NOT NULL, timeout, status TEXT NOT NULL, failure_reason TEXT,
            created_at REAL NOT NULL, started_at REAL, completed_at REAL);
        CREATE INDEX jobs_by_status ON jobs (status, seq);
        CREATE TABLE results (job_id TEXT PRIMARY KEY, value TEXT NOT NULL, error TEXT)
            WITHOUT ROWID;
        INSERT INTO jobs VALUES (1, 'done', 'd', NULL, 'echo', '"old"', NULL, 'COMPLETED',
                                 NULL, 1.0, 2.0, 3.0);
        INSERT INTO results VALUES ('done', '"old"', NULL);
        INSERT INTO jobs VALUES (2, 'waiting', 'w', NULL, 'echo', '"queued"', 5, 'PENDING',
                                 NULL, 4.0, NULL, NULL);
    """)
    conn.commit()
    conn.close()
    config = {"server": {"port": 0}, "storage": {"sqlite": {"path": str(path)}}}
    app = valet.Valet(config, tasks=make_tasks(gate, ran)).start()
    try:
        done = app.job("done")
        assert done["status"] == valet.COMPLETED and done["attempts"] == 1
        assert done["priority"] == 0 and done["max_retries"] == 0 and done["run_at"] is None
        assert app.wait("waiting", 10)["status"] == valet.COMPLETED
        assert ran == ["queued"] and app.job("waiting")["attempts"] == 1
        assert call(app, "GET", "/jobs").body["jobs"][0]["id"] == "done"
    finally:
        app.stop()


def test_sqlite_upgrade_that_fails_half_way_leaves_the_file_as_it_was(tmp_path,
                                                                       monkeypatch):
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT, "
                 "name TEXT, description TEXT, task_name TEXT, metadata TEXT, timeout, "
                 "status TEXT, failure_reason TEXT, created_at REAL, started_at REAL, "
                 "completed_at REAL)")
    conn.commit()
    conn.close()
    # A column that cannot be added, last: the ones before it must not stay added.
    monkeypatch.setattr(valet, "_ADDED_COLUMNS",
                        valet._ADDED_COLUMNS + (("broken", "PRIMARY KEY"),))
    with pytest.raises(valet.StorageError, match="Cannot add a PRIMARY KEY column"):
        valet.SqliteStore(path)
    conn = sqlite3.connect(path)
    columns = [row[1] for row in conn.execute("PRAGMA table_info(jobs)")]
    conn.close()
    assert "attempts" not in columns and "priority" not in columns


# -- one owner per database, and storage faults: helpers

SQLITE_ONLY = pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
BIG_METADATA = {"pad": "x" * 20_000}  # needs new pages: overflow pages of 4 KB each
VALET = os.path.join(HERE, "valet.py")


def on_writer(store, sql):
    """Run one statement on the store's writer connection while no write is under
    way (new writes wait on the queue lock meanwhile); its rows."""
    with store._idle:
        assert store._idle.wait_for(lambda: not store._leading, 10), "a write never ended"
        return store._conn.execute(sql).fetchall()


def pragma(store, name):
    return next(iter(on_writer(store, f"PRAGMA {name}")[0].values()))


class Fault:
    """A real SQLite fault on the store's writer connection, injected on entering,
    cleared by clear() or on leaving."""

    CAUSES = {"read-only": "database is read-only", "full": "disk is full"}

    def __init__(self, store, kind):
        self.store, self.kind, self.cause, self.on = store, kind, self.CAUSES[kind], False

    def __enter__(self):
        if self.kind == "read-only":
            on_writer(self.store, "PRAGMA query_only = 1")
        else:
            on_writer(self.store, f"PRAGMA max_page_count = {pragma(self.store, 'page_count')}")
        self.on = True
        return self

    def clear(self):
        if self.on:
            on_writer(self.store, "PRAGMA query_only = 0" if self.kind == "read-only"
                      else "PRAGMA max_page_count = 1073741823")
            self.on = False

    def __exit__(self, *exc):
        self.clear()


def post_job_with(app, metadata=None, **fields):
    return call(app, "POST", "/jobs", {"name": "n", "task_name": "echo",
                                       "metadata": metadata, **fields})


def assert_storage_fails(app, resp, cause, status=True):
    """`resp` is a 503 naming the storage fault; and /status says so too."""
    assert resp.status == 503, resp
    assert resp.body["message"].startswith(f"storage is failing: {cause}")
    assert resp.headers["Retry-After"] == "5"
    if status:
        health = call(app, "GET", "/status")
        assert health.status == 503
        assert health.body["storage"] == {"option": "sqlite", "ok": False, "error": cause}


def listed_ids(app):
    resp = call(app, "GET", "/jobs?limit=100")
    assert resp.status == 200, resp
    return [job["id"] for job in resp.body["jobs"]]


def result_of(app, job_id):
    resp = call(app, "GET", f"/jobs/{job_id}/results")
    assert resp.status == 200, resp
    return resp.body["metadata"]


def status_says(app, ok, error=None):
    """GET /status if its storage says `ok` (with `error`), else None; forces the
    probe due (as if no write had committed for a while)."""
    store = app.lifecycle.store
    store._last_write = time.monotonic() - 10
    resp = call(app, "GET", "/status")
    want = {"option": "sqlite", "ok": ok, "error": error}
    if resp.body["storage"] == want and resp.status == (200 if ok else 503):
        return resp
    return None


def storage_records(caplog, level=logging.WARNING):
    return [r for r in caplog.records
            if r.levelno >= level and r.getMessage().startswith("storage:")]


def run_valet(folder, *args):
    """A real `python valet.py --port 0` in `folder` (where its config.yaml is) that is
    expected to end at once: (exit code, stderr lines, seconds it took)."""
    began = time.monotonic()
    done = subprocess.run([sys.executable, VALET, "--port", "0", *args], cwd=folder,
                          capture_output=True, text=True, timeout=20)
    return done.returncode, done.stderr.splitlines(), time.monotonic() - began


def stored_jobs(path, count, pad=2000):
    """A real database file at `path` with `count` finished-looking jobs (several pages)."""
    store = valet.SqliteStore(path)
    try:
        for i in range(count):
            job = new_record(f"j{i}")
            job["metadata"] = {"pad": "y" * pad, "i": i}
            store.add(job)
    finally:
        store.close()


GARBAGE = bytes(range(256)) * 64  # 16 KB that is no SQLite page


def corrupt(path, start, end):
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(GARBAGE[:end - start])


CORRUPTIONS = {"header": (0, 100), "pages": (4096, 8192), "table": (8192, 12288)}


@pytest.fixture
def tmpfs(tmp_path):
    """A 2 MB tmpfs mounted at tmp_path/mnt (needs root), unmounted afterwards."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs: run the tests as root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"needs mount (CAP_SYS_ADMIN) for a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(folder):
    """Write a file in `folder` until the disk is full; its path."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as full:
            for _ in range(10_000):
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    assert full.value.errno == errno.ENOSPC, full.value
    return filler


# -- one owner per database

def running_block_job(proc, fifo):
    """The id of a `block` job that proc runs until `fifo` is written to."""
    os.mkfifo(fifo)
    job_id = post(proc.port, "block", {"fifo": str(fifo)})
    wait_until(lambda: call(proc.port, "GET", f"/jobs/{job_id}").body["status"]
               == valet.IN_PROGRESS, what="the block job to start")
    return job_id


def test_second_process_on_one_database_exits_1_naming_file_and_owner_pid(tmp_path,
                                                                          processes):
    first = processes(tmp_path)
    running = running_block_job(first, tmp_path / "fifo")

    code, lines, took = run_valet(tmp_path)  # the same config.yaml, the same folder
    assert code == 1 and took < 5, (code, took)
    assert len(lines) == 1, lines
    assert str(tmp_path / "valet.db") in lines[0]
    assert f"is in use by valet pid {first.proc.pid}" in lines[0]

    assert first.proc.poll() is None  # the first keeps running, its job untouched
    release(tmp_path / "fifo")
    wait_until(lambda: call(first.port, "GET", f"/jobs/{running}").body["status"]
               == valet.COMPLETED, what="the first process's job to complete")
    assert result_of(first.port, running) == "released"
    assert first.kill(signal.SIGTERM) == 0

    after = processes(tmp_path)  # the file is free again
    assert call(after.port, "GET", f"/jobs/{running}").body["status"] == valet.COMPLETED


def test_sqlite_store_opened_twice_raises_store_in_use_until_the_first_closes(tmp_path):
    path = tmp_path / "valet.db"
    first = valet.SqliteStore(path)
    try:
        with pytest.raises(valet.StoreInUse, match=rf"in use by valet pid {os.getpid()}\b"):
            valet.SqliteStore(path)
        first.add(new_record("still mine"))  # the refused open left the owner working
        assert first.health() is None
    finally:
        first.close()
    again = valet.SqliteStore(path)
    try:
        assert [job["name"] for job in again.list()] == ["still mine"]
    finally:
        again.close()


@SQLITE_ONLY
def test_valet_built_twice_on_one_file_raises_store_in_use_until_the_first_stops(make_app):
    first = make_app(start=False)
    with pytest.raises(valet.StoreInUse, match=rf"in use by valet pid {os.getpid()}\b"):
        make_app(start=False)
    first.stop()
    second = make_app()  # the lock went with the first's store
    submit(second)


def test_sigkill_releases_the_lock_and_the_next_process_recovers_its_job(tmp_path,
                                                                        processes):
    first = processes(tmp_path)
    running = running_block_job(first, tmp_path / "never")
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL

    second = processes(tmp_path)  # the OS dropped the dead process's lock
    crashed = call(second.port, "GET", f"/jobs/{running}").body
    assert crashed["status"] == valet.FAILED
    assert crashed["failure_reason"] == "the server stopped while the job was running"
    assert second.proc.poll() is None


# -- storage faults

def test_status_reports_storage_ok_when_the_store_works(app):
    store = app.lifecycle.store
    if store.option == "sqlite":
        store._last_write = time.monotonic() - 10  # the probe writes, and succeeds
    resp = call(app, "GET", "/status")
    assert resp.status == 200
    assert resp.body["storage"] == {"option": store.option, "ok": True, "error": None}
    assert valet.MemoryStore().health() is None  # a memory store never fails


@SQLITE_ONLY
@pytest.mark.parametrize("kind", list(Fault.CAUSES))
def test_post_during_a_fault_gets_503_naming_the_cause_and_creates_nothing(make_app, kind):
    app = make_app(**{"worker_pool.queue_capacity": 2})
    before = submit(app, metadata=BIG_METADATA)["id"]
    wait_for_status(app, before, valet.COMPLETED)
    with Fault(app.lifecycle.store, kind) as fault:
        for _ in range(5):  # more than the backlog holds: each place is given back
            resp = post_job_with(app, BIG_METADATA)
            assert resp.status == 503, resp
            assert resp.headers["Retry-After"] == "5"
            assert resp.body["message"].startswith(
                f"storage is failing: {fault.cause}; try again later")
        assert listed_ids(app) == [before]
        status = call(app, "GET", "/status")
        assert status.status == 503
        assert status.body["storage"] == {"option": "sqlite", "ok": False,
                                          "error": fault.cause}
        assert status.body["queue"]["depth"] == 0
    after = submit(app, metadata=BIG_METADATA)["id"]
    assert wait_for_status(app, after, valet.COMPLETED)["metadata"] == BIG_METADATA
    assert listed_ids(app) == [before, after]


@SQLITE_ONLY
def test_status_probe_notices_a_fault_on_an_idle_server_and_its_end(make_app):
    app = make_app()
    assert status_says(app, True)
    with Fault(app.lifecycle.store, "read-only") as fault:
        wait_until(lambda: status_says(app, False, "database is read-only"),
                   what="/status to say the storage is not ok")
        fault.clear()
        wait_until(lambda: status_says(app, True), what="/status to say ok again")


@SQLITE_ONLY
def test_a_fault_is_logged_once_per_episode_and_its_end_once(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app()
    for episode in (1, 2):
        with Fault(app.lifecycle.store, "read-only") as fault:
            for _ in range(20):
                assert post_job_with(app).status == 503
                assert call(app, "GET", "/status").status == 503
            errors = [r for r in storage_records(caplog) if r.levelno == logging.ERROR]
            assert len(errors) == episode, [r.getMessage() for r in errors]
            assert errors[-1].getMessage().startswith("storage: database is read-only")
            fault.clear()
            submit(app)  # a write succeeds: the fault is over
        warnings = [r for r in storage_records(caplog) if r.levelno == logging.WARNING]
        assert len(warnings) == episode, [r.getMessage() for r in warnings]
        assert warnings[-1].getMessage().startswith("storage: working again")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text


@SQLITE_ONLY
def test_running_job_whose_completion_write_fails_completes_after_the_fault(make_app, gate):
    app = make_app()
    store = app.lifecycle.store
    job_id = submit(app, "gate")["id"]
    assert gate.entered.wait(10)
    with Fault(store, "read-only") as fault:
        gate.opened.set()
        assert gate.returned.wait(10)
        wait_until(lambda: store._fault == fault.cause,
                   what="the completion write to fail")  # nothing else writes
        assert job_status(app, job_id) == valet.IN_PROGRESS
        fault.clear()
    done = wait_for_status(app, job_id, valet.COMPLETED, valet.FAILED)
    assert done["status"] == valet.COMPLETED and done["failure_reason"] is None
    assert result_of(app, job_id) == {"gate": "passed"}


@SQLITE_ONLY
def test_queued_jobs_whose_start_write_fails_run_after_the_fault(make_app, tmp_path, ran):
    store = valet.SqliteStore(tmp_path / "valet.db")  # left PENDING by a previous run
    jobs = [new_record("a"), new_record("b")]
    for job in jobs:
        store.add(job)
    store.close()
    app = make_app(start=False, **{"worker_pool.workers": 1})
    with Fault(app.lifecycle.store, "read-only") as fault:
        app.start()  # reads only; the worker's start (PENDING -> IN_PROGRESS) fails
        wait_until(lambda: app.lifecycle.store._fault == fault.cause,
                   what="the start write to fail")
        assert [job_status(app, job["id"]) for job in jobs] == [valet.PENDING] * 2
        assert ran == []
        fault.clear()
    for job in jobs:
        assert wait_for_status(app, job["id"], valet.COMPLETED)["attempts"] == 1
        assert result_of(app, job["id"]) == job["metadata"]
    assert ran == [{"n": "a"}, {"n": "b"}]


@SQLITE_ONLY
def test_scheduled_job_whose_promotion_falls_in_a_fault_runs_after_it(make_app):
    app = make_app()
    run_at = time.time() + 0.5
    job = submit(app, metadata={"s": 1}, run_at=valet._rfc3339(run_at))
    assert job["status"] == valet.SCHEDULED
    with Fault(app.lifecycle.store, "read-only") as fault:
        wait_until(lambda: app.lifecycle.store._fault == fault.cause,
                   what="the promotion to fail")
        assert time.time() >= run_at
        assert job_status(app, job["id"]) == valet.SCHEDULED
        fault.clear()
    assert wait_for_status(app, job["id"], valet.COMPLETED)["failure_reason"] is None
    assert result_of(app, job["id"]) == {"s": 1}


@SQLITE_ONLY
def test_periodic_firing_that_falls_in_a_fault_creates_its_job_after_it(make_app):
    beat = {"name": "beat", "task_name": "echo", "every": 1, "metadata": {"beat": True}}
    app = make_app(start=False, periodic=[beat])
    last = time.time() - 0.6  # its last firing: the next is due in 0.4 s
    assert app.lifecycle.store.periodic_last("beat", last) == last
    app.start()
    [entry] = call(app, "GET", "/periodic").body["periodic"]
    due = epoch(entry["next_run_at"])
    assert abs(due - (last + 1)) < 0.001
    with Fault(app.lifecycle.store, "read-only") as fault:
        wait_until(lambda: app.lifecycle.store._fault == fault.cause,
                   what="the firing to fail")
        assert time.time() >= due and listed_ids(app) == []
        fault.clear()
    first = wait_until(lambda: listed_ids(app), what="the firing's job")[0]
    job = wait_for_status(app, first, valet.COMPLETED)
    assert job["name"] == "beat"
    assert result_of(app, first) == {"beat": True}


@SQLITE_ONLY
def test_a_cancel_the_store_refuses_leaves_a_queued_job_queued(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)
    queued = submit(app, "echo", "still runs")["id"]
    with Fault(app.lifecycle.store, "read-only"):
        assert call(app, "POST", f"/jobs/{queued}/cancel").status == 503
    assert call(app, "GET", "/status").body["queue"]["depth"] == 1
    gate.opened.set()
    assert wait_for_status(app, queued, valet.COMPLETED)["status"] == valet.COMPLETED
    assert result_of(app, queued) == "still runs"


@SQLITE_ONLY
def test_a_cancel_the_store_refuses_leaves_a_running_job_to_end_with_its_result(make_app,
                                                                               gate):
    app = make_app(**{"worker_pool.workers": 1})
    running = submit(app, "gate")["id"]
    assert gate.entered.wait(10)
    with Fault(app.lifecycle.store, "read-only"):
        resp = call(app, "POST", f"/jobs/{running}/cancel")
        assert resp.status == 503 and "database is read-only" in resp.body["message"]
    gate.opened.set()  # the task was told, but returns its value all the same
    done = wait_for_status(app, running, valet.COMPLETED)
    assert done["attempts"] == 1 and result_of(app, running) == {"gate": "passed"}


@SQLITE_ONLY
def test_a_cancel_waiting_on_an_end_the_store_refuses_answers_503_in_time(make_app, gate,
                                                                         monkeypatch):
    monkeypatch.setattr(valet, "_SETTLE_WAIT", 0.2)
    app = make_app(**{"worker_pool.workers": 1})
    job_id = submit(app, "gate", timeout=0.3)["id"]
    assert gate.entered.wait(10)
    with Fault(app.lifecycle.store, "read-only"):
        # the deadline thread takes the claim and retries its write while the fault lasts
        wait_until(lambda: app.pool.stats()["abandoned"] == 1, what="the timeout")
        began = time.monotonic()
        resp = call(app, "POST", f"/jobs/{job_id}/cancel")
        assert resp.status == 503 and "still being written" in resp.body["message"]
        assert time.monotonic() - began < 5
    failed = wait_for_status(app, job_id, valet.FAILED)  # the timeout's write went through
    assert failed["failure_reason"] == "timed out after 0.3 seconds"
    gate.opened.set()


def test_a_restart_on_a_full_disk_stops_with_one_line(tmpfs, processes):
    first = processes(tmpfs)
    running_block_job(first, tmpfs / "fifo")  # left IN_PROGRESS: the restart must write
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL
    filler = fill(tmpfs)
    try:
        code, lines, _ = run_valet(tmpfs)
    finally:
        filler.unlink()
    assert code == 1 and len(lines) == 1, lines
    assert "disk is full" in lines[0]


def test_a_forked_child_does_not_keep_the_database_locked(tmp_path):
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork (not on Windows)")
    store = valet.SqliteStore(tmp_path / "valet.db")
    read_end, write_end = os.pipe()
    forked, ready = os.pipe()
    child = os.fork()
    if child == 0:  # a task's forked helper that outlives the store's owner
        os.close(write_end)
        os.write(ready, b"!")  # (after fork()'s hooks have run in this child)
        os.read(read_end, 1)  # until the test is done
        os._exit(0)
    try:
        os.close(read_end)
        os.close(ready)
        assert os.read(forked, 1) == b"!"  # the child runs: not still being forked
        os.close(forked)
        store.close()
        valet.SqliteStore(tmp_path / "valet.db").close()  # not StoreInUse
    finally:
        os.close(write_end)
        os.waitpid(child, 0)


# -- real disk faults

@SQLITE_ONLY
def test_full_tmpfs_answers_503_disk_is_full_and_recovers_when_space_is_freed(
        make_app, tmpfs, gate):
    app = make_app(**{"storage.sqlite.path": str(tmpfs / "valet.db")})
    try:
        running = submit(app, "gate")["id"]
        assert gate.entered.wait(10)
        queued = submit(app, metadata={"q": 1})["id"]  # accepted before the fault
        filler = fill(tmpfs)
        assert_storage_fails(app, post_job_with(app, BIG_METADATA), "disk is full")
        gate.opened.set()  # its job ends while the disk is full
        os.remove(filler)
        assert submit(app, metadata=BIG_METADATA)["status"] == valet.PENDING
        wait_for_status(app, running, valet.COMPLETED)
        assert result_of(app, running) == {"gate": "passed"}
        wait_for_status(app, queued, valet.COMPLETED)
        assert result_of(app, queued) == {"q": 1}
        wait_until(lambda: status_says(app, True), what="/status to say ok again")
    finally:
        gate.opened.set()
        app.stop()  # before the tmpfs is unmounted


def test_read_only_database_at_start_stops_with_exit_1_and_one_line(tmp_path, tmpfs):
    path = tmpfs / "valet.db"
    stored_jobs(path, 3)
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    (tmp_path / "config.yaml").write_text(json.dumps({"storage": {"sqlite": {
        "path": str(path)}}, "tasks_module": "valet_process_tasks"}))
    (tmp_path / "valet_process_tasks.py").write_text(PROCESS_TASKS)
    code, lines, took = run_valet(tmp_path, "--config", str(tmp_path / "config.yaml"))
    # What happens: the lock file beside the database cannot be opened for writing.
    assert code == 1 and took < 5, (code, lines)
    assert len(lines) == 1, lines
    assert "ERROR" in lines[0] and str(path) in lines[0]
    assert "read-only" in lines[0].lower(), lines[0]
    with pytest.raises(valet.StorageError) as refused:  # not an OSError or sqlite3.Error
        valet.SqliteStore(path)
    assert "read-only" in str(refused.value).lower()


# -- corruption

@pytest.mark.parametrize("where", list(CORRUPTIONS))
def test_corrupt_database_stops_a_process_with_exit_1_and_one_line(tmp_path, where):
    path = tmp_path / "valet.db"
    stored_jobs(path, 30)
    corrupt(path, *CORRUPTIONS[where])
    (tmp_path / "config.yaml").write_text(json.dumps({"tasks_module": "valet_process_tasks"}))
    (tmp_path / "valet_process_tasks.py").write_text(PROCESS_TASKS)
    code, lines, took = run_valet(tmp_path, "--config", str(tmp_path / "config.yaml"))
    assert code == 1 and took < 5, (code, lines)
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and "database is corrupt" in lines[0]


@pytest.mark.parametrize("where", list(CORRUPTIONS))
def test_corrupt_database_file_raises_storage_error_database_is_corrupt(tmp_path, where):
    path = tmp_path / "valet.db"
    stored_jobs(path, 30)
    corrupt(path, *CORRUPTIONS[where])
    for _ in range(2):  # a refused open releases the lock: the second is refused alike
        with pytest.raises(valet.StorageError) as refused:
            valet.SqliteStore(path)
        assert refused.value.cause == "database is corrupt"
        assert str(refused.value).startswith("storage is failing: database is corrupt")


def corrupt_jobs_table(app, count=100):
    """Store `count` jobs, let them finish, then write garbage over the jobs table's
    root page in the file (after checkpointing the WAL into it, on a connection of
    the test's own): every read of the table meets it."""
    ids = [submit(app, metadata={"pad": "z" * 500, "i": i})["id"] for i in range(count)]
    wait_until(lambda: not call(app, "GET", "/jobs?status=pending").body["jobs"]
               and not call(app, "GET", "/jobs?status=in_progress").body["jobs"],
               what="every job to finish")
    path = app.lifecycle.store.path
    with contextlib.closing(sqlite3.connect(path)) as conn:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        assert busy == 0
        root = conn.execute("SELECT rootpage FROM sqlite_schema WHERE name = 'jobs'"
                            ).fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        assert conn.execute("PRAGMA page_count").fetchone()[0] > root + 10
    corrupt(path, (root - 1) * size, root * size)
    return ids


@SQLITE_ONLY
def test_corruption_met_at_run_time_answers_503_and_is_logged_once(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app()
    ids = corrupt_jobs_table(app)
    caplog.clear()
    for i in range(50):
        resp = call(app, "GET", "/jobs" if i % 2 else f"/jobs/{ids[i]}")
        assert_storage_fails(app, resp, "database is corrupt", status=i == 49)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= 3, loud
    assert loud[0].startswith("storage: database is corrupt")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_a_bad_argument_is_the_callers_error_not_a_storage_fault(tmp_path):
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        with pytest.raises(sqlite3.Error) as raised:
            store.get(object())  # a caller's mistake: SQLite cannot bind it
        assert not isinstance(raised.value, valet.StorageError)
        store._last_write -= 60
        assert store.health() is None  # still healthy: nothing is wrong with the disk
    finally:
        store.close()


@SQLITE_ONLY
@pytest.mark.parametrize("garbage", [b"\xff\xfe not UTF-8", b"{not json"])
def test_a_stored_row_that_is_garbage_answers_503_database_is_corrupt(make_app, garbage):
    app = make_app()
    job_id = submit(app, "echo", {"x": 1})["id"]
    conn = sqlite3.connect(app._store.path)  # what a bad disk or another program did
    conn.execute("UPDATE jobs SET metadata = CAST(? AS TEXT) WHERE id = ?", (garbage, job_id))
    conn.commit()
    conn.close()
    resp = call(app, "GET", f"/jobs/{job_id}")
    assert resp.status == 503 and "database is corrupt" in resp.body["message"]
    assert "it needs repair" in resp.body["message"]
    assert call(app, "GET", "/jobs").status == 503
    app._store._last_write -= 60  # the probe's write succeeds: still not ok
    assert status_says(app, False, "database is corrupt")


@SQLITE_ONLY
def test_corrupt_database_stays_not_ok_when_a_probe_write_succeeds(make_app, caplog):
    """The health probe writes one row of its own table, which corruption of the
    jobs table does not stop: /status must not flip to ok (and log the fault over
    again) while every read of the jobs fails."""
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app()
    corrupt_jobs_table(app)
    caplog.clear()
    answers = []
    for _ in range(10):  # a client reading jobs, and a monitor polling /status
        assert call(app, "GET", "/jobs").status == 503
        answers.append(bool(status_says(app, False, "database is corrupt")))
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert all(answers), f"/status said ok while the database is corrupt: {answers}"
    assert len(loud) <= 3, loud


# ----------------------------------- storage: PostgreSQL, and several nodes --

# -- several nodes: in one process
#
# Valet objects in this process, several on one schema, each a node (port 0). Most
# tests drive a node's single steps themselves on unstarted apps (recover(), then
# node.claim_once / beat_once / look_once and pool.run_once); the rest start the
# apps and wait for what their threads do, with deadlines.

@pytest.fixture
def node_schema(postgres_server):
    """The dsn and a new schema of this test's own, for several nodes; dropped after."""
    import psycopg
    schema = f"n_{uuid.uuid4().hex[:12]}"
    yield {"dsn": postgres_server, "schema": schema}
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {valet._pg_name(schema)} CASCADE")


@pytest.fixture
def make_node(node_schema, gate, ran):
    """make(name, start=True, tasks=None, config=None): a Valet on the test's schema,
    the node `name` (None: named after its port), one worker. Started, or not
    (start=False: nothing runs; the test calls recover() and the single steps).
    `config` holds dotted overrides. Every one is stopped at the end."""
    apps = []

    def make(name, start=True, tasks=None, config=None):
        loaded = valet.load_config({
            "server": {"port": 0},
            "storage": {"option": "postgres", "postgres": {
                **node_schema, "node": name, "heartbeat": 30, "node_timeout": 120,
                "poll": 1}},
            "worker_pool": {"workers": 1, "queue_capacity": 20, "shutdown_grace": 5}},
            config or {})
        app = valet.Valet(loaded, tasks={**make_tasks(gate, ran), **(tasks or {})})
        apps.append(app)
        if start:
            app.start()
        return app

    yield make
    gate.opened.set()
    for app in apps:
        app.stop()


def pg_rows(dsn, sql, args=()):
    """The rows (tuples) of one statement on a connection of the test's own."""
    import psycopg
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


def in_schema(where, table):
    return f"{valet._pg_name(where['schema'])}.{table}"


def test_postgres_schema_is_made_once_when_nodes_start_together(node_schema, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    stores, errors = [None] * 6, []

    def open_one(i):
        try:
            stores[i] = valet.PostgresStore(**node_schema)
        except Exception as exc:  # (reported below, with the others)
            errors.append(exc)

    def schema_state():
        return pg_rows(node_schema["dsn"], "SELECT c.relname, c.relkind FROM pg_class AS c "
                       "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE "
                       "n.nspname = %s ORDER BY 1", (node_schema["schema"],)), pg_rows(
            node_schema["dsn"], f"SELECT step, count(*) FROM "
                                f"{in_schema(node_schema, 'version')} GROUP BY step ORDER BY 1")

    try:
        run_together(open_one, 6)
        assert errors == []
        steps = len(valet._PG_STEPS)
        tables, versions = schema_state()
        assert versions == [(step, 1) for step in range(1, steps + 1)]
        assert {"jobs", "results", "pipelines", "periodic", "keys", "nodes", "job_counts",
                "version"} <= {name for name, kind in tables if kind == "r"}
        def made():  # what the store logs of the schema: once, by the one that made it
            return [r.getMessage() for r in caplog.records
                    if node_schema["schema"] in r.getMessage()]

        assert len(made()) == 1, made()
        for i, store in enumerate(stores):  # every one works on the one schema
            store.add(new_record(f"job {i}"))
        assert all(store.counts()[valet.PENDING] == 6 for store in stores)
        valet.PostgresStore(**node_schema).close()  # once more: nothing changes
        assert schema_state() == (tables, versions)
        assert len(made()) == 1, made()
        assert stores[0].counts()[valet.PENDING] == 6
    finally:
        for store in stores:
            if store is not None:
                store.close()


def test_postgres_schema_newer_than_this_valet_is_refused(node_schema):
    valet.PostgresStore(**node_schema).close()
    newer = len(valet._PG_STEPS) + 1
    pg_rows(node_schema["dsn"], f"INSERT INTO {in_schema(node_schema, 'version')} VALUES "
                                f"(%s) RETURNING step", (newer,))
    with pytest.raises(valet.StorageError, match="newer valet") as refused:
        valet.PostgresStore(**node_schema)
    assert f"step {newer}" in refused.value.detail and valet.__version__ in refused.value.detail
    with pytest.raises(valet.StorageError, match="newer valet"):  # a node, as one
        valet.Valet({"storage": {"option": "postgres", "postgres": node_schema}},
                    tasks={"echo": lambda metadata: metadata})
    assert pg_rows(node_schema["dsn"], f"SELECT max(step) FROM "
                                       f"{in_schema(node_schema, 'version')}") == [(newer,)]


def test_two_nodes_never_start_the_same_job(make_node, node_schema):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    jobs = [new_record(f"job {i}") for i in range(200)]
    a.lifecycle.store.add(*jobs[:100])
    b.lifecycle.store.add(*jobs[100:])

    def claim_all(i):  # four threads on each node, all at once
        node = (a, b)[i % 2].node
        while node.claim_once(limit=5) or node.store.waiting()["waiting"]:
            pass

    run_together(claim_all, 8)
    on_a, on_b = a.pool.running(), b.pool.running()
    assert on_a and on_b, "one node took every job: the claims did not overlap"
    assert not set(on_a) & set(on_b)
    assert set(on_a) | set(on_b) == {job["id"] for job in jobs}
    assert set(on_a.values()) == set(on_b.values()) == {1}  # started once: attempt 1
    rows = pg_rows(node_schema["dsn"], f"SELECT node, status, count(*), max(attempts) FROM "
                                       f"{in_schema(node_schema, 'jobs')} GROUP BY node, "
                                       f"status ORDER BY node")
    assert rows == [("node-a", valet.IN_PROGRESS, len(on_a), 1),
                    ("node-b", valet.IN_PROGRESS, len(on_b), 1)]


def test_a_dead_node_s_jobs_are_settled_by_a_live_one_and_retried_when_they_have_retries(
        make_node, node_schema, ran):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    once = a.submit({"name": "once", "task_name": "echo", "metadata": "once"})["id"]
    again = a.submit({"name": "again", "task_name": "echo", "metadata": "again",
                      "max_retries": 1, "retry_backoff": 0})["id"]
    assert a.node.claim_once(limit=2) == 2
    assert set(a.pool.running()) == {once, again}
    pg_rows(node_schema["dsn"], f"UPDATE {in_schema(node_schema, 'nodes')} SET heartbeat_at "
                                f"= now() - interval '1 hour' WHERE name = 'node-a' "
                                f"RETURNING name")

    assert b.node.beat_once() == 2
    assert [node["name"] for node in b.node.nodes()] == ["node-b"]
    reason = r"the node node-a running the job stopped \(no heartbeat for 36[0-9]{2}s\)"
    failed = b.job(once)
    assert failed["status"] == valet.FAILED and failed["attempts"] == 1
    assert re.fullmatch(reason, failed["failure_reason"])
    retried = b.job(again)
    assert retried["status"] == valet.SCHEDULED and retried["attempts"] == 1
    assert re.fullmatch(reason, retried["failure_reason"])
    assert b.node.claim_once(limit=1) == 1  # the retry: on B, the live one
    assert b.job(again)["status"] == valet.IN_PROGRESS and b.job(again)["attempts"] == 2

    # A wakes, runs the jobs it had started and settles them: no write of its applies
    assert a.pool.run_once(block=False) and a.pool.run_once(block=False)
    assert sorted(ran) == ["again", "once"]
    assert a.pool.running() == {}
    assert b.job(once) == failed
    assert b.lifecycle.store.result(once) == {"value": None, "error": failed["failure_reason"]}
    assert b.job(again)["status"] == valet.IN_PROGRESS and b.job(again)["attempts"] == 2
    assert b.lifecycle.store.result(again) is None
    assert pg_rows(node_schema["dsn"], f"SELECT node FROM {in_schema(node_schema, 'jobs')} "
                                       f"WHERE id = %s", (again,)) == [("node-b",)]
    assert b.pool.run_once(block=False)  # and B's own attempt ends as it should
    assert b.job(again)["status"] == valet.COMPLETED
    assert b.lifecycle.store.result(again)["value"] == "again"
    assert a.node.beat_once() == 0  # A, taken for dead, enters the table again
    assert sorted(node["name"] for node in a.node.nodes()) == ["node-a", "node-b"]


def test_a_node_starting_again_under_its_name_settles_only_its_own_jobs(make_node,
                                                                          node_schema):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    mine = a.submit({"name": "mine", "task_name": "echo"})["id"]
    assert a.node.claim_once(limit=1) == 1
    theirs = a.submit({"name": "theirs", "task_name": "echo"})["id"]
    assert b.node.claim_once(limit=1) == 1
    assert list(a.pool.running()) == [mine] and list(b.pool.running()) == [theirs]
    a.lifecycle.store.close()  # A crashes: its connections go; its entry and jobs stay

    again = make_node("node-a", start=False)
    again.recover()
    settled = again.job(mine)
    assert settled["status"] == valet.FAILED
    assert settled["failure_reason"] == "the server stopped while the job was running"
    assert again.job(theirs)["status"] == valet.IN_PROGRESS
    assert pg_rows(node_schema["dsn"], f"SELECT id, status, node FROM "
                                       f"{in_schema(node_schema, 'jobs')} ORDER BY seq") == [
        (mine, valet.FAILED, "node-a"), (theirs, valet.IN_PROGRESS, "node-b")]
    assert b.pool.run_once(block=False)  # B's job is B's to end, and it does
    assert again.job(theirs)["status"] == valet.COMPLETED


def waiting_to_be_told():
    """A task that waits (10 s at most) to be told to stop: (it, an Event set when it
    has begun, an Event set when it was told)."""
    entered, told = threading.Event(), threading.Event()

    def waits(metadata, context):
        entered.set()
        if context.cancelled.wait(10):
            told.set()
        return "late"
    return waits, entered, told


def cancel_on_another_node(make_node, **postgres):
    """A job runs on one of two started nodes; cancelled through the other, its task
    is told, it is CANCELLED, and the worker that ran it is free again."""
    waits, entered, told = waiting_to_be_told()

    config = {f"storage.postgres.{key}": value for key, value in postgres.items()}
    apps = [make_node(f"node-{i}", tasks={"waits": waits}, config=config) for i in range(2)]
    job_id = submit(apps[0], "waits")["id"]
    assert entered.wait(5)
    runner = wait_until(lambda: next((app for app in apps if job_id in app.pool.running()),
                                     None), 5, "a node running the job")
    other = apps[1 - apps.index(runner)]
    assert call(runner, "GET", "/status").body["workers"]["busy"] == 1

    resp = call(other, "POST", f"/jobs/{job_id}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    assert told.wait(3), "the task was never told of the cancel"
    wait_until(lambda: call(runner, "GET", "/status").body["workers"]["busy"] == 0, 3,
               "the runner's worker to be free")
    wait_until(lambda: call(runner, "GET", "/status").body["workers"]["abandoned"] == 0, 3,
               "the cancelled task's thread to end")
    job = call(runner, "GET", f"/jobs/{job_id}").body
    assert job["status"] == valet.CANCELLED and job["failure_reason"] == "cancelled by request"
    assert runner.lifecycle.store.result(job_id) is None  # its late result, discarded
    assert runner.pool.running() == {}


def test_cancelled_on_another_node_the_running_task_is_told_and_its_worker_freed(make_node):
    cancel_on_another_node(make_node)


def test_with_listen_off_a_cancel_on_another_node_is_found_by_polling(make_node):
    cancel_on_another_node(make_node, listen=False, poll=0.2)


def test_the_backlog_counts_jobs_waiting_in_the_database_on_every_node(make_node):
    release, holding = threading.Event(), []

    def hold(metadata):
        holding.append(metadata)
        assert release.wait(10)

    a, b = [make_node(name, tasks={"hold": hold},
                      config={"worker_pool.queue_capacity": 3}) for name in ("a", "b")]
    try:
        submit(a, "hold", 1)
        submit(a, "hold", 2)
        wait_until(lambda: len(holding) == 2, 5, "a held job on each node")
        assert [call(app, "GET", "/status").body["workers"]["busy"] for app in (a, b)] == [1, 1]
        waiting = [submit(a, "echo", i)["id"] for i in range(3)]
        body = {"name": "one more", "task_name": "echo"}
        refused = call(a, "POST", "/jobs", body)
        assert refused.status == 503 and "backlog is full" in refused.body["message"]
        status = call(b, "GET", "/status").body  # B counts the jobs A stored
        assert status["queue"]["depth"] == 3 and status["queue"]["accepting"] is False
        refused = call(b, "POST", "/jobs", body)
        assert refused.status == 503 and "backlog is full" in refused.body["message"]
        assert call(b, "POST", f"/jobs/{waiting[0]}/cancel").status == 200
        assert call(b, "POST", "/jobs", body).status == 202
        assert call(a, "POST", "/jobs", body).status == 503
    finally:
        release.set()


def test_a_job_scheduled_on_one_node_runs_on_another_on_time(make_node, node_schema):
    runner = make_node("runner", config={"storage.postgres.poll": 5})  # (not by polling)
    submitter = make_node("submitter", start=False)
    submitter.recover()  # a node, unstarted: it never runs a job
    job = submitter.submit({"name": "later", "task_name": "echo", "metadata": "on time",
                            "run_at": valet._rfc3339(time.time() + 0.5)})
    assert job["status"] == valet.SCHEDULED
    done = runner.wait(job["id"], timeout=3)
    assert done["status"] == valet.COMPLETED
    due, started = epoch(done["run_at"]), epoch(done["started_at"])
    assert due <= started <= due + 0.2, f"started {started - due:.3f}s after its run_at"
    assert pg_rows(node_schema["dsn"], f"SELECT node FROM {in_schema(node_schema, 'jobs')}"
                   ) == [("runner",)]


def test_postgres_store_stores_nul_free_text_and_finds_no_job_for_an_id_with_nul(app,
                                                                                  postgres):
    store = valet.PostgresStore(**postgres)
    try:
        assert store.get("a\x00b") is None
        assert store.list(name="a\x00b") == []
        job = new_record("nul", valet.IN_PROGRESS)
        store.add(job)
        assert store.get(job["id"] + "\x00") is None
        moved = store.transition(job["id"], (valet.IN_PROGRESS,), valet.FAILED,
                                 {"failure_reason": "bad \x00 byte",
                                  "completed_at": time.time()}, (None, "bad \x00 byte"))
        assert moved["failure_reason"] == "bad \ufffd byte"
        assert store.get(job["id"])["failure_reason"] == "bad \ufffd byte"
        assert store.result(job["id"]) == {"value": None, "error": "bad \ufffd byte"}
    finally:
        store.close()
    for field in ("name", "task_name", "description"):  # on every store: 400, not a 500
        resp = call(app, "POST", "/jobs", {"name": "job", "task_name": "echo",
                                           field: "a\u0000b"})
        assert resp.status == 400 and field in resp.body["message"], resp
    assert call(app, "GET", "/jobs/a%00b").status == 404
    created = submit(app, "echo")
    resp = call(app, "PATCH", f"/jobs/{created['id']}", {"description": "a\u0000b"})
    assert resp.status == 400 and "description" in resp.body["message"], resp
    job = submit(app, "echo", {"text": "a\u0000b"})  # JSON keeps it: as given
    assert wait_for_status(app, job["id"], valet.COMPLETED)["metadata"] == {"text": "a\u0000b"}


def test_postgres_counts_stay_right_after_being_folded(postgres, monkeypatch):
    store = valet.PostgresStore(**postgres)

    def real():
        rows = pg_rows(postgres["dsn"], f"SELECT status, count(*) FROM "
                                        f"{in_schema(postgres, 'jobs')} GROUP BY status")
        return {status: dict(rows).get(status, 0) for status in valet.STATUSES}

    def count_rows():
        return pg_rows(postgres["dsn"], f"SELECT count(*) FROM "
                                        f"{in_schema(postgres, 'job_counts')}")[0][0]

    try:
        jobs = [new_record(f"job {i}") for i in range(4600)]
        store.add(*jobs[:2300])
        store.add(*jobs[2300:])
        store.transitions(*[(job["id"], (valet.PENDING,), valet.IN_PROGRESS)
                            for job in jobs[:300]])
        now = time.time()
        store.transitions(*[(job["id"], (valet.IN_PROGRESS,), valet.COMPLETED,
                             {"completed_at": now}) for job in jobs[:100]])
        store.transitions(*[(job["id"], (valet.PENDING,), valet.SCHEDULED, {"run_at": now})
                            for job in jobs[4500:]])
        assert count_rows() > valet._PG_COUNT_ROWS  # 5600 changes, a row each
        expected = real()
        assert (expected[valet.COMPLETED], expected[valet.IN_PROGRESS],
                expected[valet.SCHEDULED], expected[valet.PENDING]) == (100, 200, 100, 4200)
        assert store.counts() == expected  # (this one folds them)
        assert count_rows() <= len(valet.STATUSES)
        assert store.counts() == expected
        assert store.delete(jobs[0]["id"], lambda job: True) is not None
        expected[valet.COMPLETED] -= 1
        assert store.counts() == expected == real()

        # Folded on nearly every count, while four threads write: still right.
        monkeypatch.setattr(valet, "_PG_COUNT_ROWS", 3)
        stop = threading.Event()

        def write_or_count(i):
            if i == 0:
                while not stop.is_set():
                    store.counts()
                return
            try:
                for k in range(300 + i - 1, 600, 4):  # PENDING -> CANCELLED, one by one
                    store.transition(jobs[k]["id"], (valet.PENDING,), valet.CANCELLED,
                                     {"completed_at": now})
                    if k % 20 < 4:
                        store.add(new_record(f"more {k}"))
            finally:
                if i == 1:
                    stop.set()

        run_together(write_or_count, 5)
        stop.set()
        assert real()[valet.CANCELLED] == 300
        assert store.counts() == real()
        assert count_rows() <= len(valet.STATUSES)
        assert store.counts() == real()
    finally:
        store.close()


def test_status_lists_the_live_nodes(make_node):
    named = make_node("node-a")
    unnamed = make_node(None)  # named after where it listens: its host and port
    names = {"node-a", f"{socket.gethostname()}:{unnamed.port}"}
    for asker, name in ((named, "node-a"), (unnamed, f"{socket.gethostname()}:{unnamed.port}")):
        resp = call(asker, "GET", "/status")  # (checked against the OpenAPI document)
        assert resp.status == 200
        nodes = resp.body["nodes"]
        assert {node["name"] for node in nodes} == names and len(nodes) == 2
        assert {node["name"]: node["this"] for node in nodes} == {
            other: other == name for other in names}
        for node in nodes:
            assert (node["host"], node["pid"], node["version"]) == (
                socket.gethostname(), os.getpid(), valet.__version__)
            assert 0 <= node["heartbeat_age"] < 5
            assert time.time() - 10 < epoch(node["started_at"]) <= time.time()
    documented = call(named, "GET", "/openapi.json").body["components"]["schemas"]["Status"]
    node = resolve(documented["properties"]["nodes"])
    item = resolve(next(option for option in node.get("anyOf", [node])
                        if resolve(option).get("type") == "array")["items"])
    assert set(item["properties"]) == {"name", "this", "host", "pid", "version",
                                       "started_at", "heartbeat_age"}


def test_a_node_taken_for_dead_while_alive_stops_the_tasks_the_others_settled(
        make_node, node_schema, caplog):
    waits, entered, told = waiting_to_be_told()
    paused = make_node("node-a", tasks={"waits": waits})
    live = make_node("node-b", start=False)  # (unstarted: it takes no job)
    live.recover()
    job_id = submit(paused, "waits")["id"]
    assert entered.wait(5)
    pg_rows(node_schema["dsn"], f"UPDATE {in_schema(node_schema, 'nodes')} SET heartbeat_at "
                                f"= now() - interval '1 hour' WHERE name = 'node-a' "
                                f"RETURNING name")
    assert live.node.beat_once() == 1
    assert told.wait(3), "the paused node's task was never told"
    wait_until(lambda: call(paused, "GET", "/status").body["workers"] == {
        "type": "thread", "busy": 0, "total": 1, "abandoned": 0}, 3,
        "the paused node's worker to be free and its task to have returned")
    job = call(paused, "GET", f"/jobs/{job_id}").body
    assert job["status"] == valet.FAILED
    assert job["failure_reason"].startswith("the node node-a running the job stopped")
    assert live.lifecycle.store.result(job_id)["value"] is None  # "late" was discarded
    assert paused.node.beat_once() == 0  # it carries on, in the table again
    assert any(r.levelno == logging.ERROR and "node-a" in r.getMessage()  # (it says so)
               for r in caplog.records)
    assert {node["name"] for node in live.node.nodes()} == {"node-a", "node-b"}


def test_a_process_refused_a_live_node_s_name_leaves_that_node_listed(make_node):
    live = make_node("node-a")
    second = make_node("node-a", start=False)
    with pytest.raises(valet.StoreInUse, match="node-a"):
        second.start()
    second.stop()  # as main() does after the refusal
    assert [node["name"] for node in live.node.nodes()] == ["node-a"]
    assert live.node.beat_once() == 0


def test_a_node_that_stops_gives_back_the_jobs_it_started_but_never_ran(make_node,
                                                                        node_schema):
    stopping, other = make_node("node-a", start=False), make_node("node-b", start=False)
    stopping.recover()
    other.recover()
    first = other.submit({"name": "first", "task_name": "echo", "metadata": 1})["id"]
    assert stopping.node.claim_once(limit=1) == 1  # started in the store, never run
    assert other.job(first)["status"] == valet.IN_PROGRESS
    stopping.stop()
    job = other.job(first)
    assert (job["status"], job["attempts"], job["started_at"]) == (valet.PENDING, 0, None)
    assert run_one(other) and other.job(first)["status"] == valet.COMPLETED
    assert other.job(first)["attempts"] == 1

    # A started node, whose claim is written just as it stops: the same.
    late = make_node("node-c", start=False)
    real_claim, claimed = late.lifecycle.store.claim, []

    def claim(n, now, promote=True):  # every claim of a worker's waits for the halt
        if n:
            assert late.pool._halted.wait(5)
        found = real_claim(n, now, promote)
        claimed.extend(job["id"] for _, job in found[0])
        return found

    late.lifecycle.store.claim = claim
    late.start()
    second = other.submit({"name": "second", "task_name": "echo", "metadata": 2})["id"]
    late.stop()
    assert claimed == [second]
    assert pg_rows(node_schema["dsn"], f"SELECT status, attempts, node FROM "
                                       f"{in_schema(node_schema, 'jobs')} WHERE id = %s",
                   (second,)) == [(valet.PENDING, 0, None)]
    assert run_one(other) and other.job(second)["status"] == valet.COMPLETED


def test_two_live_nodes_settle_a_dead_node_s_jobs_once(make_node, node_schema):
    dead, b, c = [make_node(name, start=False) for name in ("node-a", "node-b", "node-c")]
    for app in (dead, b, c):
        app.recover()
    ids = [dead.submit({"name": f"job {i}", "task_name": "echo", "max_retries": i % 2,
                        "retry_backoff": 60})["id"] for i in range(4)]
    assert dead.node.claim_once(limit=4) == 4
    pg_rows(node_schema["dsn"], f"UPDATE {in_schema(node_schema, 'nodes')} SET heartbeat_at "
                                f"= now() - interval '1 hour' WHERE name = 'node-a' "
                                f"RETURNING name")
    settled = [None, None]

    def beat(i):
        settled[i] = (b, c)[i].node.beat_once()

    run_together(beat, 2)
    assert sorted(settled) == [0, 4]
    jobs = [b.job(job_id) for job_id in ids]
    assert [(job["status"], job["attempts"]) for job in jobs] == [
        (valet.FAILED, 1), (valet.SCHEDULED, 1), (valet.FAILED, 1), (valet.SCHEDULED, 1)]
    assert {node["name"] for node in b.node.nodes()} == {"node-b", "node-c"}
    counts = b.lifecycle.store.counts()
    assert (counts[valet.FAILED], counts[valet.SCHEDULED], counts[valet.IN_PROGRESS]) == (
        2, 2, 0)


def test_postgres_store_lists_no_job_for_a_name_with_nul(postgres):
    store = valet.PostgresStore(**postgres)
    try:
        store.add(new_record("a\ufffdb"))
        assert [job["name"] for job in store.list(name="a\ufffdb")] == ["a\ufffdb"]
        assert store.list(name="a\x00b") == []
    finally:
        store.close()


def test_postgres_store_refused_for_a_newer_schema_leaves_no_connection_open(node_schema):
    valet.PostgresStore(**node_schema).close()
    pg_rows(node_schema["dsn"], f"INSERT INTO {in_schema(node_schema, 'version')} VALUES "
                                f"(%s) RETURNING step", (len(valet._PG_STEPS) + 1,))
    name = f"valet {socket.gethostname()}:{os.getpid()}"[:63]

    def connections():
        return pg_rows(node_schema["dsn"], "SELECT count(*) FROM pg_stat_activity WHERE "
                                           "application_name = %s", (name,))[0][0]

    before = connections()
    with pytest.raises(valet.StorageError, match="newer valet") as refused:
        valet.PostgresStore(**node_schema)
    assert connections() == before, "the refused store's connection is still open"
    del refused


# -- several nodes: what a review found (each fails on the code before its fix)

def _job_row(where, job_id):
    """(status, attempts, started_at, node) of a job, as the database has it."""
    return pg_rows(where["dsn"], f"SELECT status, attempts, started_at, node FROM "
                                 f"{in_schema(where, 'jobs')} WHERE id = %s", (job_id,))[0]


def _look_dead(where, name):
    pg_rows(where["dsn"], f"UPDATE {in_schema(where, 'nodes')} SET heartbeat_at = now() - "
                          f"interval '1 hour' WHERE name = %s RETURNING name", (name,))


def test_a_claim_whose_answer_was_lost_is_given_back_by_the_next_heartbeat(make_node,
                                                                           node_schema):
    a = make_node("node-a", start=False)
    a.recover()
    again = a.submit({"name": "again", "task_name": "fail", "max_retries": 2,
                      "retry_backoff": 0})["id"]
    assert run_one(a)
    assert a.job(again)["status"] == valet.SCHEDULED  # failed once; its retry is due
    first_start = _job_row(node_schema, again)[2]
    queued = a.submit({"name": "queued", "task_name": "echo", "priority": 5})["id"]
    assert a.node.claim_once(limit=1) == 1  # started and queued: a worker will run it
    fresh = a.submit({"name": "fresh", "task_name": "echo"})["id"]
    # A claim commits, and its answer never comes back (the connection broke): its
    # jobs are IN_PROGRESS on this live node, and no worker here has them.
    started, _ = a.lifecycle.store.claim(2, time.time())
    assert {job["id"] for _, job in started} == {fresh, again}
    assert _job_row(node_schema, fresh)[:2] == (valet.IN_PROGRESS, 1)
    assert _job_row(node_schema, again)[:2] == (valet.IN_PROGRESS, 2)
    assert list(a.pool.running()) == [queued]

    assert a.node.beat_once() == 0
    assert _job_row(node_schema, fresh) == (valet.PENDING, 0, None, None)  # as before
    assert _job_row(node_schema, again) == (valet.PENDING, 1, first_start, None)
    assert _job_row(node_schema, queued)[::3] == (valet.IN_PROGRESS, "node-a")  # kept
    assert a.node.beat_once() == 0  # (nothing more to give back)
    assert a.node.claim_once(limit=2) == 2
    assert all(a.pool.run_once(block=False) for _ in range(3))
    assert a.job(queued)["status"] == a.job(fresh)["status"] == valet.COMPLETED
    assert a.job(fresh)["attempts"] == 1
    assert (a.job(again)["status"], a.job(again)["attempts"]) == (valet.SCHEDULED, 2)


def _two_attempts(make_node, node_schema, second):
    """Node A runs attempt 1 of a job (one retry) on a thread of the test's; A is taken
    for dead by B and the job retried; `second` ("node-a" or "node-b") claims attempt
    2, A's entry being back first. Returns (a, b, the job's id, the attempt-1 thread,
    its task's state: {"told": Event, "returned": Event, "runs": [attempts]}, an Event
    that lets attempt 1 return on its own)."""
    entered, release = threading.Event(), threading.Event()
    state = {"told": threading.Event(), "returned": threading.Event(), "runs": []}

    def twice(metadata, context):
        state["runs"].append(context.attempt)
        if context.attempt > 1:
            return f"attempt {context.attempt}"
        entered.set()
        deadline = time.monotonic() + 10
        while not release.is_set() and time.monotonic() < deadline:
            if context.cancelled.wait(0.005):
                state["told"].set()
                break
        state["returned"].set()
        return "attempt 1"

    a, b = [make_node(name, start=False, tasks={"twice": twice})
            for name in ("node-a", "node-b")]
    a.recover()
    b.recover()
    job_id = a.submit({"name": "twice", "task_name": "twice", "max_retries": 1,
                       "retry_backoff": 0})["id"]
    assert a.node.claim_once(limit=1) == 1
    first = threading.Thread(target=a.pool.run_once, kwargs={"block": False}, daemon=True)
    first.start()
    assert entered.wait(5)
    _look_dead(node_schema, "node-a")
    assert b.node.beat_once() == 1
    assert b.job(job_id)["status"] == valet.SCHEDULED  # retried (at once: no backoff)
    if second == "node-a":  # A's heartbeat has written its entry again, and has not
        a.lifecycle.store.beat(120)  # looked yet: its claims go on meanwhile
    runner = a if second == "node-a" else b
    assert wait_until(lambda: runner.node.claim_once(limit=1), 2, "the retry to be claimed")
    assert _job_row(node_schema, job_id)[::3] == (valet.IN_PROGRESS, second)
    assert b.job(job_id)["attempts"] == 2
    return a, b, job_id, first, state, release


def test_a_stale_attempt_s_end_does_not_end_the_attempt_after_it(make_node, node_schema):
    a, b, job_id, first, state, release = _two_attempts(make_node, node_schema, "node-a")
    try:
        release.set()  # attempt 1 returns before anything tells it
        first.join(5)
        assert not first.is_alive() and state["runs"] == [1]
        job = b.job(job_id)
        assert (job["status"], job["attempts"]) == (valet.IN_PROGRESS, 2), job
        assert b.lifecycle.store.result(job_id) is None
        assert a.pool.run_once(block=False)  # attempt 2 runs, and its end applies
        assert state["runs"] == [1, 2]
        job = b.job(job_id)
        assert (job["status"], job["attempts"]) == (valet.COMPLETED, 2), job
        assert b.lifecycle.store.result(job_id)["value"] == "attempt 2"
    finally:
        release.set()


def test_a_stale_attempt_is_told_to_stop_when_its_node_claims_the_next_one(make_node,
                                                                           node_schema):
    a, b, job_id, first, state, release = _two_attempts(make_node, node_schema, "node-a")
    try:
        assert a.node.look_once() == 1  # (what the beat's look finds)
        assert state["told"].wait(2), "attempt 1 was never told to stop"
        first.join(5)
        assert not first.is_alive()
        assert a.job(job_id)["status"] == valet.IN_PROGRESS
        assert b.lifecycle.store.result(job_id) is None  # attempt 1's result, discarded
        assert a.pool.run_once(block=False)
        assert state["runs"] == [1, 2]
        job = b.job(job_id)
        assert (job["status"], job["attempts"]) == (valet.COMPLETED, 2), job
        assert b.lifecycle.store.result(job_id)["value"] == "attempt 2"
        assert a.pool.running() == {} and a.pool.known() == set()
    finally:
        release.set()


def test_a_stale_attempt_is_told_to_stop_when_its_worker_takes_the_next_one(make_node,
                                                                            node_schema):
    a, b, job_id, first, state, release = _two_attempts(make_node, node_schema, "node-a")
    try:
        assert a.pool.run_once(block=False)  # attempt 2, on another worker of A's
        assert state["told"].wait(2), "attempt 1 was never told to stop"
        first.join(5)
        assert not first.is_alive() and sorted(state["runs"]) == [1, 2]
        job = b.job(job_id)
        assert (job["status"], job["attempts"]) == (valet.COMPLETED, 2), job
        assert b.lifecycle.store.result(job_id)["value"] == "attempt 2"
        assert a.pool.running() == {} and a.pool.known() == set()
    finally:
        release.set()


def test_a_stale_attempt_is_told_to_stop_when_another_node_runs_the_next_one(make_node,
                                                                             node_schema):
    a, b, job_id, first, state, release = _two_attempts(make_node, node_schema, "node-b")
    try:
        assert a.node.look_once() == 1  # (listen: false, or what listen would hear)
        assert state["told"].wait(2), "attempt 1 was never told to stop"
        first.join(5)
        assert not first.is_alive()
        assert a.pool.running() == {}  # A's worker is free
        assert a.pool.known() == set()
        assert b.job(job_id)["status"] == valet.IN_PROGRESS
        assert b.pool.run_once(block=False)
        assert state["runs"] == [1, 2]
        job = b.job(job_id)
        assert (job["status"], job["attempts"]) == (valet.COMPLETED, 2), job
        assert b.lifecycle.store.result(job_id)["value"] == "attempt 2"
    finally:
        release.set()


def test_a_notice_not_in_valet_s_words_does_not_end_the_hearing(make_node, node_schema):
    waits, entered, told = waiting_to_be_told()
    a = make_node("node-a", tasks={"waits": waits})
    b = make_node("node-b", start=False, tasks={"waits": waits})
    b.recover()
    listener = next(t for t in a.node._threads if t.name == "valet-listen")
    for payload in ("", "job x", "job", "job a b", "hello there"):
        pg_rows(node_schema["dsn"], "SELECT pg_notify(%s, %s)",
                (f"valet.{node_schema['schema']}", payload))
    job_id = a.submit({"name": "waits", "task_name": "waits"})["id"]  # (heard after it)
    assert entered.wait(5)
    assert b.cancel(job_id)["status"] == valet.CANCELLED
    assert told.wait(3), "the cancel on B never reached A's task"
    assert listener.is_alive()


def test_a_freed_process_worker_is_given_the_next_job_at_once(fault_tasks, node_schema):
    config = valet.load_config({
        "server": {"port": 0},
        "storage": {"option": "postgres", "postgres": {
            **node_schema, "node": "node-a", "heartbeat": 30, "node_timeout": 120,
            "poll": 5}},
        "worker_pool": {"workers": 1, "worker_type": "process", "max_jobs_per_child": 1,
                        "kill_grace": 0.3, "shutdown_grace": 1}})
    app = valet.Valet(config, tasks=fault_tasks.TASKS)
    try:
        app.start()
        ids = [app.submit({"name": f"pid {i}", "task_name": "pid"})["id"]
               for i in range(5)]
        # Each job's process ends after it, and a new one starts before the worker is
        # free: the node must claim for it then, not a poll (5 s) later.
        wait_until(lambda: all(app.job(job_id)["status"] == valet.COMPLETED
                               for job_id in ids), 4, "the five jobs to complete")
        assert len({app.lifecycle.store.result(job_id)["value"] for job_id in ids}) == 5
    finally:
        app.stop(0)


def test_a_database_that_accepts_and_never_answers_is_a_storage_error(monkeypatch):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted, outcome = [], {}

    def accept():
        with contextlib.suppress(OSError):
            while True:
                accepted.append(listener.accept()[0])  # and never a byte back

    def open_store():
        try:
            valet.PostgresStore(f"host=127.0.0.1 port={port} user=valet dbname=postgres",
                                "silent").close()
            outcome["opened"] = True
        except Exception as exc:  # (checked below)
            outcome["raised"] = exc

    port = listener.getsockname()[1]
    # The node's own limit on connecting, when the DSN sets none (10 s in valet),
    # shortened here: libpq's least is 2 s.
    monkeypatch.setattr(valet, "_PG_TIMEOUTS", {**getattr(valet, "_PG_TIMEOUTS", {}),
                                                "connect_timeout": 1}, raising=False)
    threading.Thread(target=accept, daemon=True).start()
    opening = threading.Thread(target=open_store, daemon=True)
    try:
        began = time.monotonic()
        opening.start()
        opening.join(5)
        assert not opening.is_alive(), "opening the store still waits for an answer"
        assert accepted, "the store never connected"
        assert isinstance(outcome.get("raised"), valet.StorageError), outcome
        assert time.monotonic() - began < 4
    finally:
        listener.close()
        for conn in accepted:
            conn.close()  # (what still waits, if anything, ends)


def test_jobs_running_under_a_name_no_node_has_are_settled_by_a_live_node(make_node,
                                                                          node_schema):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    once = a.submit({"name": "once", "task_name": "echo"})["id"]
    again = a.submit({"name": "again", "task_name": "echo", "max_retries": 1,
                      "retry_backoff": 60})["id"]
    assert a.node.claim_once(limit=2) == 2
    # A's entry is gone, its jobs left IN_PROGRESS (it left while the store failed;
    # or it was taken for dead, then claimed and crashed before its next beat).
    pg_rows(node_schema["dsn"], f"DELETE FROM {in_schema(node_schema, 'nodes')} WHERE "
                                f"name = 'node-a' RETURNING name")
    assert b.node.beat_once() == 2
    failed, retried = b.job(once), b.job(again)
    assert (failed["status"], failed["attempts"]) == (valet.FAILED, 1)
    assert failed["failure_reason"] == "the node node-a running the job stopped"
    assert (retried["status"], retried["attempts"]) == (valet.SCHEDULED, 1)
    assert retried["failure_reason"] == "the node node-a running the job stopped"
    assert b.node.beat_once() == 0  # once


def test_a_node_whose_entry_is_gone_claims_nothing_until_its_beat_enters_it_again(
        make_node, node_schema):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    _look_dead(node_schema, "node-a")
    assert b.node.beat_once() == 0  # A taken for dead: its entry deleted
    job_id = b.submit({"name": "j", "task_name": "echo"})["id"]
    assert a.node.claim_once(limit=1) == 0  # (were it to crash now, no one would settle it)
    assert _job_row(node_schema, job_id) == (valet.PENDING, 0, None, None)
    assert a.pool.running() == {}
    assert a.node.beat_once() == 0  # in the table again
    assert a.node.claim_once(limit=1) == 1
    assert _job_row(node_schema, job_id)[::3] == (valet.IN_PROGRESS, "node-a")


def test_with_listen_off_a_live_node_s_name_is_refused_and_a_lapsed_one_taken(
        make_node, node_schema, gate):
    off = {"storage.postgres.listen": False}
    live = make_node("web-1", start=False, config=off)
    live.recover()
    job_id = live.submit({"name": "held", "task_name": "gate"})["id"]
    assert live.node.claim_once(limit=1) == 1
    worker = threading.Thread(target=live.pool.run_once, kwargs={"block": False},
                              daemon=True)
    worker.start()
    assert gate.entered.wait(5)
    try:
        second = make_node("web-1", start=False, config=off)
        with pytest.raises(valet.StoreInUse, match="web-1"):
            second.recover()
        second.stop()
        third = make_node("web-1", start=False, config=off)  # (start(): the same)
        with pytest.raises(valet.StoreInUse, match="web-1"):
            third.start()
        third.stop()
        assert _job_row(node_schema, job_id)[::3] == (valet.IN_PROGRESS, "web-1")
        assert [node["name"] for node in live.node.nodes()] == ["web-1"]
        assert live.node.beat_once() == 0
    finally:
        gate.opened.set()
        worker.join(5)
    assert live.job(job_id)["status"] == valet.COMPLETED

    # The entry's heartbeat lapses (the node died): its name is free to take.
    another = live.submit({"name": "left", "task_name": "echo"})["id"]
    assert live.node.claim_once(limit=1) == 1
    live.lifecycle.store.close()  # dies: no leave
    _look_dead(node_schema, "web-1")
    again = make_node("web-1", start=False, config=off)
    again.recover()
    assert [node["name"] for node in again.node.nodes()] == ["web-1"]
    settled = again.job(another)  # and it takes up what that node was running
    assert settled["status"] == valet.FAILED
    assert settled["failure_reason"] == "the server stopped while the job was running"


def test_a_postgres_schema_name_longer_than_57_characters_is_refused():
    def config(schema):
        return valet.load_config({"storage": {"option": "postgres", "postgres": {
            "dsn": "host=127.0.0.1 dbname=valet", "schema": schema}}})

    assert config("s" * 57)["storage.postgres.schema"] == "s" * 57  # "valet." + 57 = 63
    for schema in ("s" * 58, "s" * 63):
        with pytest.raises(valet.ConfigError, match=r"storage\.postgres\.schema"):
            config(schema)


def test_a_pipeline_s_later_jobs_are_claimable_only_in_their_turn(make_node, node_schema):
    a = make_node("node-a", start=False)
    a.recover()
    pipeline = a.submit_pipeline({"name": "p", "jobs": [
        {"name": f"step {i}", "task_name": "echo", "metadata": i} for i in range(3)]})
    ids = [job["id"] for job in pipeline["jobs"]]

    def ready_at():
        return dict(pg_rows(node_schema["dsn"], f"SELECT id, ready_at FROM "
                                                f"{in_schema(node_schema, 'jobs')}"))

    assert [ready_at()[job_id] is None for job_id in ids] == [False, True, True]
    assert a.lifecycle.store.waiting()["waiting"] == 1
    assert a.node.claim_once(limit=3) == 1  # the first alone
    assert list(a.pool.running()) == [ids[0]]
    assert a.node.claim_once(limit=3) == 0
    assert a.pool.run_once(block=False)
    first = a.job(ids[0])
    assert first["status"] == valet.COMPLETED
    assert abs(ready_at()[ids[1]] - epoch(first["completed_at"])) < 0.001  # its turn
    assert ready_at()[ids[2]] is None
    assert a.lifecycle.store.waiting()["waiting"] == 1
    assert a.node.claim_once(limit=3) == 1  # the second, its turn now
    assert list(a.pool.running()) == [ids[1]]
    assert run_one(a) and run_one(a)
    assert [a.job(job_id)["status"] for job_id in ids] == [valet.COMPLETED] * 3


def test_a_takeover_whose_answer_was_lost_is_settled_by_the_next_heartbeat(make_node,
                                                                           node_schema):
    a, b = make_node("node-a", start=False), make_node("node-b", start=False)
    a.recover()
    b.recover()
    job_id = a.submit({"name": "once", "task_name": "echo"})["id"]
    assert a.node.claim_once(limit=1) == 1  # running on A, when A dies
    _look_dead(node_schema, "node-a")
    # B's takeover commits, and its answer never comes back: the job is B's now, and
    # B has not settled it.
    b.lifecycle.store.beat(b.node.node_timeout)
    assert _job_row(node_schema, job_id)[::3] == (valet.IN_PROGRESS, "node-b")
    b.node.beat_once()  # settled as the takeover would have: it ran, on A
    job = b.job(job_id)
    assert (job["status"], job["attempts"]) == (valet.FAILED, 1), job
    assert job["failure_reason"] == "the node node-a running the job stopped"


# -- several nodes: real processes
#
# Real `python valet.py --port 0` processes (Process) as nodes, each in a folder of
# its own with its own config.yaml, all on the test's schema (node_schema). Their
# tasks append "<job id> <pid>" to the file their job's metadata names (one write,
# O_APPEND), so that a test counts the runs of each job and sees which node ran it.
# Every process is killed at the end of its test, before the schema is dropped.

NODE_TASKS = """
import os
import time


def _ran(metadata, context):
    # One line per run, in one write: lines of several processes never interleave.
    fd = os.open(metadata["runs"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{context.job_id} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)


def record(metadata, context):
    _ran(metadata, context)
    return {"pid": os.getpid()}


def until_file(metadata, context):
    # Run until the file metadata["file"] exists (20 s at most).
    _ran(metadata, context)
    deadline = time.monotonic() + 20
    while not os.path.exists(metadata["file"]):
        if time.monotonic() > deadline:
            raise TimeoutError("the file never appeared")
        time.sleep(0.005)
    return {"pid": os.getpid()}


def until_cancelled(metadata, context):
    # Run until told to stop (20 s at most); then write metadata["stopped"].
    _ran(metadata, context)
    deadline = time.monotonic() + 20
    while not context.cancelled.wait(0.01):
        if time.monotonic() > deadline:
            raise TimeoutError("never told to stop")
    with open(metadata["stopped"] + ".part", "w") as f:
        f.write(str(os.getpid()))
    os.replace(metadata["stopped"] + ".part", metadata["stopped"])  # whole, at once
    return {"stopped": os.getpid()}


TASKS = {"record": record, "until_file": until_file, "until_cancelled": until_cancelled}
"""


class Nodes:
    """Starts real valet processes as nodes sharing one schema (start()), and stops
    them all at the end, whatever happened (close())."""

    def __init__(self, dsn, schema, folder):
        self.dsn, self.schema, self.folder = dsn, schema, folder
        self.runs = folder / "runs"  # where the tasks record their runs
        self.started = []

    def settings(self, workers=4, periodic=(), **postgres):
        """The config of a node ("JSON is YAML"): `postgres` adds to storage.postgres."""
        return {"storage": {"option": "postgres", "postgres": {
                    "dsn": self.dsn, "schema": self.schema, **postgres}},
                "worker_pool": {"workers": workers}, "periodic": list(periodic),
                "tasks_module": "valet_node_tasks"}

    def prepare(self, name):
        """The node's folder, with the tasks module in it."""
        folder = self.folder / name
        folder.mkdir(exist_ok=True)
        (folder / "valet_node_tasks.py").write_text(NODE_TASKS)
        return folder

    def start(self, name, **settings):
        """A node listening, run in folder `name` (started anew in it if it was before)."""
        node = Process.__new__(Process)
        self.started.append(node)  # before it starts: killed at the end even if it
        node.__init__(self.prepare(name), **self.settings(**settings))  # never listens
        return node

    def start_all(self, names, **settings):
        """Several nodes started at once (each Process waits for its own to listen)."""
        nodes = [None] * len(names)

        def one(i):
            nodes[i] = self.start(names[i], **settings)
        run_together(one, len(names))
        assert all(nodes), "a node did not start"
        return nodes

    def ran(self):
        """[(job id, pid)] of every run recorded so far, in order."""
        if not self.runs.exists():
            return []
        return [tuple(line.split()) for line in self.runs.read_text().splitlines()]

    def one(self, sql, *args):
        """The first value of a query of the nodes' database (its tables unqualified)."""
        import psycopg
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {self.schema}")
            return conn.execute(sql, args).fetchone()[0]

    def close(self):
        for node in self.started:
            if hasattr(node, "proc") and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait(10)


@pytest.fixture
def nodes(node_schema, tmp_path):
    """Nodes on the test's schema, killed before node_schema drops it."""
    nodes = Nodes(node_schema["dsn"], node_schema["schema"], tmp_path)
    try:
        yield nodes
    finally:
        nodes.close()


def node_name(node):
    """A node's default name: this host's name and the port it listens on."""
    return f"{socket.gethostname()}:{node.port}"


def wait_gently(predicate, timeout=10.0, what="the condition", every=0.05):
    """wait_until for a predicate that costs the nodes work (a request, a query):
    asked at most every `every` seconds."""
    def paced():
        value = predicate()
        if not value:
            time.sleep(every)
        return value
    return wait_until(paced, timeout, what)


def job_of(node, job_id):
    resp = call(node.port, "GET", f"/jobs/{job_id}")
    assert resp.status == 200, resp
    return resp.body


def post_job(node, task_name, metadata, **fields):
    resp = call(node.port, "POST", "/jobs", {"name": task_name, "task_name": task_name,
                                             "metadata": metadata, **fields})
    assert resp.status == 202, resp
    return resp.body["id"]


def fired_dues(node):
    """The due times (epoch seconds) of the periodic firings this node stored, from its
    log: each firing is logged once, by the node whose write recorded it."""
    return [epoch(due) for line in node.lines for due in re.findall(
        r"created PENDING by periodic entry 'tick' \(due ([^)]+)\)", line)]


def stopped(node, signum=signal.SIGTERM):
    """Stop a node with `signum` (None: it was sent one) and read its log to the end;
    its exit code."""
    if signum is not None:
        node.proc.send_signal(signum)
    code = node.proc.wait(10)
    node.reader.join(10)
    return code


def test_three_nodes_run_every_job_exactly_once(nodes):  # (2,000 jobs: some 4 s)
    started = nodes.start_all("abc")
    total, clients = 2000, 6
    acknowledged = [[] for _ in range(clients)]
    metadata = {"runs": str(nodes.runs)}

    def submit_share(i):  # client i posts jobs i, i + 6, ..., round-robin over the nodes
        conns = [http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
                 for node in started]
        try:
            for n in range(i, total, clients):
                resp = request(conns[n % 3], "POST", "/jobs", {
                    "name": "n", "task_name": "record", "metadata": metadata})
                assert resp.status == 202, resp
                acknowledged[i].append(resp.body["id"])
        finally:
            for conn in conns:
                conn.close()

    run_together(submit_share, clients)
    acknowledged = [job_id for share in acknowledged for job_id in share]
    assert len(acknowledged) == total == len(set(acknowledged))
    counts = wait_gently(lambda: (jobs := call(started[0].port, "GET", "/status").body[
        "jobs"])[valet.COMPLETED] == total and jobs, timeout=30, what="every job to complete")
    assert counts == {**{status: 0 for status in valet.STATUSES}, valet.COMPLETED: total}
    ran = nodes.ran()
    runs = collections.Counter(job_id for job_id, _ in ran)
    assert set(runs) == set(acknowledged)  # every acknowledged job, and no other, ran
    assert [job_id for job_id, n in runs.items() if n != 1] == []  # exactly once
    by_pid = collections.Counter(int(pid) for _, pid in ran)
    assert set(by_pid) == {node.proc.pid for node in started}, by_pid  # on every node


def test_a_node_killed_with_sigkill_has_its_running_jobs_settled_by_the_others(nodes,
                                                                               tmp_path):
    started = nodes.start_all("abc", heartbeat=0.2, node_timeout=1)
    release = tmp_path / "release"
    blocking = {"runs": str(nodes.runs), "file": str(release)}
    # Twelve jobs for twelve workers: once all run, each node runs four (a node takes
    # jobs only for its idle workers); every other one may be retried once.
    retried = {post_job(started[i % 3], "until_file", blocking, max_retries=i % 2,
                        retry_backoff=0): i % 2 == 1 for i in range(12)}
    ran = wait_gently(lambda: len(r := nodes.ran()) == 12 and r, what="all 12 jobs to run")
    pids = collections.Counter(pid for _, pid in ran)
    assert sorted(pids.values()) == [4, 4, 4] and len(pids) == 3, pids
    queued = [post_job(started[i % 3], "record", {"runs": str(nodes.runs)})
              for i in range(30)]  # wait for a worker: none is free

    # The victim: a node running a job that may be retried and one that may not (six
    # of each on three nodes of four: one node at least runs both).
    on = {node: {job_id for job_id, pid in ran if int(pid) == node.proc.pid}
          for node in started}
    victim = next(node for node in started if len({retried[j] for j in on[node]}) == 2)
    alive = [node for node in started if node is not victim]
    on_victim = on[victim]
    assert stopped(victim, signal.SIGKILL) == -signal.SIGKILL

    reason = re.compile(rf"the node {re.escape(node_name(victim))} running the job "
                        rf"stopped \(no heartbeat for (\d+)s\)")

    def settled(job_id):
        job = job_of(alive[0], job_id)
        if retried[job_id]:  # failed once, and waits for its retry (every worker is busy)
            return job["status"] in (valet.SCHEDULED, valet.PENDING) and job
        return job["status"] == valet.FAILED and job

    settled_jobs = wait_gently(lambda: all(jobs := [settled(j) for j in on_victim]) and jobs,
                               timeout=10, what="the dead node's jobs to be settled")
    for job in settled_jobs:
        found = reason.fullmatch(job["failure_reason"] or "")
        assert found and int(found.group(1)) >= 1, job  # silent for over node_timeout
        assert job["attempts"] == 1
    for job_id in (set(retried) - on_victim) | set(queued):  # untouched meanwhile
        assert job_of(alive[1], job_id)["status"] in (valet.IN_PROGRESS, valet.PENDING)

    release.write_text("")
    acknowledged = [*retried, *queued]

    def ended():
        jobs = {job_id: job_of(alive[0], job_id) for job_id in acknowledged}
        return all(job["status"] in valet.FINISHED for job in jobs.values()) and jobs

    final = wait_gently(ended, timeout=15, what="every acknowledged job to end")
    ran = nodes.ran()
    for job_id, job in final.items():
        if job_id in on_victim and not retried[job_id]:
            assert job["status"] == valet.FAILED and reason.fullmatch(job["failure_reason"])
            continue
        assert job["status"] == valet.COMPLETED, job
        runs = [int(pid) for j, pid in ran if j == job_id]
        if job_id in on_victim:  # retried, and run to the end on another node
            assert job["attempts"] == 2 and job["failure_reason"] is None, job
            assert runs[0] == victim.proc.pid and runs[1] != victim.proc.pid, runs
            assert len(runs) == 2
        else:
            assert job["attempts"] == 1 and len(runs) == 1 and runs[0] != victim.proc.pid


def test_periodic_entries_fire_once_per_due_time_with_three_nodes(nodes):
    tick = {"name": "tick", "task_name": "record", "every": 1,
            "metadata": {"runs": str(nodes.runs)}}
    started = nodes.start_all("abc", periodic=[tick])
    wait_gently(lambda: len(call(started[0].port, "GET", "/jobs?name=tick").body["jobs"])
                >= 3, timeout=15, what="three firings")
    for node in started:
        node.proc.send_signal(signal.SIGTERM)
    stopping = time.time()
    assert [stopped(node, None) for node in started] == [0, 0, 0]

    dues = sorted(due for node in started for due in fired_dues(node))
    assert len(dues) >= 3
    # One firing per due time, each second from the anchor (the first node's start),
    # none twice and none skipped, whichever node stored it.
    assert [round(b - a, 3) for a, b in zip(dues, dues[1:])] == [1.0] * (len(dues) - 1), dues
    elapsed = stopping - (dues[0] - 1)  # since the anchor, a second before the first
    assert abs(len(dues) - math.floor(elapsed)) <= 1, (len(dues), elapsed)

    again = nodes.start("a", periodic=[tick])
    wait_gently(lambda: fired_dues(again), timeout=5, what="the restarted node to fire")
    jobs = call(again.port, "GET", "/jobs?name=tick&limit=1000").body["jobs"]
    assert stopped(again) == 0
    later = fired_dues(again)
    assert later and min(later) > dues[-1], (later, dues)  # what was fired, is not again
    assert all(float(round(due - dues[0], 3)).is_integer() for due in later), later  # on beat
    assert nodes.one("SELECT count(*) FROM jobs WHERE name = 'tick'") == len(dues) + len(
        later)  # and nothing was stored but what the logs tell
    created = sorted(epoch(job["created_at"]) for job in jobs)[:len(dues)]  # by the three
    assert all(b - a >= 0.5 for a, b in zip(created, created[1:])), created


def test_cancel_on_one_node_stops_the_task_running_on_another(nodes, tmp_path):
    first = nodes.start("a")
    stop_file = tmp_path / "stopped"
    job_id = post_job(first, "until_cancelled", {"runs": str(nodes.runs),
                                                 "stopped": str(stop_file)})
    wait_gently(lambda: job_of(first, job_id)["status"] == valet.IN_PROGRESS,
                what="the job to start")
    second = nodes.start("b")
    resp = call(second.port, "POST", f"/jobs/{job_id}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED, resp
    cancelled = time.monotonic()
    wait_until(stop_file.exists, timeout=5, what="the task on the first node to stop")
    assert time.monotonic() - cancelled < 5
    assert int(stop_file.read_text()) == first.proc.pid
    wait_gently(lambda: (workers := call(first.port, "GET", "/status").body["workers"])[
        "busy"] == 0 and workers["abandoned"] == 0, what="the first node's worker to be free")
    for node in (first, second):  # its late result was discarded
        assert job_of(node, job_id)["status"] == valet.CANCELLED
    assert call(first.port, "GET", f"/jobs/{job_id}/results").status == 404


def test_a_long_poll_on_one_node_answers_when_another_finishes_the_job(nodes, tmp_path):
    first = nodes.start("a")
    release = tmp_path / "release"
    job_id = post_job(first, "until_file", {"runs": str(nodes.runs), "file": str(release)})
    wait_gently(lambda: job_of(first, job_id)["status"] == valet.IN_PROGRESS,
                what="the job to start")
    second = nodes.start("b", poll=60)  # so only the first node's notice can wake it
    answer = []

    def long_poll():
        conn = http.client.HTTPConnection("127.0.0.1", second.port, timeout=30)
        try:
            answer.append((request(conn, "GET", f"/jobs/{job_id}?wait=20"), time.monotonic()))
        finally:
            conn.close()

    poller = threading.Thread(target=long_poll, daemon=True)
    poller.start()
    # A shorter wait on the second node runs out with the job still running; by then
    # it has long taken up the longer one (sent first).
    short = call(second.port, "GET", f"/jobs/{job_id}?wait=0.3")
    assert short.status == 200 and short.body["status"] == valet.IN_PROGRESS
    assert not answer  # still waiting
    release.write_text("")
    released = time.monotonic()
    poller.join(10)
    assert not poller.is_alive(), "the long poll was not answered"
    resp, when = answer[0]
    assert resp.status == 200 and resp.body["status"] == valet.COMPLETED, resp
    assert when - released < 2, when - released
    assert resp.body == job_of(first, job_id)


def test_a_second_node_with_a_running_node_s_name_exits_1(nodes):
    first = nodes.start("a", node="twin")
    folder = nodes.prepare("b")
    (folder / "config.yaml").write_text(json.dumps(nodes.settings(node="twin")))
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          capture_output=True, text=True, timeout=30, cwd=folder)
    assert done.returncode == 1, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "'twin'" in done.stderr and "storage.postgres.node" in done.stderr, done.stderr
    listed = call(first.port, "GET", "/status").body["nodes"]  # the first runs on
    assert [(n["name"], n["pid"], n["this"]) for n in listed] == [
        ("twin", first.proc.pid, True)]


def test_without_psycopg_start_exits_2_saying_how_to_install_it(tmp_path):
    # (It needs neither psycopg nor a server: it is about the machine that has none.)
    fake = tmp_path / "fake" / "psycopg"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named psycopg')\n")
    (tmp_path / "config.yaml").write_text(json.dumps({"storage": {
        "option": "postgres", "postgres": {"dsn": "host=127.0.0.1 port=1 dbname=none"}}}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(tmp_path / "fake"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    env.pop("VALET_POSTGRES_DSN", None)
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("valet: config error: storage.option: postgres needs "
                                  "the psycopg driver"), done.stderr
    assert 'pip install "psycopg[binary]"' in done.stderr


def test_nodes_listed_in_status_and_a_stopped_node_leaves(nodes):
    started = nodes.start_all("ab")
    names = sorted(node_name(node) for node in started)
    for node in started:
        listed = call(node.port, "GET", "/status").body["nodes"]
        assert [n["name"] for n in listed] == names
        assert [(n["name"], n["pid"]) for n in listed if n["this"]] == [
            (node_name(node), node.proc.pid)]
        assert all(n["version"] == valet.__version__ for n in listed)
    leaving, staying = started
    assert stopped(leaving) == 0
    listed = call(staying.port, "GET", "/status").body["nodes"]  # gone as it exited
    assert [(n["name"], n["this"]) for n in listed] == [(node_name(staying), True)]


# ---------------------------------------------------------------- lifecycle --

def test_lifecycle_refuses_a_move_the_table_forbids(store, gate, ran):
    pool = make_pool(store, make_tasks(gate, ran))
    job_id = queue_job(pool, store, "echo")
    assert pool.run_once(block=False) is True
    lifecycle = pool._lifecycle
    with pytest.raises(valet.InvalidTransition):
        lifecycle._transition(job_id, (valet.COMPLETED,), valet.PENDING)
    with pytest.raises(valet.InvalidTransition):  # a move made with it is checked too
        lifecycle._transition(job_id, (valet.IN_PROGRESS,), valet.COMPLETED,
                              then=[(job_id, (valet.FAILED,), valet.SCHEDULED, {})])
    assert store.get(job_id)["status"] == valet.COMPLETED


def test_status_and_result_become_visible_together(app):
    jobs = [submit(app, "echo", i) for i in range(20)]
    seen = set()

    def check():
        for job in jobs:
            if job["id"] not in seen and job_status(app, job["id"]) == valet.COMPLETED:
                resp = call(app, "GET", f"/jobs/{job['id']}/results")
                assert resp.status == 200, resp
                seen.add(job["id"])
        return len(seen) == len(jobs)

    wait_until(check, what="every job to complete")


# -- deleting

def test_deleted_pending_job_never_runs(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    blocker = submit(app, "gate")
    assert gate.entered.wait(10)
    doomed = submit(app, "echo", "doomed")
    assert call(app, "DELETE", f"/jobs/{doomed['id']}").status == 204
    assert call(app, "GET", f"/jobs/{doomed['id']}").status == 404
    later = submit(app, "echo", "later")
    gate.opened.set()
    wait_for_status(app, later["id"], valet.COMPLETED)
    assert ran == ["later"]  # the queue is FIFO: had it run, it would be first
    assert job_status(app, blocker["id"]) == valet.COMPLETED


def test_running_job_cannot_be_deleted(app, gate):
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    resp = call(app, "DELETE", f"/jobs/{job['id']}")
    assert resp.status == 409 and "running" in resp.body["message"]
    assert job_status(app, job["id"]) == valet.IN_PROGRESS
    gate.opened.set()
    wait_for_status(app, job["id"], valet.COMPLETED)


def test_deleting_finished_job_removes_its_result(app):
    job = submit(app, "echo", 1)
    wait_for_status(app, job["id"], valet.COMPLETED)
    assert call(app, "DELETE", f"/jobs/{job['id']}").status == 204
    assert call(app, "GET", f"/jobs/{job['id']}/results").status == 404
    assert call(app, "GET", "/jobs").body["jobs"] == []


def test_deleted_pending_jobs_give_back_their_backlog_places(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 2})
    submit(app, "gate")
    assert gate.entered.wait(10)
    waiting = [submit(app, "echo", i) for i in range(2)]
    assert call(app, "POST", "/jobs", {"name": "n", "task_name": "echo"}).status == 503
    for job in waiting:
        assert call(app, "DELETE", f"/jobs/{job['id']}").status == 204
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0
    assert submit(app, "echo", "fits")["status"] == valet.PENDING


# -- retrying

def wait_for_retry(app, job_id, attempts):
    """Wait until the job waits for its retry after `attempts` attempts, with its next
    attempt in the scheduler (settle() stores the retry, then schedules it)."""
    def waiting():
        job = app.lifecycle.store.get(job_id)
        return (job["status"] == valet.SCHEDULED and job["attempts"] == attempts
                and app.scheduler.next_due() == job["run_at"] and app.job(job_id))
    return wait_until(waiting, what=f"job {job_id} to wait for retry {attempts}")


def failing_until(attempt_that_succeeds):
    def task(metadata, context):
        if context.attempt < attempt_that_succeeds:
            raise RuntimeError(f"attempt {context.attempt} failed")
        return {"attempt": context.attempt}
    return task


def test_a_failed_job_retried_by_request_runs_again_as_its_next_attempt(make_app):
    app = make_app(tasks={"flaky": failing_until(2)})
    job = submit(app, "flaky")
    failed = wait_for_status(app, job["id"], valet.FAILED)
    assert failed["attempts"] == 1
    resp = call(app, "POST", f"/jobs/{job['id']}/retry")
    assert resp.status == 200 and resp.body["status"] in (valet.PENDING, valet.IN_PROGRESS,
                                                          valet.COMPLETED)
    done = wait_for_status(app, job["id"], valet.COMPLETED)
    assert done["attempts"] == 2 and done["failure_reason"] is None
    assert call(app, "GET", f"/jobs/{job['id']}/results").body["metadata"] == {"attempt": 2}


def test_a_retried_job_has_no_result_until_its_new_attempt_ends(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")  # holds the only worker: the retried job waits, PENDING
    assert gate.entered.wait(10)
    job = app.submit({"name": "j", "task_name": "echo", "run_at": "2100-01-01T00:00:00Z"})
    app.cancel(job["id"])
    retried = app.retry(job["id"])
    assert retried["status"] == valet.PENDING and retried["run_at"] is None
    assert retried["completed_at"] is None and retried["attempts"] == 0
    resp = call(app, "GET", f"/jobs/{job['id']}/results")
    assert resp.status == 404 and "has not finished" in resp.body["message"]
    gate.opened.set()
    assert wait_for_status(app, job["id"], valet.COMPLETED)["attempts"] == 1


def test_only_a_failed_or_cancelled_job_outside_a_pipeline_can_be_retried(app, gate):
    done = submit(app, "echo")
    wait_for_status(app, done["id"], valet.COMPLETED)
    resp = call(app, "POST", f"/jobs/{done['id']}/retry")
    assert resp.status == 409
    assert resp.body["message"] == (f"job {done['id']!r} is COMPLETED; only a FAILED or "
                                    f"CANCELLED job can be retried")
    pipeline = submit_pipeline(app, stage("fail"), stage("echo"))
    first = wait_for_pipeline(app, pipeline["id"], valet.FAILED)["jobs"][0]
    resp = call(app, "POST", f"/jobs/{first['id']}/retry")
    assert resp.status == 409 and "cannot be retried on its own" in resp.body["message"]
    assert call(app, "POST", "/jobs/nope/retry").status == 404


def test_a_retry_needs_a_place_in_the_backlog(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 1})
    failed = submit(app, "fail")
    wait_for_status(app, failed["id"], valet.FAILED)
    submit(app, "gate")
    assert gate.entered.wait(10)
    submit(app, "echo")  # the one place in the backlog
    resp = call(app, "POST", f"/jobs/{failed['id']}/retry")
    assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    assert app.job(failed["id"])["status"] == valet.FAILED  # unchanged
    gate.opened.set()


def test_a_cancelled_jobs_old_queue_entry_is_skipped_once_it_is_retried(store, gate, ran):
    pool = make_pool(store, make_tasks(gate, ran))
    job_id = queue_job(pool, store, "fail")  # queue entry 1
    pool._lifecycle.cancel(job_id)           # entry 1 stays on the queue, withdrawn
    pool._lifecycle.retry(job_id)            # entry 2
    assert pool.run_once(block=False) is True  # entry 1: skipped
    assert store.get(job_id)["status"] == valet.PENDING
    pool.run_once(block=False)  # entry 2 runs it
    assert store.get(job_id)["attempts"] == 1
    pool._lifecycle.retry(job_id)
    pool.run_once(block=False)
    assert store.get(job_id)["attempts"] == 2  # counting on, from the stored record
    with pytest.raises(queue.Empty):
        pool.run_once(block=False)


def test_no_retry_while_a_worker_still_writes_the_start_of_a_cancelled_job(store, gate, ran):
    pool, job_id, worker, release = a_start_held(store, "echo", gate, ran)
    job, cancelled = pool._lifecycle.cancel(job_id)
    assert cancelled
    with pytest.raises(valet.Conflict, match="still writing its start"):
        pool._lifecycle.retry(job_id)
    release.set()
    worker.join(10)
    assert store.get(job_id)["status"] == valet.CANCELLED  # the late start found it so
    assert pool._lifecycle.retry(job_id)["status"] == valet.PENDING


def test_an_old_due_time_does_not_start_a_job_scheduled_again_since(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, tasks={"flaky": failing_until(3)})
    job = app.submit({"name": "j", "task_name": "flaky", "run_at": at(clock, 100),
                      "max_retries": 1, "retry_backoff": 1000})
    app.cancel(job["id"])
    app.retry(job["id"])  # runs now, fails, and waits 500 to 1000 s for its retry
    wait_until(lambda: app.job(job["id"])["status"] == valet.SCHEDULED
               and app.job(job["id"])["attempts"] == 1, what="the first attempt to fail")
    waiting = app.job(job["id"])
    app.scheduler.tick(clock.advance(101))  # the first run_at's entry comes due
    assert app.job(job["id"])["status"] == valet.SCHEDULED
    assert app.job(job["id"])["run_at"] == waiting["run_at"]


def test_bulk_retry_retries_by_status_and_task_while_the_backlog_has_room(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 3})
    fails = []
    for _ in range(4):  # (one at a time: four at once may find the backlog full)
        fails.append(submit(app, "fail")["id"])
        wait_for_status(app, fails[-1], valet.FAILED)
    other = app.submit({"name": "x", "task_name": "echo", "run_at": "2100-01-01T00:00:00Z"})
    app.cancel(other["id"])
    submit(app, "gate")  # holds the worker, so that the retried jobs wait in the backlog
    assert gate.entered.wait(10)
    resp = call(app, "POST", "/jobs/retry?status=failed&task_name=fail")
    assert resp.status == 200 and resp.body == {"retried": 3, "more": True}
    assert [app.job(j)["status"] for j in fails] == [valet.PENDING] * 3 + [valet.FAILED]
    assert app.job(other["id"])["status"] == valet.CANCELLED  # another status
    resp = call(app, "POST", "/jobs/retry?status=COMPLETED")
    assert resp.status == 400 and resp.body["message"].startswith("status must be FAILED")
    gate.opened.set()
    for job_id in fails[:3]:  # each ran again, and failed again
        assert wait_for_status(app, job_id, valet.FAILED)["attempts"] == 2
    resp = call(app, "POST", "/jobs/retry?status=CANCELLED")
    assert resp.body == {"retried": 1, "more": False}


def test_failed_attempt_with_retries_left_is_scheduled_again_with_growing_backoff(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, tasks={"flaky": failing_until(3)})
    started = clock.now
    job = submit(app, "flaky", max_retries=3, retry_backoff=10)
    for attempt, (shortest, longest) in enumerate([(5, 10), (10, 20)], start=1):
        waiting = wait_for_retry(app, job["id"], attempt)
        assert waiting["failure_reason"] == f"RuntimeError: attempt {attempt} failed"
        assert epoch(waiting["started_at"]) == started  # the first attempt's start
        delay = app.lifecycle.store.get(job["id"])["run_at"] - clock.now
        assert shortest - 0.001 <= delay <= longest + 0.001  # backoff with jitter
        assert app.scheduler.tick(clock.advance(delay - 0.01)) == 0
        assert app.scheduler.tick(clock.advance(0.01)) == 1
    done = app.wait(job["id"], 10)
    assert done["status"] == valet.COMPLETED and done["attempts"] == 3
    assert done["failure_reason"] is None
    assert epoch(done["started_at"]) == started
    assert epoch(done["completed_at"]) == pytest.approx(clock.now, abs=0.001)
    assert app.result(job["id"])["metadata"] == {"attempt": 3}


def test_job_fails_for_good_once_its_retries_are_used_up(make_app):
    app = make_app(**{"worker_pool.workers": 1})
    job = submit(app, "fail", max_retries=2, retry_backoff=0)
    done = app.wait(job["id"], 10)
    assert done["status"] == valet.FAILED and done["attempts"] == 3
    assert done["failure_reason"] == "ValueError: boom"
    assert app.result(job["id"])["error"] == "ValueError: boom"


def test_backoff_doubles_with_jitter_and_is_capped():
    for attempts in range(1, 8):
        full = 2 * 2 ** (attempts - 1)
        delays = [valet._backoff(2, attempts) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1  # jittered
    assert valet._backoff(2, 1000) <= valet._MAX_BACKOFF
    assert valet._backoff(0, 5) == 0


def test_timeout_is_a_failed_attempt_and_sets_the_task_s_cancelled_flag(make_app):
    saw_flag = threading.Event()

    def stuck_once(metadata, context):
        if context.attempt == 1:
            if context.cancelled.wait(10):
                saw_flag.set()
            return "too late"
        return "second try"

    app = make_app(tasks={"stuck_once": stuck_once}, timeout_unit="millisecond")
    job = submit(app, "stuck_once", timeout=50, max_retries=1, retry_backoff=0)
    done = app.wait(job["id"], 10)
    assert done["status"] == valet.COMPLETED and done["attempts"] == 2
    assert app.result(job["id"])["metadata"] == "second try"
    assert saw_flag.wait(10)


# -- cancelling

def test_cancel_pending_job_answers_at_once_and_it_never_runs(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)
    queued = submit(app, "echo", "cancelled")
    assert call(app, "GET", "/status").body["queue"]["depth"] == 1
    resp = call(app, "POST", f"/jobs/{queued['id']}/cancel")
    assert resp.status == 200
    assert resp.body["status"] == valet.CANCELLED
    assert resp.body["failure_reason"] == "cancelled by request"
    assert resp.body["completed_at"] is not None and resp.body["started_at"] is None
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0
    gate.opened.set()
    after = submit(app, "echo", "after")
    assert app.wait(after["id"], 10)["status"] == valet.COMPLETED
    assert ran == ["after"]
    result = call(app, "GET", f"/jobs/{queued['id']}/results")
    assert result.status == 404 and "was cancelled" in result.body["message"]


def test_cancel_running_job_tells_its_task_and_discards_its_late_result(make_app):
    started, told, finish = threading.Event(), threading.Event(), threading.Event()
    threads = []

    def patient(metadata, context):
        threads.append(threading.current_thread())
        started.set()
        if context.cancelled.wait(10):
            told.set()
        finish.wait(10)
        return "late"

    app = make_app(tasks={"patient": patient}, **{"worker_pool.workers": 1})
    job = submit(app, "patient")
    assert started.wait(10)
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    assert told.wait(10)
    assert call(app, "GET", "/status").body["workers"]["abandoned"] == 1
    # the pool keeps its one free worker while the cancelled task winds down
    other = submit(app, "echo", "next")
    assert app.wait(other["id"], 10)["status"] == valet.COMPLETED
    finish.set()
    threads[0].join(10)  # the task returned, and its thread left
    assert not threads[0].is_alive()
    assert call(app, "GET", "/status").body["workers"]["abandoned"] == 0
    assert app.job(job["id"])["status"] == valet.CANCELLED
    assert app.result(job["id"]) is None


def test_cancel_finished_job_is_409_and_unknown_job_is_404(app):
    job = submit(app, "echo")
    app.wait(job["id"], 10)
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert resp.status == 409 and "has finished (status COMPLETED)" in resp.body["message"]
    assert job_status(app, job["id"]) == valet.COMPLETED
    again = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert again.status == 409
    assert call(app, "POST", "/jobs/nope/cancel").status == 404


def test_cancelling_twice_is_409_the_second_time(app, gate):
    job = submit(app, "gate")
    assert call(app, "POST", f"/jobs/{job['id']}/cancel").status == 200
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert resp.status == 409 and "CANCELLED" in resp.body["message"]


def test_cancel_a_job_waiting_for_its_retry(make_app):
    clock = FakeClock()
    app = make_app(clock=clock)
    job = submit(app, "fail", max_retries=5, retry_backoff=60)
    wait_for_retry(app, job["id"], 1)
    assert call(app, "POST", f"/jobs/{job['id']}/cancel").status == 200
    app.scheduler.tick(clock.advance(3600))
    cancelled = app.job(job["id"])
    assert cancelled["status"] == valet.CANCELLED and cancelled["attempts"] == 1


def test_cancelled_or_deleted_scheduled_jobs_never_run(make_app, ran):
    clock = FakeClock()
    app = make_app(clock=clock)
    cancelled = submit(app, "echo", "cancelled", run_at=at(clock, 10))
    deleted = submit(app, "echo", "deleted", run_at=at(clock, 10))
    resp = call(app, "POST", f"/jobs/{cancelled['id']}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    assert call(app, "DELETE", f"/jobs/{deleted['id']}").status == 204
    marker = submit(app, "echo", "marker", run_at=at(clock, 10))
    app.scheduler.tick(clock.advance(10))
    assert app.wait(marker["id"], 10)["status"] == valet.COMPLETED
    assert ran == ["marker"]
    assert job_status(app, cancelled["id"]) == valet.CANCELLED


def test_cancel_racing_a_worker_taking_the_job_means_it_never_runs(store, gate, ran):
    def worker_takes_it_first(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.CANCELLED:  # in the window between cancel's look and write
            assert pool.run_once(block=False) is True
    pool = hooked_pool(store, "transition", worker_takes_it_first, make_tasks(gate, ran))
    job_id = queue_job(pool, store, "echo")
    job, cancelled = pool._lifecycle.cancel(job_id, "cancelled by request")
    assert cancelled and job["status"] == valet.CANCELLED and job["attempts"] == 0
    assert ran == [] and pool.stats() == {"depth": 0, "busy": 0, "abandoned": 0, "oldest": None}


def test_cancel_while_the_worker_writes_the_finish_leaves_the_job_to_the_worker(make_app):
    """The task has returned and its claim is gone, but COMPLETED is not written yet:
    the cancel must wait for that write, not overwrite it."""
    entered, release = threading.Event(), threading.Event()

    def hold_the_finish(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.COMPLETED:
            entered.set()
            assert release.wait(10)

    app = make_app(start=False)
    app.lifecycle.store = Hooked(app.lifecycle.store, "transition", hold_the_finish)
    app.start()
    job = submit(app, "echo", "x")
    assert entered.wait(10)

    def release_once_cancel_waits():
        wait_until(lambda: job["id"] in app.lifecycle._waiters, what="the cancel to wait")
        release.set()
    threading.Thread(target=release_once_cancel_waits).start()
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert resp.status == 409, resp
    assert job_status(app, job["id"]) == valet.COMPLETED
    assert app.result(job["id"])["metadata"] == "x"


def test_a_task_that_returns_after_its_cancel_is_logged_after_it(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    started = threading.Event()

    def quits_when_told(metadata, context):
        started.set()
        context.cancelled.wait(10)
        return "too late"  # at once: while the cancel may still be writing

    app = make_app(tasks={"quits": quits_when_told})
    job = submit(app, "quits")
    assert started.wait(10)
    assert call(app, "POST", f"/jobs/{job['id']}/cancel").status == 200
    cancelled = f"job {job['id']}: IN_PROGRESS -> CANCELLED"
    late = (f"job {job['id']}: the task of attempt 1 returned after the attempt was "
            f"cancelled")
    wait_until(lambda: late in caplog.text, what="the late return to be logged")
    lines = [record.getMessage() for record in caplog.records]
    first = next(i for i, line in enumerate(lines) if line.startswith(cancelled))
    assert lines.index(next(line for line in lines if line.startswith(late))) > first


def test_cancels_of_one_running_job_at_once_cancel_it_once(make_app, gate):
    app = make_app()
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    answers = []
    run_together(lambda i: answers.append(call(app, "POST", f"/jobs/{job['id']}/cancel")), 6)
    assert sorted(resp.status for resp in answers) == [200] + [409] * 5
    assert all("has finished (status CANCELLED)" in resp.body["message"]
               for resp in answers if resp.status == 409)
    assert app.job(job["id"])["status"] == valet.CANCELLED



def job_is(app, job_id, status, attempts):
    job = app.lifecycle.store.get(job_id)
    return job["status"] == status and job["attempts"] == attempts


def test_a_cancel_waits_only_for_the_settle_it_found_then_cancels_the_next_attempt(make_app):
    hold, told = threading.Event(), threading.Event()

    def fails_once(metadata, context):
        if context.attempt == 1:
            raise RuntimeError("the first attempt fails")
        if context.cancelled.wait(20):  # attempt 2 lasts until it is told to stop
            told.set()
        hold.wait(20)

    app = make_app(tasks={"fails_once": fails_once}, start=False)
    settling, seen_settling = threading.Event(), threading.Event()

    def retry_written_once_cancel_looks(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.SCHEDULED:  # the worker holds its claim, writing the retry
            settling.set()
            assert seen_settling.wait(10)
    app.lifecycle.store = Hooked(app.lifecycle.store, "transition",
                                 retry_written_once_cancel_looks)
    take = app.pool.take

    def take_then_let_attempt_2_start(job_id):
        claim, taken, withdrawn = take(job_id)
        if claim is not None and not taken:  # attempt 1's claim, being settled
            seen_settling.set()
            wait_until(lambda: job_is(app, job_id, valet.IN_PROGRESS, 2),
                       what="attempt 2 to start, with a claim of its own")
        return claim, taken, withdrawn
    app.pool.take = take_then_let_attempt_2_start
    app.start()
    job = app.submit({"name": "j", "task_name": "fails_once", "max_retries": 1,
                      "retry_backoff": 0})
    assert settling.wait(10)
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")  # not held up by attempt 2
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    assert resp.body["attempts"] == 2 and told.wait(10)
    hold.set()


def test_a_cancel_that_finds_no_claim_never_cancels_a_job_a_worker_has_started(make_app):
    clock, entered, told, hold = FakeClock(), threading.Event(), threading.Event(), \
        threading.Event()

    def slow(metadata, context):
        entered.set()
        if context.cancelled.wait(20):
            told.set()
        hold.wait(20)

    app = make_app(clock=clock, tasks={"slow": slow})
    job = app.submit({"name": "j", "task_name": "slow", "run_at": at(clock, 60)})
    take = app.pool.take

    def take_then_it_comes_due_and_starts(job_id):
        claim, taken, withdrawn = take(job_id)
        if claim is None and not entered.is_set():  # between the cancel's look and write
            app.scheduler.tick(clock.advance(60))
            assert entered.wait(10)
        return claim, taken, withdrawn
    app.pool.take = take_then_it_comes_due_and_starts
    cancelled = app.cancel(job["id"])
    assert cancelled["status"] == valet.CANCELLED and cancelled["attempts"] == 1
    assert told.wait(10)  # the running task was told: the cancel took its claim
    assert app.status()["workers"]["abandoned"] == 1
    hold.set()


def test_a_timed_out_attempt_s_worker_leaves_even_when_its_retry_starts_first(make_app):
    def late_then_quick(metadata, context):
        if context.attempt == 1:
            context.cancelled.wait(20)  # returns as soon as the timeout takes its claim
            return "late"
        return "second"

    app = make_app(tasks={"late": late_then_quick}, timeout_unit="millisecond",
                   start=False)
    at_ = app.scheduler.at

    def promote_then_wait_for_the_retry_to_run(when, action, *args):
        at_(when, action, *args)
        if action == app.lifecycle.promote:  # before the timed-out claim is released
            wait_until(lambda: job_is(app, args[0], valet.COMPLETED, 2),
                       what="the retry to run")
    app.scheduler.at = promote_then_wait_for_the_retry_to_run
    app.start()
    job = app.submit({"name": "j", "task_name": "late", "timeout": 50, "max_retries": 1,
                      "retry_backoff": 0})
    assert app.wait(job["id"], 20)["status"] == valet.COMPLETED
    wait_until(lambda: app.status()["workers"]["abandoned"] == 0,
               what="the timed-out attempt's worker to leave")
    assert app.pool.tick(time.monotonic() + 3600) == 0
    assert app.pool._stale == 0 and app.pool._deadlines == []


def test_a_running_job_whose_end_cannot_be_written_stays_claimed_for_a_cancel(make_app):
    app = make_app(start=False, **{"worker_pool.workers": 1})
    failed = []

    def completion_fails_once(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.COMPLETED and not failed:
            failed.append(job_id)
            return True
    app.lifecycle.store = Hooked(app.lifecycle.store, "transition", completion_fails_once)
    app.start()
    stuck = app.submit({"name": "s", "task_name": "echo"})
    wait_until(lambda: failed, what="the completion to fail")
    after = app.submit({"name": "a", "task_name": "echo"})
    assert app.wait(after["id"], 10)["status"] == valet.COMPLETED  # the worker went on
    assert app.job(stuck["id"])["status"] == valet.IN_PROGRESS
    assert app.status()["workers"]["busy"] == 1  # its claim is kept, with no thread
    cancelled = app.cancel(stuck["id"])
    assert cancelled["status"] == valet.CANCELLED
    assert app.status()["workers"] == {"type": "thread", "busy": 0, "total": 1, "abandoned": 0}


def test_a_cancel_completes_when_no_replacement_worker_can_start(make_app, gate,
                                                                 monkeypatch):
    app = make_app()
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    start = threading.Thread.start

    def no_more_workers(thread):
        if thread.name.startswith("valet-worker"):
            raise RuntimeError("can't start new thread")
        return start(thread)
    monkeypatch.setattr(threading.Thread, "start", no_more_workers)
    resp = call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    assert app.status()["workers"]["busy"] == 0

# -- pipelines

def test_post_pipeline_answers_202_with_its_jobs_in_order_linked_by_next_job_id(make_app,
                                                                                gate):
    app = make_app(tasks={"pair": lambda metadata, previous: [metadata, previous]})
    resp = call(app, "POST", "/pipelines", {
        "name": "p", "description": "d", "priority": 7, "jobs": [
            stage("gate", {"a": 1}, description="first", timeout=30),
            stage("pair", "two", max_retries=2, retry_backoff=0.5, use_previous_results=True),
            {"name": "third", "task_name": "echo", "task_params": [3]}]})
    assert resp.status == 202, resp
    pipeline = resp.body
    assert list(pipeline) == list(valet.PIPELINE_FIELDS)
    assert resp.headers["Location"] == f"/pipelines/{pipeline['id']}"
    assert pipeline["name"] == "p" and pipeline["description"] == "d"
    assert pipeline["priority"] == 7 and pipeline["status"] == valet.PENDING
    assert pipeline["run_at"] is None and pipeline["created_at"].endswith("Z")
    assert pipeline["started_at"] is pipeline["completed_at"] is pipeline["duration"] is None
    jobs = pipeline["jobs"]
    assert [list(job) for job in jobs] == [list(valet.JOB_FIELDS)] * 3
    assert [job["name"] for job in jobs] == ["gate stage", "pair stage", "third"]
    assert [job["metadata"] for job in jobs] == [{"a": 1}, "two", [3]]
    assert [job["pipeline_id"] for job in jobs] == [pipeline["id"]] * 3
    assert [job["next_job_id"] for job in jobs] == [jobs[1]["id"], jobs[2]["id"], None]
    assert [job["use_previous_results"] for job in jobs] == [False, True, False]
    assert [job["priority"] for job in jobs] == [7, 7, 7]  # the pipeline's, for every job
    assert jobs[0]["description"] == "first" and jobs[0]["timeout"] == 30
    assert jobs[1]["max_retries"] == 2 and jobs[1]["retry_backoff"] == 0.5
    assert job_statuses(pipeline) == [valet.PENDING] * 3
    assert gate.entered.wait(10)
    got = get_pipeline(app, pipeline["id"])
    assert got["status"] == valet.IN_PROGRESS
    assert job_statuses(got) == [valet.IN_PROGRESS, valet.PENDING, valet.PENDING]
    assert [job["id"] for job in got["jobs"]] == [job["id"] for job in jobs]
    listed = call(app, "GET", f"/pipelines/{pipeline['id']}/jobs")
    assert listed.status == 200
    assert [job["id"] for job in listed.body["jobs"]] == [job["id"] for job in jobs]
    single = call(app, "GET", f"/jobs/{jobs[1]['id']}").body
    assert single["pipeline_id"] == pipeline["id"] and single["next_job_id"] == jobs[2]["id"]
    gate.opened.set()
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    result = call(app, "GET", f"/jobs/{jobs[1]['id']}/results").body["metadata"]
    assert result == ["two", {"gate": "passed"}]


def test_pipeline_jobs_run_in_order_each_given_the_previous_result_when_asked(make_app):
    counted = Counted(lasts=0.002)
    app = make_app(tasks={"counted": counted.task})
    pipeline = submit_pipeline(app, stage("counted", "m1"),
                               stage("counted", "m2", use_previous_results=True),
                               stage("counted", "m3"),
                               stage("counted", "m4", use_previous_results=True))
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED, valet.FAILED)
    assert done["status"] == valet.COMPLETED
    assert job_statuses(done) == [valet.COMPLETED] * 4
    # fn(metadata) alone, or fn(metadata, previous job's return value) when asked
    assert counted.calls == [("m1",), ("m2", {"call": 1}), ("m3",), ("m4", {"call": 3})]
    last = call(app, "GET", f"/jobs/{done['jobs'][-1]['id']}/results").body
    assert last["metadata"] == {"call": 4}
    for before, after in zip(done["jobs"], done["jobs"][1:]):
        assert epoch(after["started_at"]) >= epoch(before["completed_at"])
    assert done["started_at"] == done["jobs"][0]["started_at"]
    assert done["completed_at"] == done["jobs"][-1]["completed_at"]
    expected = (epoch(done["completed_at"]) - epoch(done["started_at"])) * 1000
    assert expected > 7  # four jobs of at least 2 ms each; times are cut to milliseconds
    assert abs(done["duration"] - expected) < 1.001


def test_pipeline_does_not_hold_a_worker_while_it_waits_between_jobs(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    pipeline = submit_pipeline(app, stage("gate"), stage("echo", "second"))
    assert gate.entered.wait(10)
    plain = submit(app, "echo", "plain")
    gate.opened.set()
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    assert job_status(app, plain["id"]) == valet.COMPLETED
    # The plain job was queued before the second job became due: FIFO runs it first.
    assert ran == ["plain", "second"]


def test_pipeline_between_jobs_is_in_progress_and_cannot_be_deleted(make_app, gate):
    hold = Gate()
    app = make_app(tasks={"hold": hold.task}, **{"worker_pool.workers": 1})
    pipeline = submit_pipeline(app, stage("gate"), stage("echo", "second"))
    assert gate.entered.wait(10)
    blocker = submit(app, "hold")
    gate.opened.set()
    assert hold.entered.wait(10)  # the only worker runs the plain job now
    between = get_pipeline(app, pipeline["id"])
    assert job_statuses(between) == [valet.COMPLETED, valet.PENDING]
    assert between["status"] == valet.IN_PROGRESS
    assert between["started_at"] is not None
    assert between["completed_at"] is None and between["duration"] is None
    listed = call(app, "GET", "/pipelines?status=in_progress").body["pipelines"]
    assert [p["id"] for p in listed] == [pipeline["id"]]
    resp = call(app, "DELETE", f"/pipelines/{pipeline['id']}")
    assert resp.status == 409 and "running" in resp.body["message"]
    hold.opened.set()
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    wait_for_status(app, blocker["id"], valet.COMPLETED)


def test_failed_job_fails_the_pipeline_after_its_retries_and_cancels_every_later_job(app, ran):
    pipeline = submit_pipeline(app, stage("echo", "first"),
                               stage("fail", max_retries=1, retry_backoff=0),
                               stage("echo", "third"), stage("echo", "fourth"))
    failing = pipeline["jobs"][1]["id"]
    done = wait_for_pipeline(app, pipeline["id"], valet.FAILED, valet.COMPLETED)
    assert done["status"] == valet.FAILED
    assert job_statuses(done) == [valet.COMPLETED, valet.FAILED, valet.CANCELLED,
                                  valet.CANCELLED]
    assert done["jobs"][1]["attempts"] == 2  # its retry ran before the pipeline failed
    assert done["jobs"][1]["failure_reason"] == "ValueError: boom"
    for later in done["jobs"][2:]:
        assert failing in later["failure_reason"] and "failed" in later["failure_reason"]
        assert later["attempts"] == 0
        resp = call(app, "GET", f"/jobs/{later['id']}/results")
        assert resp.status == 404 and "was cancelled" in resp.body["message"]
    assert call(app, "GET", "/jobs?status=pending").body["jobs"] == []
    assert done["completed_at"] is not None and done["duration"] is not None
    failed = call(app, "GET", "/pipelines?status=failed").body["pipelines"]
    assert [p["id"] for p in failed] == [pipeline["id"]]
    assert ran == ["first"]


def test_retried_pipeline_job_that_then_succeeds_lets_the_pipeline_complete(make_app):
    flaky = Counted(failures=1)
    collect = Counted()
    app = make_app(tasks={"flaky": flaky.task, "collect": collect.task})
    pipeline = submit_pipeline(app, stage("flaky", "f", max_retries=1, retry_backoff=0),
                               stage("collect", "c", use_previous_results=True))
    last = app.wait(pipeline["jobs"][1]["id"], timeout=10)
    assert last["status"] == valet.COMPLETED
    done = get_pipeline(app, pipeline["id"])
    assert done["status"] == valet.COMPLETED
    assert done["jobs"][0]["attempts"] == 2 and done["jobs"][0]["failure_reason"] is None
    assert flaky.calls == [("f",), ("f",)]
    assert collect.calls == [("c", {"call": 2})]  # the successful attempt's result


def test_pipeline_waiting_for_a_retry_is_in_progress(make_app):
    clock = FakeClock()
    flaky = Counted(failures=1)
    app = make_app(clock=clock, tasks={"flaky": flaky.task})
    pipeline = submit_pipeline(app, stage("flaky", max_retries=1, retry_backoff=10),
                               stage("echo", "after"))
    first = pipeline["jobs"][0]["id"]
    wait_for_retry(app, first, 1)
    waiting = get_pipeline(app, pipeline["id"])
    assert job_statuses(waiting) == [valet.SCHEDULED, valet.PENDING]
    assert waiting["status"] == valet.IN_PROGRESS
    assert waiting["jobs"][0]["failure_reason"] == "RuntimeError: failure 1"
    app.scheduler.tick(clock.advance(10))  # the backoff is at most 10 s
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED, valet.FAILED)
    assert done["status"] == valet.COMPLETED and done["jobs"][0]["attempts"] == 2


def test_pipeline_waiting_for_a_retry_cannot_be_deleted(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, tasks={"flaky": Counted(failures=1).task})
    pipeline = submit_pipeline(app, stage("flaky", max_retries=1, retry_backoff=10),
                               stage("echo", "after"))
    wait_for_retry(app, pipeline["jobs"][0]["id"], 1)
    resp = call(app, "DELETE", f"/pipelines/{pipeline['id']}")
    assert resp.status == 409 and "running" in resp.body["message"]
    assert get_pipeline(app, pipeline["id"])["status"] == valet.IN_PROGRESS


def test_scheduled_pipeline_starts_when_its_run_at_comes_and_a_cancelled_one_never(make_app,
                                                                                  ran):
    clock = FakeClock()
    app = make_app(clock=clock, **{"worker_pool.workers": 1})
    run_at = valet._rfc3339(clock.now + 60)
    doomed = submit_pipeline(app, stage("echo", "doomed"), stage("echo", "doomed too"),
                             run_at=run_at)
    pipeline = submit_pipeline(app, stage("echo", "a"), stage("echo", "b"), run_at=run_at)
    assert pipeline["status"] == valet.SCHEDULED and pipeline["run_at"] == run_at
    assert job_statuses(pipeline) == [valet.SCHEDULED, valet.PENDING]
    assert pipeline["jobs"][0]["run_at"] == run_at
    scheduled = call(app, "GET", "/pipelines?status=scheduled").body["pipelines"]
    assert [p["id"] for p in scheduled] == [doomed["id"], pipeline["id"]]
    cancelled = call(app, "POST", f"/pipelines/{doomed['id']}/cancel")
    assert cancelled.status == 200 and cancelled.body["status"] == valet.CANCELLED
    assert job_statuses(cancelled.body) == [valet.CANCELLED, valet.CANCELLED]
    assert cancelled.body["started_at"] is None
    app.scheduler.tick(clock.advance(59))
    assert get_pipeline(app, pipeline["id"])["status"] == valet.SCHEDULED
    app.scheduler.tick(clock.advance(1))
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    assert job_statuses(done) == [valet.COMPLETED, valet.COMPLETED]
    # The cancelled pipeline's first job was due first: had it been queued, it would
    # have run before "a" on the only worker.
    assert ran == ["a", "b"]
    assert get_pipeline(app, doomed["id"])["status"] == valet.CANCELLED


def test_pipeline_job_task_may_take_the_previous_result_and_a_context(make_app):
    def both(metadata, previous_result, context):
        return {"previous": previous_result, "attempt": context.attempt}

    app = make_app(tasks={"both": both})
    pipeline = submit_pipeline(app, stage("echo", "first"),
                               stage("both", use_previous_results=True))
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED, valet.FAILED)
    assert done["status"] == valet.COMPLETED
    assert app.result(done["jobs"][1]["id"])["metadata"] == {"previous": "first",
                                                              "attempt": 1}


def test_pipeline_next_job_is_queued_at_the_pipeline_priority(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    pipeline = submit_pipeline(app, stage("gate"), stage("echo", "second"), priority=5)
    assert gate.entered.wait(10)
    plain = submit(app, "echo", "plain")  # priority 0, queued before the second job
    gate.opened.set()
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    app.wait(plain["id"], 10)
    assert ran == ["second", "plain"]


def test_cancelling_a_running_pipeline_cancels_every_job_and_discards_the_late_result(
        app, gate, ran):
    pipeline = submit_pipeline(app, stage("gate"), stage("echo", "2"), stage("echo", "3"))
    running = pipeline["jobs"][0]["id"]
    assert gate.entered.wait(10)
    resp = call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")
    assert resp.status == 200
    assert list(resp.body) == list(valet.PIPELINE_FIELDS)
    assert resp.body["status"] == valet.CANCELLED
    assert job_statuses(resp.body) == [valet.CANCELLED] * 3
    assert "cancelled" in resp.body["jobs"][0]["failure_reason"]
    for later in resp.body["jobs"][1:]:
        assert running in later["failure_reason"]
        assert "was cancelled" in later["failure_reason"]
    before = get_pipeline(app, pipeline["id"])
    assert before["completed_at"] is not None
    gate.opened.set()  # the task returns late
    assert gate.returned.wait(10)
    stuck = gate.thread
    wait_until(lambda: not stuck.is_alive(), what="the abandoned worker to exit")
    assert get_pipeline(app, pipeline["id"]) == before
    resp = call(app, "GET", f"/jobs/{running}/results")
    assert resp.status == 404 and "was cancelled" in resp.body["message"]
    assert ran == []
    assert call(app, "GET", "/status").body["workers"] == {"type": "thread", "busy": 0, "total": 2,
                                                           "abandoned": 0}
    listed = call(app, "GET", "/pipelines?status=cancelled").body["pipelines"]
    assert [p["id"] for p in listed] == [pipeline["id"]]
    again = call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")
    assert again.status == 409 and "has finished" in again.body["message"]


def test_cancelling_one_pipeline_job_cancels_it_and_the_jobs_after_it(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    pipeline = submit_pipeline(app, stage("gate"), stage("echo", "2"), stage("echo", "3"))
    first, second, third = (job["id"] for job in pipeline["jobs"])
    assert gate.entered.wait(10)
    resp = call(app, "POST", f"/jobs/{second}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED
    now = get_pipeline(app, pipeline["id"])
    assert job_statuses(now) == [valet.IN_PROGRESS, valet.CANCELLED, valet.CANCELLED]
    assert second in now["jobs"][2]["failure_reason"]
    assert now["status"] == valet.IN_PROGRESS  # its first job still runs
    gate.opened.set()
    assert app.wait(first, 10)["status"] == valet.COMPLETED
    later = submit(app, "echo", "later")  # queued behind the second job, had it been
    wait_for_status(app, later["id"], valet.COMPLETED)
    assert ran == ["later"]
    done = get_pipeline(app, pipeline["id"])
    assert done["status"] == valet.CANCELLED
    assert job_statuses(done) == [valet.COMPLETED, valet.CANCELLED, valet.CANCELLED]


def test_finished_pipeline_cannot_be_cancelled(app):
    pipeline = submit_pipeline(app, stage(), stage())
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    resp = call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")
    assert resp.status == 409
    assert "has finished (status COMPLETED)" in resp.body["message"]
    assert get_pipeline(app, pipeline["id"])["status"] == valet.COMPLETED


def test_deleting_a_finished_pipeline_removes_it_its_jobs_and_their_results(app):
    plain = submit(app, "echo", "stays")
    pipeline = submit_pipeline(app, stage("echo", 1), stage("fail"))
    wait_for_pipeline(app, pipeline["id"], valet.FAILED)
    wait_for_status(app, plain["id"], valet.COMPLETED)
    assert call(app, "GET", f"/jobs/{pipeline['jobs'][0]['id']}/results").status == 200
    resp = call(app, "DELETE", f"/pipelines/{pipeline['id']}")
    assert resp.status == 204 and resp.body is None
    assert call(app, "GET", f"/pipelines/{pipeline['id']}").status == 404
    for job in pipeline["jobs"]:
        assert call(app, "GET", f"/jobs/{job['id']}").status == 404
        assert call(app, "GET", f"/jobs/{job['id']}/results").status == 404
    assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [plain["id"]]
    assert call(app, "GET", "/pipelines").body["pipelines"] == []
    assert call(app, "DELETE", f"/pipelines/{pipeline['id']}").status == 404


def test_running_pipeline_cannot_be_deleted_and_nothing_is_removed(app, gate):
    pipeline = submit_pipeline(app, stage("gate"), stage("echo"))
    assert gate.entered.wait(10)
    resp = call(app, "DELETE", f"/pipelines/{pipeline['id']}")
    assert resp.status == 409 and "running" in resp.body["message"]
    got = get_pipeline(app, pipeline["id"])
    assert got["status"] == valet.IN_PROGRESS
    assert [job["id"] for job in got["jobs"]] == [job["id"] for job in pipeline["jobs"]]
    gate.opened.set()
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    assert job_statuses(done) == [valet.COMPLETED, valet.COMPLETED]


def test_deleted_pending_pipeline_never_runs(make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)
    pipeline = submit_pipeline(app, stage("echo", "doomed"), stage("echo", "doomed too"))
    assert call(app, "DELETE", f"/pipelines/{pipeline['id']}").status == 204
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0  # its place given back
    later = submit(app, "echo", "later")
    gate.opened.set()
    wait_for_status(app, later["id"], valet.COMPLETED)
    assert ran == ["later"]


def test_cancelled_pending_pipeline_gives_back_its_backlog_place_and_never_runs(make_app,
                                                                             gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)
    pipeline = submit_pipeline(app, stage("echo", "doomed"), stage("echo", "doomed too"))
    assert call(app, "GET", "/status").body["queue"]["depth"] == 1
    resp = call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")
    assert resp.status == 200 and job_statuses(resp.body) == [valet.CANCELLED] * 2
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0
    later = submit(app, "echo", "later")
    gate.opened.set()
    wait_for_status(app, later["id"], valet.COMPLETED)
    assert ran == ["later"]


def test_pipeline_job_cannot_be_deleted_on_its_own(app):
    pipeline = submit_pipeline(app, stage(), stage())
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    first = pipeline["jobs"][0]["id"]
    resp = call(app, "DELETE", f"/jobs/{first}")
    assert resp.status == 409
    assert pipeline["id"] in resp.body["message"] and "pipeline" in resp.body["message"]
    assert job_status(app, first) == valet.COMPLETED
    assert len(get_pipeline(app, pipeline["id"])["jobs"]) == 2


# -- recovery at start

def test_scheduled_job_survives_a_restart_and_one_due_meanwhile_runs_once(tmp_path, ran,
                                                                          gate):
    clock = FakeClock()
    config = {"server": {"port": 0}, "storage": {"sqlite": {"path": str(tmp_path / "v.db")}}}
    first = valet.Valet(config, tasks=make_tasks(gate, ran), clock=clock).start()
    due_later = first.submit({"name": "later", "task_name": "echo", "metadata": "later",
                              "run_at": at(clock, 3600)})
    due_soon = first.submit({"name": "soon", "task_name": "echo", "metadata": "soon",
                             "run_at": at(clock, 60)})
    first.stop()
    clock.advance(600)  # "soon" came due while valet was down
    second = valet.Valet(config, tasks=make_tasks(gate, ran), clock=clock).start()
    try:
        second.scheduler.tick(clock.now)
        assert second.wait(due_soon["id"], 10)["status"] == valet.COMPLETED
        assert second.job(due_later["id"])["status"] == valet.SCHEDULED
        assert second.scheduler.next_due() == epoch(due_later["run_at"])
        assert ran == ["soon"] and second.job(due_soon["id"])["attempts"] == 1
    finally:
        second.stop()


def test_pipeline_runs_its_next_job_after_a_restart_on_sqlite(make_app, storage, gate, ran):
    if storage["storage"]["option"] == "memory":
        pytest.skip("a memory store does not outlive its server")
    collect = Counted()
    first = make_app(tasks={"collect": collect.task}, start=False)
    first.recover()
    begun = first.submit_pipeline({"name": "begun", "jobs": [
        stage("echo", {"n": 1}), stage("collect", "a2", use_previous_results=True)]})
    unstarted = first.submit_pipeline({"name": "unstarted", "jobs": [
        stage("gate"), stage("collect", "b2", use_previous_results=True)]})
    a1, a2 = (job["id"] for job in begun["jobs"])
    b1, b2 = (job["id"] for job in unstarted["jobs"])
    assert run_one(first) is True  # exactly one job: the first queued
    assert first.lifecycle.store.get(a1)["status"] == valet.COMPLETED
    assert [first.lifecycle.store.get(i)["status"] for i in (a2, b1, b2)] == [valet.PENDING] * 3
    first.stop()
    assert collect.calls == []

    second = make_app(tasks={"collect": collect.task})  # the same file
    done = wait_for_pipeline(second, begun["id"], valet.COMPLETED, valet.FAILED)
    assert job_statuses(done) == [valet.COMPLETED, valet.COMPLETED]
    assert collect.calls == [("a2", {"n": 1})]  # given the first run's stored result
    # The other pipeline resumes from its first job; its second waits for it.
    assert gate.entered.wait(10)
    plain = submit(second, "echo", "plain")  # queued behind anything recovered
    wait_for_status(second, plain["id"], valet.COMPLETED)
    assert job_status(second, b2) == valet.PENDING
    gate.opened.set()
    assert wait_for_pipeline(second, unstarted["id"], valet.COMPLETED,
                             valet.FAILED)["status"] == valet.COMPLETED
    assert collect.calls == [("a2", {"n": 1}), ("b2", {"gate": "passed"})]
    assert ran == [{"n": 1}, "plain"]  # the completed first job did not run again


# ------------------------------------------------------------------ workers --

def test_run_once_runs_the_next_job_and_records_result(pool, store):
    job_id = queue_job(pool, store, "echo")
    assert pool.run_once(block=False) is True
    job = store.get(job_id)
    assert job["status"] == valet.COMPLETED
    assert job["started_at"] <= job["completed_at"]
    assert store.result(job_id) == {"value": None, "error": None}
    assert pool.stats() == {"depth": 0, "busy": 0, "abandoned": 0, "oldest": None}


@pytest.mark.parametrize("timeout, reason", [(5, "timed out after 5 seconds"),
                                             (1, "timed out after 1 second")])
def test_tick_fails_a_job_only_once_its_deadline_has_passed(pool, store, gate, timeout,
                                                            reason):
    job_id = queue_job(pool, store, "gate", timeout=timeout)
    worker = threading.Thread(target=pool.run_once)
    worker.start()
    assert gate.entered.wait(10)
    assert pool.tick(pool.clock[0] + timeout - 0.001) == 0
    assert store.get(job_id)["status"] == valet.IN_PROGRESS
    assert pool.tick(pool.clock[0] + timeout) == 1
    job = store.get(job_id)
    assert job["status"] == valet.FAILED
    assert job["failure_reason"] == reason
    assert not gate.returned.is_set()  # failed at the deadline, not when the task returned
    gate.opened.set()
    worker.join(10)
    assert not worker.is_alive()
    assert store.get(job_id)["status"] == valet.FAILED
    assert store.result(job_id) == {"value": None, "error": reason}


def test_deadlines_of_jobs_that_finished_in_time_do_not_pile_up(pool, store, gate):
    slow = queue_job(pool, store, "gate", timeout=60)
    worker = threading.Thread(target=pool.run_once)
    worker.start()
    assert gate.entered.wait(10)
    for _ in range(20):
        queue_job(pool, store, "echo", timeout=60)
        pool.run_once(block=False)
    assert [claim.job["id"] for _, _, claim, _ in pool._deadlines] == [slow]
    assert pool.tick(pool.clock[0] + 60) == 1  # the one kept still fires
    gate.opened.set()
    worker.join(10)
    assert not worker.is_alive()


def test_backlog_counts_reserved_and_queued_jobs(pool, store):
    for _ in range(3):
        queue_job(pool, store, "echo")
    pool.reserve()
    pool.reserve()  # two submissions on their way to the store
    assert pool.stats()["depth"] == 5
    with pytest.raises(valet.BacklogFull) as caught:
        pool.reserve()
    answer = valet._http_error(caught.value)
    assert answer.status == 503 and answer.headers == {"Retry-After": "1"}
    pool.unreserve()  # one was refused by the store
    pool.reserve()
    with pytest.raises(valet.BacklogFull):
        pool.reserve()
    pool.run_once(block=False)
    pool.reserve()  # a worker took one: a place came free


def test_full_backlog_answers_503_with_retry_after_and_stores_nothing(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 2})
    first = submit(app, "gate")
    assert gate.entered.wait(10)
    waiting = [submit(app, "echo", i) for i in range(2)]
    resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo"})
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert "backlog is full" in resp.body["message"]
    assert len(call(app, "GET", "/jobs").body["jobs"]) == 3
    assert call(app, "GET", "/status").body["queue"]["accepting"] is False
    gate.opened.set()
    for job in [first, *waiting]:
        wait_for_status(app, job["id"], valet.COMPLETED)
    assert submit(app, "echo")["status"] == valet.PENDING


def test_higher_priority_starts_first_and_equal_priorities_keep_submission_order(
        make_app, gate, ran):
    app = make_app(**{"worker_pool.workers": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)
    jobs = [submit(app, "echo", name, priority=priority)
            for name, priority in [("a", 0), ("b", 5), ("c", -1), ("d", 5), ("e", 0)]]
    gate.opened.set()
    for job in jobs:
        app.wait(job["id"], 10)
    assert ran == ["b", "d", "a", "e", "c"]
    assert [j["priority"] for j in jobs] == [0, 5, -1, 5, 0]


def test_task_exception_fails_the_job_and_the_worker_goes_on(make_app):
    app = make_app(**{"worker_pool.workers": 1})
    bad = submit(app, "fail")
    good = submit(app, "echo", "after")
    failed = wait_for_status(app, bad["id"], valet.FAILED)
    assert failed["failure_reason"] == "ValueError: boom"
    result = call(app, "GET", f"/jobs/{bad['id']}/results").body
    assert result == {"job_id": bad["id"], "metadata": None, "error": "ValueError: boom"}
    wait_for_status(app, good["id"], valet.COMPLETED)


def test_a_failed_attempt_keeps_its_tasks_traceback_until_an_attempt_succeeds(make_app):
    clock, calls = FakeClock(), []

    def flaky(metadata):
        calls.append(metadata)
        if len(calls) == 1:
            raise KeyError("first try")
        return "second time"

    app = make_app(clock=clock, tasks={"flaky": flaky})
    job = app.submit({"name": "j", "task_name": "flaky", "max_retries": 1,
                      "retry_backoff": 60})
    waiting = wait_for_status(app, job["id"], valet.SCHEDULED)  # its retry is due later
    trace = waiting["failure_traceback"]
    assert trace.startswith("Traceback (most recent call last):") and "in flaky" in trace
    assert trace.rstrip().endswith("KeyError: 'first try'")
    assert waiting["failure_reason"] == "KeyError: 'first try'"
    app.scheduler.tick(clock.advance(61))
    done = wait_for_status(app, job["id"], valet.COMPLETED)
    assert done["failure_reason"] is None and done["failure_traceback"] is None


def test_an_exception_that_cannot_be_shown_still_fails_its_job(make_app):
    class Unshowable(Exception):
        def __str__(self):
            raise RuntimeError("no")

        @property
        def __notes__(self):
            raise RuntimeError("no notes either")

    def raises_it(metadata):
        raise Unshowable()

    app = make_app(tasks={"bad": raises_it})
    job = app.submit({"name": "j", "task_name": "bad"})
    failed = wait_for_status(app, job["id"], valet.FAILED)
    assert failed["failure_reason"] == "Unshowable (its message could not be read)"
    assert app.status()["workers"]["busy"] == 0


def test_only_a_task_that_raised_leaves_a_traceback(make_app, gate):
    app = make_app()
    timed_out = submit(app, "gate", timeout=0.1)
    failed = wait_for_status(app, timed_out["id"], valet.FAILED)
    assert failed["failure_reason"].startswith("timed out") and failed["failure_traceback"] is None
    bad = wait_for_status(app, submit(app, "returns_set")["id"], valet.FAILED)
    assert bad["failure_traceback"] is None
    gate.opened.set()


def test_a_traceback_is_cut_to_its_last_characters(make_app):
    def huge(metadata):
        raise ValueError("x" * 100_000 + " the end")

    app = make_app(tasks={"huge": huge})
    job = app.submit({"name": "j", "task_name": "huge"})
    trace = wait_for_status(app, job["id"], valet.FAILED)["failure_traceback"]
    assert len(trace) == valet._MAX_TRACEBACK + 3 and trace.startswith("...")
    assert trace.rstrip().endswith(" the end")


@pytest.mark.parametrize("task_name, reason", [
    ("returns_set", "the task's result is not JSON-serialisable: Object of type set"),
    ("returns_nan", "the task's result is not JSON-serialisable: Out of range float"),
    ("exits", "SystemExit: 3"),
])
def test_bad_result_or_exit_fails_the_job_not_the_worker(make_app, task_name, reason):
    app = make_app(**{"worker_pool.workers": 1})
    bad = submit(app, task_name)
    good = submit(app, "echo")
    assert reason in wait_for_status(app, bad["id"], valet.FAILED)["failure_reason"]
    wait_for_status(app, good["id"], valet.COMPLETED)


def test_a_task_that_cannot_be_hashed_runs(make_app):
    @dataclasses.dataclass
    class Multiply:  # eq=True makes instances unhashable
        factor: int

        def __call__(self, metadata):
            return metadata * self.factor

    app = make_app(tasks={"triple": Multiply(3)})
    job = submit(app, "triple", 2)
    assert app.wait(job["id"], 10)["status"] == valet.COMPLETED
    assert app.result(job["id"])["metadata"] == 6


def test_task_context_gives_id_attempt_deadline_and_plain_tasks_still_work(make_app):
    seen = {}

    def with_context(metadata, context):
        seen.update(job_id=context.job_id, attempt=context.attempt,
                    deadline=context.deadline, remaining=context.remaining(),
                    flag=context.cancelled.is_set())
        return "ok"

    def with_kwargs(metadata, **extra):
        return sorted(extra)

    app = make_app(tasks={"with_context": with_context, "with_kwargs": with_kwargs})
    before = time.time()
    job = submit(app, "with_context", timeout=30)
    assert app.wait(job["id"], 10)["status"] == valet.COMPLETED
    assert seen["job_id"] == job["id"] and seen["attempt"] == 1 and not seen["flag"]
    assert before + 30 <= seen["deadline"] <= time.time() + 30
    assert 0 < seen["remaining"] <= 30
    plain = submit(app, "echo", "plain")
    assert app.wait(plain["id"], 10)["status"] == valet.COMPLETED
    kwargs = submit(app, "with_kwargs")
    app.wait(kwargs["id"], 10)
    assert app.result(kwargs["id"])["metadata"] == ["context"]
    untimed = submit(app, "with_context")
    app.wait(untimed["id"], 10)
    assert seen["deadline"] is None and seen["remaining"] is None


def test_progress_shows_in_job_json_while_the_job_runs(make_app):
    reported, finish = threading.Event(), threading.Event()
    errors = []

    def reporting(metadata, context):
        context.progress(0.25, "a quarter")
        context.progress(0.5, "halfway")
        for bad in (1.5, -0.1, float("nan"), "half"):
            try:
                context.progress(bad)
            except ValueError as exc:
                errors.append(str(exc))
        reported.set()
        finish.wait(10)
        return "done"

    app = make_app(tasks={"reporting": reporting})
    job = submit(app, "reporting")
    assert job["progress"] is None
    assert reported.wait(10)
    running = call(app, "GET", f"/jobs/{job['id']}").body
    assert running["progress"] == {"fraction": 0.5, "message": "halfway"}
    listed = call(app, "GET", "/jobs?status=in_progress").body["jobs"]
    assert listed[0]["progress"] == running["progress"]
    assert len(errors) == 4 and all("from 0 to 1" in e for e in errors)
    finish.set()
    assert app.wait(job["id"], 10)["progress"] is None


def test_context_remaining_follows_the_app_clock(make_app):
    clock, seen = FakeClock(), {}

    def remembers(metadata, context):
        seen.update(deadline=context.deadline, remaining=context.remaining())

    app = make_app(clock=clock, tasks={"remembers": remembers})
    job = submit(app, "remembers", timeout=30)
    assert app.wait(job["id"], 10)["status"] == valet.COMPLETED
    assert seen == {"deadline": clock.now + 30, "remaining": 30}


def test_timeout_fails_at_the_deadline_and_the_pool_keeps_its_workers(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "timeout_unit": "millisecond"})
    slow = submit(app, "gate", timeout=50)
    assert gate.entered.wait(10)
    failed = wait_for_status(app, slow["id"], valet.FAILED)
    assert failed["failure_reason"] == "timed out after 50 milliseconds"
    assert not gate.returned.is_set()  # the task is still running
    # The only worker is stuck in the gate, yet a new job runs: a replacement took over.
    quick = submit(app, "echo", "quick")
    wait_for_status(app, quick["id"], valet.COMPLETED)
    assert call(app, "GET", "/status").body["workers"] == {"type": "thread", "busy": 0, "total": 1,
                                                           "abandoned": 1}
    gate.opened.set()
    stuck = gate.thread
    wait_until(lambda: not stuck.is_alive(), what="the abandoned worker to exit")
    assert call(app, "GET", "/status").body["workers"]["abandoned"] == 0
    after = call(app, "GET", f"/jobs/{slow['id']}").body
    assert after["status"] == valet.FAILED and after["completed_at"] == failed["completed_at"]
    assert call(app, "GET", f"/jobs/{slow['id']}/results").body["metadata"] is None


def test_job_without_timeout_is_never_timed_out(app, gate):
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    assert app.pool.tick(time.monotonic() + 10 ** 9) == 0
    gate.opened.set()
    wait_for_status(app, job["id"], valet.COMPLETED)


def test_release_wakes_a_worker_that_waits_for_a_claim_it_still_holds(pool):
    # (a worker process's thread whose job was taken waits for the taker's write;
    # it is not abandoned, as a worker thread would be, yet must be woken)
    claim = valet._Claim(threading.current_thread(), "job")
    claim.taken = True
    woke = threading.Event()

    def worker():
        with pool._lock:
            pool._changed.wait_for(lambda: claim.released, 20)
        woke.set()
    thread = threading.Thread(target=worker)
    thread.start()
    wait_until(lambda: len(pool._changed._waiters) == 1, what="the worker to wait")
    pool.release(claim)
    assert woke.wait(5), "release() did not wake the worker"
    thread.join(5)


def test_a_worker_that_left_the_pool_takes_no_next_job_when_its_task_returns():
    class CancelFails(valet.MemoryStore):  # the first cancel cannot be written
        failed = False

        def transitions(self, *moves):
            if not self.failed and any(move[2] == valet.CANCELLED for move in moves):
                self.failed = True
                raise valet.StorageError("disk is full")
            return super().transitions(*moves)

    entered, release_a, release_b, threads = (threading.Event(), threading.Event(),
                                              threading.Event(), [])

    def a(metadata):
        threads.append(threading.current_thread())
        entered.set()
        release_a.wait(20)

    def b(metadata):
        release_b.wait(20)

    app = valet.Valet({"server": {"port": 0}, "worker_pool": {"workers": 1}},
                      tasks={"a": a, "b": b, "echo": lambda m: m},
                      store=CancelFails()).start()
    try:
        first = app.submit({"name": "a", "task_name": "a"})["id"]
        assert entered.wait(10)
        with pytest.raises(valet.StorageError):  # its thread leaves the pool, and a
            app.cancel(first)                    # new one takes its place
        second = app.submit({"name": "b", "task_name": "b"})["id"]
        wait_until(lambda: app.job(second)["status"] == valet.IN_PROGRESS,
                   what="the new worker to start the second job")
        rest = [app.submit({"name": "c", "task_name": "echo"})["id"] for _ in range(3)]
        release_a.set()  # the first task returns: its own end stands (the cancel failed)
        wait_until(lambda: not threads[0].is_alive(), what="the old worker to exit")
        assert app.job(first)["status"] == valet.COMPLETED
        assert [app.job(job_id)["status"] for job_id in rest] == [valet.PENDING] * 3
        release_b.set()  # the pool's one worker goes on with them
        for job_id in rest:
            wait_for_status(app, job_id, valet.COMPLETED)
    finally:
        release_a.set()
        release_b.set()
        app.stop(5)


def test_one_overdue_job_that_cannot_be_written_leaves_the_others_timed_out(store, gate,
                                                                             ran, caplog):
    failed_once = []

    def first_fail_write_breaks(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.FAILED and not failed_once:
            failed_once.append(job_id)
            return True
    pool = hooked_pool(store, "transition", first_fail_write_breaks, make_tasks(gate, ran))
    jobs = [queue_job(pool, store, "gate", timeout=5) for _ in range(2)]
    workers = [threading.Thread(target=pool.run_once) for _ in jobs]
    for worker in workers:
        worker.start()
    wait_until(lambda: len(pool._deadlines) == 2, what="both jobs to start, with deadlines")
    assert pool.tick(pool.clock[0] + 5) == 2
    statuses = {job_id: store.get(job_id)["status"] for job_id in jobs}
    assert sorted(statuses.values()) == [valet.FAILED, valet.IN_PROGRESS]
    assert statuses[failed_once[0]] == valet.IN_PROGRESS  # left for the next start
    assert "OSError: disk full" in caplog.text
    gate.opened.set()
    for worker in workers:
        worker.join(10)


def test_a_write_the_store_refuses_a_worker_is_retried_until_it_is_made(store, gate, ran):
    store = Flaky(store, "transition")
    pool = make_pool(store, make_tasks(gate, ran))
    pool.start()
    try:
        first = queue_job(pool, store, "echo")
        second = queue_job(pool, store, "echo")
        for job_id in (first, second):
            wait_until(lambda: store.get(job_id)["status"] == valet.COMPLETED,
                       what="each job to complete, the first once its start is retried")
        assert store.failed and ran == [{"n": 1}, {"n": 1}] or len(ran) == 2
    finally:
        pool.stop(5)


def test_an_abandoned_worker_whose_start_fails_leaves_the_pool(store, gate, ran, caplog):
    threads = []

    def cancelled_then_broken(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.IN_PROGRESS and not threads:
            threads.append(threading.current_thread())
            canceller = threading.Thread(target=pool._lifecycle.cancel, args=(job_id, "by request"))
            canceller.start()
            canceller.join(10)
            return True  # the start's write fails after the cancel took the job
    pool = hooked_pool(store, "transition", cancelled_then_broken, make_tasks(gate, ran))
    pool.start()
    try:
        job_id = queue_job(pool, store, "echo")
        wait_until(lambda: threads, what="the worker to take the job")
        threads[0].join(10)
        assert not threads[0].is_alive()  # it left, rather than work on untracked
        assert store.get(job_id)["status"] == valet.CANCELLED
        after = queue_job(pool, store, "echo")  # the replacement runs the next job
        wait_until(lambda: store.get(after)["status"] == valet.COMPLETED, what="the next job")
        assert "OSError: disk full" in caplog.text
        assert pool.stats()["abandoned"] == 0
    finally:
        pool.stop(5)


# -- stopping

def test_stop_fails_jobs_still_running_after_the_grace_period(storage, gate, ran, tmp_path):
    config = valet.load_config(storage, {"server.port": 0})
    app = valet.Valet(config, tasks=make_tasks(gate, ran)).start()
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    app.stop(grace=0)
    app.stop()  # a second stop does nothing
    gate.opened.set()
    with reopened(app) as store:
        stopped = store.get(job["id"])
    assert stopped["status"] == valet.FAILED
    assert "server stopped before the job finished" in stopped["failure_reason"]


def test_timeouts_are_enforced_while_stop_waits_for_running_jobs(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "timeout_unit": "millisecond"})
    job = submit(app, "gate", timeout=50)
    assert gate.entered.wait(10)
    started = time.monotonic()
    app.pool.stop(grace=30)  # returns once the timed-out worker has left the pool
    assert time.monotonic() - started < 15
    stopped = app.lifecycle.store.get(job["id"])
    assert stopped["status"] == valet.FAILED
    assert stopped["failure_reason"] == "timed out after 50 milliseconds"


def test_a_start_being_written_when_stop_ends_is_settled_not_left_to_run(store, gate, ran):
    pool, job_id, worker, written = a_start_held(store, "gate", gate, ran)
    stopper = threading.Thread(target=pool.stop, args=(0,))
    stopper.start()
    wait_until(lambda: pool._stopping, what="stop to begin")
    written.set()  # stop waits for the start, whether this comes before or after it waits
    stopper.join(10)
    assert not stopper.is_alive()
    stopped = store.get(job_id)  # settled by stop, not left IN_PROGRESS to run on
    assert stopped["status"] == valet.FAILED and stopped["attempts"] == 1
    assert stopped["failure_reason"].startswith("the server stopped before the job finished")
    gate.opened.set()
    worker.join(10)
    assert not worker.is_alive() and store.get(job_id)["status"] == valet.FAILED


def test_stop_sets_the_cancelled_flag_of_tasks_still_running(make_app):
    told = threading.Event()

    def patient(metadata, context):
        if context.cancelled.wait(20):
            told.set()

    app = make_app(tasks={"patient": patient})
    job = submit(app, "patient")
    wait_until(lambda: job_status(app, job["id"]) == valet.IN_PROGRESS, what="the start")
    app.stop(grace=0)
    assert told.wait(10)


# -- helpers for default_timeout, idempotency, retention, bulk delete, shutdown

DAY = 86400


def keyed(app, path, body, key):
    """POST `body` to `path` with this Idempotency-Key."""
    return call(app, "POST", path, body, headers={"Idempotency-Key": key})


def post_with_headers(app, path, body, pairs):
    """POST with headers given as (name, value) pairs: a name may come twice."""
    data = json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(data)))
        for name, value in pairs:
            conn.putheader(name, value)
        conn.endheaders(data)
        resp = conn.getresponse()
        text = resp.read()
        return Response(resp.status, json.loads(text) if text else None,
                        dict(resp.getheaders()))
    finally:
        conn.close()


def job_ids(app):
    """The ids of every job in the store (standalone and in pipelines)."""
    return {job["id"] for job in app._store.list(limit=10_000)}


def finished_record(when, status=valet.COMPLETED, metadata=None):
    """A job record created and finished at `when`, to add to a store directly."""
    job = valet._new_job({"name": "old", "task_name": "echo", "metadata": metadata},
                         {"echo": None}, "second", when)
    job.update(status=status, attempts=1, started_at=when, completed_at=when,
               failure_reason="boom" if status == valet.FAILED else None)
    return job


def unfinished_record(when, status):
    job = valet._new_job({"name": "old", "task_name": "echo", "metadata": None},
                         {"echo": None}, "second", when)
    job["status"] = status
    return job


def cancelled_job(app, clock=None):
    """A job cancelled while SCHEDULED: it finished with status CANCELLED."""
    run_at = at(clock, DAY) if clock else valet._rfc3339(time.time() + DAY)
    job = submit(app, run_at=run_at)
    assert call(app, "POST", f"/jobs/{job['id']}/cancel").status == 200
    return job


def started_with_fake_deadlines(make_app, **overrides):
    """A started app whose pool reads deadlines on a monotonic clock that stays at
    1000.0: only the test's calls of app.pool.tick(now) time jobs out."""
    app = make_app(start=False, **overrides)
    app.pool._monotonic = lambda: 1000.0
    app.start()
    return app


def bulk_delete(app, **query):
    return call(app, "DELETE", "/jobs?" + urllib.parse.urlencode(query))


# -- worker_pool.default_timeout

def test_default_timeout_fails_a_job_without_timeout_and_keeps_the_pool_full(make_app,
                                                                             gate):
    pair = threading.Barrier(2)

    def together(metadata):  # completes only if two workers run it at the same time
        pair.wait(10)
        return "together"

    app = started_with_fake_deadlines(make_app, tasks={"together": together},
                                      **{"worker_pool.default_timeout": 0.2})
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    assert app.pool.tick(1000.15) == 0  # before the default deadline
    assert job_status(app, job["id"]) == valet.IN_PROGRESS
    assert app.pool.tick(1000.25) == 1
    failed = wait_for_status(app, job["id"], valet.FAILED)
    assert failed["failure_reason"] == ("timed out after 0.2 seconds "
                                        "(worker_pool.default_timeout)")
    workers = call(app, "GET", "/status").body["workers"]
    assert workers["abandoned"] == 1 and workers["total"] == 2
    # Both workers are free while the abandoned thread still blocks in its task.
    pairs = [submit(app, "together")["id"] for _ in range(2)]
    for job_id in pairs:
        assert wait_for_status(app, job_id, valet.COMPLETED,
                               valet.FAILED)["status"] == valet.COMPLETED
    assert gate.thread.is_alive() and not gate.returned.is_set()
    gate.opened.set()
    wait_until(lambda: call(app, "GET", "/status").body["workers"]["abandoned"] == 0,
               what="the abandoned thread's task to return")
    gate.thread.join(10)
    assert not gate.thread.is_alive()
    assert call(app, "GET", f"/jobs/{job['id']}").body == failed  # late result discarded


def test_job_with_its_own_timeout_keeps_it_over_the_default(make_app, gate):
    app = started_with_fake_deadlines(make_app, **{"worker_pool.default_timeout": 0.2})
    job = submit(app, "gate", timeout=5)
    assert gate.entered.wait(10)
    assert app.pool.tick(1001.0) == 0  # past the default, before its own
    assert job_status(app, job["id"]) == valet.IN_PROGRESS
    assert app.pool.tick(1005.1) == 1
    assert wait_for_status(app, job["id"], valet.FAILED)["failure_reason"] == \
        "timed out after 5 seconds"


# --------------------------------------------------------- worker processes --

# worker_pool.worker_type: process. Timeouts and cancels that really stop the task,
# worker processes that crash, leak or are killed from outside, recycling, parity
# with worker threads on every store, the config, and a real `python valet.py` in
# process mode. Nothing waits a fixed time: the tasks coordinate with the test
# through files, and the test polls with a deadline (wait_until).

# -- fault tasks

# Top-level functions of an importable module, as worker processes need: they are
# pickled by reference and imported again in each child. A task told where by its
# metadata writes its pid to a file, waits for a file to appear, or counts its runs
# in a file: the test and the child share nothing else.
FAULT_TASKS = '''
import os
import time


def _note_pid(metadata):
    path = metadata["pidfile"]
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)  # the test never reads half a pid


def _wait_for(path, timeout=30):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)


def pid(metadata):
    return os.getpid()


def spin(metadata):
    """Spin on the CPU, deaf to context.cancelled (30 s at most)."""
    _note_pid(metadata)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        pass
    return "spun"


def leak(metadata):
    chunks = []
    while True:
        chunks.append(bytearray(8 * 2**20))


def exit7(metadata):
    os._exit(7)


def wait_for_file(metadata):
    _note_pid(metadata)
    _wait_for(metadata["file"])
    return "released"


def stubborn(metadata, context):
    """Note that context.cancelled was set (in metadata["seen"]), and sleep on."""
    _note_pid(metadata)
    end = time.monotonic() + 30
    while time.monotonic() < end:
        if context.cancelled.is_set() and not os.path.exists(metadata["seen"]):
            open(metadata["seen"], "w").close()
        time.sleep(0.005)
    return "ignored"


def cooperative(metadata, context):
    _note_pid(metadata)
    return "stopped" if context.cancelled.wait(30) else "never cancelled"


def progress(metadata, context):
    context.progress(0.5, "half")
    _wait_for(metadata["file"])
    return {"job_id": context.job_id, "attempt": context.attempt,
            "deadline": context.deadline}


def record(metadata):
    """Append metadata["line"] to the file metadata["file"]: the order jobs ran in."""
    with open(metadata["file"], "a") as f:
        f.write(metadata["line"] + "\\n")


def double(metadata):
    return {"n": metadata["n"] * 2}


def previous(metadata, previous_result):
    return {"metadata": metadata, "previous": previous_result}


def flaky(metadata, context):
    with open(metadata["runs"], "a") as f:
        f.write(f"{context.attempt}\\n")
    with open(metadata["runs"]) as f:
        runs = len(f.readlines())
    if runs == 1:
        raise RuntimeError("the first run fails")
    return {"attempt": context.attempt, "runs": runs}


def big(metadata):
    return "x" * (metadata["mb"] * 2**20)


def returns_nan(metadata):
    return float("nan")


def returns_set(metadata):
    return {1, 2}


def raises(metadata):
    raise ValueError("bad input")  # the line failure_traceback shows


def shout(metadata):
    print(metadata["text"], flush=True)


TASKS = {name: fn for name, fn in dict(globals()).items()
         if callable(fn) and not name.startswith("_")}
'''


@pytest.fixture(scope="session")
def fault_tasks(tmp_path_factory):
    """The module valet_fault_tasks, written once in a folder on sys.path (which the
    worker processes are given too)."""
    folder = tmp_path_factory.mktemp("fault_tasks")
    (folder / "valet_fault_tasks.py").write_text(FAULT_TASKS)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    return importlib.import_module("valet_fault_tasks")


@pytest.fixture
def process_app(fault_tasks, tmp_path):
    """A function that starts a Valet whose one worker runs its tasks in a process
    (nested config sections override the defaults below, key by key)."""
    apps = []

    def make(option="memory", **sections):
        config = {"server": {"port": 0},
                  "storage": {"option": option,
                              "sqlite": {"path": str(tmp_path / "valet.db")}},
                  "worker_pool": {"workers": 1, "worker_type": "process",
                                  "kill_grace": 0.3, "shutdown_grace": 1}}
        for section, values in sections.items():
            config[section] = {**config.get(section, {}), **values}
        if config["worker_pool"]["worker_type"] == "thread":
            del config["worker_pool"]["kill_grace"]  # (for worker processes only)
        app = valet.Valet(config, tasks=fault_tasks.TASKS)
        apps.append(app)
        return app.start()

    yield make
    for app in apps:
        app.stop(0)


@pytest.fixture(params=["memory", "sqlite"])
def option(request):
    """Each store, as the `storage` fixture of test_valet.py."""
    return request.param


def gone(pid):
    """Whether the process has ended and been reaped (a zombie still answers kill 0)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def alive(pid):
    """Whether the process runs: neither gone nor a zombie (an orphan's zombie may
    wait for an init that does not reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def children_of(parent):
    """The pids of the live processes whose parent is `parent`."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            found.add(int(entry))
    return found


def read_pid(path):
    """The pid a task wrote to `path`, once it has."""
    return int(wait_until(lambda: path.exists() and path.read_text(),
                             what=f"a task to write its pid to {path.name}"))


def workers(app_or_port):
    resp = call(app_or_port, "GET", "/status")
    assert resp.status == 200, resp
    return resp.body["workers"]


def run_pid_job(app):
    """Run a `pid` job to its end: the pid of the worker process that ran it."""
    job = wait_for_status(app, submit(app, "pid")["id"], valet.COMPLETED)
    return result_of(app, job["id"])


def assert_refilled(app, old_pid, replaced=1):
    """The slot of the worker process `old_pid` has a new process: a job completes on
    it, and /status counts the replacement (and no abandoned worker)."""
    new_pid = run_pid_job(app)
    assert new_pid != old_pid
    assert workers(app) == {"type": "process", "busy": 0, "total": 1, "abandoned": 0,
                            "pids": [new_pid], "replaced": replaced}
    assert f"\nvalet_worker_processes_replaced_total {replaced}\n" in app.metrics_text()


# -- stopping a task

def test_spinning_task_times_out_at_once_and_its_process_is_killed_and_replaced(
        process_app, tmp_path):
    app = process_app(worker_pool={"kill_grace": 0.5})
    before = workers(app)
    assert before["type"] == "process" and before["replaced"] == 0
    job_id = submit(app, "spin", {"pidfile": str(tmp_path / "pid")}, timeout=0.3)["id"]
    spinner = read_pid(tmp_path / "pid")
    assert before["pids"] == [spinner]  # the process start() made ran it
    failed = wait_for_status(app, job_id, valet.FAILED)
    assert failed["failure_reason"] == "timed out after 0.3 seconds"
    # FAILED at the deadline, not once the process is killed (kill_grace later)
    took = epoch(failed["completed_at"]) - epoch(failed["started_at"])
    assert 0.3 <= took < 0.3 + 0.4, took
    wait_until(lambda: gone(spinner), what=f"the spinning process {spinner} to end")
    assert_refilled(app, spinner)


def test_task_leaking_past_max_memory_per_child_fails_with_memory_error_and_is_replaced(
        process_app):
    app = process_app(worker_pool={"max_memory_per_child": 64})
    [leaker] = workers(app)["pids"]
    failed = wait_for_status(app, submit(app, "leak")["id"], valet.FAILED)
    assert failed["failure_reason"].startswith("MemoryError"), failed["failure_reason"]
    assert "worker_pool.max_memory_per_child" in failed["failure_reason"]
    assert "64 MB" in failed["failure_reason"]
    wait_until(lambda: gone(leaker), what=f"the leaking process {leaker} to end")
    assert_refilled(app, leaker)


def test_worker_process_exiting_with_code_7_fails_its_job_and_is_replaced(process_app):
    app = process_app()
    [exited] = workers(app)["pids"]
    failed = wait_for_status(app, submit(app, "exit7")["id"], valet.FAILED)
    assert failed["failure_reason"] == \
        "the worker process running the job exited with code 7"
    assert call(app, "GET", "/status").status == 200  # the server is still up
    assert gone(exited)  # reaped before its job was failed
    assert_refilled(app, exited)


def test_worker_process_killed_from_outside_fails_its_job_naming_sigkill(process_app,
                                                                         tmp_path):
    app = process_app()
    job_id = submit(app, "wait_for_file", {"pidfile": str(tmp_path / "pid"),
                                              "file": str(tmp_path / "never")})["id"]
    victim = read_pid(tmp_path / "pid")
    os.kill(victim, signal.SIGKILL)
    failed = wait_for_status(app, job_id, valet.FAILED)
    assert failed["failure_reason"] == ("the worker process running the job was killed by "
                                        "SIGKILL (kill -9, or the out-of-memory killer)")
    assert gone(victim)
    assert_refilled(app, victim)


def test_a_worker_process_killed_while_idle_is_replaced_without_failing_a_job(
        process_app, option):
    app = process_app(option)
    [idle] = workers(app)["pids"]
    os.kill(idle, signal.SIGKILL)
    wait_until(lambda: not alive(idle), what=f"the idle process {idle} to end")
    assert_refilled(app, idle)  # the next job completes, on a new process
    assert gone(idle)  # (reaped, when valet found it dead)


def test_a_result_too_big_for_max_memory_per_child_fails_naming_the_limit(process_app):
    app = process_app(worker_pool={"max_memory_per_child": 64})
    [worker] = workers(app)["pids"]
    failed = wait_for_status(app, submit(app, "big", {"mb": 40})["id"], valet.FAILED)
    assert failed["failure_reason"].startswith("MemoryError"), failed["failure_reason"]
    assert failed["failure_reason"].endswith(
        "(the worker process reached worker_pool.max_memory_per_child, 64 MB)")
    assert_refilled(app, worker)


def test_a_cancel_sent_right_behind_its_job_reaches_the_task(fault_tasks, tmp_path):
    child = valet._Child({"path": sys.path, "memory_limit": None},
                         pickle.dumps(fault_tasks.TASKS))
    try:
        assert child.ready(30) is None
        job = {"task": "cooperative", "context": True, "attempt": 1, "deadline": None,
               "args": [{"pidfile": str(tmp_path / "pid")}]}
        for i in range(50):  # the cancel frame may be read before the task begins
            child.send({**job, "id": f"job-{i}"})
            child.send({"cancel": True})
            answer = child.inbox.get(timeout=10)  # (the task waits 30 s if not told)
            assert answer == {"outcome": [valet.COMPLETED, "stopped", None, None]}, i
    finally:
        child.kill()


def test_cancel_of_a_task_ignoring_it_answers_at_once_then_kills_and_replaces_its_process(
        process_app, tmp_path):
    app = process_app(worker_pool={"kill_grace": 1})
    job_id = submit(app, "stubborn", {"pidfile": str(tmp_path / "pid"),
                                         "seen": str(tmp_path / "seen")})["id"]
    stubborn = read_pid(tmp_path / "pid")
    began = time.monotonic()
    resp = call(app, "POST", f"/jobs/{job_id}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED, resp
    assert time.monotonic() - began < 0.8  # not once the process is killed
    assert job_status(app, job_id) == valet.CANCELLED
    assert not gone(stubborn)  # it has kill_grace (1 s) to return
    wait_until(lambda: (tmp_path / "seen").exists(),
                  what="the task to see its context.cancelled set")
    wait_until(lambda: gone(stubborn), what=f"the stubborn process {stubborn} to end")
    assert_refilled(app, stubborn)
    assert job_status(app, job_id) == valet.CANCELLED


def test_cancel_of_a_cooperative_task_keeps_its_process_for_the_next_job(process_app,
                                                                         option, tmp_path):
    app = process_app(option, worker_pool={"kill_grace": 5})  # a kill: a long wait
    job_id = submit(app, "cooperative", {"pidfile": str(tmp_path / "pid")})["id"]
    worker = read_pid(tmp_path / "pid")
    resp = call(app, "POST", f"/jobs/{job_id}/cancel")
    assert resp.status == 200 and resp.body["status"] == valet.CANCELLED, resp
    began = time.monotonic()
    assert run_pid_job(app) == worker  # the same process runs the next job
    assert time.monotonic() - began < 4  # not after a kill_grace of 5 s
    assert workers(app) == {"type": "process", "busy": 0, "total": 1, "abandoned": 0,
                            "pids": [worker], "replaced": 0}
    assert job_status(app, job_id) == valet.CANCELLED


# -- recycling

def test_max_jobs_per_child_recycles_the_process_after_that_many_jobs(process_app):
    app = process_app(worker_pool={"max_jobs_per_child": 2})
    ids = [submit(app, "pid")["id"] for _ in range(5)]
    for job_id in ids:
        wait_for_status(app, job_id, valet.COMPLETED)
    a1, a2, b1, b2, c = [result_of(app, job_id) for job_id in ids]
    assert a1 == a2 and b1 == b2, [a1, a2, b1, b2, c]
    assert len({a1, b1, c}) == 3, [a1, a2, b1, b2, c]
    assert workers(app)["pids"] == [c] and workers(app)["replaced"] == 2
    assert gone(a1) and gone(b1)


def test_a_job_cancelled_as_the_last_before_recycling_still_recycles_the_process(
        process_app, tmp_path):
    app = process_app(worker_pool={"max_jobs_per_child": 2, "kill_grace": 5})
    first = run_pid_job(app)
    job_id = submit(app, "cooperative", {"pidfile": str(tmp_path / "pid")})["id"]
    assert read_pid(tmp_path / "pid") == first
    assert call(app, "POST", f"/jobs/{job_id}/cancel").status == 200
    second = run_pid_job(app)  # the cancelled job was the process's second: a new one
    assert second != first and run_pid_job(app) == second
    assert run_pid_job(app) not in (first, second)  # and recycling goes on


# -- the same as worker threads

def test_process_task_reports_progress_and_sees_its_context(process_app, option, tmp_path):
    app = process_app(option)
    submitted = time.time()
    job_id = submit(app, "progress", {"file": str(tmp_path / "go")}, timeout=30)["id"]
    running = wait_until(
        lambda: (job := call(app, "GET", f"/jobs/{job_id}").body)["progress"] and job,
        what="the progress report")
    assert running["status"] == valet.IN_PROGRESS
    assert running["progress"] == {"fraction": 0.5, "message": "half"}
    (tmp_path / "go").touch()
    done = wait_for_status(app, job_id, valet.COMPLETED)
    assert done["progress"] is None  # shown while it runs only
    result = result_of(app, job_id)
    assert result["job_id"] == job_id and result["attempt"] == 1
    assert submitted + 30 <= result["deadline"] <= time.time() + 30


def test_process_pipeline_passes_the_previous_result(process_app, option):
    app = process_app(option)
    pipeline = submit_pipeline(app, stage("double", {"n": 21}),
                                  stage("previous", "mine", use_previous_results=True))
    done = wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    assert job_statuses(done) == [valet.COMPLETED, valet.COMPLETED]
    assert result_of(app, done["jobs"][1]["id"]) == {"metadata": "mine",
                                                        "previous": {"n": 42}}


def test_process_task_failing_its_first_attempt_completes_on_its_retry(process_app, option,
                                                                       tmp_path):
    app = process_app(option)
    runs = tmp_path / "runs"
    job_id = submit(app, "flaky", {"runs": str(runs)}, max_retries=1,
                       retry_backoff=0)["id"]
    done = wait_for_status(app, job_id, valet.COMPLETED)
    assert done["attempts"] == 2
    assert result_of(app, job_id) == {"attempt": 2, "runs": 2}
    assert runs.read_text() == "1\n2\n"


@pytest.mark.parametrize("task, detail", [("returns_nan", "Out of range float values"),
                                          ("returns_set", "set is not JSON serializable")])
def test_process_task_returning_what_json_cannot_hold_fails(process_app, option, task,
                                                            detail):
    app = process_app(option)
    failed = wait_for_status(app, submit(app, task)["id"], valet.FAILED)
    assert failed["failure_reason"].startswith(
        "the task's result is not JSON-serialisable"), failed["failure_reason"]
    assert detail in failed["failure_reason"]
    assert workers(app)["replaced"] == 0  # the process goes on
    assert run_pid_job(app) == workers(app)["pids"][0]


def test_process_task_raising_fails_with_its_reason_and_traceback(process_app, option,
                                                                  fault_tasks):
    app = process_app(option)
    failed = wait_for_status(app, submit(app, "raises")["id"], valet.FAILED)
    assert failed["failure_reason"] == "ValueError: bad input"
    trace = failed["failure_traceback"]
    assert f'File "{fault_tasks.__file__}"' in trace and ", in raises" in trace
    assert 'raise ValueError("bad input")  # the line failure_traceback shows' in trace
    assert workers(app)["replaced"] == 0


@pytest.fixture(params=["thread", "process"])
def worker_type(request):
    return request.param


def test_priorities_order_the_queue_with_either_worker_type(process_app, worker_type,
                                                            tmp_path):
    app = process_app(worker_pool={"worker_type": worker_type})
    blocker = submit(app, "wait_for_file", {"pidfile": str(tmp_path / "pid"),
                                            "file": str(tmp_path / "go")})
    read_pid(tmp_path / "pid")  # the one worker is busy: the next jobs queue
    order = tmp_path / "order"
    jobs = [submit(app, "record", {"file": str(order), "line": line}, priority=priority)
            for line, priority in (("low", 0), ("high", 5), ("middle", 2))]
    (tmp_path / "go").touch()
    for job in [blocker, *jobs]:
        wait_for_status(app, job["id"], valet.COMPLETED)
    assert order.read_text().split() == ["high", "middle", "low"]


def test_a_timed_out_attempt_is_retried_with_either_worker_type(process_app, worker_type,
                                                                 tmp_path):
    app = process_app(worker_pool={"worker_type": worker_type, "workers": 2})
    job = submit(app, "cooperative", {"pidfile": str(tmp_path / "pid")}, timeout=0.3,
                 max_retries=1, retry_backoff=0)
    failed = wait_for_status(app, job["id"], valet.FAILED)
    assert failed["attempts"] == 2 and failed["failure_reason"] == \
        "timed out after 0.3 seconds"
    assert wait_for_status(app, submit(app, "double", {"n": 2})["id"], valet.COMPLETED)


def test_a_periodic_entry_runs_its_jobs_in_worker_processes(fault_tasks):
    app = valet.Valet({"server": {"port": 0}, "storage": {"option": "memory"},
                       "worker_pool": {"workers": 1, "worker_type": "process"},
                       "periodic": [{"name": "tick", "task_name": "pid", "every": 1}]},
                      tasks=fault_tasks.TASKS).start()
    try:
        [worker] = workers(app)["pids"]
        fired = wait_until(lambda: app.list_jobs(task_name="pid")["jobs"], timeout=10,
                           what="the entry to fire (after 1 s)")
        done = wait_for_status(app, fired[0]["id"], valet.COMPLETED)
        assert result_of(app, done["id"]) == worker  # run by the worker process
    finally:
        app.stop(1)


def test_cancelling_a_running_pipeline_with_either_worker_type(process_app, worker_type,
                                                              tmp_path):
    app = process_app(worker_pool={"worker_type": worker_type})
    pipeline = submit_pipeline(
        app, stage("cooperative", {"pidfile": str(tmp_path / "pid")}),
        stage("double", {"n": 1}))
    read_pid(tmp_path / "pid")
    resp = call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")
    assert resp.status == 200 and job_statuses(resp.body) == [valet.CANCELLED] * 2
    assert wait_for_status(app, submit(app, "double", {"n": 2})["id"], valet.COMPLETED)
    results = call(app, "GET", f"/jobs/{pipeline['jobs'][0]['id']}/results")
    assert results.status == 404  # its late result discarded
    assert workers(app)["abandoned"] == 0  # (it returned: its thread, or process, goes on)


# -- config

@pytest.mark.parametrize("key, value", [("max_jobs_per_child", 2),
                                        ("max_memory_per_child", 64), ("kill_grace", 5)])
def test_process_only_keys_with_worker_threads_are_a_config_error(key, value):
    with pytest.raises(valet.ConfigError, match=f"worker_pool.{key}"):
        valet.load_config({"worker_pool": {"worker_type": "thread", key: value}})
    assert valet.load_config({"worker_pool": {"worker_type": "process", key: value}})[
        f"worker_pool.{key}"] == value
    default = valet._SCHEMA[f"worker_pool.{key}"][0]  # (as config.yaml writes it)
    assert valet.load_config({"worker_pool": {key: default}})[f"worker_pool.{key}"] \
        == default


def test_a_worker_stopping_its_task_counts_as_busy(process_app, tmp_path):
    app = process_app(worker_pool={"kill_grace": 30})
    job_id = submit(app, "spin", {"pidfile": str(tmp_path / "pid")}, timeout=0.2)["id"]
    spinner = read_pid(tmp_path / "pid")
    wait_for_status(app, job_id, valet.FAILED)
    assert workers(app)["busy"] == 1 and alive(spinner)  # told, not yet killed
    waiting = submit(app, "pid")["id"]
    assert job_status(app, waiting) == valet.PENDING
    os.kill(spinner, signal.SIGKILL)  # (rather than wait 30 s): the worker is free
    wait_for_status(app, waiting, valet.COMPLETED)
    assert workers(app)["busy"] == 0


def test_a_lambda_task_in_process_mode_is_a_config_error_naming_it(fault_tasks):
    before = children_of(os.getpid())
    with pytest.raises(valet.ConfigError, match="task 'anonymous' cannot be"):
        valet.Valet({"server": {"port": 0}, "storage": {"option": "memory"},
                     "worker_pool": {"workers": 1, "worker_type": "process"}},
                    tasks={"pid": fault_tasks.pid, "anonymous": lambda metadata: None})
    assert children_of(os.getpid()) <= before  # no worker process was started


def test_a_tasks_module_that_no_longer_loads_holds_jobs_back_until_it_does(
        process_app, tmp_path, caplog):
    folder = tmp_path / "mod"
    folder.mkdir()
    module = folder / "valet_reloaded_tasks.py"
    module.write_text("def version(metadata):\n    return 1\n")
    sys.path.insert(0, str(folder))
    try:
        importlib.invalidate_caches()
        tasks = importlib.import_module("valet_reloaded_tasks")
        app = valet.Valet({"server": {"port": 0}, "storage": {"option": "memory"},
                           "worker_pool": {"workers": 1, "worker_type": "process",
                                           "max_jobs_per_child": 1}},
                          tasks={"version": tasks.version}).start()
        try:
            first = wait_for_status(app, submit(app, "version")["id"], valet.COMPLETED)
            module.write_text("def version(metadata)\n")  # broken (the process that
            job_id = submit(app, "version")["id"]             # ran `first` is replaced)
            wait_until(lambda: "could not load the tasks" in caplog.text,
                       what="the broken module to be logged")
            assert job_status(app, job_id) == valet.PENDING  # held back, not failed
            module.write_text("def version(metadata):\n    return 2  # mended\n")
            wait_for_status(app, job_id, valet.COMPLETED)
            assert result_of(app, first["id"]) == 1 and result_of(app, job_id) == 2
        finally:
            app.stop(1)
    finally:
        sys.path.remove(str(folder))


# -- a real valet.py

@pytest.fixture
def valet_process(fault_tasks, tmp_path):
    """A function that starts a real `python valet.py` in process mode (Process),
    run from another folder than that of its config and tasks module; the valet is
    killed at the end if still running."""
    started = []

    def start(**worker_pool):
        (tmp_path / "valet_fault_tasks.py").write_text(FAULT_TASKS)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        started.append(Process(
            tmp_path, run_in=elsewhere, tasks_module="valet_fault_tasks",
            worker_pool={"workers": 2, "worker_type": "process", **worker_pool}))
        return started[-1]

    yield start
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def test_real_valet_in_process_mode_logs_task_prints_and_exits_0_on_sigterm_killing_its_children(
        valet_process, tmp_path):
    grace, kill_grace = 0.5, 0.3
    proc = valet_process(shutdown_grace=grace, kill_grace=kill_grace)
    assert proc.logged("workers: 2 processes")
    post(proc.port, "shout", {"text": "a task's print reaches valet's stderr"})
    wait_until(lambda: proc.logged("a task's print reaches valet's stderr"),
                  what="the task's print on valet's stderr")
    spinning = post(proc.port, "spin", {"pidfile": str(tmp_path / "pid")})
    spinner = read_pid(tmp_path / "pid")
    pids = workers(proc.port)["pids"]
    assert spinner in pids and set(pids) == children_of(proc.proc.pid)
    signalled = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(grace + kill_grace + 5) == 0
    assert time.monotonic() - signalled < grace + kill_grace + 3
    assert not [pid for pid in pids if alive(pid)]
    proc.reader.join(10)
    assert proc.lines[-1].endswith("valet stopped\n"), proc.lines[-3:]
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert store.get(spinning)["status"] == valet.FAILED
    finally:
        store.close()


def test_worker_processes_of_a_sigkilled_valet_exit_on_their_own(valet_process, tmp_path):
    proc = valet_process(kill_grace=0.3)
    post(proc.port, "spin", {"pidfile": str(tmp_path / "pid")})
    spinner = read_pid(tmp_path / "pid")
    pids = workers(proc.port)["pids"]
    assert spinner in pids and len(pids) == 2
    proc.proc.kill()
    proc.proc.wait(10)
    wait_until(lambda: not [pid for pid in pids if alive(pid)], timeout=5,
                  what=f"the worker processes {pids} of the killed valet to exit")


# ---------------------------------------------------------------- scheduler --

def test_scheduler_tick_runs_due_actions_in_time_order_and_survives_a_failing_one():
    scheduler = valet._Scheduler(clock=FakeClock(100))
    done = []
    scheduler.at(30, done.append, "c")
    scheduler.at(10, done.append, "a")
    scheduler.at(20, lambda: 1 / 0)
    scheduler.at(20, done.append, "b")
    scheduler.at(40, done.append, "d")
    assert scheduler.tick(30) == 4
    assert done == ["a", "b", "c"] and scheduler.next_due() == 40


def test_job_with_future_run_at_is_scheduled_until_due_then_runs(make_app, ran):
    clock = FakeClock()
    app = make_app(clock=clock)
    job = submit(app, "echo", "later", run_at=at(clock, 60))
    assert job["status"] == valet.SCHEDULED and job["run_at"] == at(clock, 60)
    listed = call(app, "GET", "/jobs?status=scheduled").body["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    assert app.scheduler.tick(clock.advance(59.999)) == 0
    assert job_status(app, job["id"]) == valet.SCHEDULED
    assert app.scheduler.tick(clock.advance(0.001)) == 1
    done = app.wait(job["id"], 10)
    assert done["status"] == valet.COMPLETED and ran == ["later"]


def test_run_at_in_the_past_means_now(app):
    job = submit(app, "echo", run_at="2000-01-01T00:00:00Z")
    assert job["status"] == valet.PENDING and job["run_at"] == "2000-01-01T00:00:00.000000Z"
    assert app.wait(job["id"], 10)["status"] == valet.COMPLETED


def test_scheduler_sleeps_until_due_and_wakes_for_an_earlier_job(app):
    late = submit(app, "echo", run_at=valet._rfc3339(time.time() + 3600))
    due = time.time() + 0.2
    soon = submit(app, "echo", run_at=valet._rfc3339(due))
    done = app.wait(soon["id"], 10)
    assert done["status"] == valet.COMPLETED
    lateness = epoch(done["started_at"]) - epoch(done["run_at"])
    assert 0 <= lateness < 1  # started at run_at, not at the next poll (there is none)
    assert job_status(app, late["id"]) == valet.SCHEDULED


# -- periodic entries

MINUTELY = {"name": "minutely", "task_name": "echo", "every": 60}


NIGHTLY = {"name": "nightly", "task_name": "echo", "cron": "0 3 * * *"}


def utc(*args):
    """Epoch seconds of a UTC date and time: utc(2026, 1, 1, 12, 30)."""
    return datetime.datetime(*args, tzinfo=datetime.timezone.utc).timestamp()


def next_run(app, name):
    """The next_run_at GET /periodic gives for the entry `name`."""
    entries = call(app, "GET", "/periodic").body["periodic"]
    return next(e["next_run_at"] for e in entries if e["name"] == name)


def listed_jobs(app):
    return call(app, "GET", "/jobs").body["jobs"]


def fire(app, name, due, then):
    """Tick the app's scheduler at `due` and wait for the firing to have planned the
    next one, at `then` (the scheduler's own thread may be the one that fires)."""
    app.scheduler.tick(due)
    wait_until(lambda: next_run(app, name) == valet._rfc3339(then),
               what=f"{name} to plan its next firing at {valet._rfc3339(then)}")


@pytest.mark.parametrize("periodic, message", [
    (5, "periodic: 5 is not allowed; expected a list of entries"),
    (MINUTELY, 'periodic: {"name": "minutely", "task_name": "echo", "every": 60} is not '
               "allowed; expected a list"),
    (["minutely"], 'periodic[0]: "minutely" is not allowed; expected a mapping'),
    ([{**MINUTELY, "run_at": "2027-01-01T00:00:00Z"}], "periodic[0].run_at: unknown key"),
    ([{"task_name": "echo", "every": 60}],
     "periodic[0].name: null is not allowed; expected a non-empty string"),
    ([{**MINUTELY, "name": " "}], 'periodic[0].name: " " is not allowed'),
    ([MINUTELY, NIGHTLY, {**NIGHTLY, "cron": "0 4 * * *"}],
     "periodic[2].name: 'nightly' is used by an earlier entry"),
    ([{**NIGHTLY, "every": 60}], "periodic[0]: give cron or every, not both"),
    ([{"name": "n", "task_name": "echo"}], "periodic[0]: give cron or every: when its jobs"),
    ([{**NIGHTLY, "cron": "0 3 * *"}], "periodic[0].cron: expected five fields"),
    ([{**NIGHTLY, "cron": "0 3 * * * *"}], "periodic[0].cron: expected five fields"),
    ([{**NIGHTLY, "cron": "60 * * * *"}],
     "periodic[0].cron: minute field '60' is out of range: minute runs from 0 to 59"),
    ([{**NIGHTLY, "cron": "0 24 * * *"}], "periodic[0].cron: hour field '24' is out of range"),
    ([{**NIGHTLY, "cron": "0 0 0 * *"}],
     "periodic[0].cron: day of month field '0' is out of range"),
    ([{**NIGHTLY, "cron": "0 0 * 13 *"}], "periodic[0].cron: month field '13' is out of range"),
    ([{**NIGHTLY, "cron": "0 0 * * 8"}],
     "periodic[0].cron: day of week field '8' is out of range"),
    ([{**NIGHTLY, "cron": "*/0 * * * *"}],
     "periodic[0].cron: minute field '*/0' has a step outside 1 to 59"),
    ([{**NIGHTLY, "cron": "5-1 * * * *"}],
     "periodic[0].cron: minute field '5-1' is a range that runs backwards"),
    ([{**NIGHTLY, "cron": "@daily"}], "periodic[0].cron: expected five fields (minute hour "
                                      "day-of-month month day-of-week), got 1 (shortcuts "
                                      "such as @daily are not supported)"),
    ([{**NIGHTLY, "cron": "*/x * * * *"}],
     "periodic[0].cron: minute field '*/x' is not a number, *, a range"),
    ([{**NIGHTLY, "cron": "0 3 * * MON"}], "periodic[0].cron: day of week field 'MON' is "
     "not a number, *, a range a-b, a step /n or a list of those (names such as MON are "
     "not supported: use numbers)"),
    ([{**NIGHTLY, "cron": "1,,2 * * * *"}], "periodic[0].cron: minute field ''"),
    ([{**NIGHTLY, "cron": "*-5 * * * *"}], "periodic[0].cron: minute field '*-5'"),
    ([{**NIGHTLY, "cron": "0 0 30 2 *"}], "periodic[0].cron: '0 0 30 2 *' never matches a date"),
    ([{**NIGHTLY, "cron": "0 0 31 4,6,9,11 *"}], "periodic[0].cron: '0 0 31 4,6,9,11 *'"),
    ([{**NIGHTLY, "cron": 5}], "periodic[0].cron: 5 is not a cron expression"),
    ([MINUTELY, {**NIGHTLY, "cron": "0 3 * *"}], "periodic[1].cron: expected five fields"),
    ([{**MINUTELY, "every": "5 parsecs"}], 'periodic[0].every: "5 parsecs" is not an interval'),
    ([{**MINUTELY, "every": True}], "periodic[0].every: true is not an interval"),
    ([{**MINUTELY, "every": 0}],
     "periodic[0].every: 0 is not allowed; an interval runs from 1 second to a year"),
    ([{**MINUTELY, "every": -60}], "periodic[0].every: -60 is not allowed"),
    ([{**MINUTELY, "every": 0.5}], "periodic[0].every: 0.5 is not allowed"),
    ([{**MINUTELY, "every": "0.5s"}], 'periodic[0].every: "0.5s" is not allowed'),
    ([{**MINUTELY, "every": "999ms"}], 'periodic[0].every: "999ms" is not allowed'),
    ([{**MINUTELY, "every": "367d"}], 'periodic[0].every: "367d" is not allowed'),
])
def test_invalid_periodic_entry_is_a_config_error_naming_entry_and_field(periodic, message):
    with pytest.raises(valet.ConfigError) as caught:
        valet.load_config({"periodic": periodic})
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("change, message", [
    ({"task_name": "nope"}, "periodic[1]: task_name 'nope' is not a registered task; "
                            "registered tasks: echo"),
    ({"task_name": None}, "periodic[1]: task_name must be a string, got null"),
    ({"description": 5}, "periodic[1]: description must be a string or null, got 5"),
    ({"timeout": 0}, "periodic[1]: timeout must be a number greater than 0"),
    ({"priority": "high"}, "periodic[1]: priority must be an integer"),
    ({"max_retries": 101}, "periodic[1]: max_retries must be an integer from 0 to 100"),
    ({"retry_backoff": -1}, "periodic[1]: retry_backoff must be a number of seconds"),
])
def test_periodic_job_fields_are_checked_when_valet_is_built(change, message):
    config = valet.load_config({"storage": {"option": "memory"},
                                "periodic": [NIGHTLY, {**MINUTELY, **change}]})
    with pytest.raises(valet.ConfigError) as caught:
        valet.Valet(config, tasks={"echo": print})
    assert str(caught.value).startswith(message), str(caught.value)


@pytest.mark.parametrize("metadata", [{"since": datetime.date(2026, 1, 1)},
                                      {"ratio": float("nan")}],
                         ids=["yaml-date", "nan"])
def test_periodic_metadata_that_json_cannot_carry_is_a_config_error(metadata):
    """A YAML date or .nan in metadata must stop valet at start: else every firing of
    a date fails, and a NaN job makes GET /jobs answer 500."""
    with pytest.raises(valet.ConfigError, match=r"^periodic\[0\]\.metadata"):
        config = valet.load_config({"storage": {"option": "memory"},
                                    "periodic": [{**MINUTELY, "metadata": metadata}]})
        valet.Valet(config, tasks={"echo": print}).stop()


def test_periodic_config_accepts_every_documented_form():
    entries = [
        {"name": "quarterly", "task_name": "echo", "cron": "*/15 * * * *"},
        {"name": "weekdays", "task_name": "echo", "cron": "0 3 * * 1-5",
         "description": "d", "metadata": {"k": [1]}, "timeout": 5, "priority": -3,
         "max_retries": 1, "retry_backoff": 0},
        {"name": "mixed", "task_name": "echo", "cron": "0,30 8-18/2 1 1,7 0,7"},
        {"name": "leap", "task_name": "echo", "cron": "0 0 29 2 *"},
        {"name": "seconds", "task_name": "echo", "every": 90},
        {"name": "ms", "task_name": "echo", "every": "1500ms"},
        {"name": "days", "task_name": "echo", "every": "1d"},
    ]
    config = valet.load_config({"storage": {"option": "memory"}, "periodic": entries})
    assert config["periodic"] == entries
    for periodic, names in [(entries, [e["name"] for e in entries]),
                            (None, [])]:  # `periodic:` with every entry commented out
        app = valet.Valet(valet.load_config({"storage": {"option": "memory"},
                                             "periodic": periodic}), tasks={"echo": print})
        try:
            assert [e["name"] for e in app.periodic()] == names
        finally:
            app.stop()


# 2026-01-01 is a Thursday.
@pytest.mark.parametrize("cron, after, expected", [
    ("*/15 * * * *", utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 12, 15)),  # strictly after
    ("*/15 * * * *", utc(2026, 1, 1, 12, 14, 59, 999000), utc(2026, 1, 1, 12, 15)),
    ("*/15 * * * *", utc(2026, 1, 1, 12, 50, 10), utc(2026, 1, 1, 13, 0)),
    ("* * * * *", utc(2026, 1, 1, 12, 0, 0, 500000), utc(2026, 1, 1, 12, 1)),  # whole minute
    ("1-5 * * * *", utc(2026, 1, 1, 12, 2, 30), utc(2026, 1, 1, 12, 3)),
    ("1-5 * * * *", utc(2026, 1, 1, 12, 5), utc(2026, 1, 1, 13, 1)),
    ("10-20/5 * * * *", utc(2026, 1, 1, 12, 10), utc(2026, 1, 1, 12, 15)),
    ("10-20/5 * * * *", utc(2026, 1, 1, 12, 20), utc(2026, 1, 1, 13, 10)),
    ("1,2,3 * * * *", utc(2026, 1, 1, 12, 1), utc(2026, 1, 1, 12, 2)),
    ("1,2,3 * * * *", utc(2026, 1, 1, 12, 3), utc(2026, 1, 1, 13, 1)),
    ("0 1,2,3 * * *", utc(2026, 1, 1, 3, 0), utc(2026, 1, 2, 1, 0)),
    ("30 2 * * *", utc(2026, 1, 1, 1, 0), utc(2026, 1, 1, 2, 30)),
    ("30 2 * * *", utc(2026, 1, 1, 2, 30), utc(2026, 1, 2, 2, 30)),
    ("0 0 1 * *", utc(2026, 1, 31, 23, 59), utc(2026, 2, 1)),  # month boundary
    ("0 0 31 * *", utc(2026, 4, 1), utc(2026, 5, 31)),  # April has no 31st
    ("*/10 * * * *", utc(2026, 12, 31, 23, 55), utc(2027, 1, 1)),  # year boundary
    ("0 0 1 1 *", utc(2026, 6, 1), utc(2027, 1, 1)),
    ("0 0 29 2 *", utc(2026, 3, 1), utc(2028, 2, 29)),  # the next leap year
    ("0 12 * 2-3 *", utc(2026, 3, 31, 12, 0), utc(2027, 2, 1, 12, 0)),
])
def test_cron_next_after_is_the_first_matching_minute_strictly_after(cron, after, expected):
    assert valet._Cron(cron).next_after(after) == expected


@pytest.mark.parametrize("cron, after, expected", [
    ("0 0 * * 0", utc(2026, 1, 1), utc(2026, 1, 4)),  # Sunday is 0 ...
    ("0 0 * * 7", utc(2026, 1, 1), utc(2026, 1, 4)),  # ... and 7
    ("0 0 * * 1-5", utc(2026, 1, 2), utc(2026, 1, 5)),  # Friday -> Monday
    # Both restricted: a day matches if either does.
    ("0 0 13 * 5", utc(2026, 1, 1), utc(2026, 1, 2)),  # a Friday, not the 13th
    ("0 0 13 * 5", utc(2026, 1, 10), utc(2026, 1, 13)),  # the 13th, a Tuesday
    ("0 0 30 2 1", utc(2026, 1, 1), utc(2026, 2, 2)),  # no 30 February, but Mondays
    # One is *: the other alone decides.
    ("0 0 13 * *", utc(2026, 1, 1), utc(2026, 1, 13)),
    ("0 0 * * 5", utc(2026, 1, 2), utc(2026, 1, 9)),
    # A field starting with * counts as unrestricted: here both must match.
    ("0 0 */10 * 1", utc(2026, 1, 1), utc(2026, 5, 11)),  # the 11th and a Monday
])
def test_cron_day_of_month_and_day_of_week_follow_vixie_rules(cron, after, expected):
    assert valet._Cron(cron).next_after(after) == expected


@pytest.mark.parametrize("cron, last, now, expected", [
    ("*/15 * * * *", utc(2026, 1, 1, 12, 0), utc(2026, 1, 1, 12, 44, 59),
     utc(2026, 1, 1, 12, 30)),
    ("*/15 * * * *", utc(2026, 1, 1, 12, 30), utc(2026, 1, 1, 12, 44, 59), None),
    ("*/15 * * * *", utc(2026, 1, 1, 12, 29, 59), utc(2026, 1, 1, 12, 30),
     utc(2026, 1, 1, 12, 30)),  # at now counts
    ("30 2 * * *", utc(2026, 1, 1, 2, 30), utc(2026, 1, 4, 10, 0), utc(2026, 1, 4, 2, 30)),
    ("0 0 1 * *", utc(2026, 1, 1), utc(2026, 3, 15), utc(2026, 3, 1)),
    ("0 0 1 1 *", utc(2025, 1, 1), utc(2026, 1, 1, 0, 0, 30), utc(2026, 1, 1)),
])
def test_cron_latest_is_the_last_due_time_after_last_and_at_or_before_now(cron, last, now,
                                                                         expected):
    assert valet._Cron(cron).latest(last, now) == expected


@pytest.mark.parametrize("every, seconds", [
    (60, 60), (1, 1), (2.5, 2.5), ("90", 90), ("1500ms", 1.5), ("1000ms", 1), ("30s", 30),
    ("5m", 300), ("1.5m", 90), ("2h", 7200), ("1d", 86400),
])
def test_every_takes_seconds_or_a_number_and_a_unit(every, seconds):
    assert valet._Every(every).seconds == seconds
    assert valet._Every(every).next_after(1000) == 1000 + seconds


def test_next_due_counts_from_the_last_firing_and_fires_a_backlog_once():
    every = valet._Every(60)
    assert valet._next_due(every, 1000, 1000) == 1060
    assert valet._next_due(every, 1000, 1059.9) == 1060
    assert valet._next_due(every, 1000, 1060) == 1060
    assert valet._next_due(every, 1000, 1359) == 1300  # five missed: the latest, once
    cron = valet._Cron("*/15 * * * *")
    assert valet._next_due(cron, utc(2026, 1, 1, 12, 30), utc(2026, 1, 1, 12, 44)) \
        == utc(2026, 1, 1, 12, 45)
    assert valet._next_due(cron, utc(2026, 1, 1, 11, 0), utc(2026, 1, 1, 12, 44)) \
        == utc(2026, 1, 1, 12, 30)


def test_every_latest_counts_a_single_missed_firing():
    every = valet._Every(60)
    assert every.latest(1000, 1059.9) is None
    assert every.latest(1000, 1060) == 1060
    assert every.latest(1000, 1119) == 1060


def test_a_late_firing_keeps_the_entry_on_its_beat(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, periodic=[MINUTELY])
    due = clock.now + 60
    fire(app, "minutely", clock.advance(90), then=due + 60)  # fired 30 s late


def test_every_entry_fires_one_ordinary_job_per_due_time(make_app, ran):
    clock = FakeClock()
    app = make_app(clock=clock, periodic=[{
        **MINUTELY, "description": "a beat", "metadata": {"beat": 1}, "timeout": 30,
        "priority": 5, "max_retries": 2, "retry_backoff": 0.5}])
    assert app.scheduler.tick(clock.now) == 0  # not due at start
    assert listed_jobs(app) == []
    due = clock.advance(60)
    fire(app, "minutely", due, then=due + 60)
    [job] = listed_jobs(app)
    assert {k: job[k] for k in ("name", "description", "task_name", "metadata", "timeout",
                                "priority", "max_retries", "retry_backoff", "run_at")} == {
        "name": "minutely", "description": "a beat", "task_name": "echo",
        "metadata": {"beat": 1}, "timeout": 30, "priority": 5, "max_retries": 2,
        "retry_backoff": 0.5, "run_at": None}
    assert epoch(job["created_at"]) == due
    assert wait_for_status(app, job["id"], valet.COMPLETED)["attempts"] == 1
    assert ran == [{"beat": 1}]
    assert app.scheduler.tick(clock.now) == 0  # the same time again: nothing more
    assert [j["id"] for j in listed_jobs(app)] == [job["id"]]
    assert epoch(next_run(app, "minutely")) == due + 60


def test_get_periodic_lists_entries_with_their_next_run_and_last_firing(make_app):
    clock = FakeClock()  # 2027-01-15T08:00:00Z
    app = make_app(clock=clock, periodic=[MINUTELY, {**NIGHTLY, "cron": "30 2 * * *"}])
    assert call(app, "GET", "/periodic").body == {"periodic": [
        {"name": "minutely", "task_name": "echo", "cron": None, "every": 60,
         "next_run_at": "2027-01-15T08:01:00.000000Z", "last_fired_at": None},
        {"name": "nightly", "task_name": "echo", "cron": "30 2 * * *", "every": None,
         "next_run_at": "2027-01-16T02:30:00.000000Z", "last_fired_at": None}]}
    fire(app, "minutely", clock.advance(60), then=utc(2027, 1, 15, 8, 2))
    assert next_run(app, "minutely") == "2027-01-15T08:02:00.000000Z"
    assert next_run(app, "nightly") == "2027-01-16T02:30:00.000000Z"
    entries = call(app, "GET", "/periodic").body["periodic"]
    assert [e["last_fired_at"] for e in entries] == ["2027-01-15T08:01:00.000000Z", None]


def test_cron_entry_fires_on_its_minutes_through_the_app(make_app):
    clock = FakeClock(utc(2027, 3, 10, 12, 3, 30))
    app = make_app(clock=clock, periodic=[{**NIGHTLY, "name": "five", "cron": "*/5 * * * *"}])
    assert next_run(app, "five") == "2027-03-10T12:05:00.000000Z"
    clock.now = utc(2027, 3, 10, 12, 5)
    fire(app, "five", clock.now, then=utc(2027, 3, 10, 12, 10))
    [job] = listed_jobs(app)
    assert job["name"] == "five" and epoch(job["created_at"]) == utc(2027, 3, 10, 12, 5)
    clock.now = utc(2027, 3, 10, 12, 9, 59)
    assert app.scheduler.tick(clock.now) == 0
    clock.now = utc(2027, 3, 10, 12, 10)
    fire(app, "five", clock.now, then=utc(2027, 3, 10, 12, 15))
    assert len(listed_jobs(app)) == 2


def test_a_firing_the_store_refuses_is_retried_and_later_firings_follow(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, start=False, periodic=[MINUTELY])
    app.lifecycle.store = Flaky(app.lifecycle.store, "add")
    app.recover()
    first = clock.advance(60)
    app.scheduler.tick(first)  # the store fails once: the firing is retried, not lost
    assert app.lifecycle.store.failed
    assert len(app.lifecycle.store.list()) == 1
    assert valet._parse_time(app.periodic()[0]["next_run_at"]) == first + 60
    app.scheduler.tick(clock.advance(60))
    assert len(app.lifecycle.store.list()) == 2


@pytest.fixture
def sqlite_app(tmp_path):
    """Valets on one SQLite file in tmp_path, built one after another as restarts."""
    apps = []

    def make(clock, periodic, start=True):
        config = valet.load_config(
            {"storage": {"sqlite": {"path": str(tmp_path / "valet.db")}}, "periodic": periodic},
            {"server.port": 0, "worker_pool.workers": 1})
        app = valet.Valet(config, tasks=make_tasks(Gate(), []), clock=clock)
        apps.append(app)
        if start:
            app.start()
            app.scheduler.stop()  # only the test's ticks run what is due
        return app

    yield make
    for app in apps:
        app.stop()


@pytest.mark.parametrize("delay", [0, 30])
def test_periodic_firing_is_not_repeated_by_a_restart(sqlite_app, delay):
    clock = FakeClock()
    first = sqlite_app(clock, [MINUTELY])
    due = clock.advance(60)
    fire(first, "minutely", due, then=due + 60)
    [job] = listed_jobs(first)
    wait_for_status(first, job["id"], valet.COMPLETED)
    first.stop()

    clock.advance(delay)
    second = sqlite_app(clock, [MINUTELY])
    assert epoch(next_run(second, "minutely")) == due + 60  # on the first run's beat
    assert second.scheduler.tick(clock.now) == 0
    assert [j["id"] for j in listed_jobs(second)] == [job["id"]]
    fire(second, "minutely", clock.advance(60 - delay), then=due + 120)
    assert len(listed_jobs(second)) == 2


def test_firing_missed_while_down_runs_once_at_start(sqlite_app):
    clock = FakeClock()
    first = sqlite_app(clock, [MINUTELY])
    due = clock.advance(60)
    fire(first, "minutely", due, then=due + 60)
    [old] = listed_jobs(first)
    first.stop()

    restart = clock.advance(5 * 60)  # five due times pass while valet is down
    second = sqlite_app(clock, [MINUTELY])
    fire(second, "minutely", restart, then=restart + 60)
    jobs = listed_jobs(second)
    assert [j["id"] for j in jobs][0] == old["id"] and len(jobs) == 2
    assert epoch(jobs[1]["created_at"]) == restart
    wait_for_status(second, jobs[1]["id"], valet.COMPLETED)
    assert epoch(next_run(second, "minutely")) > clock.now


def test_a_second_valet_on_one_sqlite_file_is_refused_until_the_first_stops(sqlite_app):
    clock = FakeClock()
    first = sqlite_app(clock, [MINUTELY], start=False)
    with pytest.raises(valet.StoreInUse, match=rf"in use by valet pid {os.getpid()}"):
        sqlite_app(clock, [MINUTELY], start=False)
    first.stop()
    second = sqlite_app(clock, [MINUTELY], start=False)  # the lock went with the first
    second.recover()
    due = clock.advance(60)
    second.scheduler.tick(due)
    assert len(second.lifecycle.store.list()) == 1


# ------------------------------------------------------------------ metrics --

# -- a strict parser of the Prometheus text format 0.0.4

class ExpositionError(ValueError):
    pass


class Family:
    def __init__(self):
        self.type, self.help, self.samples = None, None, []  # samples: (name, labels, value)


_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_FLOAT = r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|Inf)|NaN"
_HELP_LINE = re.compile(rf"#[ \t]+HELP[ \t]+({_NAME})(?:[ \t]+((?:[^\\]|\\[\\n])*))?")
_TYPE_LINE = re.compile(rf"#[ \t]+TYPE[ \t]+({_NAME})[ \t]+"
                        r"(counter|gauge|histogram|summary|untyped)")
_SAMPLE_NAME = re.compile(_NAME)
_SAMPLE_TAIL = re.compile(rf"[ \t]+({_FLOAT})(?:[ \t]+(-?\d+))?")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}


def _labels(line, i, where):
    """The label set that starts at line[i] (just after "{"), and the index after "}"."""
    labels = {}
    while line[i:i + 1] != "}":
        found = _LABEL_NAME.match(line, i)
        if not found or line[found.end():found.end() + 2] != '="':
            raise ExpositionError(f"{where}: a label name and =\" expected at {i}")
        name, i, chars = found[0], found.end() + 2, []
        while line[i:i + 1] != '"':
            if i >= len(line):
                raise ExpositionError(f"{where}: label value not closed")
            if line[i] == "\\":
                if line[i + 1:i + 2] not in _ESCAPES:
                    raise ExpositionError(f"{where}: bad escape {line[i:i + 2]!r}")
                chars.append(_ESCAPES[line[i + 1]])
                i += 2
            else:
                chars.append(line[i])
                i += 1
        if name in labels:
            raise ExpositionError(f"{where}: label {name!r} given twice")
        labels[name], i = "".join(chars), i + 1
        if line[i:i + 1] == ",":
            i += 1
        elif line[i:i + 1] != "}":
            raise ExpositionError(f"{where}: , or }} expected after a label at {i}")
    return labels, i + 1


def _family_of(name, families):
    for suffix in ("_bucket", "_sum", "_count"):
        base = name[:-len(suffix)]
        if name.endswith(suffix) and base in families and families[base].type in _SUFFIXES:
            return base
    return name


def _check_histogram(family_name, family):
    groups = collections.defaultdict(lambda: {"buckets": [], "_sum": None, "_count": None})
    for name, labels, value in family.samples:
        group = groups[frozenset((k, v) for k, v in labels.items() if k != "le")]
        if name.endswith("_bucket"):
            if not re.fullmatch(_FLOAT, labels["le"]):
                raise ExpositionError(f"{family_name}: bad le {labels['le']!r}")
            group["buckets"].append((float(labels["le"]), value))
        else:
            group[name[len(family_name):]] = value
    for key, group in groups.items():
        bounds, counts = zip(*group["buckets"]) if group["buckets"] else ((), ())
        what = f"{family_name}{dict(key)}"
        if not bounds or bounds[-1] != math.inf:
            raise ExpositionError(f"{what}: the last bucket is not le=\"+Inf\"")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ExpositionError(f"{what}: buckets not in increasing le order")
        if any(not a >= 0 or a > b for a, b in zip(counts, counts[1:] + (math.inf,))):
            raise ExpositionError(f"{what}: bucket counts not cumulative")
        if group["_sum"] is None or group["_count"] is None:
            raise ExpositionError(f"{what}: _sum or _count missing")
        if counts[-1] != group["_count"]:
            raise ExpositionError(f"{what}: +Inf bucket {counts[-1]} != _count "
                                  f"{group['_count']}")


def parse_exposition(text):
    """{family name: Family} of a text in the Prometheus text format 0.0.4, or
    ExpositionError for anything in it that is not valid."""
    if not text.endswith("\n"):
        raise ExpositionError("the text does not end with a newline")
    families, closed, series, current = {}, set(), set(), None

    def enter(name, where):
        nonlocal current
        if name != current:
            if name in closed:
                raise ExpositionError(f"{where}: the lines of {name} are not together")
            closed.add(current)
            current = name
        return families.setdefault(name, Family())

    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number} {line!r}"
        if help_line := _HELP_LINE.fullmatch(line):
            family = enter(help_line[1], where)
            if family.help is not None:
                raise ExpositionError(f"{where}: a second HELP")
            family.help = re.sub(r"\\(.)", lambda m: _ESCAPES[m[1]], help_line[2] or "")
        elif line.startswith("#"):
            type_line = _TYPE_LINE.fullmatch(line)
            if not type_line:
                raise ExpositionError(f"{where}: neither HELP nor TYPE")
            name, kind = type_line[1], type_line[2]
            if any(name + s in families for s in _SUFFIXES.get(kind, ()) if s):
                raise ExpositionError(f"{where}: TYPE after its samples")
            family = enter(name, where)
            if family.type is not None or family.samples:
                raise ExpositionError(f"{where}: a second TYPE, or TYPE after samples")
            family.type = kind
        else:
            found = _SAMPLE_NAME.match(line)
            if not found:
                raise ExpositionError(f"{where}: not a sample")
            name, labels, end = found[0], {}, found.end()
            if line[end:end + 1] == "{":
                labels, end = _labels(line, end + 1, where)
            tail = _SAMPLE_TAIL.fullmatch(line, end)
            if not tail:
                raise ExpositionError(f"{where}: a value (and timestamp) expected")
            value = float(tail[1])
            family_name = _family_of(name, families)
            family = enter(family_name, where)
            kind = family.type or "untyped"
            if name not in [family_name + s for s in _SUFFIXES.get(kind, ("",))]:
                raise ExpositionError(f"{where}: {name} in a {kind} family {family_name}")
            if kind == "histogram" and ("le" in labels) != name.endswith("_bucket"):
                raise ExpositionError(f"{where}: le only and always on a bucket")
            if (name, frozenset(labels.items())) in series:
                raise ExpositionError(f"{where}: a duplicate series")
            series.add((name, frozenset(labels.items())))
            if kind == "counter" and not value >= 0:
                raise ExpositionError(f"{where}: a counter below 0")
            family.samples.append((name, labels, value))
    for name, family in families.items():
        if family.type == "histogram":
            _check_histogram(name, family)
    return families


# -- metrics: helpers

def scrape(app, headers=None):
    """GET /metrics: (status, headers, body text)."""
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers=headers or {})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode("utf-8")
    finally:
        conn.close()


def metrics(app, headers=None):
    status, _, text = scrape(app, headers)
    assert status == 200, (status, text)
    return parse_exposition(text)


def metrics_when(app, expect, timeout=10.0):
    """The parsed /metrics once expect(it) is true, or the last one after `timeout`
    (the test's assertion then shows what differs)."""
    deadline = time.monotonic() + timeout
    while True:
        exposition = metrics(app)
        if expect(exposition) or time.monotonic() > deadline:
            return exposition
        time.sleep(0.002)


def values(exposition, name, *keys):
    """{label values in the order of `keys` (one key: the value alone): value} of the
    samples named `name`."""
    family = exposition[_family_of(name, exposition)]
    found = {}
    for sample, labels, value in family.samples:
        if sample == name:
            assert set(labels) == set(keys), (name, labels)
            at = tuple(labels[key] for key in keys)
            found[at[0] if len(keys) == 1 else at] = value
    return found


def one(exposition, name):
    return values(exposition, name)[()]


def jobs_by_status(exposition):
    return values(exposition, "valet_jobs", "status")


def expected_jobs(**counts):
    return {status: counts.get(status, 0) for status in valet.STATUSES}


def stored_counts(app):
    """The jobs in the store by status, counted one by one."""
    found = collections.Counter(job["status"] for job in app._store.list(limit=10_000))
    return {status: found[status] for status in valet.STATUSES}


def finished(exposition):
    return values(exposition, "valet_jobs_finished_total", "task", "outcome")


def finished_zeros(app):
    return {(task, outcome): 0 for task in app.tasks
            for outcome in ("completed", "failed", "timed_out", "cancelled")}


def in_a_day():
    return valet._rfc3339(time.time() + DAY)


def busy_for(seconds):
    """A task that works (spins) for `seconds`."""
    def task(metadata):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            pass
        return metadata
    return task


def noop(metadata):
    return metadata


# -- metrics: the tests

HIST = """\
# HELP h A histogram
# TYPE h histogram
h_bucket{t="a",le="0.5"} 1
h_bucket{t="a",le="+Inf"} 2
h_sum{t="a"} 0.75
h_count{t="a"} 2
"""


def test_parser_reads_a_valid_exposition_with_escapes_and_timestamps():
    text = ('# HELP c A \\\\ counter\\nof things\n# TYPE c counter\n'
            'c{a="q\\"uo\\\\te\\nnl",b=""} 3 1700000000000\nc{a="x",} 1.5e3\n'
            'u NaN\n# TYPE g gauge\ng -Inf\n' + HIST)
    families = parse_exposition(text)
    assert list(families) == ["c", "u", "g", "h"]
    assert families["c"].help == "A \\ counter\nof things"
    assert families["c"].samples == [("c", {"a": 'q"uo\\te\nnl', "b": ""}, 3.0),
                                     ("c", {"a": "x"}, 1500.0)]
    assert families["u"].type is None and math.isnan(families["u"].samples[0][2])
    assert families["g"].samples == [("g", {}, -math.inf)]
    assert values(families, "h_count", "t") == {"a": 2}


@pytest.mark.parametrize("text, problem", [
    ('# TYPE c counter\nc{a="b"c"} 1\n', ", or }"),                    # unescaped quote
    ('# TYPE c counter\nc{a="b\\t"} 1\n', "bad escape"),
    ('# TYPE c counter\nc{a="b} 1\n', "not closed"),
    (HIST.replace('le="+Inf"} 2', 'le="+Inf"} 0'), "not cumulative"),  # it decreases
    (HIST.replace("h_count{t=\"a\"} 2", "h_count{t=\"a\"} 3"), "!= _count"),
    (HIST.replace('le="+Inf"', 'le="9"'), "+Inf"),
    (HIST.replace('le="0.5"} 1', 'le="1"} 0\nh_bucket{t="a",le="0.5"} 1'), "increasing le"),
    (HIST.replace('h_sum{t="a"} 0.75\n', ""), "_sum or _count missing"),
    (HIST + 'h{t="b"} 1\n', "in a histogram family"),
    (HIST.replace('h_sum{t="a"}', 'h_sum{t="a",le="1"}'), "le only"),
    ("# TYPE c counter\nc 1\nc 2\n", "duplicate series"),
    ('# TYPE c counter\nc{a="1",b="2"} 1\nc{b="2",a="1"} 2\n', "duplicate series"),
    ("c 1\n# TYPE c counter\n", "TYPE after samples"),                  # TYPE after
    ("# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\na 2\n", "not together"),  # interleaved
    ("# TYPE a gauge\n# TYPE b gauge\n# HELP a x\n", "not together"),
    ("h_bucket{le=\"1\"} 1\n# TYPE h histogram\n", "TYPE after its samples"),
    ("# TYPE c counter\n# TYPE c counter\n", "second TYPE"),
    ("# HELP c a\n# HELP c b\n", "second HELP"),
    ("# HELP c bad \\t escape\n", "neither HELP nor TYPE"),
    ("# TYPE c counter\nc -1\n", "below 0"),
    ("# TYPE c histogramm\n", "neither HELP nor TYPE"),
    ("# a comment\n", "neither HELP nor TYPE"),
    ("c 1\n\nd 1\n", "not a sample"),
    ("1c 1\n", "not a sample"),
    ("c{1a=\"x\"} 1\n", "label name"),
    ("c{a=\"x\",a=\"y\"} 1\n", "given twice"),
    ("c 1_000\n", "value"), ("c 0x10\n", "value"), ("c infinity\n", "value"),
    ("c 1 2.5\n", "value"), ("c\n", "value"),
    ("c 1", "newline"),
])
def test_parser_rejects_invalid_exposition(text, problem):
    with pytest.raises(ExpositionError, match=re.escape(problem)):
        parse_exposition(text)


def test_metrics_is_prometheus_text_with_every_metric_named_valet(app):
    status, headers, text = scrape(app)
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = parse_exposition(text)
    assert [(name, f.type, f.help) for name, f in families.items()] == list(valet._METRICS)
    assert all(name.startswith("valet_") for name in families)
    assert all(line.startswith(("valet_", "# HELP valet_", "# TYPE valet_"))
               for line in text.splitlines())


def test_jobs_by_status_match_the_jobs_stored(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    done, failed = submit(app), submit(app, "fail")
    wait_for_status(app, done["id"], valet.COMPLETED)
    wait_for_status(app, failed["id"], valet.FAILED)
    cancelled_job(app)
    submit(app, run_at=in_a_day())
    submit(app, "gate")
    assert gate.entered.wait(10)
    submit(app)  # waits behind the gate
    expected = expected_jobs(COMPLETED=1, FAILED=1, CANCELLED=1, SCHEDULED=1,
                             IN_PROGRESS=1, PENDING=1)
    assert stored_counts(app) == expected
    assert jobs_by_status(metrics(app)) == expected
    assert call(app, "GET", "/status").body["jobs"] == expected
    gate.opened.set()
    wait_until(lambda: stored_counts(app) == expected_jobs(
        COMPLETED=3, FAILED=1, CANCELLED=1, SCHEDULED=1), what="the queue to empty")
    assert jobs_by_status(metrics(app)) == stored_counts(app)


@SQLITE_ONLY
def test_sqlite_job_counts_survive_a_restart_and_are_rebuilt_in_a_file_without_them(
        make_app, storage):
    first = make_app()
    for task, status in (("echo", valet.COMPLETED), ("echo", valet.COMPLETED),
                         ("fail", valet.FAILED)):
        wait_for_status(first, submit(first, task)["id"], status)
    cancelled_job(first)
    submit(first, run_at=in_a_day())
    expected = expected_jobs(COMPLETED=2, FAILED=1, CANCELLED=1, SCHEDULED=1)
    assert jobs_by_status(metrics(first)) == expected
    first.stop()
    second = make_app()
    assert jobs_by_status(metrics(second)) == expected
    second.stop()
    with contextlib.closing(sqlite3.connect(storage["storage"]["sqlite"]["path"],
                                            isolation_level=None)) as conn:
        for trigger in ("count_added", "count_moved", "count_deleted"):
            conn.execute(f"DROP TRIGGER {trigger}")
        conn.execute("DROP TABLE job_counts")  # as a file from an older valet
    third = make_app()
    assert jobs_by_status(metrics(third)) == expected
    wait_for_status(third, submit(third)["id"], valet.COMPLETED)  # its triggers count
    assert jobs_by_status(metrics(third)) == {**expected, "COMPLETED": 3}


@SQLITE_ONLY
def test_sqlite_job_counts_are_made_whole_when_one_trigger_is_missing(make_app, storage):
    first = make_app()
    wait_for_status(first, submit(first)["id"], valet.COMPLETED)
    first.stop()
    with contextlib.closing(sqlite3.connect(storage["storage"]["sqlite"]["path"],
                                            isolation_level=None)) as conn:
        conn.execute("DROP TRIGGER count_added")
        conn.execute("INSERT INTO jobs (id, name, task_name, metadata, status, created_at) "
                     "VALUES ('uncounted', 'n', 'echo', 'null', 'FAILED', 0)")
    second = make_app()
    assert jobs_by_status(metrics(second)) == expected_jobs(COMPLETED=1, FAILED=1)
    submit(second, run_at=in_a_day())  # counted: the trigger is back
    assert jobs_by_status(metrics(second)) == expected_jobs(COMPLETED=1, FAILED=1,
                                                            SCHEDULED=1)


def test_deleting_jobs_lowers_their_counts(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, **{"retention.finished_jobs": "1h"})
    done = [submit(app) for _ in range(3)]
    failed = [submit(app, "fail") for _ in range(2)]
    for job in done:
        wait_for_status(app, job["id"], valet.COMPLETED)
    for job in failed:
        wait_for_status(app, job["id"], valet.FAILED)
    cancelled_job(app, clock)
    assert jobs_by_status(metrics(app)) == expected_jobs(COMPLETED=3, FAILED=2, CANCELLED=1)
    assert call(app, "DELETE", f"/jobs/{done[0]['id']}").status == 204
    assert jobs_by_status(metrics(app)) == expected_jobs(COMPLETED=2, FAILED=2, CANCELLED=1)
    assert call(app, "DELETE", "/jobs?status=FAILED").body == {"deleted": 2}
    assert jobs_by_status(metrics(app)) == expected_jobs(COMPLETED=2, CANCELLED=1)
    clock.advance(3601)
    assert app.sweep() == 3
    assert jobs_by_status(metrics(app)) == expected_jobs() == stored_counts(app)


def test_submitted_counts_jobs_of_posts_and_pipelines_not_replays(app):
    zeros = {task: 0 for task in app.tasks}
    assert values(metrics(app), "valet_jobs_submitted_total", "task") == zeros
    submit(app), submit(app)
    body = {"name": "k", "task_name": "fail", "metadata": None}
    assert [keyed(app, "/jobs", body, "job-key").status for _ in range(2)] == [202, 200]
    submit_pipeline(app, stage(), stage("returns_set"), stage("returns_set"))
    pipeline = {"name": "p", "jobs": [stage("returns_nan"), stage("returns_nan")]}
    assert [keyed(app, "/pipelines", pipeline, "pipe-key").status
            for _ in range(2)] == [202, 200]
    assert values(metrics(app), "valet_jobs_submitted_total", "task") == {
        **zeros, "echo": 3, "fail": 1, "returns_set": 2, "returns_nan": 2}


def test_finished_counts_each_outcome_by_task(make_app, gate):
    app = started_with_fake_deadlines(
        make_app, tasks={"a": noop, "b": noop, "c": noop, "d": noop, "e": noop},
        **{"worker_pool.workers": 1})
    done, failed = submit(app), submit(app, "fail")
    wait_for_status(app, done["id"], valet.COMPLETED)
    wait_for_status(app, failed["id"], valet.FAILED)
    failing = submit_pipeline(app, stage("fail"), stage("e"))  # e is cancelled with it
    wait_for_pipeline(app, failing["id"], valet.FAILED)
    stuck = submit(app, "gate", timeout=5)
    assert gate.entered.wait(10)
    pending = submit(app, "a")  # waits behind the gate
    assert call(app, "POST", f"/jobs/{pending['id']}/cancel").status == 200
    scheduled = submit(app, "b", run_at=in_a_day())
    assert call(app, "POST", f"/jobs/{scheduled['id']}/cancel").status == 200
    pipeline = submit_pipeline(app, stage("c"), stage("d"), stage("d"), run_at=in_a_day())
    assert call(app, "POST", f"/pipelines/{pipeline['id']}/cancel").status == 200
    assert app.pool.tick(1000.0 + 5) == 1
    timed_out = wait_for_status(app, stuck["id"], valet.FAILED)
    assert timed_out["failure_reason"].startswith("timed out after")
    expected = {**finished_zeros(app), ("echo", "completed"): 1, ("fail", "failed"): 2,
                ("gate", "timed_out"): 1, ("a", "cancelled"): 1, ("b", "cancelled"): 1,
                ("c", "cancelled"): 1, ("d", "cancelled"): 2, ("e", "cancelled"): 1}
    assert finished(metrics_when(app, lambda m: finished(m) == expected)) == expected


def test_retries_count_automatic_retries_and_retries_by_request(make_app):
    app = make_app(tasks={"flaky": failing_until(2)})
    zeros = {task: 0 for task in app.tasks}
    assert values(metrics(app), "valet_job_retries_total", "task") == zeros
    flaky = submit(app, "flaky", max_retries=1, retry_backoff=0)
    assert wait_for_status(app, flaky["id"], valet.COMPLETED)["attempts"] == 2
    failed = submit(app, "fail")
    wait_for_status(app, failed["id"], valet.FAILED)
    assert call(app, "POST", f"/jobs/{failed['id']}/retry").status == 200
    wait_until(lambda: (lambda job: (job["attempts"], job["status"]) == (2, valet.FAILED))(
        call(app, "GET", f"/jobs/{failed['id']}").body), what="its second attempt to fail")
    assert values(metrics(app), "valet_job_retries_total", "task") == {
        **zeros, "flaky": 1, "fail": 1}


def test_run_and_wait_histograms_count_each_attempt_of_a_task(make_app):
    app = make_app(tasks={"work": busy_for(0.002)})
    jobs = [submit(app, "work") for _ in range(3)]
    for job in jobs:
        wait_for_status(app, job["id"], valet.COMPLETED)

    def counts(m):
        return (values(m, "valet_job_run_seconds_count", "task"),
                values(m, "valet_job_wait_seconds_count", "task"))
    found = metrics_when(app, lambda m: counts(m) == ({"work": 3}, {"work": 3}))
    assert counts(found) == ({"work": 3}, {"work": 3})
    assert values(found, "valet_job_run_seconds_sum", "task")["work"] >= 3 * 0.002 > 0
    assert values(found, "valet_job_wait_seconds_sum", "task")["work"] >= 0
    for name in ("valet_job_run_seconds", "valet_job_wait_seconds"):
        bounds = [float(labels["le"]) for sample, labels, _ in found[name].samples
                  if sample.endswith("_bucket")]
        assert bounds == [*map(float, valet._BUCKETS[name]), math.inf]


def test_oldest_waiting_age_is_0_until_a_job_waits_behind_a_busy_worker(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})

    def oldest():
        return (one(metrics(app), "valet_oldest_waiting_job_age_seconds"),
                call(app, "GET", "/status").body["queue"]["oldest_waiting_seconds"])

    def aged():
        found = oldest()
        return found[0] > 0 and found
    assert oldest() == (0, None)
    submit(app, "gate")
    assert gate.entered.wait(10)
    assert oldest() == (0, None)  # running is not waiting
    waiting = submit(app)
    _, status_age = wait_until(aged, what="the waiting job to age")
    assert isinstance(status_age, (int, float)) and status_age > 0
    found = metrics(app)
    assert [one(found, name) for name in ("valet_workers", "valet_workers_busy",
                                          "valet_queue_depth")] == [1, 1, 1]
    gate.opened.set()
    wait_for_status(app, waiting["id"], valet.COMPLETED)
    assert oldest() == (0, None)


def test_http_requests_are_counted_by_route_pattern_never_by_raw_path(app):
    jobs = [submit(app), submit(app)]
    for job in jobs:
        assert call(app, "GET", f"/jobs/{job['id']}").status == 200
    assert call(app, "GET", "/no/such/path").status == 404
    assert call(app, "GET", f"/jobs/{jobs[0]['id']}/nothing-here").status == 404

    def requests(m):
        return values(m, "valet_http_requests_total", "method", "route", "code")

    def durations(m):
        return values(m, "valet_http_request_duration_seconds_count", "method", "route")

    def agree(m):
        by_route = collections.Counter()
        for (method, route, _), n in requests(m).items():
            by_route[method, route] += n
        return dict(by_route) == durations(m)

    want = {("POST", "/jobs", "202"): 2, ("GET", "/jobs/{id}", "200"): 2,
            ("GET", "other", "404"): 2}
    found = metrics_when(app, lambda m: want.items() <= requests(m).items() and agree(m))
    assert {key: n for key, n in requests(found).items() if key in want} == want
    assert {key for key in requests(found)} - set(want) <= {("GET", "/metrics", "200")}
    assert agree(found), (requests(found), durations(found))
    assert durations(found)["GET", "/jobs/{id}"] == 2
    _, _, text = scrape(app)
    assert not any(job["id"] in text for job in jobs)
    assert "no/such" not in text and "nothing-here" not in text


def test_methods_http_does_not_define_are_counted_as_other_not_by_their_name(app):
    """A client may send any token as a method: as a label value each would make a new
    series (and histogram) for as long as valet runs."""
    methods = ["BREW", "X-1", "QUERY2"]
    for method in methods:
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        try:
            conn.request(method, "/jobs")
            assert conn.getresponse().status in (405, 501)
        finally:
            conn.close()

    def by_method(m):
        found = collections.Counter()
        for (method, _, _), n in values(m, "valet_http_requests_total", "method", "route",
                                        "code").items():
            found[method] += n
        return found
    found = metrics_when(app, lambda m: sum(by_method(m).values()) >= 3)
    assert set(by_method(found)) & set(methods) == set()
    assert by_method(found)["other"] == 3
    text = scrape(app)[2]
    assert not any(f'method="{method}"' in text for method in methods)


@SQLITE_ONLY
def test_storage_errors_rise_while_the_store_fails_and_metrics_still_answers(make_app):
    app = make_app()
    assert one(metrics(app), "valet_storage_errors_total") == 0
    with Fault(app.lifecycle.store, "read-only"):
        assert call(app, "POST", "/jobs", {"name": "n", "task_name": "echo",
                                           "metadata": None}).status == 503
        status, _, text = scrape(app)
        assert status == 200
        failing = parse_exposition(text)
        assert one(failing, "valet_storage_errors_total") >= 1
        assert jobs_by_status(failing) == expected_jobs()  # the counts can be read
    errors = one(failing, "valet_storage_errors_total")
    assert one(metrics(app), "valet_storage_errors_total") == errors  # never goes down


def test_metrics_answers_without_job_counts_while_they_cannot_be_read(app):
    submit(app, run_at=in_a_day())
    app.lifecycle.store = Flaky(app.lifecycle.store, "counts")
    failing = metrics(app)
    assert app.lifecycle.store.failed
    assert failing["valet_jobs"].type == "gauge" and failing["valet_jobs"].samples == []
    assert set(failing) == {name for name, _, _ in valet._METRICS}
    assert jobs_by_status(metrics(app)) == expected_jobs(SCHEDULED=1)  # and once it works


def test_start_time_is_when_the_app_was_built_and_info_has_the_version(make_app):
    before = time.time()
    app = make_app()
    after = time.time()
    found = metrics(app)
    assert before <= one(found, "valet_process_start_time_seconds") <= after
    assert values(found, "valet_info", "version") == {valet.__version__: 1}


def test_metrics_needs_the_token_like_every_route(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    status, headers, _ = scrape(app)
    assert status == 401 and headers["WWW-Authenticate"].startswith('Bearer realm="valet"')
    status, _, text = scrape(app, {"Authorization": "Bearer " + "x" * len(TOKEN)})
    assert status == 401 and TOKEN not in text
    assert "valet_jobs" in metrics(app, AUTH)


WEIRD = 'we"ird\\name\nand {le="1"}'  # a quote, a backslash, a newline, braces


def test_a_task_name_that_needs_escaping_is_given_back_exactly(make_app):
    app = make_app(tasks={WEIRD: noop})
    job = call(app, "POST", "/jobs", {"name": "weird", "task_name": WEIRD, "metadata": 1})
    assert job.status == 202, job
    wait_for_status(app, job.body["id"], valet.COMPLETED)
    found = metrics_when(app, lambda m: finished(m)[WEIRD, "completed"] == 1 and
                         values(m, "valet_job_run_seconds_count", "task") == {WEIRD: 1})
    assert values(found, "valet_jobs_submitted_total", "task")[WEIRD] == 1
    assert finished(found)[WEIRD, "completed"] == 1
    assert values(found, "valet_job_run_seconds_count", "task") == {WEIRD: 1}
    _, _, text = scrape(app)
    assert 'task="we\\"ird\\\\name\\nand {le=\\"1\\"}"' in text


# --------------------------------------------------------------------- HTTP --

def test_post_job_answers_202_with_every_field_and_location(app):
    resp = call(app, "POST", "/jobs", {"name": "n", "description": "d", "task_name": "gate",
                                       "metadata": {"a": [1, 2]}, "timeout": 30})
    assert resp.status == 202
    job = resp.body
    assert list(job) == list(valet.JOB_FIELDS)
    assert re.fullmatch(r"[0-9a-f-]{36}", job["id"])
    assert resp.headers["Location"] == f"/jobs/{job['id']}"
    assert job["name"] == "n" and job["description"] == "d" and job["timeout"] == 30
    assert job["metadata"] == {"a": [1, 2]}
    assert job["status"] == valet.PENDING
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", job["created_at"])
    assert job["started_at"] is job["completed_at"] is job["duration"] is None
    assert call(app, "GET", f"/jobs/{job['id']}").body["name"] == "n"


def test_job_runs_and_its_result_is_readable(app):
    job = submit(app, "echo", {"x": 1})
    done = wait_for_status(app, job["id"], valet.COMPLETED)
    assert done["started_at"] and done["completed_at"] and done["duration"] >= 0
    assert done["failure_reason"] is None
    resp = call(app, "GET", f"/jobs/{job['id']}/results")
    assert resp.status == 200
    assert resp.body == {"job_id": job["id"], "metadata": {"x": 1}, "error": None}


@pytest.mark.parametrize("method, path", [
    ("GET", "/jobs/{id}"), ("PATCH", "/jobs/{id}"), ("DELETE", "/jobs/{id}"),
    ("GET", "/jobs/{id}/results"), ("DELETE", "/jobs/{id}/results"),
    ("POST", "/jobs/{id}/cancel"),
])
def test_unknown_job_id_is_404(app, method, path):
    resp = call(app, method, path.format(id="no-such-job"), body={"name": "x"})
    assert resp.status == 404
    assert resp.body == {"error": True, "code": 404, "message": "job 'no-such-job' not found"}


def test_unknown_path_is_404_and_wrong_method_is_405_with_allow(app):
    resp = call(app, "GET", "/nothing/here")
    assert resp.status == 404 and resp.body["message"] == "no such path: /nothing/here"
    resp = call(app, "PUT", "/jobs")
    assert resp.status == 405
    assert resp.headers["Allow"] == "POST, GET, HEAD, DELETE"
    resp = call(app, "POST", "/jobs/some-id")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, HEAD, PATCH, DELETE"


def test_routes_also_answer_under_api_prefix(app):
    resp = call(app, "POST", "/api/jobs", {"name": "n", "task_name": "echo"})
    assert resp.status == 202
    assert resp.headers["Location"] == f"/api/jobs/{resp.body['id']}"
    assert call(app, "GET", resp.headers["Location"]).body["id"] == resp.body["id"]
    assert call(app, "GET", "/api/tasks").status == 200
    assert call(app, "GET", "/api/status").status == 200


def test_pipeline_routes_also_answer_under_api_prefix(app):
    resp = call(app, "POST", "/api/pipelines", {"name": "p", "jobs": [stage(), stage()]})
    assert resp.status == 202
    assert resp.headers["Location"] == f"/api/pipelines/{resp.body['id']}"
    assert call(app, "GET", resp.headers["Location"]).body["id"] == resp.body["id"]


@pytest.mark.parametrize("method, path", [
    ("GET", "/pipelines/{id}"), ("PATCH", "/pipelines/{id}"), ("DELETE", "/pipelines/{id}"),
    ("GET", "/pipelines/{id}/jobs"), ("POST", "/pipelines/{id}/cancel"),
])
def test_unknown_pipeline_id_is_404(app, method, path):
    resp = call(app, method, path.format(id="no-such-pipeline"), body={"name": "x"})
    assert resp.status == 404
    assert resp.body == {"error": True, "code": 404,
                         "message": "pipeline 'no-such-pipeline' not found"}


def test_pipeline_whose_jobs_vanish_between_two_reads_is_404_not_500(app):
    class JobsGone:  # the pipeline's row is read, but none of its jobs
        def __init__(self, store):
            self._store = store

        def __getattr__(self, name):
            return getattr(self._store, name)

        def get_pipeline(self, pipeline_id):
            return dict(self._store.get_pipeline(pipeline_id), jobs=[])

    pipeline = submit_pipeline(app, stage(), stage())
    app.lifecycle.store = JobsGone(app.lifecycle.store)
    for path in ("/pipelines/{id}", "/pipelines/{id}/jobs"):
        resp = call(app, "GET", path.format(id=pipeline["id"]))
        assert resp.status == 404 and "not found" in resp.body["message"]


def test_patch_changes_only_the_fields_present(app):
    job = submit(app, "gate")
    resp = call(app, "PATCH", f"/jobs/{job['id']}", {"description": "new"})
    assert resp.status == 204 and resp.body is None
    got = call(app, "GET", f"/jobs/{job['id']}").body
    assert got["description"] == "new" and got["name"] == job["name"]
    assert call(app, "PATCH", f"/jobs/{job['id']}", {"name": "renamed"}).status == 204
    got = call(app, "GET", f"/jobs/{job['id']}").body
    assert got["name"] == "renamed" and got["description"] == "new"


def test_patch_pipeline_changes_only_name_and_description(app):
    pipeline = submit_pipeline(app, stage(), stage(), description="old")
    resp = call(app, "PATCH", f"/pipelines/{pipeline['id']}", {"description": "new"})
    assert resp.status == 204 and resp.body is None
    got = get_pipeline(app, pipeline["id"])
    assert got["description"] == "new" and got["name"] == "pipeline"
    resp = call(app, "PATCH", f"/pipelines/{pipeline['id']}", {"name": "renamed"})
    assert resp.status == 204
    got = get_pipeline(app, pipeline["id"])
    assert got["name"] == "renamed" and got["description"] == "new"
    for body, message in [({"jobs": []}, "field 'jobs' cannot be changed"),
                          ({"priority": 3}, "field 'priority' cannot be changed"),
                          ({"name": "x", "nmae": "y"}, "unknown field 'nmae'"),
                          ({"name": ""}, "name must be a non-empty string")]:
        resp = call(app, "PATCH", f"/pipelines/{pipeline['id']}", body)
        assert resp.status == 400 and message in resp.body["message"], (body, resp)
    after = get_pipeline(app, pipeline["id"])
    assert after["name"] == "renamed" and after["priority"] == 0
    assert len(after["jobs"]) == 2


def test_result_is_404_until_the_job_finishes(app, gate):
    job = submit(app, "gate")
    resp = call(app, "GET", f"/jobs/{job['id']}/results")
    assert resp.status == 404 and "has not finished" in resp.body["message"]
    gate.opened.set()
    wait_for_status(app, job["id"], valet.COMPLETED)
    resp = call(app, "GET", f"/jobs/{job['id']}/results")
    assert resp.status == 200 and resp.body["metadata"] == {"gate": "passed"}


def test_result_can_be_deleted_and_the_job_stays(app):
    job = submit(app, "echo", 1)
    wait_for_status(app, job["id"], valet.COMPLETED)
    assert call(app, "DELETE", f"/jobs/{job['id']}/results").status == 204
    resp = call(app, "GET", f"/jobs/{job['id']}/results")
    assert resp.status == 404 and "was deleted" in resp.body["message"]
    assert call(app, "DELETE", f"/jobs/{job['id']}/results").status == 404
    assert job_status(app, job["id"]) == valet.COMPLETED


def test_list_filters_by_status_case_insensitively(app, gate):
    running = submit(app, "gate")
    assert gate.entered.wait(10)
    done = submit(app, "echo")
    wait_for_status(app, done["id"], valet.COMPLETED)
    resp = call(app, "GET", "/jobs?status=in_progress")
    assert resp.status == 200
    assert [j["id"] for j in resp.body["jobs"]] == [running["id"]]
    assert [j["id"] for j in call(app, "GET", "/jobs?status=Completed").body["jobs"]] == \
        [done["id"]]


def test_list_pages_through_every_job_once_in_submission_order(make_app):
    app = make_app(**{"worker_pool.queue_capacity": 100})
    ids = [submit(app, "echo", i)["id"] for i in range(25)]
    seen, cursor = [], ""
    for _ in range(4):
        resp = call(app, "GET", f"/jobs?limit=10&cursor={cursor}")
        assert resp.status == 200
        assert len(resp.body["jobs"]) <= 10
        seen += [j["id"] for j in resp.body["jobs"]]
        cursor = resp.body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids
    assert cursor is None
    assert call(app, "GET", "/jobs?limit=25").body["next_cursor"] is None  # exactly full
    assert call(app, "GET", "/jobs?limit=1000").status == 200


def test_list_page_size_defaults_to_100(make_app):
    app = make_app(**{"worker_pool.queue_capacity": 200})
    for i in range(101):
        app.submit({"name": "n", "task_name": "echo", "metadata": i})
    first = call(app, "GET", "/jobs").body
    assert len(first["jobs"]) == 100 and first["next_cursor"] is not None
    rest = call(app, "GET", f"/jobs?cursor={first['next_cursor']}").body
    assert [j["metadata"] for j in rest["jobs"]] == [100] and rest["next_cursor"] is None


def test_list_treats_empty_query_values_as_not_given(app):
    job = submit(app, "echo")
    resp = call(app, "GET", "/jobs?status=&limit=&cursor=")
    assert resp.status == 200 and [j["id"] for j in resp.body["jobs"]] == [job["id"]]


def test_list_pipelines_pages_in_submission_order_and_filters_by_status(app):
    ids = [submit_pipeline(app, stage(), stage("fail" if i in (1, 3) else "echo"))["id"]
           for i in range(5)]
    for pipeline_id in ids:
        wait_for_pipeline(app, pipeline_id, valet.COMPLETED, valet.FAILED)
    seen, cursor = [], ""
    for _ in range(4):
        resp = call(app, "GET", f"/pipelines?limit=2&cursor={cursor}")
        assert resp.status == 200 and len(resp.body["pipelines"]) <= 2
        seen += [p["id"] for p in resp.body["pipelines"]]
        cursor = resp.body["next_cursor"]
        if cursor is None:
            break
    assert seen == ids and cursor is None
    whole = call(app, "GET", "/pipelines?limit=5").body
    assert whole["next_cursor"] is None  # exactly full
    assert [list(p) for p in whole["pipelines"]] == [list(valet.PIPELINE_FIELDS)] * 5
    first = call(app, "GET", "/pipelines?status=FAILED&limit=1").body
    assert [p["id"] for p in first["pipelines"]] == [ids[1]]
    rest = call(app, "GET", f"/pipelines?status=failed&cursor={first['next_cursor']}").body
    assert [p["id"] for p in rest["pipelines"]] == [ids[3]] and rest["next_cursor"] is None
    completed = call(app, "GET", "/pipelines?status=Completed").body["pipelines"]
    assert [p["id"] for p in completed] == [ids[0], ids[2], ids[4]]
    assert call(app, "GET", "/pipelines?status=pending").body == {"pipelines": [],
                                                                 "next_cursor": None}


@pytest.mark.parametrize("path, takes", [("/jobs/{id}", "it takes wait"),
                                         ("/jobs/{id}/results", "it takes none"),
                                         ("/tasks", "it takes none"),
                                         ("/status", "it takes none")])
def test_routes_reject_query_parameters_they_do_not_take(app, path, takes):
    job = submit(app, "echo")
    resp = call(app, "GET", path.format(id=job["id"]) + "?verbose=1")
    assert resp.status == 400
    assert resp.body["message"] == f"unknown query parameter 'verbose'; {takes}"


def test_tasks_lists_registered_names_sorted(app):
    resp = call(app, "GET", "/tasks")
    assert resp.body == {"tasks": ["echo", "exits", "fail", "gate", "returns_nan",
                                   "returns_set"]}


def test_status_reports_version_storage_queue_and_workers(app, storage, gate):
    submit(app, "gate")
    assert gate.entered.wait(10)
    body = call(app, "GET", "/status").body
    assert body["version"] == valet.__version__
    assert body["storage"] == {"option": storage["storage"]["option"], "ok": True,
                               "error": None}
    assert body["queue"] == {"depth": 0, "capacity": 20, "accepting": True,
                             "oldest_waiting_seconds": None}
    assert body["workers"] == {"type": "thread", "busy": 1, "total": 2, "abandoned": 0}
    assert body["jobs"] == {**dict.fromkeys(valet.STATUSES, 0), valet.IN_PROGRESS: 1}
    assert body["time"].endswith("Z")
    assert 0 < body["uptime"] < 60


def test_store_error_on_submit_is_a_503_that_gives_back_the_backlog_place(make_app):
    app = make_app(**{"worker_pool.queue_capacity": 1, "worker_pool.workers": 1})
    app.lifecycle.store = Flaky(app.lifecycle.store, "add")
    resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo"})
    assert resp.status == 503 and resp.headers["Retry-After"] == "5"
    assert resp.body["message"] == "storage is failing: disk is full; try again later"
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0
    assert call(app, "GET", "/jobs").body["jobs"] == []
    wait_for_status(app, submit(app, "echo")["id"], valet.COMPLETED)


# -- the API's description: GET /openapi.json

def test_openapi_documents_every_route_and_nothing_else(app):
    document = call(app, "GET", "/openapi.json").body
    documented = {(method.upper(), path) for path, operations in document["paths"].items()
                  for method in operations}
    assert documented == {(method, path) for method, path, *_ in valet.ROUTES}
    assert set(valet._OPERATIONS) == documented


def test_openapi_json_is_an_openapi_3_1_document_whose_references_all_resolve(app):
    resp = call(app, "GET", "/openapi.json")
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    document = resp.body
    assert document["openapi"] == "3.1.0" and document["info"]["version"] == valet.__version__
    refs = re.findall(r'"\$ref": "#/([^"]+)"', json.dumps(document))
    assert refs
    for ref in refs:
        where = document
        for part in ref.split("/"):
            where = where[part]  # a KeyError: a reference to nothing
    ids = [op["operationId"] for ops in document["paths"].values() for op in ops.values()]
    assert len(ids) == len(set(ids))
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            query = next(q for m, p, _, q in valet.ROUTES if (m, p) == (method.upper(), path))
            named = [p["name"] for p in operation["parameters"] if p["in"] == "query"]
            assert named == list(query), f"{method} {path}"
            assert any(code.startswith("2") for code in operation["responses"])
            assert "400" in operation["responses"] and "503" in operation["responses"]


def test_periodic_entries_with_every_as_a_duration_match_the_document(make_app):
    app = make_app(periodic=[{**MINUTELY, "every": "5m"}])
    entries = call(app, "GET", "/periodic").body["periodic"]  # (checked by request())
    assert entries[0]["every"] == "5m"
    assert_matches({"periodic": entries}, {"$ref": "#/components/schemas/Periodic"})


def test_head_of_the_dashboard_needs_no_token_either(make_app):
    app = make_app(**{"server.auth_token": "s3cret-token-for-tests"})
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("HEAD", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
        conn.request("HEAD", "/status")
        assert conn.getresponse().status == 401
    finally:
        conn.close()


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
def test_last_fired_at_is_null_after_a_restart_until_the_entry_fires(make_app, tmp_path):
    clock = FakeClock()
    first = make_app(clock=clock, periodic=[MINUTELY])  # anchored now, never fired
    first.stop()
    clock.advance(30)  # restarted before its first due time: the anchor is no firing
    second = make_app(clock=clock, periodic=[MINUTELY])
    [entry] = call(second, "GET", "/periodic").body["periodic"]
    assert entry["last_fired_at"] is None


def test_openapi_names_the_registered_tasks_and_the_timeout_unit(make_app):
    app = make_app(timeout_unit="millisecond")
    schemas = call(app, "GET", "/openapi.json").body["components"]["schemas"]
    new_job = schemas["NewJob"]["properties"]
    assert new_job["task_name"]["enum"] == sorted(app.tasks)
    timeout = new_job["timeout"]["anyOf"][0]
    assert timeout["maximum"] == valet._MAX_TIMEOUT_SECONDS * 1000
    assert timeout["description"] == "in milliseconds"


def test_openapi_has_the_bearer_scheme_only_when_a_token_is_set(make_app, tmp_path):
    open_app = make_app(**{"storage.sqlite.path": str(tmp_path / "open.db")})
    assert "security" not in call(open_app, "GET", "/openapi.json").body
    app = make_app(**{"server.auth_token": "s3cret-token-for-tests"})
    assert call(app, "GET", "/openapi.json").status == 401
    document = call(app, "GET", "/openapi.json",
                    headers={"Authorization": "Bearer s3cret-token-for-tests"}).body
    assert document["security"] == [{"bearer": []}]
    assert document["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer"}}
    assert "401" in document["paths"]["/jobs"]["post"]["responses"]
    assert "s3cret" not in json.dumps(document)


def test_the_documented_schemas_find_what_does_not_match():
    job = {**dict.fromkeys(valet.JOB_FIELDS), "id": "a", "name": "n", "task_name": "echo",
           "status": "PENDING", "priority": 0, "attempts": 0, "max_retries": 0,
           "retry_backoff": 1, "created_at": "2026-12-02T10:00:00.000000Z",
           "use_previous_results": False}
    ref = {"$ref": "#/components/schemas/Job"}
    assert schema_problems(job, ref) == []
    assert schema_problems({**job, "status": "DONE"}, ref)
    assert schema_problems({**job, "extra": 1}, ref)
    assert schema_problems({**job, "created_at": "yesterday"}, ref)
    assert schema_problems({**job, "attempts": -1}, ref)
    assert schema_problems({k: v for k, v in job.items() if k != "id"}, ref)
    assert schema_problems({**job, "progress": {"fraction": 2, "message": ""}}, ref)
    with pytest.raises(AssertionError, match="is not documented"):
        check_documented("DELETE", "/jobs/x", Response(200, None, {}), "")


@pytest.mark.parametrize("storage", ["sqlite"], indirect=True)  # the default, once: slow
def test_a_property_based_tester_finds_no_server_error_and_no_undocumented_answer(
        make_app, tmp_path):
    tester = shutil.which("schemathesis")
    if tester is None:
        pytest.skip("schemathesis is not installed: pip install schemathesis (in a venv of "
                    "its own, on the PATH) to let a property-based tester try the API")
    app = make_app(**{"worker_pool.queue_capacity": 1000})
    run = subprocess.run(
        [tester, "run", f"{app.url}/openapi.json", "--checks",
         "not_a_server_error,status_code_conformance,content_type_conformance,"
         "response_schema_conformance", "--max-examples", "3", "--workers", "1",
         "--seed", "1", "--phases", "fuzzing,stateful"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_COLOR": "1", "SCHEMATHESIS_TELEMETRY": "false"})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


# -- the long-poll

def long_poll(app, job_id, seconds):
    """GET /jobs/{id}?wait=seconds on a thread; returns (thread, [Response])."""
    answer = []
    poller = threading.Thread(target=lambda: answer.append(
        call(app, "GET", f"/jobs/{job_id}?wait={seconds}")))
    poller.start()
    wait_until(lambda: job_id in app.lifecycle._waiters, what="the request to wait")
    return poller, answer


def test_get_with_wait_answers_as_soon_as_the_job_finishes(app, gate):
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    poller, answer = long_poll(app, job["id"], 30)
    assert not answer  # still waiting while the job runs
    gate.opened.set()
    poller.join(10)  # long before its 30 s run out
    assert not poller.is_alive()
    assert answer[0].status == 200 and answer[0].body["status"] == valet.COMPLETED
    assert answer[0].body == call(app, "GET", f"/jobs/{job['id']}").body


def test_get_with_wait_answers_with_the_current_state_when_the_wait_runs_out(app, gate):
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    started = time.monotonic()
    resp = call(app, "GET", f"/jobs/{job['id']}?wait=0.2")
    assert time.monotonic() - started >= 0.2
    assert resp.status == 200 and resp.body["status"] == valet.IN_PROGRESS


def test_get_with_wait_of_a_finished_or_unknown_job_answers_at_once(app):
    job = submit(app, "echo", [1])
    wait_for_status(app, job["id"], valet.COMPLETED)
    started = time.monotonic()
    assert call(app, "GET", f"/jobs/{job['id']}?wait=60").body["status"] == valet.COMPLETED
    resp = call(app, "GET", "/jobs/nope?wait=60")
    assert time.monotonic() - started < 5
    assert resp.status == 404 and resp.body["message"] == "job 'nope' not found"


@pytest.mark.parametrize("value", ["abc", "-1", "61", "60.5", "1e3", "nan", "1.", ".5",
                                   "0x10", "1234567"])
def test_get_with_a_bad_wait_is_refused_naming_it(app, value):
    job = submit(app, "echo")
    resp = call(app, "GET", f"/jobs/{job['id']}?wait={value}")
    assert resp.status == 400
    assert resp.body["message"] == (f"wait must be a number of seconds from 0 to 60, "
                                    f"written as digits such as 2 or 0.5, got {value!r}")


def test_stop_answers_a_waiting_request_with_the_current_state(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    poller, answer = long_poll(app, job["id"], 60)
    stopper = threading.Thread(target=app.stop)  # waits for the gate job: its grace
    stopper.start()
    poller.join(10)  # answered while stop() still waits for the running job
    assert not poller.is_alive() and stopper.is_alive()
    assert answer[0].status == 200 and answer[0].body["status"] == valet.IN_PROGRESS
    gate.opened.set()
    stopper.join(10)
    assert not stopper.is_alive()


# -- the connection

def test_keep_alive_serves_many_requests_and_errors_on_one_connection(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        assert request(conn, "GET", "/tasks").status == 200
        sock = conn.sock
        assert sock is not None  # http.client drops the socket when told to close
        for method, path, raw, status in [
                ("POST", "/jobs", b"{bad json", 400), ("GET", "/nowhere", None, 404),
                ("PUT", "/jobs", b'{"a": 1}', 405),
                ("POST", "/jobs", b'{"name": "n", "task_name": "echo"}', 202)]:
            resp = request(conn, method, path, raw=raw)
            assert resp.status == status
            assert "Connection" not in resp.headers
            assert resp.headers["Content-Type"] == "application/json"
            assert conn.sock is sock  # the same connection throughout
    finally:
        conn.close()


def test_oversized_body_is_413_and_chunked_body_is_411(make_app):
    app = make_app(**{"server.max_body_bytes": 1024})
    resp = call(app, "POST", "/jobs", raw=b"{" + b" " * 2000 + b"}")
    assert resp.status == 413 and "limit is 1024" in resp.body["message"]
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("POST", "/jobs", body=iter([b'{"name": "n"}']),
                     headers={"Transfer-Encoding": "chunked"})
        resp = conn.getresponse()
        assert resp.status == 411 and json.loads(resp.read())["code"] == 411
    finally:
        conn.close()
    assert call(app, "GET", "/jobs").body["jobs"] == []


def test_oversized_body_is_refused_before_it_is_sent_when_client_expects_100(make_app):
    app = make_app(**{"server.max_body_bytes": 1024})
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        reply = sock.makefile("rb").read()  # no body sent: the answer comes without it
    assert reply.startswith(b"HTTP/1.1 413")
    assert b"the limit is 1024 (server.max_body_bytes)" in reply


def test_garbage_request_gets_a_json_error_and_the_server_lives_on(app):
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(b"HELLO THERE\r\n\r\n")
        reply = sock.makefile("rb").read()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["error"] is True
    assert call(app, "GET", "/tasks").status == 200


def test_unicode_text_round_trips_and_surrogate_pairs_are_accepted(app):
    resp = call(app, "POST", "/jobs", raw=b'{"name": "\\ud83d\\ude00 caf\xc3\xa9", '
                                          b'"task_name": "echo", "metadata": "\xe2\x82\xac"}')
    assert resp.status == 202, resp
    got = call(app, "GET", f"/jobs/{resp.body['id']}").body
    assert got["name"] == "\U0001F600 caf\u00e9" and got["metadata"] == "\u20ac"


def test_bad_content_length_is_400_and_closes_the_connection(app):
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        # b"\xb2" is '²' in Latin-1, how headers are read: it passes str.isdigit().
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\n{}")
        reply = sock.makefile("rb").read()  # returns only because the server closes
    assert reply.startswith(b"HTTP/1.1 400") and b"Connection: close" in reply
    assert b"Content-Length must be a whole number" in reply


def test_head_answers_as_get_without_a_body_and_options_gets_405_with_allow(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        got = request(conn, "GET", "/tasks")  # (an answer whose length never changes)
        conn.request("HEAD", "/tasks")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b""
        assert resp.getheader("Content-Length") == got.headers["Content-Length"]
        conn.request("HEAD", "/jobs/x/cancel")  # a path with no GET
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "POST"
        assert resp.read() == b""
        resp = request(conn, "OPTIONS", "/jobs")
        assert resp.status == 405 and resp.headers["Allow"] == "POST, GET, HEAD, DELETE"
    finally:
        conn.close()


def test_open_connection_gets_503_once_stop_has_begun(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        assert request(conn, "GET", "/tasks").status == 200
        app.stop()
        resp = request(conn, "POST", "/jobs", {"name": "n", "task_name": "echo"})
        assert resp.status == 503 and resp.headers["Connection"] == "close"
        assert resp.headers["Retry-After"] == "1"
        assert resp.body["message"] == "valet is shutting down"
    finally:
        conn.close()
    with reopened(app) as store:
        assert store.list(None, 0, 10) == []  # the refused POST stored nothing


# -- logging

def test_info_logs_failures_and_refused_requests_not_each_success(app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    ok, bad = submit(app, "echo"), submit(app, "fail")
    wait_for_status(app, ok["id"], valet.COMPLETED)
    wait_for_status(app, bad["id"], valet.FAILED)
    assert call(app, "POST", "/jobs", {"name": "x"}).status == 400
    assert f"job {bad['id']}: IN_PROGRESS -> FAILED (ValueError: boom)" in caplog.text
    wait_until(lambda: "POST /jobs 400" in caplog.text, what="the 400 to be logged")
    assert ok["id"] not in caplog.text and "POST /jobs 202" not in caplog.text
    assert re.search(r"POST /jobs 400 [0-9.]+ms: task_name is required", caplog.text)


def test_debug_logs_every_request_and_transition(app, caplog):
    caplog.set_level(logging.DEBUG, logger="valet")
    ok = submit(app, "echo")
    wait_for_status(app, ok["id"], valet.COMPLETED)
    lines = (f"job {ok['id']}: created PENDING (task echo)", "POST /jobs 202",
             f"job {ok['id']}: PENDING -> IN_PROGRESS (attempt 1)",
             f"job {ok['id']}: IN_PROGRESS -> COMPLETED", f"GET /jobs/{ok['id']} 200")
    wait_until(lambda: all(line in caplog.text for line in lines),  # written after answering
               what="every line")



def test_json_log_lines_about_a_job_or_pipeline_carry_its_id_as_a_field(app):
    formatter = valet._JsonFormatter()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(json.loads(formatter.format(record)))

    keep = Keep(level=logging.DEBUG)
    valet.log.addHandler(keep)
    level = valet.log.level
    valet.log.setLevel(logging.DEBUG)  # (setLevel, which clears the logger's cache)
    try:
        job = submit(app, "fail")
        wait_for_status(app, job["id"], valet.FAILED)
        pipeline = submit_pipeline(app, stage("fail"), stage("echo"))
        wait_for_pipeline(app, pipeline["id"], valet.FAILED)
    finally:
        valet.log.removeHandler(keep)
        valet.log.setLevel(level)
    about_job = [r for r in records if r["message"].startswith(f"job {job['id']}:")]
    assert about_job and all(r["job_id"] == job["id"] for r in about_job)
    assert any(r.get("pipeline_id") == pipeline["id"] for r in records)
    assert all("job_id" not in r for r in records if not r["message"].startswith("job "))


def test_version_flag_prints_the_version_and_exits_0():
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--version"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0 and done.stdout == f"valet {valet.__version__}\n"


# -- access: token, Host, origin, content type

TOKEN = "s3cret-Token_0123456789~!"  # 25 printable ASCII characters, no space
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# how a config error says that it leaves the token out
HIDDEN = re.compile(r"it is not shown here")
NEW_JOB = {"name": "n", "task_name": "echo", "metadata": {"x": 1}}
NEW_JOB_BYTES = json.dumps(NEW_JOB).encode()


def raw(port, data, addr="127.0.0.1"):
    """Send these exact request bytes on a new connection; the parsed answer."""
    with socket.create_connection((addr, port), timeout=10) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        text = resp.read()
        return Response(resp.status, json.loads(text) if text else None,
                        dict(resp.getheaders()))


def get_status(port, host, *extra, addr="127.0.0.1"):
    """GET /status with this Host header (None: no Host header) and extra lines."""
    lines = ["GET /status HTTP/1.1", *([] if host is None else [f"Host: {host}"]), *extra,
             "Connection: close"]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), addr)


def post_job_as(port, host, *extra):
    """POST /jobs with a JSON body and this Host header."""
    lines = ["POST /jobs HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {len(NEW_JOB_BYTES)}", *extra, "Connection: close"]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + NEW_JOB_BYTES)


def no_jobs(app, headers=None):
    resp = call(app, "GET", "/jobs", headers=headers)
    assert resp.status == 200, resp
    return resp.body["jobs"] == []


def read_to_eof(sock):
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


# -- access: the token in the config

def test_env_token_wins_over_config_source_and_overrides():
    source = {"server": {"auth_token": "f" * 16}}
    overrides = {"server.auth_token": "o" * 16}
    assert valet.load_config(source)["server.auth_token"] == "f" * 16
    assert valet.load_config(source, overrides)["server.auth_token"] == "o" * 16
    assert valet.load_config(source, overrides, {"VALET_AUTH_TOKEN": "e" * 16})[
        "server.auth_token"] == "e" * 16
    assert valet.load_config(None, None, {"VALET_AUTH_TOKEN": "e" * 16})[
        "server.auth_token"] == "e" * 16
    # an environment without the variable (or with it empty) leaves the config's token
    assert valet.load_config(source, None, {"PATH": "/bin"})["server.auth_token"] == "f" * 16
    assert valet.load_config(source, None, {"VALET_AUTH_TOKEN": ""})[
        "server.auth_token"] == "f" * 16
    assert valet.load_config()["server.auth_token"] is None


def test_load_config_does_not_read_the_process_environment(monkeypatch):
    monkeypatch.setenv("VALET_AUTH_TOKEN", "e" * 16)
    assert valet.load_config({})["server.auth_token"] is None
    assert valet.load_config({"server.port": 0})["server.auth_token"] is None


@pytest.mark.parametrize("token", ["a" * 16, "z" * 512, "!\"#$%&'()*+,-./09:;<=>?@AZ[\\]^_`az{|}~"])
def test_token_of_16_to_512_printable_ascii_characters_is_accepted(token):
    assert valet.load_config({"server": {"auth_token": token}})["server.auth_token"] == token


@pytest.mark.parametrize("token", ["short", "a" * 15, "a" * 513, "has a space in it ok",
                                   "tab\tinside-the-token", "non-ascii-\u00e9-token-xx",
                                   "new\nline-inside-the-token"])
def test_bad_token_is_a_config_error_that_hides_the_token(token):
    for config, environ in (({"server": {"auth_token": token}}, None),
                            ({}, {"VALET_AUTH_TOKEN": token})):
        with pytest.raises(valet.ConfigError) as caught:
            valet.load_config(config, None, environ)
        message = str(caught.value)
        assert "server.auth_token" in message and HIDDEN.search(message), message
        assert token not in message and repr(token) not in message


def test_non_string_token_is_a_config_error():
    with pytest.raises(valet.ConfigError) as caught:
        valet.load_config({"server": {"auth_token": 1234567890123456789}})
    message = str(caught.value)
    assert "server.auth_token" in message and HIDDEN.search(message), message
    assert "1234567890123456789" not in message


# -- access: listening beyond this machine

@pytest.mark.parametrize("host, token, exposed", [
    ("0.0.0.0", None, True), ("192.168.1.5", None, True), ("::", None, True),
    ("example.com", None, True),
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("[::1]", None, False), ("127.0.0.2", None, False),
    ("0.0.0.0", TOKEN, False), ("192.168.1.5", TOKEN, False)])
def test_exposed_only_for_a_non_loopback_host_without_a_token(host, token, exposed):
    config = valet.load_config({"server": {"host": host, "auth_token": token}})
    assert valet._exposed(config) is exposed


def test_loopback_start_logs_no_exposed_warning(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    make_app()
    assert "listening on" in caplog.text  # the start was logged...
    assert "no server.auth_token" not in caplog.text  # ...without the warning


# -- access: the token

def test_request_without_token_gets_401_with_www_authenticate(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    for method, path, body in (("GET", "/status", None), ("GET", "/jobs", None),
                               ("GET", "/tasks", None), ("GET", "/no/such/path", None),
                               ("POST", "/jobs", NEW_JOB)):
        resp = call(app, method, path, body)
        assert resp.status == 401, (method, path, resp)
        assert resp.headers["WWW-Authenticate"] == 'Bearer realm="valet"', (method, path)
        assert resp.body["code"] == 401 and "Authorization: Bearer" in resp.body["message"]
        assert TOKEN not in json.dumps(resp.body)
    assert no_jobs(app, AUTH)  # the refused POST created nothing


def test_wrong_token_gets_401_with_invalid_token_error(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    for given in (f"Bearer {'x' * len(TOKEN)}", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}",
                  f"Basic {TOKEN}", TOKEN, "Bearer", "Bearer "):
        resp = call(app, "GET", "/status", headers={"Authorization": given})
        assert resp.status == 401, (given, resp)
        www = resp.headers["WWW-Authenticate"]
        assert www.startswith('Bearer realm="valet"') and 'error="invalid_token"' in www, www
        assert TOKEN not in json.dumps(resp.body)
    resp = call(app, "POST", "/jobs", NEW_JOB, headers={"Authorization": "Bearer wrong-token"})
    assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]
    assert no_jobs(app, AUTH)


def test_non_ascii_authorization_gets_401_not_500(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    resp = raw(app.port, b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"Authorization: Bearer \xe9\xff" + TOKEN.encode()[2:] +
               b"\r\nConnection: close\r\n\r\n")
    assert resp.status == 401 and 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


@pytest.mark.parametrize("environ, source", [({}, "server.auth_token"),
                                             ({"VALET_AUTH_TOKEN": TOKEN}, "VALET_AUTH_TOKEN")])
def test_start_line_and_401_say_a_token_is_required_and_where_it_comes_from(
        caplog, environ, source):
    caplog.set_level(logging.INFO, logger="valet")
    config = valet.load_config({"server": {"port": 0, "auth_token": "x" * 16},
                                "storage": {"option": "memory"}}, None, environ)
    app = valet.Valet(config, tasks={}).start()
    try:
        started = next(r.getMessage() for r in caplog.records
                       if "listening on" in r.getMessage())
        assert started.endswith(f", token required, from {source})")
        resp = call(app, "GET", "/status")
        assert resp.status == 401
        assert resp.body["message"].endswith(f"(valet takes it from {source})")
    finally:
        app.stop()


def test_right_token_is_served_on_every_request(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    assert call(app, "GET", "/status", headers=AUTH).status == 200
    created = call(app, "POST", "/jobs", NEW_JOB, headers=AUTH)
    assert created.status == 202, created
    job = call(app, "GET", f"/jobs/{created.body['id']}", headers=AUTH)
    assert job.status == 200 and job.body["id"] == created.body["id"]
    # the scheme is case-insensitive (RFC 9110) and extra spaces are tolerated
    for given in (f"bearer {TOKEN}", f"BEARER {TOKEN}", f"Bearer  {TOKEN} "):
        assert call(app, "GET", "/status", headers={"Authorization": given}).status == 200, given
    listed = call(app, "GET", "/jobs", headers=AUTH)
    assert [j["id"] for j in listed.body["jobs"]] == [created.body["id"]]


def test_token_never_appears_in_log_lines_or_error_bodies(make_app, caplog):
    caplog.set_level(logging.DEBUG, logger="valet")
    app = make_app(**{"server.auth_token": TOKEN})
    bodies = []
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, AUTH):
        for method, path, body in (("GET", "/status", None), ("POST", "/jobs", {"bad": 1}),
                                   ("GET", "/jobs/nope", None)):
            resp = call(app, method, path, body, headers=headers)
            bodies.append(json.dumps(resp.body))
    # a refused body with the token: 415 before it is read
    resp = call(app, "POST", "/jobs", raw=TOKEN.encode(),
                headers={**AUTH, "Content-Type": "text/plain"})
    assert resp.status == 415
    bodies.append(json.dumps(resp.body))
    app.stop()  # every line is written
    assert any("401" in r.getMessage() for r in caplog.records)  # the refusals were logged
    assert TOKEN not in caplog.text
    for record in caplog.records:
        assert TOKEN not in record.getMessage()
    assert not any(TOKEN in b for b in bodies)


def test_expect_100_continue_without_token_gets_401_before_the_body(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    head = (f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(NEW_JOB_BYTES)}\r\n"
            f"Expect: 100-continue\r\n").encode()
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(head + b"\r\n")  # headers only: the body is never sent
        answer = read_to_eof(sock)  # the server answers and closes
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 401"), answer
    assert b"100 Continue" not in answer
    assert b'WWW-Authenticate: Bearer realm="valet"' in rest
    # with the token, the same head gets 100 Continue, and the body is then taken
    with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
        sock.sendall(head + f"Authorization: Bearer {TOKEN}\r\n\r\n".encode())
        first = b""
        while b"\r\n\r\n" not in first:
            chunk = sock.recv(65536)
            assert chunk, f"closed before 100 Continue: {first!r}"
            first += chunk
        assert first.startswith(b"HTTP/1.1 100"), first
        sock.sendall(NEW_JOB_BYTES)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        assert resp.status == 202, resp.read()
    assert len(call(app, "GET", "/jobs", headers=AUTH).body["jobs"]) == 1


# -- access: content type

def test_body_without_json_content_type_gets_415_creates_nothing_and_closes(make_app):
    app = make_app()
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded",
                         "multipart/form-data; boundary=x", "application/json; charset=latin-1",
                         "application/json; charset=utf-16", "application/jsonx", "text/json"):
        lines = ["POST /jobs HTTP/1.1", f"Host: 127.0.0.1:{app.port}",
                 f"Content-Length: {len(NEW_JOB_BYTES)}"]
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        with socket.create_connection(("127.0.0.1", app.port), timeout=10) as sock:
            # a second request right behind: it must not be served, the connection closes
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + NEW_JOB_BYTES
                         + b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = read_to_eof(sock)
        assert answer.startswith(b"HTTP/1.1 415"), (content_type, answer)
        assert answer.count(b"HTTP/1.1 ") == 1, answer  # one answer, then closed
        assert b"Connection: close" in answer
        assert b"application/json" in answer.partition(b"\r\n\r\n")[2]  # says what to send
    assert no_jobs(app)


def test_json_content_type_with_utf8_charset_or_any_case_is_accepted(make_app):
    app = make_app()
    for content_type in ("application/json", "application/json; charset=utf-8",
                         "application/json;charset=UTF-8", 'application/json; charset="utf-8"',
                         "Application/JSON", "application/json; charset=utf8"):
        resp = call(app, "POST", "/jobs", raw=NEW_JOB_BYTES,
                    headers={"Content-Type": content_type})
        assert resp.status == 202, (content_type, resp)
    assert len(call(app, "GET", "/jobs").body["jobs"]) == 6


def test_bodyless_post_needs_no_content_type(make_app, gate):
    app = make_app()
    job = call(app, "POST", "/jobs", {"name": "n", "task_name": "gate"}).body
    assert gate.entered.wait(10)
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("POST", f"/jobs/{job['id']}/cancel")  # no body, no Content-Type
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
    finally:
        conn.close()
    # Content-Length: 0 with another type is no body either
    other = call(app, "POST", "/jobs", {"name": "n", "task_name": "gate"}).body
    resp = raw(app.port, f"POST /jobs/{other['id']}/cancel HTTP/1.1\r\n"
                         f"Host: 127.0.0.1\r\nContent-Length: 0\r\nContent-Type: text/plain"
                         f"\r\nConnection: close\r\n\r\n".encode())
    assert resp.status == 200, resp


# -- access: Host

def test_default_allowed_hosts_are_the_loopback_names_with_any_port(make_app):
    app = make_app()
    for host in ("localhost", "localhost:1", f"127.0.0.1:{app.port}", "127.0.0.1",
                 "[::1]", "[::1]:8080", "LOCALHOST:99"):
        assert get_status(app.port, host).status == 200, host


def test_other_host_gets_403_naming_allowed_hosts_and_creates_nothing(make_app):
    app = make_app()
    for host in ("evil.example", f"evil.example:{app.port}", "127.0.0.1.evil.example",
                 "localhost.evil.example:80", "10.0.0.1", "[::2]"):
        resp = get_status(app.port, host)
        assert resp.status == 403, (host, resp)
        assert "server.allowed_hosts" in resp.body["message"]
    resp = post_job_as(app.port, "evil.example")
    assert resp.status == 403 and "server.allowed_hosts" in resp.body["message"]
    assert no_jobs(app)


def test_server_host_itself_is_an_allowed_host(make_app):
    try:
        app = make_app(**{"server.host": "127.0.0.2"})
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.0.0.2 ({exc}): needs Linux's whole 127/8 "
                    f"loopback")
    assert get_status(app.port, f"127.0.0.2:{app.port}", addr="127.0.0.2").status == 200
    assert get_status(app.port, "localhost", addr="127.0.0.2").status == 200
    assert get_status(app.port, "127.0.0.3", addr="127.0.0.2").status == 403


def test_ipv6_server_host_itself_is_an_allowed_host(make_app):
    """An IPv6 literal in server.host comes bracketed in the Host header: [addr]:port.
    ::ffff:127.0.0.1 is an IPv6 address that this machine can listen on and that is
    not in the default list."""
    try:
        app = make_app(**{"server.host": "::ffff:127.0.0.1"})
    except OSError as exc:
        pytest.skip(f"cannot listen on ::ffff:127.0.0.1 ({exc}): needs IPv6 enabled")
    addr = "::ffff:127.0.0.1"
    assert get_status(app.port, "localhost", addr=addr).status == 200  # it is reachable
    resp = get_status(app.port, f"[::ffff:127.0.0.1]:{app.port}", addr=addr)
    assert resp.status == 200, resp


def test_with_token_and_default_allowed_hosts_any_host_is_allowed(make_app):
    app = make_app(**{"server.auth_token": TOKEN})
    for host in ("jobs.example", "jobs.example:8443", "10.1.2.3", "localhost"):
        assert get_status(app.port, host, f"Authorization: Bearer {TOKEN}").status == 200, host
    assert post_job_as(app.port, "jobs.example", f"Authorization: Bearer {TOKEN}").status == 202


def test_explicit_allowed_hosts_allow_that_host_and_refuse_others_even_with_token(make_app):
    app = make_app(**{"server.auth_token": TOKEN, "server.allowed_hosts": ["jobs.example"]})
    auth = f"Authorization: Bearer {TOKEN}"
    for host in ("jobs.example", "jobs.example:8443", "JOBS.example:1"):
        assert get_status(app.port, host, auth).status == 200, host
    for host in ("other.example", "jobs.example.evil", f"127.0.0.1:{app.port}"):
        resp = get_status(app.port, host, auth)
        assert resp.status == 403 and "server.allowed_hosts" in resp.body["message"], host
    assert post_job_as(app.port, "other.example", auth).status == 403
    assert post_job_as(app.port, "jobs.example", auth).status == 202
    resp = post_job_as(app.port, "jobs.example", auth)
    assert resp.status == 202
    listed = raw(app.port, f"GET /jobs HTTP/1.1\r\nHost: jobs.example\r\n{auth}\r\n"
                           f"Connection: close\r\n\r\n".encode())
    assert len(listed.body["jobs"]) == 2  # the refused one was not created


@pytest.mark.parametrize("star", ["*", ["*"]])
def test_star_allowed_hosts_allows_any_host(make_app, star):
    app = make_app(**{"server.allowed_hosts": star})
    for host in ("anything.example", "10.0.0.1:80", "localhost"):
        assert get_status(app.port, host).status == 200, host


def test_http11_request_without_host_gets_400(make_app):
    app = make_app()
    resp = get_status(app.port, None)
    assert resp.status == 400 and "Host" in resp.body["message"]
    resp = raw(app.port, b"POST /jobs HTTP/1.1\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(NEW_JOB_BYTES) + NEW_JOB_BYTES)
    assert resp.status == 400
    assert no_jobs(app)


def test_two_host_headers_get_400(make_app):
    app = make_app()
    for second in ("127.0.0.1", "evil.example"):
        resp = get_status(app.port, "127.0.0.1", f"Host: {second}")
        assert resp.status == 400 and "Host" in resp.body["message"], second


def test_http10_request_without_host_is_served(make_app):
    app = make_app()
    resp = raw(app.port, b"GET /status HTTP/1.0\r\n\r\n")
    assert resp.status == 200 and "storage" in resp.body
    resp = raw(app.port, b"POST /jobs HTTP/1.0\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(NEW_JOB_BYTES) + NEW_JOB_BYTES)
    assert resp.status == 202, resp
    assert len(call(app, "GET", "/jobs").body["jobs"]) == 1


# -- access: origin and CORS

def test_a_page_of_valets_own_host_behind_a_tls_proxy_may_post(make_app):
    """A proxy that ends TLS passes the Host on: the page's origin is https://{Host}.
    Nothing but that proxy can serve a page of that origin, so it is valet's own."""
    app = make_app()
    resp = raw(app.port, (f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
                          f"Origin: https://127.0.0.1:{app.port}\r\nContent-Type: "
                          f"application/json\r\nContent-Length: {len(NEW_JOB_BYTES)}\r\n"
                          f"\r\n").encode() + NEW_JOB_BYTES)
    assert resp.status == 202, resp
    assert "Access-Control-Allow-Origin" not in resp.headers  # not a cross-origin answer


def test_cross_site_simple_post_is_refused_with_403_and_creates_nothing(make_app):
    app = make_app()
    form = b"name=n&task_name=echo"
    for origin, content_type, body in (
            ("http://evil.example", "text/plain", form),
            ("http://evil.example", "application/x-www-form-urlencoded", form),
            ("http://evil.example", "application/json", NEW_JOB_BYTES),
            (f"http://127.0.0.1:{app.port + 1 if app.port < 65535 else 1}",
             "application/json", NEW_JOB_BYTES),
            ("null", "text/plain", form)):
        resp = raw(app.port, (f"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:{app.port}\r\n"
                              f"Origin: {origin}\r\nContent-Type: {content_type}\r\n"
                              f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
        assert resp.status == 403, (origin, resp)
        assert "server.cors_origins" in resp.body["message"]
        assert "Access-Control-Allow-Origin" not in resp.headers
    assert no_jobs(app)


def test_same_origin_request_is_allowed(make_app):
    app = make_app()
    origin = {"Origin": f"http://127.0.0.1:{app.port}"}  # http.client sends Host 127.0.0.1:PORT
    resp = call(app, "POST", "/jobs", NEW_JOB, headers=origin)
    assert resp.status == 202, resp
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert call(app, "GET", "/status", headers=origin).status == 200
    resp = call(app, "GET", "/status",
                headers={"Host": "localhost:7", "Origin": "http://localhost:7"})
    assert resp.status == 200


def test_preflight_from_listed_origin_gets_204_with_cors_headers_and_needs_no_token(make_app):
    app = make_app(**{"server.cors_origins": ["https://app.example"],
                      "server.auth_token": TOKEN})
    resp = call(app, "OPTIONS", "/jobs", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
    assert resp.status == 204, resp
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    methods = {m.strip() for m in resp.headers["Access-Control-Allow-Methods"].split(",")}
    assert "POST" in methods and "GET" in methods
    allowed = {h.strip().lower() for h in resp.headers["Access-Control-Allow-Headers"]
               .split(",")}
    assert {"authorization", "content-type", "idempotency-key"} <= allowed
    assert "Origin" in [v.strip() for v in resp.headers["Vary"].split(",")]
    assert "WWW-Authenticate" not in resp.headers


def test_request_from_listed_origin_gets_allow_origin_and_expose_headers(make_app):
    app = make_app(**{"server.cors_origins": ["https://app.example"],
                      "server.auth_token": TOKEN})
    origin = {"Origin": "https://app.example"}
    resp = call(app, "POST", "/jobs", NEW_JOB, headers={**origin, **AUTH})
    assert resp.status == 202, resp
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    exposed = {h.strip().lower() for h in resp.headers["Access-Control-Expose-Headers"]
               .split(",")}
    assert "location" in exposed
    assert "Origin" in resp.headers.get("Vary", "")
    resp = call(app, "GET", "/status", headers={**origin, **AUTH})
    assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == \
        "https://app.example"
    # still needs the token: only the preflight goes without
    assert call(app, "POST", "/jobs", NEW_JOB, headers=origin).status == 401
    assert len(call(app, "GET", "/jobs", headers=AUTH).body["jobs"]) == 1


def test_preflight_from_unlisted_origin_gets_403_without_cors_headers(make_app):
    app = make_app(**{"server.cors_origins": ["https://app.example"],
                      "server.auth_token": TOKEN})
    for origin in ("https://evil.example", "http://app.example", "https://app.example.evil"):
        resp = call(app, "OPTIONS", "/jobs",
                    headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert resp.status == 403, (origin, resp)
        assert not any(name.startswith("Access-Control-") for name in resp.headers), resp.headers
        resp = call(app, "POST", "/jobs", NEW_JOB, headers={"Origin": origin, **AUTH})
        assert resp.status == 403 and "Access-Control-Allow-Origin" not in resp.headers
    assert no_jobs(app, AUTH)


@pytest.mark.parametrize("star", ["*", ["*"]])
def test_star_cors_origins_allows_any_origin(make_app, star):
    app = make_app(**{"server.cors_origins": star})
    resp = call(app, "POST", "/jobs", NEW_JOB, headers={"Origin": "https://any.example"})
    assert resp.status == 202, resp
    assert resp.headers["Access-Control-Allow-Origin"] in ("https://any.example", "*")
    resp = call(app, "OPTIONS", "/jobs", headers={"Origin": "https://other.example",
                                                  "Access-Control-Request-Method": "POST"})
    assert resp.status == 204


@pytest.mark.parametrize("cors", [[], ["https://app.example"]])
def test_options_without_origin_is_still_405_with_allow(make_app, cors):
    app = make_app(**{"server.cors_origins": cors})
    resp = call(app, "OPTIONS", "/jobs")
    assert resp.status == 405 and resp.headers["Allow"] == "POST, GET, HEAD, DELETE"
    assert "Access-Control-Allow-Origin" not in resp.headers


# -- access: a real process

def test_process_takes_its_token_from_the_environment_and_never_logs_it(tmp_path, processes,
                                                                         monkeypatch):
    env_token, file_token = "env-token-0123456789-abc", "file-token-0123456789-xyz"
    monkeypatch.setenv("VALET_AUTH_TOKEN", env_token)  # inherited by the child only
    proc = processes(tmp_path, server={"auth_token": file_token}, logging_level="debug")
    with_env = {"Authorization": f"Bearer {env_token}"}
    assert call(proc.port, "GET", "/status", headers=with_env).status == 200
    created = call(proc.port, "POST", "/jobs", {"name": "n", "task_name": "echo"},
                   headers=with_env)
    assert created.status == 202, created
    refused = call(proc.port, "GET", "/status",
                   headers={"Authorization": f"Bearer {file_token}"})
    assert refused.status == 401
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    assert call(proc.port, "GET", "/status").status == 401
    assert call(proc.port, "POST", "/jobs", {"name": "n", "task_name": "echo"},
                headers={"Authorization": f"Bearer {file_token}"}).status == 401
    assert proc.kill(signal.SIGTERM) == 0
    proc.reader.join(10)
    assert not proc.reader.is_alive()
    text = "".join(proc.lines)
    assert "401" in text  # the refusals were logged...
    assert env_token not in text and file_token not in text  # ...without either token


def test_process_with_a_bad_env_token_exits_2_without_showing_it(tmp_path):
    token = "bad token with spaces in it"
    (tmp_path / "config.yaml").write_text(json.dumps({"storage": {"option": "memory"}}))
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          cwd=tmp_path, env={**os.environ, "VALET_AUTH_TOKEN": token},
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert "server.auth_token" in done.stderr and HIDDEN.search(done.stderr), done.stderr
    assert "bad token" not in done.stderr and "spaces in it" not in done.stderr


HUGE = int("7" * 400)  # a 400-digit integer
GET_STATUS = b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n"


# -- hostile clients: helpers

def connect(app_or_port, timeout=10):
    port = app_or_port if isinstance(app_or_port, int) else app_or_port.port
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def read_response(reader):
    """One response from a binary file on a socket: (status, headers, body)."""
    status_line = reader.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = {}
    while (line := reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = reader.read(int(headers.get("content-length", 0)))
    return int(status_line.split()[1]), headers, body


def exchange(app, data):
    """Send raw bytes on a new connection; (status, headers, body, closed): the
    first response, and whether the server then closed the connection."""
    with connect(app) as sock:
        sock.sendall(data)
        reader = sock.makefile("rb")
        status, headers, body = read_response(reader)
        return status, headers, body, server_closed(sock, reader)


def server_closed(sock, reader=None):
    """Whether the server closed the connection (EOF or a reset) with nothing more
    to say; the socket's timeout bounds the wait."""
    try:
        rest = reader.read(1) if reader is not None else sock.recv(1)
    except ConnectionResetError:
        return True
    return rest == b""


def reset(sock):
    """Close with SO_LINGER 0, which sends RST instead of FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def nest(depth, inner="x"):
    """`depth` arrays and objects nested in one another around `inner`."""
    value = inner
    for i in range(depth):
        value = [value] if i % 2 else {"k": value}
    return value


def job_body(**fields):
    return {"name": "n", "task_name": "echo", **fields}


def assert_nothing_stored(app):
    assert call(app, "GET", "/jobs").body["jobs"] == []
    assert call(app, "GET", "/pipelines").body["pipelines"] == []


def completed_job(app):
    job = submit(app, "echo")
    wait_for_status(app, job["id"], valet.COMPLETED)
    return job["id"]


# -- hostile clients: backlog and connections

def test_300_clients_connecting_at_once_are_all_answered_200(make_app):
    app = make_app(**{"server.max_connections": 1000})
    address = ("127.0.0.1", app.port)
    selector = selectors.DefaultSelector()
    replies = {}
    socks = []
    try:
        # All 300 SYNs go out within milliseconds, faster than the one listening
        # thread accepts: those not yet accepted wait in the listen backlog.
        for _ in range(300):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(address)
            socks.append(sock)
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 10
        while len(replies) < len(socks) and time.monotonic() < deadline:
            for key, events in selector.select(timeout=0.5):
                sock = key.fileobj
                if events & selectors.EVENT_WRITE:
                    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
                    sock.send(GET_STATUS)  # 41 bytes: fits any send buffer
                    selector.modify(sock, selectors.EVENT_READ, b"")
                    continue
                data = key.data + sock.recv(65536)
                head, _, body = data.partition(b"\r\n\r\n")
                length = re.search(rb"Content-Length: (\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    replies[sock] = head.split(b"\r\n")[0]
                    selector.unregister(sock)
                else:
                    selector.modify(sock, selectors.EVENT_READ, data)
    finally:
        selector.close()
        for sock in socks:
            sock.close()
    assert len(replies) == 300, f"only {len(replies)} of 300 clients were answered in 10s"
    assert set(replies.values()) == {b"HTTP/1.1 200 OK"}


def test_backlog_is_the_listen_queue_length_the_kernel_reports(make_app, tmp_path):
    if shutil.which("ss") is None:
        pytest.skip("needs ss to read a listening socket's backlog: apt-get install iproute2")
    second = {"server.backlog": 77, "storage.sqlite.path": str(tmp_path / "second.db")}
    for overrides, backlog in (({}, 1024), (second, 77)):
        app = make_app(**overrides)
        out = subprocess.run(["ss", "-ltnH", f"sport = :{app.port}"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        # State Recv-Q Send-Q ...: for a listening socket, Send-Q is its backlog.
        assert out[0] == "LISTEN" and int(out[2]) == backlog, out


def hold_idle_connections(app, count):
    """`count` keep-alive connections, each left idle after one answered request."""
    held = []
    for _ in range(count):
        conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
        held.append(conn)
        assert request(conn, "GET", "/status").status == 200
    return held


def refused(app):
    """Connect, ask for /status, read until the server closes: the response."""
    with connect(app) as sock:
        sock.sendall(GET_STATUS)
        reader = sock.makefile("rb")
        answer = read_response(reader)
        assert server_closed(sock, reader)
    return answer


def test_connection_past_max_connections_gets_quick_503_and_a_freed_one_is_served(
        make_app):
    app = make_app(**{"server.max_connections": 4})
    held = hold_idle_connections(app, 4)
    try:
        started = time.monotonic()
        status, headers, body = refused(app)  # also asserts the server closed it
        assert time.monotonic() - started < 2  # no waiting for an idle connection
        assert status == 503 and headers["retry-after"] == "1"
        assert headers["connection"] == "close"
        assert "server.max_connections" in json.loads(body)["message"]
        held.pop().close()

        def served():
            with connect(app) as sock:
                sock.sendall(GET_STATUS)
                return read_response(sock.makefile("rb"))[0] == 200
        wait_until(served, what="a connection to be served once one of 4 closed")
        # The held ones were kept, and still work.
        assert all(request(conn, "GET", "/status").status == 200 for conn in held)
    finally:
        for conn in held:
            conn.close()


# -- hostile clients: time limits

def trickle_until_cut(app, data, before=b""):
    """Send `before` at once, then `data` a byte every 0.05 s until the server closes
    the connection: (seconds from the first byte to the close, bytes trickled)."""
    with connect(app) as sock:
        started = time.monotonic()
        sock.sendall(before)
        for sent, byte in enumerate(data, 1):
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - started, sent - 1
            # Paces the trickle, and notices the close as soon as it comes.
            if select.select([sock], [], [], 0.05)[0]:
                assert server_closed(sock), "the server answered instead of closing"
                return time.monotonic() - started, sent
        pytest.fail(f"the server never closed the connection ({len(data)} bytes sent)")


def cut_after_idle(app, data):
    """Send `data` at once, then nothing: seconds until the server closes."""
    with connect(app) as sock:
        sock.sendall(data)
        started = time.monotonic()
        reader = sock.makefile("rb")
        if data.startswith(b"GET"):  # a whole request: read its answer first
            assert read_response(reader)[0] == 200
            started = time.monotonic()
        assert server_closed(sock, reader), "the server sent more than its answer"
        return time.monotonic() - started


def test_slow_requests_and_idle_keep_alive_connections_are_cut(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app(**{"server.request_timeout": 0.5, "server.keepalive_timeout": 0.5})
    head = b"GET /status HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 100 + b"\r\n\r\n"
    body = json.dumps(job_body(metadata="x" * 100)).encode()
    stalled = (b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % (len(body) + 10))
    results = {}
    clients = {
        "trickled head": lambda: trickle_until_cut(app, head),
        "trickled body": lambda: trickle_until_cut(app, body, before=stalled),
        "stalled body": lambda: (cut_after_idle(app, stalled + body), None),
        "idle keep-alive": lambda: (cut_after_idle(app, GET_STATUS), None),
    }

    def run(name):
        results[name] = clients[name]()

    threads = [threading.Thread(target=run, args=(name,)) for name in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
        assert not t.is_alive(), "a client was never cut off"
    assert set(results) == set(clients), results
    for name, (seconds, sent) in results.items():
        assert 0.4 < seconds < 5, (name, seconds)
        if sent is not None:  # it kept sending: more than a byte every 0.1 s would
            assert sent > 5, (name, sent)  # send in request_timeout (0.5 s)
    assert_nothing_stored(app)
    wait_until(lambda: "within 0.5s (server.request_timeout)" in caplog.text,
               what="the cut requests to be logged")


# -- hostile clients: framing

SMUGGLING_HEADS = {
    "two equal Content-Lengths": "Content-Length: {n}\r\nContent-Length: {n}\r\n",
    "two different Content-Lengths": "Content-Length: {n}\r\nContent-Length: 2\r\n",
    "Content-Length and Transfer-Encoding": "Content-Length: {n}\r\n"
                                            "Transfer-Encoding: chunked\r\n",
    "Transfer-Encoding and Content-Length": "Transfer-Encoding: chunked\r\n"
                                            "Content-Length: {n}\r\n",
}


def test_ambiguous_framing_gets_400_closes_and_smuggles_nothing(make_app):
    app = make_app()
    victim = completed_job(app)
    body = json.dumps(job_body()).encode()
    smuggled = f"DELETE /jobs/{victim} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    for framing, lengths in SMUGGLING_HEADS.items():
        head = ("POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                "\r\n" + lengths.format(n=len(body)) + "\r\n").encode()
        status, headers, reply, closed = exchange(app, head + body + smuggled)
        assert status == 400 and headers["connection"] == "close", (framing, reply)
        assert closed, framing  # and nothing more answered: the DELETE was never read
        assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [victim], framing


def test_chunked_body_alone_gets_411_and_closes(app):
    status, headers, reply, closed = exchange(app, (
        b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"))
    assert status == 411 and headers["connection"] == "close", reply
    assert closed
    assert_nothing_stored(app)


@pytest.mark.parametrize("first", [True, False], ids=["before Host", "after Host"])
def test_header_name_with_a_space_before_its_colon_gets_400_and_smuggles_nothing(
        make_app, first):
    app = make_app()
    victim = completed_job(app)
    smuggled = f"DELETE /jobs/{victim} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()
    malformed = b"Content-Length : %d\r\n" % len(smuggled)
    host = b"Host: localhost\r\n"
    head = (b"POST /jobs HTTP/1.1\r\n" + (malformed + host if first else host + malformed)
            + b"Content-Type: application/json\r\n\r\n")
    with connect(app) as sock:
        sock.sendall(head + smuggled)
        reader = sock.makefile("rb")
        status, headers, reply = read_response(reader)
        assert status == 400, reply
        assert headers.get("connection") == "close", reply
        assert server_closed(sock, reader)  # and no answer to a DELETE
    assert call(app, "GET", f"/jobs/{victim}").status == 200


def test_a_header_folded_over_two_lines_gets_400_and_closes(app):
    with connect(app) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\nX-Long: a\r\n b\r\n\r\n"
                     + GET_STATUS)
        reader = sock.makefile("rb")
        status, headers, body = read_response(reader)
        assert status == 400 and "folded" in json.loads(body)["message"]
        assert server_closed(sock, reader)


def test_a_bare_cr_inside_a_header_line_gets_400_and_closes(app):
    """Python's parser would split `X-Pad: a<CR>Content-Length: 5` in two headers where a
    proxy in front keeps one: the two would frame the request differently."""
    with connect(app) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nX-Pad: a\rContent-Length: 5\r\n\r\n" + GET_STATUS)
        reader = sock.makefile("rb")
        status, _, body = read_response(reader)
        assert status == 400 and "bare CR" in json.loads(body)["message"]
        assert server_closed(sock, reader)


def test_a_malformed_header_line_is_named_in_the_400_without_its_value(make_app, caplog):
    caplog.set_level(logging.DEBUG, logger="valet")
    app = make_app(**{"server.auth_token": TOKEN})
    with connect(app) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHost: localhost\r\nAuthorization Bearer "
                     + TOKEN.encode() + b"\r\n\r\n")
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 400
    assert json.loads(body)["message"] == "malformed header line (starting 'Authorization')"
    assert TOKEN[:8] not in caplog.text


def test_empty_line_before_the_request_line_is_skipped(app):
    with connect(app) as sock:
        sock.sendall(b"\r\n" + GET_STATUS)
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 200 and json.loads(body)["version"] == valet.__version__


# -- hostile clients: resets

BIG = 6_000_000  # bytes of metadata: more than the kernel buffers a reset client's reply


def reset_clients(port):
    """Three clients that reset: mid-head, mid-body, and mid-response (asking for a
    listing of 6 MB with a tiny receive window)."""
    with connect(port) as sock:
        sock.sendall(b"GET /status HTTP/1.1\r\nHo")
        reset(sock)
    body = json.dumps(job_body()).encode()
    with connect(port) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                     + body[:len(body) // 2])
        reset(sock)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /jobs HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert sock.recv(1) == b"H"  # the server has begun to answer
    reset(sock)


def store_big_job(port):
    resp = call(port, "POST", "/jobs", job_body(metadata="x" * BIG,
                                                run_at="2099-01-01T00:00:00Z"))
    assert resp.status == 202, resp


def test_resetting_clients_leave_no_traceback_and_the_server_answers(make_app, caplog):
    caplog.set_level(logging.DEBUG, logger="valet")
    app = make_app(**{"server.max_body_bytes": 2 * BIG})
    store_big_job(app.port)
    reset_clients(app.port)
    wait_until(lambda: caplog.text.count("connection from 127.0.0.1 ended: ") >= 3,
               what="the three resets to be handled")
    assert call(app, "GET", "/status").status == 200
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == [], [r.getMessage() for r in loud]
    assert "Traceback" not in caplog.text


def test_resetting_clients_make_a_process_write_nothing_outside_its_logger(tmp_path,
                                                                           processes):
    proc = processes(tmp_path, logging_format="json", logging_level="debug",
                     server={"max_body_bytes": 2 * BIG})
    store_big_job(proc.port)
    reset_clients(proc.port)
    wait_until(lambda: sum("connection from 127.0.0.1 ended: " in line
                           for line in proc.lines) >= 3, what="the three resets to be handled")
    assert call(proc.port, "GET", "/status").status == 200
    assert proc.kill(signal.SIGTERM) == 0
    proc.reader.join(10)
    assert proc.lines
    for line in proc.lines:
        record = json.loads(line)  # fails on any line valet's logger did not write
        assert record["level"] in ("DEBUG", "INFO"), record
        assert "exception" not in record, record


# -- hostile clients: huge numbers, deep JSON

def test_400_digit_integers_are_a_400_naming_the_field(make_app):
    app = make_app()
    for field in ("timeout", "retry_backoff", "priority", "max_retries"):
        resp = call(app, "POST", "/jobs", job_body(**{field: HUGE}))
        assert resp.status == 400, resp
        assert resp.body["message"].startswith(f"{field} must be"), resp
    resp = call(app, "POST", "/pipelines", {"name": "p", "jobs": [stage(timeout=HUGE),
                                                                   stage()]})
    assert resp.status == 400, resp
    assert resp.body["message"].startswith("jobs[0]: timeout must be"), resp
    assert_nothing_stored(app)


def test_400_digit_timeout_in_a_periodic_entry_stops_the_process_with_exit_2(tmp_path):
    settings = {"storage": {"sqlite": {"path": "valet.db"}},
                "tasks_module": "valet_process_tasks",
                "periodic": [{"name": "p", "task_name": "echo", "every": "1h",
                              "timeout": HUGE}]}
    (tmp_path / "config.yaml").write_text(json.dumps(settings))  # JSON is YAML
    (tmp_path / "valet_process_tasks.py").write_text(PROCESS_TASKS)
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=10)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "valet: config error: periodic[0]: timeout must be"), lines
    assert not (tmp_path / "valet.db").exists()


def test_metadata_64_levels_deep_round_trips_and_65_is_a_400(make_app):
    app = make_app()
    deep = nest(64)
    too_deep = call(app, "POST", "/jobs", job_body(metadata=nest(65)))
    assert too_deep.status == 400
    assert too_deep.body["message"] == "metadata is nested more than 64 levels deep"
    assert_nothing_stored(app)
    job = submit(app, "echo", metadata=deep, run_at="2099-01-01T00:00:00Z")
    assert call(app, "GET", f"/jobs/{job['id']}").body["metadata"] == deep
    assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [job["id"]]


def test_json_nested_near_and_past_the_recursion_limit_is_a_400(make_app):
    app = make_app()

    def arrays(n):
        return "[" * n + "]" * n

    for depth in (979, 980, 981, 982, 983, 100_000):
        # Each body is `depth` arrays and objects deep, counting its own object.
        job = '{"name": "n", "task_name": "echo", "metadata": %s}' % arrays(depth - 1)
        pipeline = ('{"name": "p", "jobs": [{"name": "a", "task_name": "echo", "metadata": '
                    '%s}, {"name": "b", "task_name": "echo"}]}' % arrays(depth - 3))
        for path, raw in (("/jobs", job), ("/pipelines", pipeline)):
            resp = call(app, "POST", path, raw=raw.encode())
            assert resp.status == 400, (depth, path, resp)
    assert_nothing_stored(app)


# -- hostile clients: log lines

def test_huge_id_or_path_gets_404_and_only_short_log_lines(make_app, caplog):
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app()
    for path in ("/jobs/" + "i" * 60_000, "/" + "p" * 60_000):
        caplog.clear()
        resp = call(app, "GET", path)
        assert resp.status == 404, resp
        wait_until(lambda: " 404 " in caplog.text, what="the 404 to be logged")
        for record in caplog.records:
            assert len(record.getMessage()) < 1000, record.getMessage()[:300]


def logged(caplog, line, kind):
    """For one kind of line: (the lines logged in full, which match the regex `line`;
    the counts of the summary lines of `kind`)."""
    messages = [r.getMessage() for r in caplog.records]
    summary = re.compile(r"(\d+) more like this in the last second: " + re.escape(kind))
    return ([m for m in messages if re.match(line, m)],
            [int(found.group(1)) for found in map(summary.match, messages) if found])


def test_floods_of_503s_are_logged_as_the_first_line_then_a_count_a_second(
        make_app, gate, caplog):
    """Backlog 503s and refused connections: each kind is logged once, then counted
    in one summary line a second (one server for both, so one second of waiting)."""
    caplog.set_level(logging.INFO, logger="valet")
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 1,
                      "server.max_connections": 4})
    submit(app, "gate")
    assert gate.entered.wait(10)
    submit(app, "echo")  # the one place in the backlog
    held = hold_idle_connections(app, 4)
    try:
        for _ in range(200):
            resp = request(held[0], "POST", "/jobs", job_body())
            assert resp.status == 503 and resp.headers["Retry-After"] == "1", resp
        for _ in range(50):
            assert refused(app)[0] == 503
        refusals = [r.getMessage() for r in caplog.records
                    if "max_connections" in r.getMessage()]
        assert 1 <= len(refusals) <= 3, refusals
    finally:
        for conn in held:
            conn.close()
    floods = {  # kind: (its line logged in full, how many came)
        "503: the backlog is full": (r"POST /jobs 503 [0-9.]+ms: the backlog is full", 200),
        "refused a connection: server.max_connections (4) are open":
            (r"refused a connection: server\.max_connections \(4\) are open \(from ", 50),
    }
    for kind, (line, count) in floods.items():
        wait_until(lambda: (lambda lines, counts: len(lines) + sum(counts) >= count)(
            *logged(caplog, line, kind)), what=f"every {kind!r} to be logged or counted")
        lines, counts = logged(caplog, line, kind)
        assert len(lines) + sum(counts) == count, (kind, lines, counts)
        assert counts and len(lines) + len(counts) <= 6, (kind, lines, counts)
    gate.opened.set()


# The fuzz test sends thousands of random and mutated requests (request lines,
# headers, bodies, framing) over raw sockets, checks each answer, then checks the
# server is alive. Besides 503 with Retry-After, one 5xx is right: 505 for HTTP/2
# or later (RFC 9110); any other method than valet's gets 404 or 405. A failure
# names its seed: VALET_FUZZ_SEED=<seed> pytest test_valet.py -k fuzz replays it.
# Per store, so that each run is one fixed sequence; VALET_FUZZ_SEED replays another.
SEEDS = {"memory": 5150, "sqlite": 1906, "postgres": 4242}
REQUESTS_PER_STORE = 3000
SOCKET_TIMEOUT = 5.0

KNOWN_METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")
GARBAGE_METHODS = ("FOO", "get", "Post", "BREW", "TRACE", "CONNECT", "PRI", "G\x00T", "GET\x7f",
                   "_dispatch", "__init__", "M" * 300, "GÉT")
GARBAGE_VERSIONS = ("HTTP/2.0", "HTTP/3", "HTTP/1.2", "HTTP/0.9", "HTTP/1", "HTTP/1.1.1",
                    "http/1.1", "HTTP/x.y", "HTTP/01.01", "HTTP/1.10", "HTTP/99999999999.1",
                    "HTTP/-1.1", "HTTP/1.1\x00", "", "HTTP/1.1 HTTP/1.1", "HTTP/ 1.1")
JOB_STATUSES = ("SCHEDULED", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED")
JOB_KEYS = ("name", "description", "task_name", "metadata", "task_params", "timeout",
            "priority", "run_at", "max_retries", "retry_backoff")
STAGE_KEYS = ("name", "description", "task_name", "metadata", "timeout", "max_retries",
              "retry_backoff", "use_previous_results")
PIPELINE_KEYS = ("name", "description", "priority", "run_at", "jobs")
# Nesting depths of a field's value: around _MAX_DEPTH (64), past Python's recursion
# limit (1000), and, most often, just under it (from 960 to 1000).
DEPTHS = (2, 63, 64, 65, 200, 500, 1200)
PLACEHOLDER = "@@raw-json@@"
POST_JOBS, POST_PIPELINES = (next(r for r in valet.ROUTES if r[:2] == ("POST", path))
                             for path in ("/jobs", "/pipelines"))
_STATUS_LINE = re.compile(rb"HTTP/1\.1 ([0-9]{3}) [^\r\n]*")
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


# -- fuzz: the requests

@dataclasses.dataclass
class Req:
    data: bytes
    framed: bool  # its end is certain: the next request on the connection can follow
    what: str     # what the generator did, for the failure message

    @property
    def head_only(self):
        """Whether valet takes it as a HEAD request (no body in its answer), as
        http.server's parse_request would: up to 8 empty lines skipped, 3 words,
        and a version it takes (a bad one is refused before the method is set)."""
        lines = self.data.split(b"\n", 9)
        i = 0
        while i < 8 and i < len(lines) - 1 and lines[i] in (b"", b"\r"):
            i += 1
        words = lines[i].decode("latin-1").rstrip("\r\n").split()
        if len(words) != 3 or words[0] != "HEAD":
            return False
        return bool(re.fullmatch(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})", words[2])
                    and int(words[2][5:].split(".")[0]) < 2)


def random_text(rng, size=None):
    size = rng.randint(0, 24) if size is None else size
    pool = rng.choice([string.ascii_letters + string.digits + " -_.",
                       "\u00e9\u20ac\u30b8\u30e7\u30d6\U0001F600\u202e\u0000\t\n\"\\/",
                       string.printable])
    return "".join(rng.choice(pool) for _ in range(size))


def random_json(rng, depth):
    """A random JSON value (as Python), nested at most `depth` levels."""
    kinds = ["null", "bool", "int", "float", "str"] + (["list", "dict"] * 2 if depth else [])
    kind = rng.choice(kinds)
    if kind == "null":
        return None
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "int":
        return rng.choice([0, -1, 1, 2**31, -2**63, 2**64, 10**rng.randint(1, 400),
                           rng.randint(-10**6, 10**6)])
    if kind == "float":
        return rng.choice([0.5, -0.0, 1e308, -1e308, 5e-324, 1e-7, rng.uniform(-1e6, 1e6)])
    if kind == "str":
        return random_text(rng)
    if kind == "list":
        return [random_json(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    return {random_text(rng, rng.randint(0, 8)): random_json(rng, depth - 1)
            for _ in range(rng.randint(0, 4))}


def deep_text(rng, depth):
    """JSON text nested `depth` levels deep (arrays, objects or both)."""
    kind = rng.choice(["array", "object", "mixed"])
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    half = depth // 2
    return '[{"a":' * half + "[]" + "}]" * half


def rfc3339(rng):
    return rng.choice(["2020-01-01T00:00:00Z", "2999-12-31T23:59:59Z", "2026-02-30T00:00:00Z",
                       "0001-01-01T00:00:00+23:59", "9999-12-31T23:59:59-23:59",
                       "2026-11-28T09:30:00.123456789+01:00", "2026-11-28 09:30:00",
                       "yesterday", "", "2026-13-01T00:00:00Z", "1970-01-01T00:00:00Z"])


def wrong_value(rng):
    return rng.choice([None, True, False, 0, -1, 1.5, 10**30, "", "x", [], {}, [1, "a"],
                       {"a": {"b": None}}, random_text(rng, 300), "-" * 5000,
                       random_json(rng, 3)])


def valid_job(rng):
    job = {"name": random_text(rng, rng.randint(1, 20)) or "job", "task_name": "echo",
           "metadata": random_json(rng, rng.randint(0, 4))}
    for key, values in (("description", [None, "d", random_text(rng)]),
                        ("timeout", [1, 30, 0.5, 3600]),
                        ("priority", [0, 5, -1000000, 1000000]),
                        ("run_at", [None, "2020-01-01T00:00:00Z"]),
                        ("max_retries", [0, 1]),
                        ("retry_backoff", [0, 1.5])):
        if rng.random() < 0.2:
            job[key] = rng.choice(values)
    if not job["name"].strip():
        job["name"] = "job"
    return job


def valid_pipeline(rng):
    jobs = [{"name": f"stage {i}", "task_name": "echo", "metadata": random_json(rng, 2)}
            for i in range(rng.randint(2, 4))]
    pipeline = {"name": "fuzz pipeline", "jobs": jobs}
    if rng.random() < 0.3:
        pipeline["priority"] = rng.choice([0, 3, -3])
    if rng.random() < 0.2:
        pipeline["description"] = random_text(rng)
    return pipeline


class Fuzzer:
    """Builds random requests for one server and sends them, checking every answer."""

    def __init__(self, port, rng):
        self.port, self.rng = port, rng
        self.job_ids, self.pipeline_ids, self.keys = [], [], []
        self.counts = collections.Counter()  # what happened: statuses, closes, ...
        self.problems = []

    # -- request lines

    def pick_id(self):
        rng = self.rng
        r = rng.random()
        if r < 0.45 and self.job_ids:
            return rng.choice(self.job_ids)
        if r < 0.6 and self.pipeline_ids:
            return rng.choice(self.pipeline_ids)
        return rng.choice([
            str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            random_text(rng).replace(" ", "_").replace("/", "-"),
            "x" * rng.choice([300, 5000, 70000]), "%2e%2e", "%00", "%ff%fe", "%2F",
            "..", ".", "\u30b8\u30e7\u30d6", "\U0001F600", "\u202eevil", "id?x=1",
            "a b", "a/b", "%" + "".join(rng.choice("0123456789abcdefXYZ") for _ in range(6)),
            "null", "0", "-1", "'; DROP TABLE jobs; --", "\x00", "\x7f\xff"])

    def query(self, allowed):
        rng = self.rng
        names = list(allowed) + ["status", "limit", "cursor", "wait", "finished_before",
                                 "unknown", "", "x" * 100, "st\u00e4tus", "%73tatus"]
        values = {
            "status": lambda: rng.choice(JOB_STATUSES + ("completed", "done", "", "PENDING,x")),
            "limit": lambda: rng.choice(["1", "2", "5", "0", "-1", "1000", "1001", "abc", "1.5",
                                         "9" * 30, "", "\u0663"]),
            "cursor": lambda: rng.choice(["0", "1", "10", "9" * 18, "9" * 19, "-1", "abc", ""]),
            # a real wait holds the request: only short ones, and refused ones
            "wait": lambda: rng.choice(["0", "0.01", "0.05", "", "61", "-1", "1e1", "nan",
                                        "0.0000001", "x"]),
            "finished_before": lambda: rfc3339(rng),
        }
        parts = []
        for _ in range(rng.randint(0, 4)):
            name = rng.choice(names)
            value = values.get(name, lambda: random_text(rng))()
            if rng.random() < 0.5:
                value = urllib.parse.quote(value, safe="")
            parts.append(rng.choice([f"{name}={value}", f"{name}=", name, f"={value}"]))
            if rng.random() < 0.1:
                parts.append(parts[-1])  # repeated
        return rng.choice(["&", "&", ";", "&&"]).join(parts)

    def request_line(self):
        """(method, target, version, route pattern)."""
        rng = self.rng
        r = rng.random()
        route = (POST_JOBS if r < 0.25 else POST_PIPELINES if r < 0.35
                 else rng.choice(valet.ROUTES))
        route_method, pattern, _, allowed = route
        r = rng.random()
        if r < 0.8:
            method = route_method
        elif r < 0.96:
            method = rng.choice(KNOWN_METHODS)
        else:
            method = rng.choice(GARBAGE_METHODS)
        path = pattern
        while "{id}" in path:
            path = path.replace("{id}", self.pick_id(), 1)
        if rng.random() < 0.2:
            path = "/api" + path
        r = rng.random()
        if r < 0.05:
            path = "//" + path.lstrip("/")
        elif r < 0.08:
            path = path.replace("/", "//")
        elif r < 0.11:
            path = path + "/"
        elif r < 0.13:
            path = path.upper()
        elif r < 0.15:
            path = "/jobs/../" + path.lstrip("/")
        elif r < 0.17:
            path = rng.choice(["*", "http://127.0.0.1" + path, "", "jobs", "/\u00e9",
                               "/%2e%2e/%2e%2e/etc/passwd", path + "#frag"])
        if rng.random() < 0.35:
            path += "?" + self.query(allowed)
        r = rng.random()
        version = ("HTTP/1.1" if r < 0.8 else "HTTP/1.0" if r < 0.9
                   else rng.choice(GARBAGE_VERSIONS))
        return method, path, version, pattern

    # -- bodies

    def body_for(self, method, pattern):
        """A valid body for the route, as a dict, or None."""
        rng = self.rng
        if pattern == "/jobs" and method == "POST":
            return valid_job(rng)
        if pattern == "/pipelines" and method == "POST":
            return valid_pipeline(rng)
        if method == "PATCH":
            return {"name": random_text(rng, 5) or "n", "description": random_text(rng)}
        if method in ("POST", "PUT") or rng.random() < 0.05:
            return rng.choice([valid_job(rng), valid_pipeline(rng), {}])
        return None

    def mutate_fields(self, body):
        """Change the fields of a body (a dict): wrong types, unknown and missing fields,
        random values, or one value as raw JSON text (deep, NaN, huge, ...); returns
        (dict, raw text for PLACEHOLDER or None, what)."""
        rng = self.rng
        keys = (PIPELINE_KEYS if "jobs" in body else JOB_KEYS) + ("unknown",)
        r = rng.random()
        target = body
        if "jobs" in body and isinstance(body["jobs"], list) and body["jobs"] and r < 0.3:
            target = rng.choice(body["jobs"])  # a stage of the pipeline
            keys = STAGE_KEYS + ("priority", "run_at")
        key = rng.choice(keys)
        r = rng.random()
        if r < 0.25:
            target[key] = wrong_value(rng)
            return body, None, f"wrong type in {key}"
        if r < 0.35:
            target.pop(rng.choice(list(target) or ["name"]), None)
            return body, None, "a field removed"
        if r < 0.45:
            for k in list(target):
                if rng.random() < 0.5:
                    target[k] = wrong_value(rng)
            return body, None, "wrong types in several fields"
        if r < 0.5:
            target[key] = random_json(rng, rng.randint(0, 6))
            return body, None, f"random JSON in {key}"
        raw = rng.choice([
            lambda: deep_text(rng, rng.choice(DEPTHS)),
            *[lambda: deep_text(rng, rng.randint(960, 1000))] * 5,
            lambda: rng.choice(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"]),
            lambda: rng.choice(["9" * rng.choice([19, 400, 999, 1000, 1001, 5000]),
                                "-" + "9" * 1001, "1" + "0" * 400 + ".5", "1E400",
                                "0.0000000000000000000001", "1e-400"]),
            lambda: rng.choice(['"\\ud800"', '"a\\udfffb"', '"\\ud83d\\ude00"',
                                '"\\ud83d"', '"\\u0000"', '["\\udc00", 1]']),
            lambda: rng.choice(['"\\x41"', "'single'", "undefined", "01", "+1", ".5", "1.",
                                '"unterminated', "[1,]", '{"a":1,}', "tru", "nul"]),
        ])()
        target[key] = PLACEHOLDER
        return body, raw, f"raw {raw[:30]!r}... ({len(raw)} chars) in {key}"

    def mutate_bytes(self, data):
        """Byte-level mutations of an encoded body."""
        rng = self.rng
        r = rng.random()
        if r < 0.25 and data:
            data = bytearray(data)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            return bytes(data), "bytes flipped"
        if r < 0.4 and data:
            return data[:rng.randrange(len(data))], "truncated"
        if r < 0.5:
            i, j = sorted(rng.randrange(len(data) + 1) for _ in range(2))
            return rng.choice([data + data, data[:j] + data[i:]]), "duplicated"
        if r < 0.65:
            bad = rng.choice([b"\xff", b"\xc3\x28", b"\xc0\xaf", b"\xed\xa0\x80",
                              b"\xf4\x90\x80\x80", b"\x80", b"\xe2\x82"])
            i = data.find(b'"') + 1
            return data[:i] + bad + data[i:], "invalid UTF-8"
        if r < 0.75:
            return rng.choice([b"", b"   ", b"\r\n", b"[]", b"1", b'"s"', b"null", b"true",
                               b'{"name":"a","name":"b","task_name":"echo"}', b"\xef\xbb\xbf{}",
                               b"\xef\xbb\xbf" + data, b"{}" * 3, b"{" * 1200,
                               b"\x00" * 16]), "replaced"
        if r < 0.8:
            return data + b" " * rng.randint(1, 10) + rng.choice([b"", b"x", b"{}"]), "trailing"
        return data, "as is"

    def body(self, method, pattern):
        """(bytes, what) of a request's body: valid, or mutated."""
        rng = self.rng
        fields = self.body_for(method, pattern)
        if fields is None:
            return b"", "no body"
        what = "valid body"
        raw = None
        if rng.random() < 0.6:
            fields, raw, what = self.mutate_fields(fields)
        text = json.dumps(fields, ensure_ascii=rng.random() < 0.5)
        if raw is not None:
            text = text.replace(f'"{PLACEHOLDER}"', raw)
        data = text.encode("utf-8", "surrogatepass")
        if rng.random() < (0.15 if raw else 0.35):
            data, how = self.mutate_bytes(data)
            what += ", " + how
        return data, what

    # -- headers

    def headers(self, method, body):
        """(header lines, framed, what)."""
        rng, port = self.rng, self.port
        lines, what, framed = [], [], True
        r = rng.random()
        if r < 0.9:
            lines.append(f"Host: {rng.choice(['127.0.0.1', 'localhost', f'127.0.0.1:{port}'])}")
        elif r < 0.93:
            what.append("no Host")
        elif r < 0.95:
            lines += [f"Host: 127.0.0.1:{port}"] * 2
            what.append("Host twice")
        else:
            host = rng.choice(["evil.example", "[::1]:80", "LOCALHOST:1", "[", "", ":", "::1",
                               "127.0.0.1.evil.example", "\u00e9", "localhost:99999", "[::1"])
            lines.append(f"Host: {host}")
            what.append(f"Host {host!r}")
        if body or rng.random() < 0.1:
            r = rng.random()
            if r < 0.9:
                kind = rng.choice(["application/json"] * 4 + [
                    "application/json; charset=utf-8", "APPLICATION/JSON",
                    'application/json; charset="UTF-8"', "application/json;;;"])
            else:
                kind = rng.choice([None, "text/plain", "application/x-www-form-urlencoded",
                                   "", "application/json; charset=latin-1", "application/jsonx",
                                   "multipart/form-data; boundary=x"])
            if kind is not None:
                lines.append(f"Content-Type: {kind}")
            if not kind or kind.split(";")[0].lower() != "application/json":
                what.append(f"Content-Type {kind!r}")
        r = rng.random()
        if r < 0.92:
            if body or rng.random() < 0.3:
                lines.append(f"Content-Length: {rng.choice(['', ' '])}{len(body)}")
        else:
            framed = False
            length = rng.choice([
                str(max(0, len(body) - rng.randint(1, 10))), str(len(body) + rng.randint(1, 50)),
                "-1", "-0", "99999999999", str(2**64), "9" * 40, "abc", "0x10", "+5", "1e3",
                "\u00b2", "\u0663", "", f"{len(body)}, {len(body)}", None, "twice"])
            if length == "twice":
                lines += [f"Content-Length: {len(body)}"] * 2
            elif length is not None:
                lines.append(f"Content-Length: {length}")
            what.append(f"Content-Length {length!r}")
        origins = ["http://evil.example", "null", f"http://127.0.0.1:{port}",
                   "http://localhost", random_text(rng)]
        extras = [  # (chance, whether its request stays framed, a header line)
            (0.04, False, lambda: "Transfer-Encoding: "
                                  + rng.choice(["chunked", "identity", "gzip, chunked"])),
            (0.08, True, lambda: "Expect: " + rng.choice(["100-continue", "100-CONTINUE",
                                                          "200-ok"])),
            (0.12, True, lambda: f"Idempotency-Key: {self.idempotency_key()}"),
            (0.05, True, lambda: f"Origin: {rng.choice(origins)}"),
            (0.04, True, lambda: "Authorization: " + rng.choice(["Bearer x", "Basic",
                                                                 random_text(rng)])),
            (0.06, True, lambda: "Connection: " + rng.choice(["close", "keep-alive", "upgrade",
                                                              "Close"])),
            (0.03, False, lambda: "NoColonHere"),
            (0.02, False, lambda: f"X-Long: {'v' * rng.choice([1000, 60000, 70000])}"),
            (0.02, False, lambda: "\r\n".join(  # more than 100 is refused with 431
                f"X-H{i}: {i}" for i in range(rng.choice([50, 99, 101, 150])))),
            (0.02, False, lambda: rng.choice(["Bad Name: x", ": empty", "X-\u00e9: v",
                                              "X\x00: v", " folded: continuation",
                                              "X-A:\x00\x01"])),
            (0.03, True, lambda: f"X-Random-{rng.randint(0, 9)}: {random_text(rng)}"),
        ]
        for chance, stays_framed, make in extras:
            if rng.random() < chance:
                line = make()
                lines.append(line)
                framed = framed and stays_framed
                what.append(line[:40])
        if method == "POST" and rng.random() < 0.05:
            key = self.idempotency_key()
            lines += [f"Idempotency-Key: {key}"] * 2
            what.append("Idempotency-Key twice")
        rng.shuffle(lines)
        return lines, framed, what

    def idempotency_key(self):
        rng = self.rng
        r = rng.random()
        if r < 0.3 and self.keys:
            return rng.choice(self.keys)  # reused: a replay, or 409 with another body
        key = rng.choice([f"{rng.getrandbits(128):032x}", "k" * rng.choice([255, 256, 5000]),
                          "\u00e9t\u00e9", "a b", "", "\x7f", f"{rng.getrandbits(64):x}"])
        self.keys.append(key)
        return key

    # -- one request

    def build(self):
        rng = self.rng
        if rng.random() < 0.02:
            data = rng.choice([
                bytes(rng.randrange(256) for _ in range(rng.randint(1, 200))),
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(40),
                b"\r\n" * rng.randint(8, 12) + b"GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n",
                b"GET " + b"/" * 70000 + b" HTTP/1.1\r\n\r\n",
                b"GET /status\r\n", b"GET\r\n\r\n", b" \r\n\r\n", b"\x00\r\n\r\n"])
            return Req(data, False, "garbage bytes")
        method, target, version, pattern = self.request_line()
        body, body_what = self.body(method, pattern)
        lines, framed, what = self.headers(method, body)
        framed = framed and version in ("HTTP/1.1", "HTTP/1.2", "HTTP/1.0")  # 1.0: then closed
        eol = "\r\n" if rng.random() < 0.95 else rng.choice(["\n", "\r\n\n"])
        framed = framed and eol == "\r\n"
        line = " ".join(x for x in (method, target, version) if x)
        if any(c in text for text in (line, *lines) for c in "\r\n"):
            framed = False  # a line break inside a line: where it ends is unsure
        head = line + eol + "".join(h + eol for h in lines) + eol
        if rng.random() < 0.05:
            head = rng.choice(["\r\n", "\n", "\r\n\r\n"]) + head
            what.append("empty line first")
        data = head.encode("utf-8", "surrogatepass") + body
        if rng.random() < 0.03:
            data = bytearray(data)
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            data, framed = bytes(data), False
            what.append("request bytes flipped")
        return Req(data, framed, f"{line[:120]!r} {body_what}; {', '.join(what)}")

    # -- sending and reading

    def run(self, total):
        sent = 0
        while sent < total:
            count = self.rng.randint(1, 6)
            reqs = []
            while len(reqs) < count:
                req = self.build()
                reqs.append(req)
                if not req.framed:
                    break  # its end is unsure: the last one on its connection
            pipelined = self.rng.random() < 0.4
            self.connection(reqs, pipelined)
            sent += len(reqs)
        self.counts["requests"] = sent

    def problem(self, req, message):
        before = [r.data[:200] for r in self.sending[:self.sending.index(req)]
                  ] if req in self.sending else ["?"]
        self.problems.append(f"{message}\n    request: {req.what}\n    bytes: "
                             f"{req.data[:300]!r}\n    {self.mode}, after: {before}")

    def connection(self, reqs, pipelined):
        self.counts["connections"] += 1
        self.sending, self.mode = reqs, "pipelined" if pipelined else "sequential"
        conn = _Conn(self.port)
        try:
            if pipelined:
                self.pipelined(conn, reqs)
            else:
                self.sequential(conn, reqs)
        except TimeoutError:
            self.problem(reqs[min(conn.answered, len(reqs) - 1)],
                         f"no answer within {SOCKET_TIMEOUT}s: the server hangs")
        finally:
            conn.sock.close()

    def sequential(self, conn, reqs):
        for req in reqs:
            last = not req.framed
            if not conn.send(req.data, shut=last):
                self.counts["closed mid-stream"] += 1
            if last:
                self.tail(conn, req)
                return
            if not self.answer(conn, req):
                return

    def pipelined(self, conn, reqs):
        last = not reqs[-1].framed
        if not conn.send(b"".join(r.data for r in reqs), shut=last):
            self.counts["closed mid-stream"] += 1
        for req in reqs:
            if not req.framed:
                self.tail(conn, req)
                return
            if not self.answer(conn, req):
                return

    def answer(self, conn, req):
        """Read and check the answer to a request; False once the connection ends."""
        resp = conn.response(req.head_only)
        if resp is None:
            self.counts["closed mid-stream"] += 1
            return False
        if isinstance(resp, str):
            self.problem(req, resp)
            return False
        conn.answered += 1
        self.check(req, *resp)
        status, headers, body = resp
        if headers.get("connection", "").lower() == "close":
            rest = conn.rest()
            if rest and not (req.head_only and len(rest) == int(headers["content-length"])):
                self.problem(req, f"bytes after Connection: close: {rest[:200]!r}")
            elif rest:  # a HEAD refused before its method was known: the body comes
                self.check(req, status, headers, rest)
            self.counts["closed by the server"] += 1
            return False
        return True

    def tail(self, conn, req):
        """Every answer to a request whose end is unsure (sent last, the writing side
        then shut): read until the server closes."""
        while self.answer(conn, req):  # what follows answers the rest: not a HEAD
            req = dataclasses.replace(req, data=b"(the rest of) " + req.data)

    def check(self, req, status, headers, body):
        self.counts[status] += 1
        if 500 <= status:
            message = _message(headers, body)
            version = re.fullmatch(r"Invalid HTTP version \(([0-9]+)\.[0-9]+\)", message or "")
            if status == 503 and "retry-after" in headers:
                pass
            elif status == 505 and version and int(version.group(1)) >= 2:
                pass  # RFC 9110: HTTP/2 or later on an HTTP/1.1 server
            else:
                self.problem(req, f"answered {status}: {body[:300]!r}")
        if headers.get("content-type", "").startswith("application/json") and body:
            try:
                value = json.loads(body)
            except ValueError as exc:
                self.problem(req, f"{status} with a body that is not JSON ({exc}): "
                                  f"{body[:200]!r}")
                return
            if status >= 400 and not (isinstance(value, dict) and value.get("error") is True
                                      and value.get("code") == status
                                      and isinstance(value.get("message"), str)):
                self.problem(req, f"{status} with an error body that is not "
                                  f"{{error, code, message}}: {body[:200]!r}")
        elif status >= 400 and not req.head_only:
            self.problem(req, f"{status} without a JSON error body: {headers} {body[:200]!r}")


def _message(headers, body):
    try:
        return json.loads(body)["message"]
    except (ValueError, KeyError, TypeError):
        return None


class _Conn:
    """A raw client connection: sends bytes, reads HTTP/1.1 responses one by one."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT)
        self.buf = b""
        self.eof = self.reset = False
        self.answered = 0

    def send(self, data, shut=False):
        """False if the server had closed (or reset) the connection."""
        try:
            self.sock.sendall(data)
            if shut:
                self.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            return False
        except OSError as exc:  # shutdown() once the server has closed
            if exc.errno != errno.ENOTCONN:
                raise
            return False
        return True

    def _fill(self):
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data, self.reset = b"", True
        except socket.timeout:
            raise TimeoutError from None
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def rest(self):
        while self._fill():
            pass
        rest, self.buf = self.buf, b""
        return rest

    def response(self, head_only):
        """(status, headers (lower-case names), body); None at the end of the stream;
        a string saying what is wrong with what came."""
        while True:
            while b"\r\n\r\n" not in self.buf:
                if not self._fill():
                    if self.buf and not self.reset:
                        return f"a partial response head: {self.buf[:300]!r}"
                    return None  # the end; or a reset, which may cut an answer short
            head, self.buf = self.buf.split(b"\r\n\r\n", 1)
            status_line, *lines = head.split(b"\r\n")
            found = _STATUS_LINE.fullmatch(status_line)
            if not found:
                return f"not an HTTP/1.1 status line: {status_line[:200]!r}"
            status = int(found.group(1))
            headers = {}
            for line in lines:
                name, colon, value = line.partition(b":")
                if not colon or not _TOKEN.fullmatch(name):
                    return f"a malformed response header: {line[:200]!r}"
                headers[name.decode().lower()] = value.strip().decode("latin-1")
            if status == 100:
                continue  # Expect: 100-continue; the answer follows
            if status < 200:
                return f"an unexpected interim status {status}"
            if status == 204 or head_only:
                return status, headers, b""
            if "content-length" not in headers:
                return f"{status} without Content-Length: {head[:300]!r}"
            length = int(headers["content-length"])
            while len(self.buf) < length:
                if not self._fill():
                    return None  # cut short: the server closed or reset the connection
            body, self.buf = self.buf[:length], self.buf[length:]
            return status, headers, body


# -- fuzz: the tests

def fuzz_app(make_app):
    return make_app(**{"server.request_timeout": 0.5, "server.keepalive_timeout": 0.5,
                       "worker_pool.queue_capacity": 100000})


def test_thousands_of_random_and_mutated_requests_get_no_5xx_and_leave_the_server_alive(
        make_app, caplog):
    """Every answer is HTTP with a JSON body ({error, code, message} from 400 up); none
    is a 5xx but 503 with Retry-After (and 505: see the top); no request hangs;
    then /status answers 200, a job still runs, and nothing was logged as an error."""
    caplog.set_level(logging.WARNING, logger="valet")
    app = fuzz_app(make_app)
    store = app.config["storage.option"]
    seed = int(os.environ.get("VALET_FUZZ_SEED") or SEEDS[store])
    fuzzer = Fuzzer(app.port, random.Random(seed))
    # Real ids for the paths, made before (so that what is sent depends on the seed
    # alone): finished, scheduled and cancelled jobs; finished and scheduled pipelines.
    later = "2999-01-01T00:00:00Z"
    fuzzer.job_ids += [submit(app, metadata={"n": n})["id"] for n in range(3)]
    fuzzer.job_ids += [submit(app, run_at=later)["id"] for _ in range(2)]
    assert call(app, "POST", f"/jobs/{fuzzer.job_ids[-1]}/cancel").status == 200
    fuzzer.pipeline_ids += [submit_pipeline(app, stage(), stage())["id"],
                            submit_pipeline(app, stage(), stage(), stage(), run_at=later)["id"]]

    fuzzer.run(REQUESTS_PER_STORE)

    replay = f"store {store}, seed {seed} (replay: VALET_FUZZ_SEED={seed})"
    if fuzzer.problems:
        shown = "\n".join(fuzzer.problems[:12])
        pytest.fail(f"{len(fuzzer.problems)} bad answers; {replay}; {dict(fuzzer.counts)}\n"
                    f"{shown}", pytrace=False)
    # The fuzz reached the routes, not just the parser.
    assert fuzzer.counts["requests"] >= REQUESTS_PER_STORE
    assert fuzzer.counts[202] >= 20 and fuzzer.counts[400] >= 100, (replay, fuzzer.counts)
    assert fuzzer.counts[200] >= 20 and fuzzer.counts[404] >= 20, (replay, fuzzer.counts)

    assert call(app, "GET", "/status").status == 200
    job = submit(app, metadata={"after": "the fuzz"})
    assert wait_for_status(app, job["id"], "COMPLETED")["metadata"] == {"after": "the fuzz"}
    errors = [r for r in caplog.records if r.name.startswith("valet") and
              (r.levelno >= logging.ERROR or "internal error" in r.getMessage())]
    assert not errors, (replay, [f"{r.levelname} {r.getMessage()}" for r in errors[:5]])


def nesting_near_the_limit_answers(app, bodies):
    """{status: [(depth, method, path), ...]} of each body(nested text) sent at every
    depth near Python's recursion limit: the depth at which a recursive json.dumps
    fails, while the parser still reads the body, depends on the server's stack."""
    answers = {}
    for depth in range(940, 1011):
        nested = "[" * depth + "]" * depth
        for method, path, body in bodies:
            resp = call(app, method, path, raw=body(nested).encode())
            answers.setdefault(resp.status, []).append((depth, method, path))
    return answers


def test_a_field_nested_just_under_the_parse_limit_gets_400_not_500(make_app, caplog):
    """Found by the fuzz: a field other than metadata (whose depth is checked without
    recursion) nested about 980 levels deep, which Python's JSON parser still reads,
    made the error message's json.dumps (_show) raise RecursionError: 500, and an
    "internal error" traceback in the log."""
    caplog.set_level(logging.WARNING, logger="valet")
    app = make_app()
    job_id = submit(app)["id"]
    answers = nesting_near_the_limit_answers(app, [
        ("POST", "/jobs", lambda nested: f'{{"name": {nested}, "task_name": "echo"}}'),
        ("POST", "/jobs", lambda nested: f'{{"name": "n", "task_name": "echo", '
                                         f'"priority": {nested}}}'),
        ("POST", "/pipelines", lambda nested: f'{{"name": "p", "jobs": {nested}}}'),
        ("PATCH", f"/jobs/{job_id}", lambda nested: f'{{"name": {nested}}}'),
    ])
    assert set(answers) == {400}, {status: found[:6] for status, found in answers.items()
                                   if status != 400}
    assert "internal error" not in caplog.text


def test_a_deeply_nested_body_with_a_surrogate_pair_escape_gets_400_not_500(make_app, caplog):
    """Found by the fuzz: a body with a \\uD83D\\uDE00 escape (as json.dumps writes
    an emoji) is encoded again by _Request.json() to look for a lone surrogate; nested
    just under the parser's limit, that json.dumps raised RecursionError: 500."""
    caplog.set_level(logging.WARNING, logger="valet")
    app = make_app()
    answers = nesting_near_the_limit_answers(app, [
        ("POST", "/jobs", lambda nested: f'{{"name": "\\ud83d\\ude00", "task_name": "echo", '
                                         f'"metadata": {nested}}}'),
        ("POST", "/pipelines", lambda nested: f'{{"name": "\\ud83d\\ude00", "jobs": {nested}}}'),
    ])
    assert set(answers) == {400}, {status: found[:6] for status, found in answers.items()
                                   if status != 400}
    assert "internal error" not in caplog.text


# ------------------------------------------------------------------- facade --

def test_embedding_program_can_submit_wait_and_read_results_without_http(app, gate):
    blocked = app.submit({"name": "blocked", "task_name": "gate"})
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(app.wait(blocked["id"], 30)))
    waiter.start()
    assert gate.entered.wait(10)
    gate.opened.set()
    waiter.join(5)  # woken by the finish, long before its 30 s run out
    assert not waiter.is_alive() and outcome[0]["status"] == valet.COMPLETED
    job = app.submit({"name": "direct", "task_name": "echo", "metadata": [1]})
    done = app.wait(job["id"], timeout=10)
    assert done["status"] == valet.COMPLETED and done == app.job(job["id"])
    assert done == call(app, "GET", f"/jobs/{job['id']}").body
    assert app.result(job["id"]) == {"job_id": job["id"], "metadata": [1], "error": None}
    assert app.wait("no-such-job") is None and app.job("no-such-job") is None
    with pytest.raises(valet.Invalid) as caught:
        app.submit({"name": "direct"})
    answer = valet._http_error(caught.value)
    assert answer.status == 400 and "task_name is required" in answer.message


def test_wait_gives_up_after_its_timeout_and_wakes_when_the_job_is_deleted(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    blocker = app.submit({"name": "b", "task_name": "gate"})
    assert gate.entered.wait(10)
    assert app.wait(blocker["id"], timeout=0.01)["status"] == valet.IN_PROGRESS
    queued = app.submit({"name": "q", "task_name": "echo"})
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(app.wait(queued["id"], 20)))
    waiter.start()
    wait_until(lambda: queued["id"] in app.lifecycle._waiters, what="the waiter to watch")
    assert call(app, "DELETE", f"/jobs/{queued['id']}").status == 204
    waiter.join(10)
    assert not waiter.is_alive() and outcome == [None]


@pytest.mark.parametrize("call_it", [
    lambda app: app.submit({"name": "n", "task_name": "echo"}),
    lambda app: app.submit_pipeline({"name": "p", "jobs": [{"name": "a", "task_name": "echo"},
                                                           {"name": "b", "task_name": "echo"}]}),
    lambda app: app.cancel("any"),
    lambda app: app.cancel_pipeline("any"),
    lambda app: app.update_job("any", {"name": "x"}),
    lambda app: app.delete_job("any"),
    lambda app: app.delete_result("any"),
    lambda app: app.update_pipeline("any", {"name": "x"}),
    lambda app: app.delete_pipeline("any"),
    lambda app: app.job("any"),
    lambda app: app.wait("any", 1),
    lambda app: app.list_jobs(),
    lambda app: app.result("any"),
    lambda app: app.pipeline("any"),
    lambda app: app.list_pipelines(),
])
def test_embedded_calls_after_stop_answer_503_on_both_stores(make_app, call_it):
    app = make_app()
    app.stop()
    with pytest.raises(valet.ShuttingDown) as caught:
        call_it(app)
    answer = valet._http_error(caught.value)
    assert answer.status == 503 and answer.message == "valet is shutting down"


def test_the_facade_answers_as_the_http_api_does(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    running = app.submit({"name": "r", "task_name": "gate"})
    assert gate.entered.wait(10)
    queued = app.submit({"name": "q", "task_name": "echo", "metadata": [1]})
    pipeline = app.submit_pipeline({"name": "p", "jobs": [stage(), stage()]})
    for got, path in [(app.job(queued["id"]), f"/jobs/{queued['id']}"),
                      (app.list_jobs(limit=2), "/jobs?limit=2"),
                      (app.list_jobs(status="in_progress"), "/jobs?status=in_progress"),
                      (app.pipeline(pipeline["id"]), f"/pipelines/{pipeline['id']}"),
                      ({"jobs": app.pipeline_jobs(pipeline["id"])},
                       f"/pipelines/{pipeline['id']}/jobs"),
                      (app.list_pipelines(status="PENDING"), "/pipelines?status=PENDING"),
                      ({"periodic": app.periodic()}, "/periodic"),
                      ({"tasks": app.task_names()}, "/tasks")]:
        assert got == call(app, "GET", path).body, path
    assert app.status()["workers"] == call(app, "GET", "/status").body["workers"]
    app.update_job(queued["id"], {"description": "changed"})
    app.update_pipeline(pipeline["id"], {"name": "renamed"})
    assert app.job(queued["id"])["description"] == "changed"
    assert app.pipeline(pipeline["id"])["name"] == "renamed"
    assert app.cancel(queued["id"])["status"] == valet.CANCELLED
    app.delete_job(queued["id"])
    assert app.cancel_pipeline(pipeline["id"])["status"] == valet.CANCELLED
    app.delete_pipeline(pipeline["id"])
    assert app.job(queued["id"]) is None and app.pipeline(pipeline["id"]) is None
    assert app.status()["queue"]["depth"] == 0  # both gave back their places
    gate.opened.set()
    assert app.wait(running["id"], 10)["status"] == valet.COMPLETED
    assert app.result(running["id"]) == call(app, "GET", f"/jobs/{running['id']}/results").body
    app.delete_result(running["id"])
    assert app.result(running["id"]) is None


@pytest.mark.parametrize("act, error, method, path, body", [
    (lambda app, i: app.delete_job(i), valet.Conflict, "DELETE", "/jobs/{id}", None),
    (lambda app, i: app.result(i, strict=True), valet.NotFound, "GET", "/jobs/{id}/results",
     None),
    (lambda app, i: app.delete_result(i), valet.NotFound, "DELETE", "/jobs/{id}/results",
     None),
    (lambda app, i: app.update_job(i, {"name": ""}), valet.Invalid, "PATCH", "/jobs/{id}",
     {"name": ""}),
    (lambda app, i: app.update_job("nope", {"name": "x"}), valet.NotFound, "PATCH",
     "/jobs/nope", {"name": "x"}),
    (lambda app, i: app.list_jobs(status="DONE"), valet.Invalid, "GET", "/jobs?status=DONE",
     None),
    (lambda app, i: app.delete_pipeline("nope"), valet.NotFound, "DELETE", "/pipelines/nope",
     None),
    (lambda app, i: app.cancel_pipeline("nope"), valet.NotFound, "POST",
     "/pipelines/nope/cancel", None),
])
def test_the_facade_raises_what_the_http_api_answers(app, gate, act, error, method, path,
                                                     body):
    running = app.submit({"name": "r", "task_name": "gate"})
    assert gate.entered.wait(10)
    with pytest.raises(error) as caught:
        act(app, running["id"])
    resp = call(app, method, path.format(id=running["id"]), body)
    assert (resp.status, resp.body["message"]) == (valet._http_error(caught.value).status,
                                                   str(caught.value))


def test_a_filtered_pipeline_listing_reads_on_until_its_page_is_full(make_app):
    app = make_app(start=False)
    for i in range(300):  # more than one read's worth; only two have FAILED
        status = valet.FAILED if i in (7, 290) else valet.COMPLETED
        job = dict(new_record(f"p{i}", status), pipeline_id=f"p{i}", completed_at=1.0)
        app.lifecycle.store.add(job, pipeline={
            "id": f"p{i}", "name": f"p{i}", "description": None, "priority": 0,
            "run_at": None, "created_at": float(i)})
    first = app.list_pipelines(status="failed", limit=1)
    assert [p["id"] for p in first["pipelines"]] == ["p7"]
    rest = app.list_pipelines(status="failed", limit=1, cursor=first["next_cursor"])
    assert [p["id"] for p in rest["pipelines"]] == ["p290"] and rest["next_cursor"] is None
    assert len(app.list_pipelines(limit=1000)["pipelines"]) == 300


@pytest.mark.parametrize("metadata, problem", [
    (float("nan"), "metadata must be plain JSON: Out of range float values"),
    ({"ids": {1, 2}}, "metadata must be plain JSON: Object of type set"),
    ([object()], "metadata must be plain JSON: Object of type object"),
])
def test_the_facade_refuses_what_json_cannot_hold_and_stores_nothing(app, metadata, problem):
    with pytest.raises(valet.Invalid, match=re.escape(problem)):
        app.submit({"name": "n", "task_name": "echo", "metadata": metadata})
    with pytest.raises(valet.Invalid, match=re.escape(f"jobs[1]: {problem}")):
        app.submit_pipeline({"name": "p", "jobs": [stage(), stage("echo", metadata)]})
    for body in ("a job", ["a", "list"]):
        with pytest.raises(valet.Invalid, match="must be a JSON object, got"):
            app.submit(body)
        with pytest.raises(valet.Invalid, match="must be a JSON object, got"):
            app.submit_pipeline(body)
    assert call(app, "GET", "/jobs").body == {"jobs": [], "next_cursor": None}


def test_a_stopped_valet_says_it_cannot_start_again(make_app):
    app = make_app()
    with pytest.raises(RuntimeError, match="^valet is already started$"):
        app.start()
    app.stop()
    with pytest.raises(RuntimeError, match="valet was stopped and cannot be started again"):
        app.start()
    never_started = make_app(start=False)
    never_started.stop()
    with pytest.raises(RuntimeError, match="valet was stopped"):
        never_started.start()


def test_valet_runs_on_a_store_it_is_given(tmp_path, gate, ran):
    store = valet.MemoryStore()
    config = {"server": {"port": 0}, "storage": {"sqlite": {"path": str(tmp_path / "x.db")}}}
    app = valet.Valet(config, tasks=make_tasks(gate, ran), store=store).start()
    try:
        job = app.submit({"name": "n", "task_name": "echo", "metadata": "via the given store"})
        assert app.wait(job["id"], 10)["status"] == valet.COMPLETED
        assert store.result(job["id"])["value"] == "via the given store"
        assert call(app, "GET", "/status").body["storage"] == {"option": "memory", "ok": True,
                                                               "error": None}
    finally:
        app.stop()
    assert not (tmp_path / "x.db").exists()


# -- Idempotency-Key

BODY = {"name": "n", "task_name": "echo", "metadata": {"order": 1}}


def test_repeated_key_and_body_replays_the_job_with_200_and_creates_nothing(app, ran):
    first = keyed(app, "/jobs", BODY, "order-1")
    assert first.status == 202 and "Idempotent-Replayed" not in first.headers
    job_id = first.body["id"]
    wait_for_status(app, job_id, valet.COMPLETED)
    again = keyed(app, "/jobs", BODY, "order-1")
    assert again.status == 200
    assert again.body == call(app, "GET", f"/jobs/{job_id}").body  # its current JSON
    assert again.body["id"] == job_id and again.body["status"] == valet.COMPLETED
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"] == f"/jobs/{job_id}"
    assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [job_id]
    assert ran == [{"order": 1}]


def test_repeated_key_and_body_replays_the_pipeline_with_200(app):
    body = {"name": "p", "jobs": [stage(metadata=1), stage(metadata=2)]}
    first = keyed(app, "/pipelines", body, "pipe-1")
    assert first.status == 202
    wait_for_pipeline(app, first.body["id"], valet.COMPLETED)
    again = keyed(app, "/pipelines", body, "pipe-1")
    assert again.status == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.body == call(app, "GET", f"/pipelines/{first.body['id']}").body
    assert again.headers["Location"] == first.headers["Location"]
    assert len(call(app, "GET", "/pipelines").body["pipelines"]) == 1
    assert len(call(app, "GET", "/jobs").body["jobs"]) == 2


def test_key_reused_with_another_body_or_for_a_pipeline_gets_409_naming_it(app):
    assert keyed(app, "/jobs", BODY, "k-409").status == 202
    other = keyed(app, "/jobs", dict(BODY, metadata={"order": 2}), "k-409")
    assert other.status == 409 and "'k-409'" in other.body["message"]
    as_pipeline = keyed(app, "/pipelines", {"name": "p", "jobs": [stage(), stage()]},
                        "k-409")
    assert as_pipeline.status == 409 and "'k-409'" in as_pipeline.body["message"]
    assert len(call(app, "GET", "/jobs").body["jobs"]) == 1
    assert call(app, "GET", "/pipelines").body["pipelines"] == []


@pytest.mark.parametrize("key", ["has space", "caf\u00e9", "x" * 256],
                         ids=["space", "non-ascii", "256-chars"])
def test_malformed_key_gets_400_and_stores_nothing(app, key):
    resp = keyed(app, "/jobs", BODY, key)
    assert resp.status == 400 and "Idempotency-Key" in resp.body["message"], resp
    assert call(app, "GET", "/jobs").body["jobs"] == []


def test_key_of_255_printable_characters_is_accepted(app):
    assert keyed(app, "/jobs", BODY, "~" * 255).status == 202


def test_key_given_twice_gets_400_and_stores_nothing(app):
    resp = post_with_headers(app, "/jobs", BODY, [("Idempotency-Key", "a"),
                                                  ("Idempotency-Key", "a")])
    assert resp.status == 400 and "Idempotency-Key" in resp.body["message"], resp
    assert call(app, "GET", "/jobs").body["jobs"] == []


def test_ten_concurrent_requests_with_one_key_create_exactly_one_job(app):
    answers = [None] * 10

    def post_once(i):
        resp = keyed(app, "/jobs", BODY, "together")
        answers[i] = (resp.status, resp.body["id"])

    run_together(post_once, 10)
    assert sorted(status for status, _ in answers) == [200] * 9 + [202]
    assert len({job_id for _, job_id in answers}) == 1
    assert [j["id"] for j in call(app, "GET", "/jobs").body["jobs"]] == [answers[0][1]]


def test_key_is_free_again_once_its_finished_job_is_deleted(app):
    first = keyed(app, "/jobs", BODY, "reuse").body["id"]
    wait_for_status(app, first, valet.COMPLETED)
    assert call(app, "DELETE", f"/jobs/{first}").status == 204
    again = keyed(app, "/jobs", BODY, "reuse")
    assert again.status == 202 and again.body["id"] != first
    replay = keyed(app, "/jobs", BODY, "reuse")
    assert replay.status == 200 and replay.body["id"] == again.body["id"]


def test_key_is_free_again_once_retention_deletes_what_it_made(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, **{"retention.finished_jobs": "1h"})
    pipeline_body = {"name": "p", "jobs": [stage(), stage()]}
    job = keyed(app, "/jobs", BODY, "job-key").body["id"]
    pipeline = keyed(app, "/pipelines", pipeline_body, "pipe-key").body["id"]
    wait_for_status(app, job, valet.COMPLETED)
    wait_for_pipeline(app, pipeline, valet.COMPLETED)
    clock.advance(3601)
    assert app.sweep() == 3
    assert app._store.find_key("job-key") is None and app._store.find_key("pipe-key") is None
    again = keyed(app, "/jobs", BODY, "job-key")
    assert again.status == 202 and again.body["id"] != job
    again = keyed(app, "/pipelines", pipeline_body, "pipe-key")
    assert again.status == 202 and again.body["id"] != pipeline


def test_facade_submits_once_per_key(app):
    fields = {"name": "n", "task_name": "echo", "metadata": "facade"}
    first = app.submit(fields, idempotency_key="facade")
    assert app.submit(fields, idempotency_key="facade")["id"] == first["id"]
    made, created = app.submit_once(fields, "facade-2")
    assert created is True and made["id"] != first["id"]
    replayed, created = app.submit_once(fields, "facade-2")
    assert created is False and replayed["id"] == made["id"]
    pipeline_fields = {"name": "p", "jobs": [stage(), stage()]}
    made, created = app.submit_pipeline_once(pipeline_fields, "facade-3")
    assert created is True
    replayed, created = app.submit_pipeline_once(pipeline_fields, "facade-3")
    assert created is False and replayed["id"] == made["id"]
    assert len(app.list_jobs()["jobs"]) == 4


def test_replay_answers_200_while_the_backlog_is_full(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "worker_pool.queue_capacity": 1})
    submit(app, "gate")
    assert gate.entered.wait(10)  # the one worker is busy; the backlog is empty
    first = keyed(app, "/jobs", BODY, "full")
    assert first.status == 202  # it waits: the backlog's one place is taken
    assert call(app, "POST", "/jobs", BODY).status == 503
    replay = keyed(app, "/jobs", BODY, "full")
    assert replay.status == 200 and replay.body["id"] == first.body["id"]
    assert replay.body["status"] == valet.PENDING


# -- retention

@pytest.mark.parametrize("value, seconds", [("7d", 7 * DAY), ("12h", 12 * 3600),
                                            ("90s", 90), (None, None)])
def test_retention_accepts_durations_and_null(value, seconds):
    app = valet.Valet({"storage": {"option": "memory"},
                       "retention": {"finished_jobs": value}}, tasks={})
    assert app.retention == seconds
    assert valet.load_config({})["retention.finished_jobs"] == "7d"  # the default


@pytest.mark.parametrize("value", ["7 days", "1w", "0.5s", "", -1, True, [1]])
def test_bad_retention_is_a_config_error_naming_the_key(value):
    with pytest.raises(valet.ConfigError, match=r"^retention\.finished_jobs: "):
        valet.load_config({"retention": {"finished_jobs": value}})


def test_sweep_deletes_what_finished_before_the_cutoff_never_unfinished_jobs(make_app,
                                                                            gate):
    holding, held = threading.Event(), threading.Event()

    def hold(metadata):
        holding.set()
        assert held.wait(10)
        return "held"

    clock = FakeClock()
    app = make_app(clock=clock, tasks={"hold": hold}, **{"retention.finished_jobs": "1h"})
    done = keyed(app, "/jobs", BODY, "done-key").body
    failed = submit(app, "fail")
    whole = submit_pipeline(app, stage(), stage())
    wait_for_status(app, done["id"], valet.COMPLETED)
    wait_for_status(app, failed["id"], valet.FAILED)
    wait_for_pipeline(app, whole["id"], valet.COMPLETED)
    cancelled = cancelled_job(app, clock)
    scheduled = submit(app, run_at=at(clock, 100 * DAY))
    partial = submit_pipeline(app, stage(), stage("hold"))
    assert holding.wait(10)
    running = submit(app, "gate")
    assert gate.entered.wait(10)
    queued = [submit(app, "gate")["id"] for _ in range(2)]  # both workers are busy
    clock.advance(1800)  # partial's last job finishes half an hour after the rest
    held.set()
    wait_for_pipeline(app, partial["id"], valet.COMPLETED)
    wait_for_status(app, queued[0], valet.IN_PROGRESS)  # took the freed worker
    unfinished = {scheduled["id"]: valet.SCHEDULED, running["id"]: valet.IN_PROGRESS,
                  queued[0]: valet.IN_PROGRESS, queued[1]: valet.PENDING}
    partial_jobs = {job["id"] for job in partial["jobs"]}
    assert app._store.result(done["id"]) is not None

    clock.advance(1801)  # the cutoff is 1 s after the first jobs finished
    assert app.sweep() == 5  # done, failed, cancelled, and whole's two jobs
    assert job_ids(app) == set(unfinished) | partial_jobs
    assert app._store.result(done["id"]) is None
    assert app._store.find_key("done-key") is None
    assert call(app, "GET", f"/pipelines/{whole['id']}").status == 404
    assert call(app, "GET", f"/jobs/{cancelled['id']}").status == 404

    clock.advance(1800)  # now partial's last job finished more than an hour ago too
    assert app.sweep() == 2
    assert call(app, "GET", f"/pipelines/{partial['id']}").status == 404
    clock.advance(400 * DAY)
    assert app.sweep() == 0
    assert {job_id: job_status(app, job_id) for job_id in unfinished} == unfinished


def test_sweep_deletes_one_batch_of_at_most_500_and_returns_the_count(make_app):
    clock = FakeClock()
    app = make_app(clock=clock, **{"retention.finished_jobs": "1h"})
    old = clock.now - 30 * DAY
    kept = [unfinished_record(old, status) for status in (valet.SCHEDULED, valet.PENDING)]
    app._store.add(kept[0])
    app._store.add(*[finished_record(old + i) for i in range(1200)])
    app._store.add(kept[1])
    assert [app.sweep() for _ in range(4)] == [500, 500, 200, 0]
    assert job_ids(app) == {job["id"] for job in kept}


@pytest.mark.parametrize("keep, count", [("7d", 1), (None, 0)])
def test_retention_thread_runs_only_when_retention_is_set(make_app, keep, count):
    def retention_threads():
        return {t for t in threading.enumerate() if t.name == "valet-retention"}

    before = retention_threads()
    clock = FakeClock()
    app = make_app(clock=clock, start=False, **{"retention.finished_jobs": keep})
    app._store.add(finished_record(clock.now - 400 * DAY))
    assert retention_threads() - before == set()  # not before start()
    app.start()
    started = retention_threads() - before
    assert len(started) == count
    assert app.sweep() == (1 if keep else 0)  # null keeps even a job a year old
    app.stop()
    for thread in started:
        thread.join(10)
        assert not thread.is_alive()


def on_disk(path):
    """Bytes the database takes (file and WAL), once the WAL is checkpointed."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = f"{path}-wal"
    return os.path.getsize(path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


def test_a_sweep_of_a_file_made_before_0_5_0_keeps_its_pages_for_reuse(tmp_path):
    path = tmp_path / "old.db"
    sqlite3.connect(path).execute("CREATE TABLE placeholder (x)").connection.close()
    clock = FakeClock()  # a file with a table already: no auto_vacuum, as 0.4.0 made it
    app = valet.Valet({"storage": {"option": "sqlite", "sqlite": {"path": str(path)}},
                       "retention": {"finished_jobs": "1h"}}, tasks={}, clock=clock)
    try:
        app._store.add(*[finished_record(clock.now - DAY, metadata={"blob": "x" * 4000})
                         for _ in range(50)])
        assert app.sweep() == 50 and app.sweep() == 0  # no endless vacuum loop
    finally:
        app.stop()


def test_sqlite_file_gives_space_back_after_a_sweep(tmp_path):
    path = tmp_path / "shrink.db"
    clock = FakeClock()
    app = valet.Valet({"storage": {"option": "sqlite", "sqlite": {"path": str(path)}},
                       "retention": {"finished_jobs": "1h"}}, tasks={}, clock=clock)
    try:
        empty = on_disk(path)
        blob = "x" * 4000
        for start in range(0, 2000, 250):
            app._store.add(*[finished_record(clock.now - DAY, metadata={"n": n, "blob": blob})
                             for n in range(start, start + 250)])
        full = on_disk(path)
        assert full > 8_000_000
        swept = []
        while not swept or swept[-1]:
            swept.append(app.sweep())
        assert sum(swept) == 2000
        emptied = on_disk(path)
        assert emptied < full / 10, (empty, full, emptied)
    finally:
        app.stop()


def test_memory_stays_bounded_swept_jobs_leave_nothing_behind(make_app):
    clock = FakeClock()
    app = make_app(clock=clock)  # retention by default: 7d
    ids = []
    for i in range(40):
        job = app.submit({"name": "n", "task_name": "echo", "metadata": i},
                         idempotency_key=f"k{i}")
        assert app.wait(job["id"], 10)["status"] == valet.COMPLETED
        ids.append(job["id"])
    clock.advance(7 * DAY - 1)
    assert app.sweep() == 0
    clock.advance(2)
    assert app.sweep() == 40 and app.sweep() == 0
    assert app._store.list(limit=1000) == []
    assert all(app._store.result(job_id) is None for job_id in ids)
    assert all(app._store.find_key(f"k{i}") is None for i in range(40))
    store = app._store
    if isinstance(store, valet.MemoryStore):
        assert not (store._jobs or store._ids or store._seqs or store._results
                    or store._keys or store._key_of)
        assert not any(store._by_status.values())


# -- bulk delete

def test_bulk_delete_by_status_deletes_only_failed_standalone_jobs(app, gate):
    completed = submit(app)
    failed = [submit(app, "fail") for _ in range(2)]
    cancelled = cancelled_job(app)
    in_pipeline = submit_pipeline(app, stage("fail"), stage())
    running = submit(app, "gate")
    assert gate.entered.wait(10)
    wait_for_status(app, completed["id"], valet.COMPLETED)
    for job in failed:
        wait_for_status(app, job["id"], valet.FAILED)
    wait_for_pipeline(app, in_pipeline["id"], valet.FAILED)
    resp = bulk_delete(app, status="FAILED")
    assert resp.status == 200 and resp.body == {"deleted": 2}
    assert job_ids(app) == {completed["id"], cancelled["id"], running["id"],
                            *(job["id"] for job in in_pipeline["jobs"])}


def test_bulk_delete_finished_before_deletes_only_jobs_finished_earlier(make_app, gate):
    clock = FakeClock()
    app = make_app(clock=clock)
    early = [submit(app)["id"], submit(app, "fail")["id"], cancelled_job(app, clock)["id"]]
    pipeline = submit_pipeline(app, stage(), stage())
    scheduled = submit(app, run_at=at(clock, DAY))
    running = submit(app, "gate")
    assert gate.entered.wait(10)
    for job_id in early[:2]:
        wait_for_status(app, job_id, valet.COMPLETED, valet.FAILED)
    wait_for_pipeline(app, pipeline["id"], valet.COMPLETED)
    clock.advance(3600)
    late = submit(app)["id"]
    wait_for_status(app, late, valet.COMPLETED)
    resp = bulk_delete(app, finished_before=at(clock, -1800))
    assert resp.status == 200 and resp.body == {"deleted": 3}
    unfinished = {scheduled["id"], running["id"], *(job["id"] for job in pipeline["jobs"])}
    assert job_ids(app) == unfinished | {late}
    both = bulk_delete(app, status="COMPLETED", finished_before=at(clock, 1))
    assert both.status == 200 and both.body == {"deleted": 1}
    assert job_ids(app) == unfinished


@pytest.mark.parametrize("query, message", [
    ({}, "give status, finished_before or both"),
    ({"status": "PENDING"}, "status must be COMPLETED, FAILED or CANCELLED"),
    ({"status": "PENDING", "finished_before": "2100-01-01T00:00:00Z"}, "status must be"),
    ({"finished_before": "yesterday"}, "finished_before must be an RFC 3339 time"),
    ({"status": "COMPLETED", "finished_before": "2100-13-01T00:00:00Z"},
     'finished_before "2100-13-01T00:00:00Z" is not a real time'),
])
def test_rejected_bulk_delete_gets_400_naming_the_problem_and_deletes_nothing(app, query,
                                                                             message):
    jobs = [submit(app)["id"], submit(app, "fail")["id"]]
    for job_id in jobs:
        wait_for_status(app, job_id, valet.COMPLETED, valet.FAILED)
    resp = bulk_delete(app, **query)
    assert resp.status == 400 and message in resp.body["message"], resp
    assert job_ids(app) == set(jobs)


def test_bulk_delete_of_1200_jobs_deletes_them_all_in_batches(app):
    now = time.time()
    app._store.add(*[finished_record(now - 60 + i / 1000) for i in range(1200)])
    kept = finished_record(now - 60, valet.FAILED)
    app._store.add(kept)
    resp = bulk_delete(app, status="COMPLETED")
    assert resp.status == 200 and resp.body == {"deleted": 1200}
    assert job_ids(app) == {kept["id"]}


# ------------------------------------------------------------------- client --

@pytest.fixture
def client(app, monkeypatch, capsys):
    """Run `python valet.py COMMAND ...` in-process against the app: (exit code,
    stdout, stderr)."""
    monkeypatch.setenv("VALET_URL", app.url)
    monkeypatch.delenv("VALET_AUTH_TOKEN", raising=False)

    def run(*argv):
        try:
            code = valet.main(list(argv))
        except SystemExit as exc:  # argparse: a usage error, or -h
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


def test_client_submits_waits_and_exits_0_or_1_by_the_jobs_end(client):
    code, out, _ = client("submit", "echo", "--metadata", '{"a": 1}', "--wait")
    assert code == 0 and re.fullmatch(r"job [0-9a-f-]{36} COMPLETED\n", out)
    code, out, _ = client("--json", "submit", "fail", "--wait")
    assert code == 1 and json.loads(out)["failure_reason"] == "ValueError: boom"
    code, out, _ = client("submit", "echo", "--name", "later", "--run-at",
                          "2100-01-01T00:00:00Z")
    assert code == 0 and out.endswith(" SCHEDULED\n")


def test_client_tells_a_failure_on_stderr_with_its_reason_and_exits_1(client):
    code, out, err = client("submit", "fail", "--wait")
    assert code == 1 and out == ""
    assert re.fullmatch(r"job [0-9a-f-]{36} FAILED: ValueError: boom\n", err)
    job_id = err.split()[1]
    assert client("result", job_id) == (1, "", f"job {job_id} failed: ValueError: boom\n")
    code, out, _ = client("--json", "result", job_id)
    assert code == 1 and json.loads(out)["error"] == "ValueError: boom"


def test_client_says_how_to_write_a_url_without_a_scheme(client, app):
    code, out, err = client("--url", f"127.0.0.1:{app.port}", "status")
    assert code == 2 and out == ""
    assert err == (f"valet: --url (or VALET_URL) must be http://HOST:PORT or https://..., "
                   f"got '127.0.0.1:{app.port}'\n")


def test_client_status_gives_the_job_counts_and_the_oldest_wait(client, app):
    submit(app, "echo", run_at="2100-01-01T00:00:00Z")
    lines = client("status")[1].splitlines()
    assert lines[2] == ("jobs: 1 scheduled, 0 pending, 0 in_progress, 0 completed, "
                        "0 failed, 0 cancelled")
    assert lines[3] == "queue: 0 of 20 waiting"


def test_client_lists_shows_and_acts_on_jobs(client, app, tmp_path):
    (tmp_path / "m.json").write_text('{"from": "a file"}')
    code, out, _ = client("submit", "echo", "--metadata-file", str(tmp_path / "m.json"),
                          "--wait", "--json")
    job_id = json.loads(out)["id"]
    code, out, _ = client("jobs", "--task", "echo")
    header, row = out.splitlines()
    assert header.split() == ["ID", "STATUS", "TASK_NAME", "NAME", "CREATED_AT"]
    assert row.split()[:4] == [job_id, valet.COMPLETED, "echo", "echo"]
    assert json.loads(client("show", job_id)[1])["id"] == job_id
    assert json.loads(client("result", job_id)[1]) == {"from": "a file"}
    assert client("retry", job_id)[0] == 3  # COMPLETED: refused
    later = app.submit({"name": "n", "task_name": "echo", "run_at": "2100-01-01T00:00:00Z"})
    assert client("cancel", later["id"]) == (0, f"job {later['id']} CANCELLED\n", "")
    assert client("retry", later["id"])[1] == f"job {later['id']} PENDING\n"
    wait_for_status(app, later["id"], valet.COMPLETED)
    assert client("delete", later["id"]) == (0, f"job {later['id']} deleted\n", "")
    assert "echo\nexits\nfail" in client("tasks")[1]
    assert client("status")[1].startswith(f"valet {valet.__version__}, up ")


def test_client_exit_codes_say_usage_refusal_or_no_server(client, monkeypatch):
    code, _, err = client("show", "no-such-job")
    assert code == 3 and err == "valet: 404: job 'no-such-job' not found\n"
    code, _, err = client("submit", "echo", "--metadata", "{not json")
    assert code == 2 and err.startswith("valet: the metadata is not JSON")
    assert client("submit")[0] == 2  # argparse: the task is missing
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    code, _, err = client("--url", f"http://127.0.0.1:{port}", "status")
    assert code == 3 and err.startswith(f"valet: cannot reach http://127.0.0.1:{port}")


def test_client_process_sends_the_token_from_the_environment(tmp_path, processes):
    token = "t" * 20
    proc = processes(tmp_path, server={"auth_token": token})
    env = {**os.environ, "VALET_URL": f"http://127.0.0.1:{proc.port}"}
    run = [sys.executable, os.path.join(HERE, "valet.py"), "tasks"]
    refused = subprocess.run(run, capture_output=True, text=True, timeout=30,
                             env={k: v for k, v in env.items() if k != "VALET_AUTH_TOKEN"})
    assert refused.returncode == 3 and refused.stderr.startswith("valet: 401: ")
    served = subprocess.run(run, capture_output=True, text=True, timeout=30,
                            env={**env, "VALET_AUTH_TOKEN": token})
    assert served.returncode == 0 and "echo" in served.stdout.split()


def test_a_server_option_value_that_names_a_command_still_runs_the_server():
    assert not valet._is_client(["--host", "jobs", "--port", "0"])
    assert valet._is_client(["--url", "http://x", "--json", "jobs"])
    assert valet._is_client(["--url=http://x", "status"])


# ---------------------------------------------------------------- dashboard --

# The dashboard (GET /), driven in a real headless Chromium through chromedriver's
# W3C WebDriver HTTP API, with the standard library only. Skips, saying how to
# enable it, when chromium or chromedriver is missing.

_WD_ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference


# -- dashboard: a WebDriver client, and helpers

def _browser_paths():
    """(chromium, chromedriver): /usr/bin's, or VALET_CHROMIUM and VALET_CHROMEDRIVER."""
    return (os.environ.get("VALET_CHROMIUM", "/usr/bin/chromium"),
            os.environ.get("VALET_CHROMEDRIVER", "/usr/bin/chromedriver"))


class _WdError(Exception):
    def __init__(self, status, error, message):
        super().__init__(f"{status} {error}: {message}")
        self.error = error


class _WdClient:
    """A minimal W3C WebDriver client over http.client: one session."""

    def __init__(self, port):
        self.port, self.session = port, None

    def call(self, method, path, body=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            payload = json.loads(resp.read() or b"null")
        finally:
            conn.close()
        value = payload.get("value") if isinstance(payload, dict) else payload
        if resp.status >= 400:
            value = value or {}
            raise _WdError(resp.status, value.get("error"), value.get("message"))
        return value

    def __call__(self, method, path, body=None):
        """A command of the session: path is relative to /session/{id}."""
        return self.call(method, f"/session/{self.session}{path}", body)

    def start(self, user_data_dir):
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={user_data_dir}", "--window-size=1280,900"]
        caps = {"browserName": "chrome", "pageLoadStrategy": "normal",
                "goog:chromeOptions": {"binary": _browser_paths()[0], "args": args},
                "goog:loggingPrefs": {"browser": "ALL"}}
        value = self.call("POST", "/session", {"capabilities": {"alwaysMatch": caps}}, timeout=60)
        self.session = value["sessionId"]
        self("POST", "/timeouts", {"implicit": 0, "script": 10000, "pageLoad": 20000})

    def quit(self):
        if self.session is not None:
            try:
                self.call("DELETE", f"/session/{self.session}", timeout=20)
            finally:
                self.session = None

    # -- the page
    def get(self, url):
        self("POST", "/url", {"url": url})

    def js(self, script, *args):
        return self("POST", "/execute/sync", {"script": script, "args": list(args)})

    def find(self, css):
        """The first element matching css, or None."""
        found = self("POST", "/elements", {"using": "css selector", "value": css})
        return found[0][_WD_ELEMENT] if found else None

    def wait_find(self, css, timeout=8.0):
        return wait_until(lambda: self.find(css), timeout, f"an element {css!r}")

    def click(self, css):
        """Click the element once it is there, shown and enabled (the page updates live)."""
        def attempt():
            element = self.find(css)
            if element is None or not self.js(
                    "const e = arguments[0]; return !!(e.offsetParent || e.getClientRects().length)"
                    " && !e.disabled", {_WD_ELEMENT: element}):
                return False
            try:
                self("POST", f"/element/{element}/click", {})
            except _WdError as exc:  # replaced or covered between find and click
                if exc.error not in ("stale element reference", "element click intercepted",
                                     "element not interactable"):
                    raise
                return False
            return True
        wait_until(attempt, what=f"{css!r} to be clickable")

    def choose(self, select_css, value):
        """Pick an option of a <select>, as a user does (WebDriver clicks the option)."""
        option = self.wait_find(f'{select_css} option[value="{value}"]')
        self("POST", f"/element/{option}/click", {})
        wait_until(lambda: self.js("return document.querySelector(arguments[0]).value",
                                          select_css) == value, what=f"{value!r} chosen")

    def type(self, css, text):
        element = self.wait_find(css)
        self("POST", f"/element/{element}/clear", {})
        self("POST", f"/element/{element}/value", {"text": text})

    def text(self, css):
        return self.js("const e = document.querySelector(arguments[0]); return e && e.textContent",
                       css)

    def visible(self, css):
        return self.js("const e = document.querySelector(arguments[0]);"
                       "return !!e && !!(e.offsetParent || e.getClientRects().length)", css)

    def console(self):
        """The browser console entries since the last call: [{level, message, ...}]."""
        return self("POST", "/se/log", {"type": "browser"})


def _wd_start_driver():
    """Start chromedriver on a free port; (process, port, its output lines)."""
    proc = subprocess.Popen([_browser_paths()[1], "--port=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()

    def drain():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, name="chromedriver-output", daemon=True).start()
    deadline, seen = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        found = re.search(r"started successfully on port (\d+)", line)
        if found:
            return proc, int(found.group(1))
    proc.kill()
    proc.wait(10)
    pytest.fail("chromedriver did not start: " + "".join(seen)[-2000:])


def _wd_stop_driver(proc):
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _browser_app(tmp_path, release, settings=None, **overrides):
    """A started Valet on a free port with a SQLite file in tmp_path (and `settings`,
    config.yaml-shaped) and test tasks: echo, and block (runs until `release` is set
    or the job is cancelled)."""
    def echo(metadata):
        return metadata

    def block(metadata, context):
        while not (release.is_set() or context.cancelled.is_set()):
            context.progress(0.5, "halfway")
            context.cancelled.wait(0.05)
        return {"released": release.is_set()}

    config = valet.load_config({"storage": {"option": "sqlite",
                                            "sqlite": {"path": str(tmp_path / "valet.db")}},
                                **(settings or {})},
                               {"server.port": 0, "worker_pool.workers": 2,
                                "worker_pool.shutdown_grace": 5, **overrides})
    return valet.Valet(config, tasks={"echo": echo, "block": block}).start()


def _browser_call(app, method, path, body=None, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        data = None if body is None else json.dumps(body).encode()
        if data:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        text = resp.read()
        return resp.status, (json.loads(text) if text else None)
    finally:
        conn.close()


def _browser_submit(app, token=None, **fields):
    status, job = _browser_call(app, "POST", "/jobs", {"name": "job", "task_name": "echo",
                                                       **fields}, token)
    assert status == 202, job
    return job


def _browser_pipeline(app, name, jobs, token=None, **fields):
    status, pipeline = _browser_call(app, "POST", "/pipelines",
                                     {"name": name, "jobs": jobs, **fields}, token)
    assert status == 202, pipeline
    return pipeline


def _browser_later(seconds=3600):
    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _browser_severe(entries):
    return [e for e in entries if e.get("level") in ("SEVERE", "WARNING")]


# -- dashboard: fixtures

@pytest.fixture(scope="module")
def _browser_driver():
    """chromedriver, started once for the module; skips when it cannot run."""
    missing = [path for path in _browser_paths()
               if not (os.path.isfile(path) and os.access(path, os.X_OK))]
    if missing:
        pytest.skip(f"the dashboard tests need {' and '.join(missing)}: "
                    f"apt-get install chromium chromium-driver")
    proc, port = _wd_start_driver()
    yield port
    _wd_stop_driver(proc)


@pytest.fixture(scope="module")
def _browser_session(_browser_driver, tmp_path_factory):
    """One headless Chromium for the module (starting one takes a second or two)."""
    client = _WdClient(_browser_driver)
    try:
        client.start(tmp_path_factory.mktemp("chromium-profile"))
        yield client
    finally:
        client.quit()


@pytest.fixture
def _browser(_browser_session):
    """The browser on a blank page, its console read empty, so that a test sees only
    its own entries. Each test's valet listens on a port of its own, so its page has
    an origin (and sessionStorage) of its own too."""
    _browser_session.get("about:blank")
    _browser_session.console()
    yield _browser_session
    _browser_session.get("about:blank")


@pytest.fixture
def _browser_valet(tmp_path):
    """make(**config overrides) -> a started Valet; stopped, its blocked tasks released."""
    release, apps = threading.Event(), []

    def make(settings=None, **overrides):
        app = _browser_app(tmp_path, release, settings, **overrides)
        apps.append(app)
        return app

    yield make
    release.set()
    for app in apps:
        app.stop()


# -- dashboard: the tests

def test_dashboard_loads_without_console_errors(_browser, _browser_valet):
    app = _browser_valet()
    _browser_submit(app, name="done")
    _browser.get(app.url + "/")
    for status in valet.STATUSES:
        _browser.wait_find(f'[data-count="{status}"]')
    # the counts come from /status: wait until they are numbers, and the echo job ran
    wait_until(lambda: _browser.text('[data-count="COMPLETED"] .n') == "1",
                      what="the COMPLETED tile to count the job")
    assert _browser.text('[data-count="FAILED"] .n') == "0"
    assert _browser.js("return document.title") == "valet"
    # a second poll has come and gone without errors either
    version = _browser.text("#version")
    assert version == valet.__version__
    entries = _browser.console()
    assert _browser_severe(entries) == [], entries


def test_the_header_names_the_worker_type_and_what_it_counts(_browser, _browser_valet,
                                                              process_app):
    threads = _browser_valet()
    _browser.get(threads.url + "/")
    wait_until(lambda: _browser.text("#f-kind") == "threads", what="the worker type")
    assert (_browser.text("#f-workers"), _browser.text("#f-lost")) == ("0 / 2", "abandoned")
    processes = process_app()
    _browser.get(processes.url + "/")
    wait_until(lambda: _browser.text("#f-kind") == "processes", what="the worker type")
    assert (_browser.text("#f-workers"), _browser.text("#f-lost"),
            _browser.text("#f-abandoned")) == ("0 / 1", "replaced", "0")
    assert _browser_severe(_browser.console()) == []


def test_a_job_submitted_over_the_api_appears_without_a_reload(_browser, _browser_valet):
    app = _browser_valet()
    _browser.get(app.url + "/")
    _browser.wait_find('[data-count="SCHEDULED"]')
    _browser.js("window.__same_page = true")
    job = _browser_submit(app, name="later", run_at=_browser_later())
    row = f'tr[data-job-id="{job["id"]}"]'
    _browser.wait_find(row)
    assert _browser.js("return window.__same_page === true"), "the page was reloaded"
    assert _browser.text(row + " .badge") == "SCHEDULED"
    assert "later" in _browser.text(row)
    wait_until(lambda: _browser.text('[data-count="SCHEDULED"] .n') == "1",
                      what="the SCHEDULED tile to count the job")
    assert _browser_severe(_browser.console()) == []


def test_cancel_from_the_detail_cancels_the_job(_browser, _browser_valet):
    app = _browser_valet()
    job = _browser_submit(app, name="long one", task_name="block")
    wait_until(lambda: app.job(job["id"])["status"] == "IN_PROGRESS",
                      what="the job to start")
    _browser.get(app.url + "/")
    _browser.click(f'tr[data-job-id="{job["id"]}"]')
    status = '#detail [data-field="status"]'
    wait_until(lambda: _browser.js(
        "const e = document.querySelector(arguments[0]); return e && e.dataset.value",
        status) == "IN_PROGRESS", what="the detail to show IN_PROGRESS")
    wait_until(lambda: _browser.visible('#detail [data-section="progress"]'),
                      what="the progress bar")
    _browser.click('#detail [data-action="cancel"]')
    _browser.click('#confirm [data-action="confirm"]')  # the in-page confirmation
    wait_until(lambda: app.job(job["id"])["status"] == "CANCELLED",
                      what="the job to be CANCELLED over the API")
    assert _browser_call(app, "GET", f"/jobs/{job['id']}")[1]["status"] == "CANCELLED"
    wait_until(lambda: _browser.text(status) == "CANCELLED",
                      what="the detail to show CANCELLED")
    assert _browser.text('#detail [data-field="failure_reason"]') == "cancelled by request"
    assert not _browser.visible('#detail [data-action="cancel"]')
    assert _browser_severe(_browser.console()) == []


def test_a_token_is_asked_for_kept_in_the_session_and_never_put_in_a_url(
        _browser, _browser_valet):
    token = "dashboard-test-token-5f2c9a"
    app = _browser_valet(**{"server.auth_token": token})
    job = _browser_submit(app, token=token, name="guarded", run_at=_browser_later())
    paths, logger = [], logging.getLogger("valet")

    class Paths(logging.Handler):  # every request valet answers, as its debug line
        def emit(self, record):
            paths.append(record.getMessage())

    handler, level = Paths(logging.DEBUG), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        _browser.get(app.url + "/")
        wait_until(lambda: _browser.visible("#token-form"), what="the token form")
        assert not _browser.visible("#tiles")
        _browser.type('#token-form input[name="token"]', "not-the-token")
        _browser.click('#token-form button[type="submit"]')
        wait_until(lambda: _browser.visible("#token-error"),
                          what="the token form to say the token was refused")
        assert "not accepted" in _browser.text("#token-error")
        assert _browser.visible("#token-form")
        _browser.type('#token-form input[name="token"]', token)
        _browser.click('#token-form button[type="submit"]')
        _browser.wait_find(f'tr[data-job-id="{job["id"]}"]')
        assert not _browser.visible("#token-form")
        assert _browser.js("return sessionStorage.getItem('valet-token')") == token
        urls = _browser.js("return [location.href, document.referrer, ...performance"
                           ".getEntriesByType('resource').map(e => e.name)]")
        assert any("/jobs" in url for url in urls)
        entries = _browser.console()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert paths and any(" /status " in line for line in paths)
    quoted = urllib.parse.quote(token)
    for text in [*urls, *paths, *(e.get("message", "") for e in entries)]:
        assert token not in text and quoted not in text, text
    # forgetting it asks again
    _browser.click("#forget-token")
    wait_until(lambda: _browser.visible("#token-form"), what="the token form again")
    assert _browser.js("return sessionStorage.getItem('valet-token')") is None


def test_a_job_submitted_from_the_form_is_created(_browser, _browser_valet):
    app = _browser_valet()
    _browser.get(app.url + "/")
    _browser.click('[data-tab="submit"]')
    _browser.choose('#submit-form select[name="task_name"]', "echo")
    _browser.type('#submit-form input[name="name"]', "from the form")
    _browser.type('#submit-form textarea[name="metadata"]', '{"n": 5, oops}')
    _browser.click('#submit-form button[type="submit"]')
    wait_until(lambda: _browser.visible("#submit-error"), what="the JSON error")
    assert "not valid JSON" in _browser.text("#submit-error")
    assert app.list_jobs()["jobs"] == []  # nothing was sent
    _browser.type('#submit-form textarea[name="metadata"]', '{"n": 5, "words": ["a", "b"]}')
    _browser.click('#submit-form button[type="submit"]')
    jobs = wait_until(lambda: app.list_jobs(name="from the form")["jobs"],
                             what="the job to be created")
    assert len(jobs) == 1
    assert jobs[0]["task_name"] == "echo"
    assert jobs[0]["metadata"] == {"n": 5, "words": ["a", "b"]}
    wait_until(lambda: _browser.text('#detail [data-field="name"]') == "from the form",
                      what="the detail of the new job")
    wait_until(lambda: _browser.text('#detail [data-field="status"]') == "COMPLETED",
                      what="the detail to show it COMPLETED")
    wait_until(lambda: '"words"' in (_browser.text('#detail [data-field="result"]') or ""),
                      what="the result in the detail")
    assert _browser_severe(_browser.console()) == []


def test_a_refused_action_shows_the_servers_message(_browser, _browser_valet):
    app = _browser_valet()
    job = _browser_submit(app, name="soon gone", run_at=_browser_later())
    _browser.get(app.url + f"/#job={job['id']}")  # a link to a job opens its detail
    wait_until(lambda: _browser.text('#detail [data-field="name"]') == "soon gone",
                      what="the detail from the link")
    _browser.click('#detail [data-action="cancel"]')
    _browser.wait_find("#confirm[open]")
    # while the page asks, the job is cancelled elsewhere: the page's cancel gets a 409
    assert _browser_call(app, "POST", f"/jobs/{job['id']}/cancel")[0] == 200
    _browser.click('#confirm [data-action="confirm"]')
    wait_until(lambda: _browser.visible("#notice"), what="the notice")
    status, answer = _browser_call(app, "POST", f"/jobs/{job['id']}/cancel")
    assert status == 409
    assert _browser.text("#notice-text") == answer["message"]
    wait_until(lambda: _browser.text('#detail [data-field="status"]') == "CANCELLED",
                      what="the detail to show CANCELLED")
    # the one console entry is the browser's own line about the 409
    entries = _browser_severe(_browser.console())
    assert all("409" in e["message"] for e in entries), entries


def test_the_page_fits_a_phone_screen(_browser, _browser_valet):
    app = _browser_valet()
    job = _browser_submit(app, name="a rather long job name " * 6, metadata={"k": "v " * 200},
                          run_at=_browser_later())
    _browser("POST", "/window/rect", {"width": 390, "height": 844})
    try:
        _browser.get(app.url + "/")
        _browser.wait_find(f'tr[data-job-id="{job["id"]}"]')
        fits = ("return document.documentElement.scrollWidth <= "
                "document.documentElement.clientWidth")
        assert _browser.js(fits)
        assert not _browser.visible("td.hide-sm")  # the less important columns
        _browser.click(f'tr[data-job-id="{job["id"]}"]')
        wait_until(lambda: _browser.text('#detail [data-field="status"]') == "SCHEDULED",
                          what="the detail")
        assert _browser.js(fits)
        width = _browser.js("return document.querySelector('#detail').getBoundingClientRect()"
                            ".width")
        assert width >= _browser.js("return document.documentElement.clientWidth") - 1
        _browser.click("#detail-close")
        wait_until(lambda: not _browser.visible("#detail"), what="the detail to close")
    finally:
        _browser("POST", "/window/rect", {"width": 1280, "height": 900})
    assert _browser_severe(_browser.console()) == []


def test_absolute_times_are_utc_and_labelled(_browser, _browser_valet):
    app = _browser_valet()
    run_at = _browser_later(7200)
    job = _browser_submit(app, name="later", run_at=run_at)
    # a browser far from UTC still shows UTC
    _browser("POST", "/goog/cdp/execute", {"cmd": "Emulation.setTimezoneOverride",
                                           "params": {"timezoneId": "Pacific/Auckland"}})
    try:
        _browser.get(app.url + f"/#job={job['id']}")
        wait_until(lambda: _browser.text('#detail [data-field="name"]') == "later",
                          what="the detail")
        assert _browser.js("return new Date(0).getTimezoneOffset()") != 0
        fields = wait_until(lambda: _browser.js(
            "const d = [...document.querySelectorAll('#detail-fields > *')].map(e => e.textContent);"
            "const o = {}; for (let i = 0; i < d.length; i += 2) o[d[i]] = d[i + 1]; return o"),
            what="the fields")
        fields = {k: v.replace("\xa0", " ") for k, v in fields.items()}  # "(in 2 h)" keeps together
        expected = run_at.replace("T", " ").replace("Z", " UTC")
        assert fields["Run at"].startswith(expected + " (in "), fields
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \((just now|\d+ s ago)\)",
                            fields["Created"]), fields
        row = f'tr[data-job-id="{job["id"]}"]'
        title = _browser.js("return document.querySelector(arguments[0]).cells[4].title", row)
        assert title.endswith(" UTC"), title
        # a SCHEDULED job's Duration cell says when it is due
        assert _browser.js("return document.querySelector(arguments[0]).cells[5].textContent",
                           row) in ("due in 1.9 h", "due in 2.0 h")
    finally:
        _browser("POST", "/goog/cdp/execute", {"cmd": "Emulation.setTimezoneOverride",
                                               "params": {"timezoneId": ""}})
    assert _browser_severe(_browser.console()) == []


def test_a_pipeline_is_cancelled_and_deleted_from_its_view(_browser, _browser_valet):
    app = _browser_valet()
    pipeline = _browser_pipeline(app, "two steps", [{"name": "first", "task_name": "block"},
                                                    {"name": "second", "task_name": "echo"}])
    first = pipeline["jobs"][0]["id"]
    wait_until(lambda: app.job(first)["status"] == "IN_PROGRESS", what="the job to start")
    _browser.get(app.url + "/")
    # the jobs list marks the jobs of a pipeline
    _browser.wait_find(f'tr[data-job-id="{first}"]')
    wait_until(lambda: _browser.visible(f'tr[data-job-id="{first}"] .tag'),
                      what="the pipeline tag")
    assert _browser.text(f'tr[data-job-id="{first}"] .tag') == "pipeline"
    _browser.click('[data-tab="pipelines"]')
    _browser.click(f'tr[data-pipeline-id="{pipeline["id"]}"]')
    cancel, delete = ('#pipe-view [data-action="cancel-pipeline"]',
                      '#pipe-view [data-action="delete-pipeline"]')
    wait_until(lambda: _browser.visible(cancel), what="Cancel pipeline")
    assert _browser.text("#pipe-name") == "two steps"
    assert not _browser.visible(delete)  # it is running
    _browser.click(cancel)
    _browser.wait_find("#confirm[open]")
    assert "two steps" in _browser.text("#confirm-text")
    _browser.click('#confirm [data-action="confirm"]')
    wait_until(lambda: _browser_call(app, "GET", f"/pipelines/{pipeline['id']}")[1]
                      ["status"] == "CANCELLED", what="the pipeline to be CANCELLED")
    wait_until(lambda: _browser.text("#pipe-status") == "CANCELLED",
                      what="the view to show CANCELLED")
    wait_until(lambda: _browser.visible(delete), what="Delete pipeline")
    assert not _browser.visible(cancel)
    _browser.click(delete)
    _browser.wait_find("#confirm[open]")
    _browser.click('#confirm [data-action="confirm"]')
    wait_until(lambda: _browser_call(app, "GET", f"/pipelines/{pipeline['id']}")[0]
                      == 404, what="the pipeline to be deleted")
    wait_until(lambda: not _browser.visible("#pipe-view"), what="the view to close")
    assert _browser.text("#notice-text") == "Deleted pipeline “two steps” and its jobs."
    wait_until(lambda: not _browser.find(f'tr[data-pipeline-id="{pipeline["id"]}"]'),
                      what="the row to go")
    assert _browser_severe(_browser.console()) == []


def test_a_pipeline_job_says_why_it_has_no_retry_or_delete(_browser, _browser_valet):
    app = _browser_valet()
    pipeline = _browser_pipeline(app, "nightly", [{"name": "step", "task_name": "echo"},
                                                  {"name": "next", "task_name": "echo"}],
                                 run_at=_browser_later())
    job = pipeline["jobs"][0]["id"]
    assert _browser_call(app, "POST", f"/pipelines/{pipeline['id']}/cancel")[0] == 200
    _browser.get(app.url + f"/#job={job}")
    wait_until(lambda: _browser.text('#detail [data-field="status"]') == "CANCELLED",
                      what="the detail")
    wait_until(lambda: "“nightly”" in (_browser.text("#detail-pipe-note") or ""),
                      what="the note naming the pipeline")
    assert _browser.visible("#detail-pipe-note")
    assert not _browser.visible('#detail [data-action="retry"]')
    assert not _browser.visible('#detail [data-action="delete"]')
    _browser.click("#open-pipe")
    wait_until(lambda: _browser.visible("#pipe-view")
                      and _browser.text("#pipe-name") == "nightly", what="the pipeline view")
    assert _browser.js("return document.querySelector('[data-tab=pipelines]')"
                       ".getAttribute('aria-selected')") == "true"
    assert _browser.visible('#pipe-view [data-action="delete-pipeline"]')
    # a job on its own has no such note
    other = _browser_submit(app, name="alone", run_at=_browser_later())
    _browser.get(app.url + f"/#job={other['id']}")
    wait_until(lambda: _browser.text('#detail [data-field="name"]') == "alone",
                      what="the other detail")
    assert not _browser.visible("#detail-pipe-note")
    assert _browser_severe(_browser.console()) == []


def test_the_page_is_served_with_its_csp_and_breaks_none_of_it(_browser, _browser_valet):
    app = _browser_valet()
    _browser_submit(app, name="x")
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        page = resp.read().decode()
        csp = resp.getheader("Content-Security-Policy")
    finally:
        conn.close()
    assert "script-src 'sha256-" in csp
    assert page.count("<script") == 1
    assert not re.search(r"\son[a-z]+=", page) and "javascript:" not in page
    _browser.get(app.url + "/")
    wait_until(lambda: _browser.text('[data-count="COMPLETED"] .n') == "1",
                      what="the script to run")
    for tab in ("pipelines", "periodic", "submit", "jobs"):
        _browser.click(f'[data-tab="{tab}"]')
    entries = _browser.console()
    assert not [e for e in entries if "Content Security Policy" in e.get("message", "")], entries
    assert _browser_severe(entries) == [], entries


# -------------------------------------------------------------- the process --

PROCESS_TASKS = """
def block(metadata):
    # Wait until the test writes to the FIFO named in metadata.
    with open(metadata["fifo"]) as fifo:
        return fifo.read()


def echo(metadata):
    return metadata


TASKS = {"block": block, "echo": echo}
"""


class Process:
    """A real `python valet.py --port 0` run in tmp_path, where it finds config.yaml
    (read by default) and its tasks module; read until it says where it listens.
    With `run_in`, it runs in that folder instead, given --config tmp_path/config.yaml."""

    def __init__(self, tmp_path, run_in=None, **config):
        settings = {"storage": {"sqlite": {"path": "valet.db"}},
                    "worker_pool": {"workers": 1}, "tasks_module": "valet_process_tasks"}
        settings.update(config)
        (tmp_path / "config.yaml").write_text(json.dumps(settings))  # JSON is YAML
        (tmp_path / "valet_process_tasks.py").write_text(PROCESS_TASKS)
        where = ["--config", str(tmp_path / "config.yaml")] if run_in else []
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "valet.py"), "--port", "0", *where],
            stderr=subprocess.PIPE, text=True, cwd=run_in or tmp_path)
        self.lines = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        listening = wait_until(lambda: self._listening() or self.proc.poll() is not None,
                               what="valet to listen")
        assert listening is not True, f"valet exited: {self.lines}"
        self.port = int(listening)
        assert self.port != 8080  # --port 0 overrode the config's default

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)

    def _listening(self):
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", "".join(self.lines))
        return found and found.group(1)

    def logged(self, text):
        return any(text in line for line in self.lines)

    def kill(self, signum):
        self.proc.send_signal(signum)
        return self.proc.wait(10)


@pytest.fixture
def processes():
    started = []
    yield lambda tmp_path, **config: started.append(Process(tmp_path, **config)) or started[-1]
    for p in started:
        if p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait(10)


def post(port, task_name, metadata=None):
    resp = call(port, "POST", "/jobs", {"name": "n", "task_name": task_name,
                                        "metadata": metadata})
    assert resp.status == 202, resp
    return resp.body["id"]


def release(fifo):
    """Let a `block` task return: open its FIFO for writing, which waits for the task
    to have opened it for reading."""
    written = threading.Event()

    def write():
        with open(fifo, "w") as f:
            f.write("released")
        written.set()

    threading.Thread(target=write, daemon=True).start()
    assert written.wait(10), "the block task never opened its FIFO"


def test_sigkill_loses_no_acknowledged_job_and_restart_recovers(tmp_path, processes):
    first = processes(tmp_path)
    os.mkfifo(tmp_path / "never")
    running = post(first.port, "block", {"fifo": str(tmp_path / "never")})
    wait_until(lambda: call(first.port, "GET", f"/jobs/{running}").body["status"]
               == valet.IN_PROGRESS, what="the block job to start")
    acknowledged = []

    def submit_many(i):
        for j in range(5):
            acknowledged.append(post(first.port, "echo", {"n": i * 5 + j}))

    run_together(submit_many, 8)
    assert len(acknowledged) == 40
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL

    restarted = time.time()
    second = processes(tmp_path)
    crashed = call(second.port, "GET", f"/jobs/{running}").body
    assert crashed["status"] == valet.FAILED
    assert crashed["failure_reason"] == "the server stopped while the job was running"
    assert epoch(crashed["completed_at"]) >= restarted - 0.001  # settled by the restart
    for job_id in acknowledged:
        wait_until(lambda: call(second.port, "GET", f"/jobs/{job_id}").body["status"]
                   == valet.COMPLETED, what=f"job {job_id} to complete after the restart")
    # Re-queued in submission order (the listing's order): with one worker, no job
    # starts before one submitted earlier.
    jobs = call(second.port, "GET", "/jobs?status=completed&limit=100").body["jobs"]
    assert sorted(j["id"] for j in jobs) == sorted(acknowledged)
    starts = [j["started_at"] for j in jobs]
    assert starts == sorted(starts)


def test_job_with_retries_left_runs_again_after_a_crash(tmp_path, processes):
    first = processes(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    resp = call(first.port, "POST", "/jobs", {
        "name": "n", "task_name": "block", "metadata": {"fifo": str(tmp_path / "fifo")},
        "max_retries": 1, "retry_backoff": 0})
    job_id = resp.body["id"]
    wait_until(lambda: call(first.port, "GET", f"/jobs/{job_id}").body["status"]
               == valet.IN_PROGRESS, what="the first attempt to start")
    first.kill(signal.SIGKILL)
    second = processes(tmp_path)
    wait_until(lambda: call(second.port, "GET", f"/jobs/{job_id}").body["attempts"] == 2,
               what="the second attempt to start")
    release(tmp_path / "fifo")
    done = wait_until(lambda: (j := call(second.port, "GET", f"/jobs/{job_id}").body)
                      ["status"] == valet.COMPLETED and j, what="the retry to complete")
    assert done["failure_reason"] is None
    assert call(second.port, "GET", f"/jobs/{job_id}/results").body["metadata"] == "released"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_lets_the_running_job_finish_and_keeps_pending_jobs(tmp_path, processes,
                                                                   signum):
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    proc = processes(tmp_path, logging_format="json")
    running = post(proc.port, "block", {"fifo": str(fifo)})
    wait_until(lambda: call(proc.port, "GET", f"/jobs/{running}").body["status"]
               == valet.IN_PROGRESS, what="the block job to start")
    pending = post(proc.port, "echo", "later")
    proc.proc.send_signal(signum)
    wait_until(lambda: proc.logged("stopping: no new job starts"), what="the stop to begin")
    release(fifo)
    assert proc.proc.wait(10) == 0
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert store.get(running)["status"] == valet.COMPLETED
        assert store.result(running)["value"] == "released"
        assert store.get(pending)["status"] == valet.PENDING
    finally:
        store.close()
    proc.reader.join(10)
    records = [json.loads(line) for line in proc.lines]  # every line is JSON
    assert [r["message"] for r in records][-1] == "valet stopped"
    assert any(r["message"].startswith(f"{signal.Signals(signum).name} received")
               for r in records)


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port",
                               str(port)], capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1  # through the logger, in its format
    assert done.stderr.endswith(f" ERROR MainThread cannot listen on 127.0.0.1:{port}: "
                                f"Address already in use\n"), done.stderr


@pytest.mark.parametrize("config_text, message", [
    ("worker_pool:\n  workers: many\n",
     'valet: config error: worker_pool.workers: "many" is not allowed; '
     'expected an integer from 1 to 256'),
    ("tasks_module: no_such_module\n",
     "valet: config error: tasks_module: 'no_such_module' cannot be imported"),
    ("server: [\n", "valet: config error: config file"),
])
def test_invalid_config_stops_the_process_with_exit_2_and_one_line(tmp_path, config_text,
                                                                   message):
    path = tmp_path / "bad.yaml"
    path.write_text(config_text)
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--config",
                           str(path)], capture_output=True, text=True, timeout=30,
                          cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr


@pytest.mark.parametrize("entry, message", [
    ({**NIGHTLY, "cron": "0 3 * *"}, "valet: config error: periodic[0].cron: expected five"),
    ({**NIGHTLY, "task_name": "nope"},
     "valet: config error: periodic[0]: task_name 'nope' is not a registered task"),
])
def test_bad_periodic_entry_stops_the_process_with_exit_2_and_one_line(tmp_path, entry,
                                                                       message):
    (tmp_path / "config.yaml").write_text(json.dumps({"periodic": [entry]}))  # JSON is YAML
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(message), done.stderr
    assert not (tmp_path / "valet.db").exists()  # stopped before opening the store


def test_a_tasks_module_beside_the_config_wins_over_the_one_beside_valet_py(tmp_path,
                                                                           processes):
    (tmp_path / "tasks.py").write_text("TASKS = {'mine': lambda metadata: metadata}\n")
    proc = processes(tmp_path, tasks_module="tasks")  # valet.py has a tasks.py too
    assert call(proc.port, "GET", "/tasks").body == {"tasks": ["mine"]}


def test_a_database_folder_that_does_not_exist_is_named_in_one_line(tmp_path):
    (tmp_path / "config.yaml").write_text("storage:\n  sqlite:\n    path: data/jobs.db\n")
    done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
                          capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    assert done.stderr.endswith(f" ERROR MainThread cannot open "
                                f"'{tmp_path / 'data' / 'jobs.db'}': cannot open the database "
                                f"file (its folder '{tmp_path / 'data'}' does not exist)\n")


def test_valet_run_from_another_folder_uses_the_files_beside_its_config(tmp_path,
                                                                        processes):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = processes(tmp_path, run_in=elsewhere)  # relative: valet.db, valet_process_tasks
    job_id = post(proc.port, "echo", "beside")
    wait_until(lambda: call(proc.port, "GET", f"/jobs/{job_id}").body["status"]
               == valet.COMPLETED, what="the job to run")
    assert proc.logged(f"(storage: sqlite {tmp_path / 'valet.db'}, workers: 1 thread)")
    assert proc.kill(signal.SIGTERM) == 0
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert store.result(job_id)["value"] == "beside"
    finally:
        store.close()
    assert os.listdir(elsewhere) == []


# -- shutdown signals

def test_sighup_stops_gracefully_letting_the_running_job_finish(tmp_path, processes):
    fifo = tmp_path / "release"
    os.mkfifo(fifo)
    proc = processes(tmp_path)
    running = post(proc.port, "block", {"fifo": str(fifo)})
    wait_until(lambda: call(proc.port, "GET", f"/jobs/{running}").body["status"]
               == valet.IN_PROGRESS, what="the block job to start")
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proc.logged("stopping: no new job starts"), what="the stop to begin")
    release(fifo)
    assert proc.proc.wait(10) == 0
    proc.reader.join(10)
    assert proc.logged("SIGHUP received: stopping")
    assert proc.lines[-1].endswith("valet stopped\n"), proc.lines
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert store.get(running)["status"] == valet.COMPLETED
        assert store.result(running)["value"] == "released"
    finally:
        store.close()


def test_second_sigterm_during_grace_exits_1_at_once_and_restart_settles_jobs(tmp_path,
                                                                              processes):
    config = {"worker_pool": {"workers": 2, "shutdown_grace": 30}}
    first = processes(tmp_path, **config)
    os.mkfifo(tmp_path / "once")
    os.mkfifo(tmp_path / "retried")
    once = post(first.port, "block", {"fifo": str(tmp_path / "once")})
    retried = call(first.port, "POST", "/jobs", {
        "name": "n", "task_name": "block", "metadata": {"fifo": str(tmp_path / "retried")},
        "max_retries": 1, "retry_backoff": 0}).body["id"]
    for job_id in (once, retried):
        wait_until(lambda: call(first.port, "GET", f"/jobs/{job_id}").body["status"]
                   == valet.IN_PROGRESS, what=f"job {job_id} to start")
    first.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: first.logged("stopping: no new job starts"), what="the stop to begin")
    signalled = time.monotonic()
    assert first.kill(signal.SIGTERM) == 1  # kill() waits at most 10 s of the 30 s grace
    assert time.monotonic() - signalled < 10
    first.reader.join(10)
    warning = [line for line in first.lines if "received again" in line]
    assert len(warning) == 1 and " WARNING " in warning[0]
    assert "SIGTERM received again: stopping at once" in warning[0]
    assert not first.logged("valet stopped")

    second = processes(tmp_path, **config)
    crashed = call(second.port, "GET", f"/jobs/{once}").body
    assert crashed["status"] == valet.FAILED
    assert crashed["failure_reason"] == "the server stopped while the job was running"
    wait_until(lambda: call(second.port, "GET", f"/jobs/{retried}").body["attempts"] == 2,
               what="the retried job's second attempt to start")
    release(tmp_path / "retried")
    wait_until(lambda: call(second.port, "GET", f"/jobs/{retried}").body["status"]
               == valet.COMPLETED, what="the retry to complete")


# -------------------------------------------------------------------- tasks --

def test_shipped_tasks_do_what_the_readme_says():
    import tasks
    assert tasks.dummytask({"user": "ann"}) == {"user": "ann", "url": "http://www.test-url.com"}
    assert tasks.dummytask(None) == {"url": "http://www.test-url.com"}
    assert tasks.add({"numbers": [1, 2, 3.5]}) == {"sum": 6.5}
    assert tasks.word_count({"text": "a b a"}) == {"words": 3, "counts": {"a": 2, "b": 1}}
    assert tasks.sha256({"text": "abc"})["sha256"].startswith("ba7816bf")
    assert tasks.echo([1]) == [1]
    with pytest.raises(RuntimeError, match="nope"):
        tasks.fail({"message": "nope"})
    assert tasks.previous(None, {"words": 3}) == {"words": 3}
    claim = valet._Claim(threading.current_thread(), "id")
    context = valet.Context("id", 2, None, claim.cancelled, claim.report)
    assert tasks.countdown({"steps": 4, "delay": 0}, context=context) == {"counted": 4,
                                                                         "attempt": 2}
    assert claim.progress == {"fraction": 1, "message": "step 4 of 4"}
    claim.cancelled.set()
    assert tasks.countdown({"steps": 4, "delay": 0}, context=context) == {"stopped_at": 0}
    once = hashlib.sha256(b"abc").digest()
    assert tasks.hash_rounds({"text": "abc", "rounds": 2}) == {
        "sha256": hashlib.sha256(once).hexdigest(), "rounds": 2}
    assert set(tasks.TASKS) == {"dummytask", "echo", "sleep", "fail", "add", "word_count",
                                "sha256", "hash_rounds", "countdown", "previous"}


# --------------------------------------------------------------------- docs --

def test_readme_documents_every_route_and_config_key():
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    for method, pattern, *_ in valet.ROUTES:
        assert f"{method} {pattern}" in readme, f"{method} {pattern}"
    for key in valet._SCHEMA:
        assert f"`{key}`" in readme, key
    assert "make run" in readme and "make test" in readme


def test_readme_embedding_example_runs(tmp_path):
    with open(os.path.join(HERE, "README.md")) as f:
        example = re.search(r"## Embedding.*?```python\n(.*?)```", f.read(), re.S).group(1)
    (tmp_path / "example.py").write_text(example)
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PYTHONPATH": HERE})
    assert done.returncode == 0, done.stderr
    assert "COMPLETED {'job_id':" in done.stdout and "'metadata': {'ok': True}" in done.stdout


def test_the_readme_error_example_is_what_valet_answers():
    import tasks
    with open(os.path.join(HERE, "README.md")) as f:
        example = re.search(r"### Errors.*?```json\n(.*?)\n```", f.read(), re.S).group(1)
    app = valet.Valet({"server": {"port": 0}, "storage": {"option": "memory"}},
                      tasks=tasks.TASKS).start()
    try:
        resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "wordcount"})
    finally:
        app.stop()
    assert json.loads(example) == resp.body


def _section_lines(source, title):
    """The first and last line numbers of the section of valet.py under this banner."""
    banners = [i + 1 for i, line in enumerate(source.split("\n"))
               if re.fullmatch(r"# -+ \S.* --", line)]
    start = next(i for i in banners if source.split("\n")[i - 1].endswith(f" {title} --"))
    later = [i for i in banners if i > start]
    return start, (later[0] - 1 if later else len(source.split("\n")))


def test_valet_py_keeps_the_shape_its_readers_rely_on():
    """Status changes in one class, routes that only call the facade, HTTP errors only
    in the HTTP section, short functions."""
    import ast
    import inspect
    with open(os.path.join(HERE, "valet.py")) as f:
        source = f.read()
    tree = ast.parse(source)
    lifecycle = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                     and node.name == "_Lifecycle")
    inside = {id(node) for node in ast.walk(lifecycle)}
    http = _section_lines(source, "HTTP")
    store = next(node for node in tree.body if isinstance(node, ast.ClassDef)
                 and node.name == "Store")
    inside |= {id(node) for node in ast.walk(store)}  # (transition() is transitions())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("transition", "transitions"):
            assert id(node) in inside, f"line {node.lineno} calls {node.func.attr}()"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HTTPError":
            assert http[0] <= node.lineno <= http[1], f"line {node.lineno}: HTTPError"
        if isinstance(node, ast.FunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 50, f"{node.name} is {length} lines long"
    for _, _, route, _ in valet.ROUTES:
        body = inspect.getsource(route)
        for part in ("store", "pool", "lifecycle", "scheduler", "_"):
            assert f"app.{part}" not in body, f"{route.__name__} reaches into app.{part}"


# ------------------------------------------------------------------ shards --

# `make test` runs the suite as three pytest processes at once, each on every third
# test (VALET_SHARD=1/3, 2/3 and 3/3): the tests listen on free ports, keep their
# files in folders of their own and each process starts its own PostgreSQL, so the
# parts cannot meet.
if os.environ.get("VALET_SHARD"):
    _part, _parts = (int(n) for n in os.environ["VALET_SHARD"].split("/"))
    for _i, _name in enumerate([name for name in globals() if name.startswith("test_")]):
        if _i % _parts != _part - 1:
            del globals()[_name]
