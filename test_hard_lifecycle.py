"""Hardening, the lifecycle part: worker_pool.default_timeout, Idempotency-Key,
retention (sweep, its thread, the space it gives back), bulk delete, and the
shutdown signals (SIGHUP; a second SIGTERM)."""

from test_valet import *  # noqa: F401,F403 (fixtures and helpers)

# The star import brings test_valet's tests too: drop them, or pytest runs them here again.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]

import contextlib
import http.client
import json
import os
import signal
import sqlite3
import threading
import time
import urllib.parse

import pytest

import valet
from test_valet import (FakeClock, Response, at, call, job_status, post, release,
                        run_together, stage, submit, submit_pipeline, wait_for_pipeline,
                        wait_for_status, wait_until)

DAY = 86400


# ------------------------------------------------------------------ helpers --

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


# ------------------------------------------------- worker_pool.default_timeout --

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


# ------------------------------------------------------------ Idempotency-Key --

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


# ------------------------------------------------------------------ retention --

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


# ---------------------------------------------------------------- bulk delete --

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
     "finished_before must be"),
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


# ------------------------------------------------------------ shutdown signals --

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
