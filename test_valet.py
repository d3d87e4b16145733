"""Tests for valet: real servers on free ports, real SQLite files, real processes.

Sections follow valet.py: config, storage, workers, HTTP API, the process, docs.
Every behaviour that touches storage runs on both stores (the `storage` fixture).
Nothing waits a fixed time: tests wait on events set by their tasks or poll a
condition with a deadline (wait_until).
"""

import datetime
import http.client
import json
import os
import re
import signal
import socket
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

    def make(**overrides):
        config = valet.load_config(storage, {
            "server.port": 0, "worker_pool.workers": 2, "worker_pool.queue_capacity": 20,
            "worker_pool.shutdown_grace": 5, **overrides})
        app = valet.Valet(config, tasks=make_tasks(gate, ran)).start()
        apps.append(app)
        return app

    yield make
    gate.opened.set()
    for app in apps:
        app.stop()


@pytest.fixture
def app(make_app):
    return make_app()


@pytest.fixture
def store(storage, tmp_path):
    config = valet.load_config(storage)
    store = valet._open_store(config)
    yield store
    store.close()


def new_record(name="job", status=valet.PENDING):
    job = valet._new_job({"name": name, "task_name": "echo", "metadata": {"n": name}},
                         {"echo": None}, "second", time.time())
    job["status"] = status
    return job


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


# ------------------------------------------------------------------ storage --

def test_store_returns_none_for_missing_job(store):
    assert store.get("nope") is None
    assert store.result("nope") is None
    assert store.delete("nope", valet.STATUSES) is None
    assert store.update("nope", {"name": "x"}) is False
    assert store.transition("nope", (valet.PENDING,), valet.IN_PROGRESS) is None


def test_store_transition_moves_once_and_refuses_illegal_moves(store):
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
    with pytest.raises(valet.InvalidTransition):
        store.transition(job["id"], (valet.COMPLETED,), valet.PENDING)


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
    assert store.ids(valet.PENDING) == [jobs[1]["id"], jobs[3]["id"], jobs[5]["id"]]


def test_store_delete_only_in_allowed_states(store):
    pending, running = new_record("p"), new_record("r", valet.IN_PROGRESS)
    store.add(pending)
    store.add(running)
    assert store.delete(running["id"], (valet.PENDING,)) == valet.IN_PROGRESS
    assert store.get(running["id"]) is not None
    assert store.delete(pending["id"], (valet.PENDING,)) == valet.PENDING
    assert store.get(pending["id"]) is None
    assert [j["name"] for j in store.list(None, 0, 10)] == ["r"]


def test_store_keeps_metadata_apart_from_callers(store):
    job = new_record()
    store.add(job)
    job["metadata"]["n"] = "changed by the caller"
    got = store.get(job["id"])
    got["metadata"]["n"] = "changed again"
    assert store.get(job["id"])["metadata"] == {"n": "job"}


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


# ------------------------------------------------------------------ workers --

@pytest.fixture
def pool(store, gate, ran):
    """A worker pool that is not started: tests drive run_once and tick directly."""
    clock = [1000.0]
    pool = valet._WorkerPool(store, make_tasks(gate, ran), workers=1, capacity=5,
                             timeout_unit="second", clock=lambda: clock[0])
    pool.clock = clock
    yield pool
    gate.opened.set()


def queue_job(pool, store, task_name, timeout=None):
    job = valet._new_job({"name": "j", "task_name": task_name, "timeout": timeout},
                         {task_name: None}, "second", time.time())
    pool.reserve()
    store.add(job)
    pool.enqueue(job["id"])
    return job["id"]


def test_run_once_runs_the_next_job_and_records_result(pool, store):
    job_id = queue_job(pool, store, "echo")
    assert pool.run_once(block=False) is True
    job = store.get(job_id)
    assert job["status"] == valet.COMPLETED
    assert job["started_at"] <= job["completed_at"]
    assert store.result(job_id) == {"value": None, "error": None}
    assert pool.stats() == {"depth": 0, "busy": 0}


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
    assert [job_id for _, job_id, _ in pool._deadlines] == [slow]
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
    with pytest.raises(valet.HTTPError) as caught:
        pool.reserve()
    assert caught.value.status == 503 and caught.value.headers == {"Retry-After": "1"}
    pool.unreserve()  # one was refused by the store
    pool.reserve()
    with pytest.raises(valet.HTTPError):
        pool.reserve()
    pool.run_once(block=False)
    pool.reserve()  # a worker took one: a place came free


# ----------------------------------------------------------------- HTTP API --

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
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", job["created_at"])
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


def test_duration_is_milliseconds_from_start_to_end():
    job = dict(new_record(), started_at=1.0, completed_at=3.5)
    assert valet._job_json(job)["duration"] == 2500
    assert valet._job_json(job)["started_at"] == "1970-01-01T00:00:01.000Z"


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


@pytest.mark.parametrize("method, path", [
    ("GET", "/jobs/{id}"), ("PATCH", "/jobs/{id}"), ("DELETE", "/jobs/{id}"),
    ("GET", "/jobs/{id}/results"), ("DELETE", "/jobs/{id}/results"),
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
    assert resp.headers["Allow"] == "POST, GET"
    resp = call(app, "POST", "/jobs/some-id")
    assert resp.status == 405 and resp.headers["Allow"] == "GET, PATCH, DELETE"


def test_routes_also_answer_under_api_prefix(app):
    resp = call(app, "POST", "/api/jobs", {"name": "n", "task_name": "echo"})
    assert resp.status == 202
    assert resp.headers["Location"] == f"/api/jobs/{resp.body['id']}"
    assert call(app, "GET", resp.headers["Location"]).body["id"] == resp.body["id"]
    assert call(app, "GET", "/api/tasks").status == 200
    assert call(app, "GET", "/api/status").status == 200


def test_patch_changes_only_the_fields_present(app):
    job = submit(app, "gate")
    resp = call(app, "PATCH", f"/jobs/{job['id']}", {"description": "new"})
    assert resp.status == 204 and resp.body is None
    got = call(app, "GET", f"/jobs/{job['id']}").body
    assert got["description"] == "new" and got["name"] == job["name"]
    assert call(app, "PATCH", f"/jobs/{job['id']}", {"name": "renamed"}).status == 204
    got = call(app, "GET", f"/jobs/{job['id']}").body
    assert got["name"] == "renamed" and got["description"] == "new"


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


@pytest.mark.parametrize("query, message", [
    ("status=DONE", "status must be one of PENDING, IN_PROGRESS, COMPLETED, FAILED"),
    ("limit=0", "limit must be an integer from 1 to 1000"),
    ("limit=1001", "limit must be an integer from 1 to 1000"),
    ("limit=ten", "limit must be an integer"),
    ("cursor=abc", "cursor must be a next_cursor"),
    ("cursor=99999999999999999999", "cursor must be a next_cursor"),
    ("limit=%C2%B2", "limit must be an integer"),  # '²' passes str.isdigit()
    ("sort=name", "unknown query parameter 'sort'; it takes status, limit, cursor"),
    ("limit=1&limit=2", "query parameter 'limit' is given more than once"),
])
def test_list_rejects_bad_query_parameters(app, query, message):
    resp = call(app, "GET", f"/jobs?{query}")
    assert resp.status == 400 and message in resp.body["message"]


@pytest.mark.parametrize("path", ["/jobs/{id}", "/jobs/{id}/results", "/tasks", "/status"])
def test_routes_without_query_parameters_reject_them(app, path):
    job = submit(app, "echo")
    resp = call(app, "GET", path.format(id=job["id"]) + "?verbose=1")
    assert resp.status == 400
    assert resp.body["message"] == "unknown query parameter 'verbose'; it takes none"


def test_list_treats_empty_query_values_as_not_given(app):
    job = submit(app, "echo")
    resp = call(app, "GET", "/jobs?status=&limit=&cursor=")
    assert resp.status == 200 and [j["id"] for j in resp.body["jobs"]] == [job["id"]]


def test_tasks_lists_registered_names_sorted(app):
    resp = call(app, "GET", "/tasks")
    assert resp.body == {"tasks": ["echo", "exits", "fail", "gate", "returns_nan",
                                   "returns_set"]}


def test_status_reports_version_storage_queue_and_workers(app, storage, gate):
    submit(app, "gate")
    assert gate.entered.wait(10)
    body = call(app, "GET", "/status").body
    assert body["version"] == valet.__version__
    assert body["storage"] == {"option": storage["storage"]["option"], "ok": True}
    assert body["queue"] == {"depth": 0, "capacity": 20, "accepting": True}
    assert body["workers"] == {"busy": 1, "total": 2}
    assert body["time"].endswith("Z")
    assert 0 < body["uptime"] < 60


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
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
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
        sock.sendall(b"POST /jobs HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n{}")
        reply = sock.makefile("rb").read()  # returns only because the server closes
    assert reply.startswith(b"HTTP/1.1 400") and b"Connection: close" in reply
    assert b"Content-Length must be a whole number" in reply


def test_head_and_options_get_405_with_allow_and_head_gets_no_body(app):
    conn = http.client.HTTPConnection("127.0.0.1", app.port, timeout=10)
    try:
        conn.request("HEAD", "/jobs")
        resp = conn.getresponse()
        assert resp.status == 405 and resp.getheader("Allow") == "POST, GET"
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
    assert app.store.list(None, 0, 10) == []  # the refused POST stored nothing


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


# --------------------------------------------------------- running the jobs --

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
    assert call(app, "GET", "/status").body["workers"] == {"busy": 0, "total": 1}
    gate.opened.set()
    stuck = gate.thread
    wait_until(lambda: not stuck.is_alive(), what="the abandoned worker to exit")
    after = call(app, "GET", f"/jobs/{slow['id']}").body
    assert after["status"] == valet.FAILED and after["completed_at"] == failed["completed_at"]
    assert call(app, "GET", f"/jobs/{slow['id']}/results").body["metadata"] is None


def test_job_without_timeout_is_never_timed_out(app, gate):
    job = submit(app, "gate")
    assert gate.entered.wait(10)
    assert app.pool.tick(time.monotonic() + 10 ** 9) == 0
    gate.opened.set()
    wait_for_status(app, job["id"], valet.COMPLETED)


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
        stopped = app.store.get(job["id"])  # a closed MemoryStore can still be read
    assert stopped["status"] == valet.FAILED
    assert "server stopped before the job finished" in stopped["failure_reason"]


def test_timeouts_are_enforced_while_stop_waits_for_running_jobs(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1, "timeout_unit": "millisecond"})
    job = submit(app, "gate", timeout=50)
    assert gate.entered.wait(10)
    started = time.monotonic()
    app.pool.stop(grace=30)  # returns once the timed-out worker has left the pool
    assert time.monotonic() - started < 15
    stopped = app.store.get(job["id"])
    assert stopped["status"] == valet.FAILED
    assert stopped["failure_reason"] == "timed out after 50 milliseconds"


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
            raise OSError("disk full")
        return fail_once


def test_store_error_in_a_worker_is_logged_and_the_worker_goes_on(store, gate, ran, caplog):
    store = Flaky(store, "transition")
    pool = valet._WorkerPool(store, make_tasks(gate, ran), workers=1, capacity=5,
                             timeout_unit="second")
    pool.start()
    try:
        first = queue_job(pool, store, "echo")
        second = queue_job(pool, store, "echo")
        wait_until(lambda: store.get(second)["status"] == valet.COMPLETED,
                   what="the second job to complete")
        assert store.get(first)["status"] == valet.PENDING  # left for the next start
        assert "OSError: disk full" in caplog.text
    finally:
        pool.stop(5)


def test_store_error_on_submit_is_a_500_that_gives_back_the_backlog_place(make_app):
    app = make_app(**{"worker_pool.queue_capacity": 1, "worker_pool.workers": 1})
    app.store = Flaky(app.store, "add")
    resp = call(app, "POST", "/jobs", {"name": "n", "task_name": "echo"})
    assert resp.status == 500 and resp.body["message"] == "internal server error"
    assert call(app, "GET", "/status").body["queue"]["depth"] == 0
    assert call(app, "GET", "/jobs").body["jobs"] == []
    wait_for_status(app, submit(app, "echo")["id"], valet.COMPLETED)


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


def test_sqlite_writer_isolates_a_failing_write_from_its_batch(tmp_path):
    store = valet.SqliteStore(tmp_path / "valet.db")
    try:
        good, other = new_record("good"), new_record("other")
        futures = [valet.concurrent.futures.Future() for _ in range(3)]

        def insert(job):
            values = dict(job, metadata=json.dumps(job["metadata"]))
            columns = [c for c in valet._JOB_COLUMNS if c != "seq"]
            return lambda conn: conn.execute(
                f"INSERT INTO jobs ({', '.join(columns)}) VALUES "
                f"({', '.join('?' * len(columns))})", [values[c] for c in columns])

        def broken(conn):
            conn.execute("DELETE FROM jobs")
            raise RuntimeError("a bug in one write")

        store._apply([(insert(good), futures[0]), (broken, futures[1]),
                      (insert(other), futures[2])])
        assert isinstance(futures[1].exception(0), RuntimeError)
        futures[0].result(0), futures[2].result(0)
        assert [j["name"] for j in store.list(None, 0, 10)] == ["good", "other"]
    finally:
        store.close()


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
    with pytest.raises(valet.HTTPError) as caught:
        app.submit({"name": "direct"})
    assert caught.value.status == 400 and "task_name is required" in caught.value.message


def test_wait_gives_up_after_its_timeout_and_wakes_when_the_job_is_deleted(make_app, gate):
    app = make_app(**{"worker_pool.workers": 1})
    blocker = app.submit({"name": "b", "task_name": "gate"})
    assert gate.entered.wait(10)
    assert app.wait(blocker["id"], timeout=0.01)["status"] == valet.IN_PROGRESS
    queued = app.submit({"name": "q", "task_name": "echo"})
    outcome = []
    waiter = threading.Thread(target=lambda: outcome.append(app.wait(queued["id"], 20)))
    waiter.start()
    wait_until(lambda: queued["id"] in app.pool._watchers, what="the waiter to watch")
    assert call(app, "DELETE", f"/jobs/{queued['id']}").status == 204
    waiter.join(10)
    assert not waiter.is_alive() and outcome == [None]


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
    (read by default) and its tasks module; read until it says where it listens."""

    def __init__(self, tmp_path, **config):
        settings = {"storage": {"sqlite": {"path": "valet.db"}},
                    "worker_pool": {"workers": 1}, "tasks_module": "valet_process_tasks"}
        settings.update(config)
        (tmp_path / "config.yaml").write_text(json.dumps(settings))  # JSON is YAML
        (tmp_path / "valet_process_tasks.py").write_text(PROCESS_TASKS)
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "valet.py"), "--port", "0"],
            stderr=subprocess.PIPE, text=True, cwd=tmp_path)
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


def epoch(rfc3339):
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


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


def test_port_in_use_exits_1_with_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, os.path.join(HERE, "valet.py"), "--port",
                               str(port)], capture_output=True, text=True, timeout=30,
                              cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == f"valet: cannot listen on 127.0.0.1:{port}: Address already in use\n"


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
    assert set(tasks.TASKS) == {"dummytask", "echo", "sleep", "fail", "add", "word_count",
                                "sha256"}


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
