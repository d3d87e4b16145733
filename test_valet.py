"""Tests for valet: real servers on free ports, real SQLite files, real processes.

Sections follow valet.py: config, job records, storage (a contract every store
must keep, then the SQLite store's own), the lifecycle, workers, scheduler, HTTP,
the Valet facade; then the process, the shipped tasks and the docs. Every
behaviour that touches storage runs on every store (the `storage` and `store`
fixtures). Nothing waits a fixed time: tests wait on events set by their tasks or
poll a condition with a deadline (wait_until).
"""

import dataclasses
import datetime
import http.client
import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

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
    """One request on an http.client connection: a Response with the parsed JSON body."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data:  # as every client must: valet answers a body of any other type with 415
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=data, headers=headers or {})
    resp = conn.getresponse()
    text = resp.read()
    return Response(resp.status, json.loads(text) if text else None, dict(resp.getheaders()))


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
        if name != self._fails or self.failed:
            return method

        def fail_once(*args, **kwargs):
            self.failed = True
            raise valet.StorageError("disk is full")
        return fail_once


class Hooked:
    """Wraps a store: hook(*args) runs before each call of the method named `method`
    (returning True skips the real call and raises OSError, as a full disk would)."""

    def __init__(self, store, method, hook):
        self._store, self._method, self._hook = store, method, hook

    def __getattr__(self, name):
        method = getattr(self._store, name)
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

@pytest.fixture(params=["memory", "sqlite"])
def storage(request, tmp_path):
    return {"storage": {"option": request.param,
                        "sqlite": {"path": str(tmp_path / "valet.db")}}}


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
# empty store in a temporary folder. A new backend adds itself here.
STORES = {
    "memory": lambda folder: valet.MemoryStore(),
    "sqlite": lambda folder: valet.SqliteStore(folder / "valet.db"),
}


@pytest.fixture(params=list(STORES))
def store(request, tmp_path):
    store = STORES[request.param](tmp_path)
    yield store
    store.close()


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
        ("sort=name", "unknown query parameter 'sort'; it takes status, limit, cursor"),
        ("limit=1&limit=2", "query parameter 'limit' is given more than once"),
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
    methods = [name for name, value in vars(valet.Store).items()
               if callable(value) and not name.startswith("_")]
    assert len(methods) == 16
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
    assert ran == [] and pool.stats() == {"depth": 0, "busy": 0, "abandoned": 0}


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
    late = f"job {job['id']}: the task returned after the job was cancelled"
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
        claim, taken = take(job_id)
        if claim is not None and not taken:  # attempt 1's claim, being settled
            seen_settling.set()
            wait_until(lambda: job_is(app, job_id, valet.IN_PROGRESS, 2),
                       what="attempt 2 to start, with a claim of its own")
        return claim, taken
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
        claim, taken = take(job_id)
        if claim is None and not entered.is_set():  # between the cancel's look and write
            app.scheduler.tick(clock.advance(60))
            assert entered.wait(10)
        return claim, taken
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
    assert app.status()["workers"] == {"busy": 0, "total": 1, "abandoned": 0}


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
    assert call(app, "GET", "/status").body["workers"] == {"busy": 0, "total": 2,
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
    assert first.pool.run_once(block=False) is True  # exactly one job: the first queued
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
    assert pool.stats() == {"depth": 0, "busy": 0, "abandoned": 0}


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
    assert call(app, "GET", "/status").body["workers"] == {"busy": 0, "total": 1,
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
    if storage["storage"]["option"] == "sqlite":
        store = valet.SqliteStore(storage["storage"]["sqlite"]["path"])
        try:
            stopped = store.get(job["id"])
        finally:
            store.close()
    else:
        stopped = app.lifecycle.store.get(job["id"])  # a closed MemoryStore can still be read
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
    writing, written = threading.Event(), threading.Event()

    def slow_start(job_id, from_states, to_state, *args, **kwargs):
        if to_state == valet.IN_PROGRESS:
            writing.set()
            assert written.wait(10)
    pool = hooked_pool(store, "transition", slow_start, make_tasks(gate, ran))
    job_id = queue_job(pool, store, "gate")
    worker = threading.Thread(target=pool.run_once)
    worker.start()
    assert writing.wait(10)
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


def test_get_periodic_lists_entries_with_their_next_run_time(make_app):
    clock = FakeClock()  # 2027-01-15T08:00:00Z
    app = make_app(clock=clock, periodic=[MINUTELY, {**NIGHTLY, "cron": "30 2 * * *"}])
    assert call(app, "GET", "/periodic").body == {"periodic": [
        {"name": "minutely", "task_name": "echo", "cron": None, "every": 60,
         "next_run_at": "2027-01-15T08:01:00.000000Z"},
        {"name": "nightly", "task_name": "echo", "cron": "30 2 * * *", "every": None,
         "next_run_at": "2027-01-16T02:30:00.000000Z"}]}
    fire(app, "minutely", clock.advance(60), then=utc(2027, 1, 15, 8, 2))
    assert next_run(app, "minutely") == "2027-01-15T08:02:00.000000Z"
    assert next_run(app, "nightly") == "2027-01-16T02:30:00.000000Z"


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
    assert resp.headers["Allow"] == "POST, GET, DELETE"
    resp = call(app, "POST", "/jobs/some-id")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, PATCH, DELETE"


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
    assert body["queue"] == {"depth": 0, "capacity": 20, "accepting": True}
    assert body["workers"] == {"busy": 1, "total": 2, "abandoned": 0}
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


def test_head_and_options_get_405_with_allow_and_head_gets_no_body(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("HEAD", "/jobs")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "POST, GET, DELETE"
        assert resp.read() == b""
        assert request(conn, "OPTIONS", "/tasks").status == 405
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
    store = app.lifecycle.store  # closed: read the file anew, if it is one
    if isinstance(store, valet.SqliteStore):
        store = valet.SqliteStore(store.path)
    assert store.list(None, 0, 10) == []  # the refused POST stored nothing
    store.close()


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
    assert proc.logged(f"(storage: sqlite {tmp_path / 'valet.db'}, workers: 1)")
    assert proc.kill(signal.SIGTERM) == 0
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        assert store.result(job_id)["value"] == "beside"
    finally:
        store.close()
    assert os.listdir(elsewhere) == []


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
    context = valet.Context("id", 2, None, claim)
    assert tasks.countdown({"steps": 4, "delay": 0}, context=context) == {"counted": 4,
                                                                         "attempt": 2}
    assert claim.progress == {"fraction": 1, "message": "step 4 of 4"}
    claim.cancelled.set()
    assert tasks.countdown({"steps": 4, "delay": 0}, context=context) == {"stopped_at": 0}
    assert set(tasks.TASKS) == {"dummytask", "echo", "sleep", "fail", "add", "word_count",
                                "sha256", "countdown", "previous"}


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
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr == "transition":
            assert id(node) in inside, f"line {node.lineno} calls transition()"
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "HTTPError":
            assert http[0] <= node.lineno <= http[1], f"line {node.lineno}: HTTPError"
        if isinstance(node, ast.FunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= 50, f"{node.name} is {length} lines long"
    for _, _, route, _ in valet.ROUTES:
        body = inspect.getsource(route)
        for part in ("store", "pool", "lifecycle", "scheduler", "_"):
            assert f"app.{part}" not in body, f"{route.__name__} reaches into app.{part}"
