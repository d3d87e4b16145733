"""Hard storage: one owner per SQLite database, and storage faults.

Faults are real SQLite errors: PRAGMA query_only (SQLITE_READONLY) and
PRAGMA max_page_count (SQLITE_FULL) on the store's writer connection, a full or
read-only tmpfs (as root), and garbage written over a real database file.
"""

from test_valet import *  # noqa: F401,F403 (fixtures and helpers)

# The star import brings test_valet's tests too: they run there, not again here.
for _name in [name for name in globals() if name.startswith("test_")]:
    del globals()[_name]

import contextlib
import errno
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

import valet
from test_valet import (HERE, PROCESS_TASKS, call, epoch, job_status, new_record, post,
                        release, submit, wait_for_status, wait_until)

SQLITE_ONLY = pytest.mark.parametrize("storage", ["sqlite"], indirect=True)
BIG = {"pad": "x" * 20_000}  # needs new pages: overflow pages of 4 KB each
VALET = os.path.join(HERE, "valet.py")


# ------------------------------------------------------------------ helpers --

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


def post_job(app, metadata=None, **fields):
    return call(app, "POST", "/jobs", {"name": "n", "task_name": "echo",
                                       "metadata": metadata, **fields})


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


# ------------------------------------------------- one owner per database --

def test_second_process_on_one_database_exits_1_naming_file_and_owner_pid(tmp_path,
                                                                          processes):
    first = processes(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    running = post(first.port, "block", {"fifo": str(tmp_path / "fifo")})
    wait_until(lambda: call(first.port, "GET", f"/jobs/{running}").body["status"]
               == valet.IN_PROGRESS, what="the first process's job to start")

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
    os.mkfifo(tmp_path / "never")
    running = post(first.port, "block", {"fifo": str(tmp_path / "never")})
    wait_until(lambda: call(first.port, "GET", f"/jobs/{running}").body["status"]
               == valet.IN_PROGRESS, what="the block job to start")
    assert first.kill(signal.SIGKILL) == -signal.SIGKILL

    second = processes(tmp_path)  # the OS dropped the dead process's lock
    crashed = call(second.port, "GET", f"/jobs/{running}").body
    assert crashed["status"] == valet.FAILED
    assert crashed["failure_reason"] == "the server stopped while the job was running"
    assert second.proc.poll() is None


# ------------------------------------------------------- storage faults ----

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
    before = submit(app, metadata=BIG)["id"]
    wait_for_status(app, before, valet.COMPLETED)
    with Fault(app.lifecycle.store, kind) as fault:
        for _ in range(5):  # more than the backlog holds: each place is given back
            resp = post_job(app, BIG)
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
    after = submit(app, metadata=BIG)["id"]
    assert wait_for_status(app, after, valet.COMPLETED)["metadata"] == BIG
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
                assert post_job(app).status == 503
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


# ----------------------------------------------------- real disk faults ----

@SQLITE_ONLY
def test_full_tmpfs_answers_503_disk_is_full_and_recovers_when_space_is_freed(
        make_app, tmpfs, gate):
    app = make_app(**{"storage.sqlite.path": str(tmpfs / "valet.db")})
    try:
        running = submit(app, "gate")["id"]
        assert gate.entered.wait(10)
        queued = submit(app, metadata={"q": 1})["id"]  # accepted before the fault
        filler = fill(tmpfs)
        resp = post_job(app, BIG)
        assert resp.status == 503, resp
        assert resp.body["message"].startswith("storage is failing: disk is full")
        assert resp.headers["Retry-After"] == "5"
        status = call(app, "GET", "/status")
        assert status.status == 503
        assert status.body["storage"] == {"option": "sqlite", "ok": False,
                                          "error": "disk is full"}
        gate.opened.set()  # its job ends while the disk is full
        os.remove(filler)
        assert submit(app, metadata=BIG)["status"] == valet.PENDING
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


# ------------------------------------------------------------ corruption ----

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
        assert resp.status == 503, resp
        assert resp.body["message"].startswith("storage is failing: database is corrupt")
        assert resp.headers["Retry-After"] == "5"
    status = call(app, "GET", "/status")
    assert status.status == 503
    assert status.body["storage"] == {"option": "sqlite", "ok": False,
                                      "error": "database is corrupt"}
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= 3, loud
    assert loud[0].startswith("storage: database is corrupt")
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


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
