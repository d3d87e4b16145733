"""valet: a small asynchronous job server in one module.

A client POSTs a job that names a registered Python task and carries a JSON
payload; valet stores it, answers 202 at once, runs it on a worker thread and
keeps its status and result for the client to read.

Run it:     python valet.py [--config config.yaml] [--host H] [--port N]
Embed it:   app = Valet({"server": {"port": 0}}, tasks={"add": add}).start()
            ...
            app.stop()

Endpoints (each also answers under /api, where the original Go valet served them):

    POST   /jobs                 submit a job                            202
    GET    /jobs                 list jobs: ?status= ?limit= ?cursor=     200
    GET    /jobs/{id}            one job                                 200
    PATCH  /jobs/{id}            change its name and/or description      204
    DELETE /jobs/{id}            remove a job that is not running        204
    GET    /jobs/{id}/results    a finished job's result                 200
    DELETE /jobs/{id}/results    remove a finished job's result          204
    GET    /tasks                the registered task names               200
    GET    /status               version, storage, queue and workers     200

A job moves PENDING -> IN_PROGRESS -> COMPLETED | FAILED, and only through
the store's transition(), so no race can move a finished job back.
"""

__version__ = "0.1.0"

__all__ = [
    "Valet", "load_config", "ConfigError", "HTTPError", "InvalidTransition",
    "MemoryStore", "SqliteStore", "main",
    "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "STATUSES",
]

import argparse
import bisect
import concurrent.futures
import contextlib
import datetime
import heapq
import http.server
import importlib
import itertools
import json
import logging
import math
import os
import queue
import re
import signal
import sqlite3
import sys
import threading
import time
import urllib.parse
import uuid

import yaml

log = logging.getLogger("valet")


# ---------------------------------------------------------------- constants --

PENDING = "PENDING"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
STATUSES = (PENDING, IN_PROGRESS, COMPLETED, FAILED)
FINISHED = (COMPLETED, FAILED)

# The only moves a status may make. transition() refuses any other.
_MOVES = {
    PENDING: {IN_PROGRESS},
    IN_PROGRESS: {COMPLETED, FAILED},
    COMPLETED: set(),
    FAILED: set(),
}

# Every key of a job's JSON, in the order it is written; unset is null.
JOB_FIELDS = (
    "id", "name", "description", "task_name", "metadata", "timeout", "status",
    "failure_reason", "created_at", "started_at", "completed_at", "duration",
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_MAX_TIMEOUT_SECONDS = 366 * 24 * 3600  # a year: longer is a mistake, not a timeout


# ------------------------------------------------------------------- errors --

class ConfigError(ValueError):
    """An invalid configuration: the message names the key, the value and what is allowed."""


class InvalidTransition(RuntimeError):
    """A status move that the table of allowed moves forbids (a bug in the caller)."""


class HTTPError(Exception):
    """A client error: carried from wherever it is raised to the one place that writes it.

    `Valet.submit()` raises it too (400 for a bad job, 503 for a full backlog),
    so an embedding program sees the same messages an HTTP client does.
    """

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": True, "code": self.status, "message": self.message}


def _show(value, limit=60):
    """A value as JSON for an error message, cut short: it came from a user, who
    may have sent a megabyte of it."""
    text = json.dumps(value, default=repr)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------- config --

def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return (isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v))


def _choice(*options):
    return (lambda v: v in options), " or ".join(options)


# key -> (default, check, what is allowed). config.yaml documents each key.
_SCHEMA = {
    "server.host": ("127.0.0.1", lambda v: isinstance(v, str) and v != "",
                    "a host name or IP address"),
    "server.port": (8080, lambda v: _is_int(v) and 0 <= v <= 65535,
                    "an integer from 0 to 65535 (0 picks a free port)"),
    "server.max_body_bytes": (1048576, lambda v: _is_int(v) and v >= 1024,
                              "an integer >= 1024"),
    "worker_pool.workers": (4, lambda v: _is_int(v) and 1 <= v <= 256,
                            "an integer from 1 to 256"),
    "worker_pool.queue_capacity": (1000, lambda v: _is_int(v) and v >= 1,
                                   "an integer >= 1"),
    "worker_pool.shutdown_grace": (10, lambda v: _is_number(v) and v >= 0,
                                   "a number of seconds >= 0"),
    "storage.option": ("sqlite", *_choice("sqlite", "memory")),
    "storage.sqlite.path": ("valet.db",
                            lambda v: isinstance(v, str) and v not in ("", ":memory:"),
                            "a file path (for no file, use storage.option: memory)"),
    "storage.sqlite.synchronous": ("full", *_choice("full", "normal")),
    "tasks_module": ("tasks", lambda v: isinstance(v, str) and v != "",
                     "an importable module name"),
    "timeout_unit": ("second", *_choice("second", "millisecond")),
    "logging_format": ("text", *_choice("text", "json")),
    "logging_level": ("info", *_choice("debug", "info", "warning", "error")),
}


def _flatten(tree, prefix=""):
    """Turn {"server": {"port": 1}} into {"server.port": 1}; dotted keys pass through."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        is_section = any(k.startswith(dotted + ".") for k in _SCHEMA)
        if is_section and value is None:
            continue  # a section whose keys are all commented out
        if is_section and isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        elif is_section:
            raise ConfigError(f"{dotted}: {_show(value)} is not allowed; expected a "
                              f"mapping of its keys")
        else:
            flat[dotted] = value
    return flat


def load_config(source=None, overrides: dict | None = None) -> dict:
    """Return a validated config: a flat dict of every dotted key to its value.

    `source` is None (all defaults), a path to a YAML file, or a dict shaped like
    config.yaml (nested sections or dotted keys). `overrides` (dotted keys) win
    over the source. Raises ConfigError naming the key, the value and what is
    allowed; a file that cannot be read or parsed is a ConfigError too.
    """
    if isinstance(source, (str, os.PathLike)):
        try:
            with open(source, encoding="utf-8") as f:
                tree = yaml.safe_load(f)
        except OSError as exc:
            raise ConfigError(f"config file {os.fspath(source)!r}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {os.fspath(source)!r} is not valid YAML: "
                              f"{exc}".replace("\n", " ")) from None
        if tree is None:
            tree = {}
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {os.fspath(source)!r}: expected a mapping "
                              f"of keys, got {type(tree).__name__}")
    else:
        tree = source or {}
    given = _flatten(tree)
    given.update(overrides or {})
    config = {key: default for key, (default, _, _) in _SCHEMA.items()}
    for key, value in given.items():
        if key not in _SCHEMA:
            raise ConfigError(f"{key}: unknown key; known keys are "
                              f"{', '.join(_SCHEMA)}")
        _, check, allowed = _SCHEMA[key]
        if not check(value):
            raise ConfigError(f"{key}: {_show(value)} is not allowed; expected {allowed}")
        config[key] = value
    return config


def _load_tasks(module_name):
    """Import `module_name` and return its TASKS dict; ConfigError if it cannot."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ConfigError(f"tasks_module: {module_name!r} cannot be imported: "
                          f"{type(exc).__name__}: {exc}") from None
    tasks = getattr(module, "TASKS", None)
    if not isinstance(tasks, dict):
        raise ConfigError(f"tasks_module: {module_name!r} has no TASKS dict "
                          f"mapping names to functions")
    for name, fn in tasks.items():
        if not callable(fn):
            raise ConfigError(f"tasks_module: TASKS[{name!r}] in {module_name!r} is "
                              f"{type(fn).__name__} {fn!r:.40}, not a function")
    return tasks


# --------------------------------------------------------------- job record --

def _rfc3339(t):
    if t is None:
        return None
    moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _job_json(job):
    """The public form of a stored job record: every key of JOB_FIELDS, in order."""
    started, completed = job["started_at"], job["completed_at"]
    return {
        "id": job["id"],
        "name": job["name"],
        "description": job["description"],
        "task_name": job["task_name"],
        "metadata": job["metadata"],
        "timeout": job["timeout"],
        "status": job["status"],
        "failure_reason": job["failure_reason"],
        "created_at": _rfc3339(job["created_at"]),
        "started_at": _rfc3339(started),
        "completed_at": _rfc3339(completed),
        "duration": (round((completed - started) * 1000, 3)
                     if started is not None and completed is not None else None),
    }


_JOB_INPUT = ("name", "description", "task_name", "metadata", "task_params", "timeout")


def _check_text(fields, key, required):
    value = fields.get(key)
    if value is None and not required:
        return None
    if key not in fields:
        raise HTTPError(400, f"{key} is required")
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string or null"
        raise HTTPError(400, f"{key} must be {kind}, got {_show(value)}")
    return value


def _new_job(fields, tasks, timeout_unit, now):
    """Validate a submitted job body and build its record; HTTPError(400) names the field."""
    unknown = sorted(set(fields) - set(_JOB_INPUT))
    if unknown:
        raise HTTPError(400, f"unknown field {unknown[0]!r}; a job takes "
                             f"{', '.join(_JOB_INPUT)}")
    name = _check_text(fields, "name", required=True)
    task_name = fields.get("task_name")
    if "task_name" not in fields:
        raise HTTPError(400, "task_name is required")
    if not isinstance(task_name, str):
        raise HTTPError(400, f"task_name must be a string, got {_show(task_name)}")
    if task_name not in tasks:
        raise HTTPError(400, f"task_name {task_name!r} is not a registered task; "
                             f"registered tasks: {', '.join(sorted(tasks)) or '(none)'}")
    description = _check_text(fields, "description", required=False)
    if "metadata" in fields and "task_params" in fields:
        raise HTTPError(400, "give metadata or task_params (its old name), not both")
    metadata = fields.get("metadata", fields.get("task_params"))
    timeout = fields.get("timeout")
    longest = _MAX_TIMEOUT_SECONDS * (1000 if timeout_unit == "millisecond" else 1)
    if timeout is not None and not (_is_number(timeout) and 0 < timeout <= longest):
        raise HTTPError(400, f"timeout must be a number greater than 0 and at most "
                             f"{longest} (in {timeout_unit}s), got {_show(timeout)}")
    return {
        "id": str(uuid.uuid4()), "name": name, "description": description,
        "task_name": task_name, "metadata": metadata, "timeout": timeout,
        "status": PENDING, "failure_reason": None, "created_at": now,
        "started_at": None, "completed_at": None,
    }


# ------------------------------------------------------------------ storage --
#
# Both stores implement the same small interface. Records are plain dicts with
# the keys of a job (times as epoch seconds) plus "seq", the job's place in
# submission order, which never changes and is never reused. Every method is
# thread-safe; every write is atomic.
#
#   add(job)                                  store a new job; durable on return
#   get(job_id) -> record | None
#   list(status, after, limit) -> [record]    in seq order, seq > after
#   ids(status) -> [job_id]                   in seq order (start-up recovery)
#   update(job_id, fields) -> bool            name/description; False if missing
#   transition(job_id, from_states, to_state, fields, result) -> record | None
#   delete(job_id, states) -> status | None   deletes only if its status is in states
#   result(job_id) -> {"value", "error"} | None
#   delete_result(job_id) -> bool
#   ping() -> bool; close()

_NO_RESULT = object()


def _check_move(from_states, to_state):
    for state in from_states:
        if to_state not in _MOVES[state]:
            raise InvalidTransition(f"{state} -> {to_state} is not an allowed move")


class MemoryStore:
    """Jobs in dicts, guarded by one lock. Lost when the process ends."""

    option = "memory"

    def __init__(self):
        self._lock = threading.Lock()  # guards every attribute below
        self._jobs = {}        # job id -> record; metadata kept as JSON text
        self._results = {}     # job id -> (value as JSON text, error)
        self._seqs = []        # seq of every job, ascending
        self._by_status = {s: [] for s in STATUSES}  # seqs per status, ascending
        self._ids = {}         # seq -> job id
        self._next_seq = itertools.count(1)

    @staticmethod
    def _out(record):
        job = dict(record)
        job["metadata"] = json.loads(record["metadata"])
        return job

    def add(self, job):
        record = dict(job, metadata=json.dumps(job["metadata"]))
        with self._lock:
            seq = record["seq"] = next(self._next_seq)
            self._jobs[job["id"]] = record
            self._ids[seq] = job["id"]
            self._seqs.append(seq)
            self._by_status[record["status"]].append(seq)

    def get(self, job_id):
        with self._lock:
            record = self._jobs.get(job_id)
            return None if record is None else self._out(record)

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE):
        with self._lock:
            seqs = self._seqs if status is None else self._by_status[status]
            start = bisect.bisect_right(seqs, after)
            return [self._out(self._jobs[self._ids[s]]) for s in seqs[start:start + limit]]

    def ids(self, status):
        with self._lock:
            return [self._ids[s] for s in self._by_status[status]]

    def update(self, job_id, fields):
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return False
            record.update(fields)
            return True

    def transition(self, job_id, from_states, to_state, fields=None, result=_NO_RESULT):
        _check_move(from_states, to_state)
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None or record["status"] not in from_states:
                return None
            self._move(record["seq"], record["status"], to_state)
            record.update(fields or {}, status=to_state)
            if result is not _NO_RESULT:
                value, error = result
                self._results[job_id] = (json.dumps(value), error)
            return self._out(record)

    def _move(self, seq, old, new):
        old_seqs = self._by_status[old]
        del old_seqs[bisect.bisect_left(old_seqs, seq)]
        bisect.insort(self._by_status[new], seq)

    def delete(self, job_id, states):
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            status = record["status"]
            if status in states:
                seq = record["seq"]
                del self._jobs[job_id], self._ids[seq]
                del self._seqs[bisect.bisect_left(self._seqs, seq)]
                by_status = self._by_status[status]
                del by_status[bisect.bisect_left(by_status, seq)]
                self._results.pop(job_id, None)
            return status

    def result(self, job_id):
        with self._lock:
            stored = self._results.get(job_id)
        if stored is None:
            return None
        return {"value": json.loads(stored[0]), "error": stored[1]}

    def delete_result(self, job_id):
        with self._lock:
            return self._results.pop(job_id, None) is not None

    def ping(self):
        return True

    def close(self):
        pass


_SQL_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT NOT NULL UNIQUE,
    name           TEXT NOT NULL,
    description    TEXT,
    task_name      TEXT NOT NULL,
    metadata       TEXT NOT NULL,  -- JSON
    timeout,                       -- no type: an int stays an int, a float a float
    status         TEXT NOT NULL,
    failure_reason TEXT,
    created_at     REAL NOT NULL,  -- epoch seconds
    started_at     REAL,
    completed_at   REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY,
    value  TEXT NOT NULL,          -- JSON
    error  TEXT
) WITHOUT ROWID;
"""

_JOB_COLUMNS = ("seq", "id", "name", "description", "task_name", "metadata", "timeout",
                "status", "failure_reason", "created_at", "started_at", "completed_at")
_MAX_BATCH = 512  # writes applied in one transaction, at most
_IDLE_READERS = 8  # read connections kept open between reads, at most


def _dict_row(cursor, row):
    return {column[0]: value for column, value in zip(cursor.description, row)}


class SqliteStore:
    """Jobs in one SQLite file (WAL). Durable: every write has committed when it returns.

    One writer thread owns the write connection. Each write is a function put on
    its queue; the writer takes every write that is waiting, applies them in one
    transaction (each in its own savepoint, so one failing write cannot undo the
    others) and commits once. Concurrent submissions thus share one fsync, and a
    caller is answered only after its write has committed. Reads use a pool of
    their own connections, which WAL lets run while the writer writes.
    """

    option = "sqlite"

    def __init__(self, path, synchronous="full"):
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.executescript(_SQL_SCHEMA)
        self._writes = queue.SimpleQueue()  # (write function, Future) or None to stop
        self._readers = queue.SimpleQueue()  # idle read connections
        self._closing = threading.Lock()  # guards _closed
        self._closed = False
        self.commits = 0  # transactions committed (written by the writer thread only)
        self._writer = threading.Thread(target=self._write_loop,
                                        name="valet-sqlite-writer", daemon=True)
        self._writer.start()

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = _dict_row
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    # -- the writer

    def _write(self, fn):
        """Run fn(connection) in the writer's next transaction; block until it commits."""
        future = concurrent.futures.Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the store is closed")
            self._writes.put((fn, future))
        return future.result()

    def _write_loop(self):
        while True:
            batch = [self._writes.get()]
            while len(batch) < _MAX_BATCH:
                try:
                    batch.append(self._writes.get_nowait())
                except queue.Empty:
                    break
            writes = [w for w in batch if w is not None]
            if writes:
                self._apply(writes)
            if len(writes) < len(batch):
                self._conn.close()
                return

    def _apply(self, writes):
        """Apply a batch in one transaction; answer every caller, whatever happens."""
        conn = self._conn
        outcomes = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for fn, future in writes:
                conn.execute("SAVEPOINT one")
                try:
                    outcomes.append((future, fn(conn), None))
                    conn.execute("RELEASE one")
                except Exception as exc:
                    conn.execute("ROLLBACK TO one")
                    conn.execute("RELEASE one")
                    outcomes.append((future, None, exc))
            conn.execute("COMMIT")
            self.commits += 1
        except Exception as exc:  # the transaction itself failed: nothing was written
            log.exception("sqlite: a write transaction failed")
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            outcomes = [(future, None, exc) for _, future in writes]
        for future, value, exc in outcomes:
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

    @contextlib.contextmanager
    def _reading(self):
        try:
            conn = self._readers.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        finally:
            if self._readers.qsize() < _IDLE_READERS:
                self._readers.put(conn)
            else:
                conn.close()  # a burst of readers is over

    @staticmethod
    def _out(row):
        if row is not None:
            row["metadata"] = json.loads(row["metadata"])
        return row

    # -- the interface

    def add(self, job):
        values = dict(job, metadata=json.dumps(job["metadata"]))
        columns = [c for c in _JOB_COLUMNS if c != "seq"]
        sql = (f"INSERT INTO jobs ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' * len(columns))})")
        self._write(lambda conn: conn.execute(sql, [values[c] for c in columns]))

    def get(self, job_id):
        with self._reading() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._out(row)

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE):
        where, args = "seq > ?", [after]
        if status is not None:
            where, args = "status = ? AND seq > ?", [status, after]
        with self._reading() as conn:
            rows = conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq LIMIT ?",
                                [*args, limit]).fetchall()
        return [self._out(row) for row in rows]

    def ids(self, status):
        with self._reading() as conn:
            rows = conn.execute("SELECT id FROM jobs WHERE status = ? ORDER BY seq",
                                (status,)).fetchall()
        return [row["id"] for row in rows]

    def update(self, job_id, fields):
        columns = [c for c in fields if c in ("name", "description")]
        sets = ", ".join(f"{c} = ?" for c in columns) or "id = id"
        sql = f"UPDATE jobs SET {sets} WHERE id = ?"
        args = [fields[c] for c in columns] + [job_id]
        return self._write(lambda conn: conn.execute(sql, args).rowcount == 1)

    def transition(self, job_id, from_states, to_state, fields=None, result=_NO_RESULT):
        _check_move(from_states, to_state)
        fields = fields or {}
        for column in fields:
            if column not in _JOB_COLUMNS:
                raise ValueError(f"no such job column: {column}")
        sets = "".join(f", {c} = ?" for c in fields)
        marks = ", ".join("?" * len(from_states))
        sql = f"UPDATE jobs SET status = ?{sets} WHERE id = ? AND status IN ({marks})"
        args = [to_state, *fields.values(), job_id, *from_states]
        if result is not _NO_RESULT:
            value_json = json.dumps(result[0])

        def move(conn):
            if conn.execute(sql, args).rowcount == 0:
                return None
            if result is not _NO_RESULT:
                conn.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                             (job_id, value_json, result[1]))
            return conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()

        return self._out(self._write(move))

    def delete(self, job_id, states):
        def remove(conn):
            row = conn.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is not None and row["status"] in states:
                conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                conn.execute("DELETE FROM results WHERE job_id = ?", (job_id,))
            return None if row is None else row["status"]

        return self._write(remove)

    def result(self, job_id):
        with self._reading() as conn:
            row = conn.execute("SELECT value, error FROM results WHERE job_id = ?",
                               (job_id,)).fetchone()
        if row is None:
            return None
        return {"value": json.loads(row["value"]), "error": row["error"]}

    def delete_result(self, job_id):
        return self._write(lambda conn: conn.execute(
            "DELETE FROM results WHERE job_id = ?", (job_id,)).rowcount == 1)

    def ping(self):
        try:
            with self._reading() as conn:
                conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return self._writer.is_alive()

    def close(self):
        """Apply the writes already queued, then close every connection. Idempotent."""
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._writes.put(None)
        self._writer.join()
        while True:
            try:
                self._readers.get_nowait().close()
            except queue.Empty:
                break


def _open_store(config):
    if config["storage.option"] == "memory":
        return MemoryStore()
    return SqliteStore(config["storage.sqlite.path"], config["storage.sqlite.synchronous"])


# ------------------------------------------------------------------ workers --

_STOP = object()  # put on the ready queue, one per worker, to end it


class _WorkerPool:
    """Worker threads taking job ids from a queue, and a watcher that enforces timeouts.

    A job belongs to the thread running it while its id is in `_running`; the
    first thread to pop it from there (the worker, when the task returns; the
    watcher, when the deadline passes; stop(), when the grace period runs out)
    settles the job, and the others drop what they have. A Python thread cannot
    be killed, so a timed-out worker is left to finish its task on its own: the
    watcher starts a replacement at once, and the old thread exits when the task
    returns, its late result discarded.
    """

    def __init__(self, store, tasks, workers, capacity, timeout_unit,
                 clock=time.monotonic):
        self.size = workers
        self.capacity = capacity
        self._store = store
        self._tasks = tasks
        self._unit = timeout_unit
        self._clock = clock
        self._ready = queue.Queue()  # ids of PENDING jobs, in submission order
        self._names = itertools.count(1)
        self._watcher = None
        self._lock = threading.Lock()  # guards every attribute below
        self._deadline_added = threading.Condition(self._lock)
        self._threads_changed = threading.Condition(self._lock)
        self._reserved = 0     # submissions given a place in the backlog, not yet queued
        self._waiting = set()  # ids queued and not yet taken by a worker (nor deleted)
        self._running = {}     # job id -> the thread that owns it
        self._deadlines = []   # heap of (monotonic deadline, job id, timeout reason)
        self._settled_early = 0  # entries in _deadlines whose job finished in time
        self._threads = set()  # the pool's worker threads (an abandoned one leaves it)
        self._watchers = {}    # job id -> Events of callers waiting for it to finish
        self._stopping = False  # set by halt(): start no more jobs or workers
        self._watching = True  # the watcher runs until stop() has waited for the workers

    # -- the backlog: jobs accepted and waiting for a worker

    def reserve(self):
        """Take a place in the backlog, or raise HTTPError(503) when it is full."""
        with self._lock:
            if len(self._waiting) + self._reserved >= self.capacity:
                raise HTTPError(503, f"the backlog is full (worker_pool.queue_capacity "
                                     f"is {self.capacity}); try again shortly",
                                {"Retry-After": "1"})
            self._reserved += 1

    def unreserve(self):
        """Give back a place reserve() took, for a job that was not stored."""
        with self._lock:
            self._reserved -= 1

    def enqueue(self, job_id, reserved=True):
        """Queue a stored PENDING job. Start-up recovery passes reserved=False."""
        with self._lock:
            self._reserved -= reserved
            self._waiting.add(job_id)
        self._ready.put(job_id)

    def discard(self, job_id):
        """Forget a queued job that was deleted: it gives back its place and never runs."""
        with self._lock:
            self._waiting.discard(job_id)
        self._wake(job_id)

    @contextlib.contextmanager
    def watching(self, job_id):
        """An Event set when the job finishes (or is deleted) from now on. Read the
        job's status after entering, so that a finish just before is not missed."""
        event = threading.Event()
        with self._lock:
            self._watchers.setdefault(job_id, set()).add(event)
        try:
            yield event
        finally:
            with self._lock:
                events = self._watchers.get(job_id)
                if events is not None:
                    events.discard(event)
                    if not events:
                        del self._watchers[job_id]

    def _wake(self, job_id):
        with self._lock:
            events = self._watchers.pop(job_id, ())
        for event in events:
            event.set()

    def stats(self):
        with self._lock:
            return {"depth": len(self._waiting) + self._reserved, "busy": len(self._running)}

    # -- a worker's single step

    def run_once(self, block=True, timeout=None):
        """Take one job id from the queue and run that job to its end.

        Returns False when this thread should stop: it took the stop sentinel, or
        its job timed out and a replacement has taken its place. Raises queue.Empty
        when not blocking (or after `timeout`) and nothing is queued.
        """
        job_id = self._ready.get(block, timeout)
        if job_id is _STOP:
            return False
        with self._lock:
            if job_id not in self._waiting or self._stopping:
                return True  # deleted while queued; or left PENDING for the next start
            self._waiting.remove(job_id)
        return self._run(job_id)

    def _run(self, job_id):
        now = time.time()
        job = self._store.transition(job_id, (PENDING,), IN_PROGRESS, {"started_at": now})
        if job is None:
            return True  # deleted while it waited
        log.info("job %s: %s -> %s", job_id, PENDING, IN_PROGRESS)
        with self._lock:
            self._running[job_id] = threading.current_thread()
            if job["timeout"] is not None:
                seconds = job["timeout"] / (1000 if self._unit == "millisecond" else 1)
                plural = "" if job["timeout"] == 1 else "s"
                reason = f"timed out after {job['timeout']:g} {self._unit}{plural}"
                heapq.heappush(self._deadlines, (self._clock() + seconds, job_id, reason))
                self._deadline_added.notify()

        status, value, reason = self._call(job)

        with self._lock:
            owned = self._running.pop(job_id, None) is not None
            if owned and job["timeout"] is not None:
                self._forget_deadline()
        if not owned:
            log.info("job %s: the task returned after the job was settled; "
                     "its result is discarded", job_id)
            return False
        self.settle(job_id, status, reason, value)
        return True

    def _forget_deadline(self):
        """Count a deadline entry made stale by a job that finished in time, and prune
        the heap once most of it is stale: a busy server with long timeouts would
        otherwise hold an entry per job until its deadline. Call with the lock held."""
        self._settled_early += 1
        if self._settled_early * 2 > len(self._deadlines):
            self._deadlines = [d for d in self._deadlines if d[1] in self._running]
            heapq.heapify(self._deadlines)
            self._settled_early = 0

    def _call(self, job):
        """Call the job's task outside every lock: (status, value, failure reason)."""
        fn = self._tasks.get(job["task_name"])
        if fn is None:
            return FAILED, None, f"task {job['task_name']!r} is not registered"
        try:
            value = fn(job["metadata"])
        except BaseException as exc:  # a task's failure must never end the worker
            log.warning("job %s: task %s raised", job["id"], job["task_name"], exc_info=True)
            return FAILED, None, f"{type(exc).__name__}: {exc}"
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            return FAILED, None, f"the task's result is not JSON-serialisable: {exc}"
        return COMPLETED, value, None

    def settle(self, job_id, status, reason, value=None):
        """Move a running job to COMPLETED or FAILED with its result, log it and wake
        its waiters; nothing happens if it is no longer running."""
        job = self._store.transition(
            job_id, (IN_PROGRESS,), status,
            {"completed_at": time.time(), "failure_reason": reason},
            result=(value, reason))
        if job is not None:
            log.info("job %s: %s -> %s%s", job_id, IN_PROGRESS, status,
                     f" ({reason})" if reason else "")
            self._wake(job_id)

    # -- the deadline watcher's single step

    def tick(self, now):
        """Fail every running job whose deadline is at or before `now` (monotonic).

        Each such job's thread leaves the pool and a replacement starts, so the
        pool keeps its full number of free workers. Returns how many it failed.
        """
        overdue = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, job_id, reason = heapq.heappop(self._deadlines)
                thread = self._running.pop(job_id, None)
                if thread is None:  # it finished in time
                    self._settled_early = max(0, self._settled_early - 1)
                    continue
                self._threads.discard(thread)
                self._threads_changed.notify_all()
                overdue.append((job_id, reason))
        for job_id, reason in overdue:
            if self._watcher is not None:
                self._spawn()
            self.settle(job_id, FAILED, reason)
        return len(overdue)

    def _watch(self):
        while True:
            with self._lock:
                while self._watching:
                    if not self._deadlines:
                        self._deadline_added.wait()
                        continue
                    delay = self._deadlines[0][0] - self._clock()
                    if delay <= 0:
                        break
                    # Capped: a long wait is re-checked, never an overflow.
                    self._deadline_added.wait(min(delay, 3600))
                if not self._watching:
                    return
            self._guarded(self.tick, self._clock())

    # -- threads

    @staticmethod
    def _guarded(step, *args):
        """Run one step of a thread's loop; an error (the store's, say) is logged, and
        the thread goes on. A job it left behind is settled at the next start."""
        try:
            return step(*args)
        except Exception:
            log.exception("%s: unexpected error", threading.current_thread().name)
            return True

    def _spawn(self):
        thread = threading.Thread(target=self._work, name=f"valet-worker-{next(self._names)}",
                                  daemon=True)
        with self._lock:
            if self._stopping:
                return
            self._threads.add(thread)
        thread.start()

    def _work(self):
        while self._guarded(self.run_once):
            pass
        with self._lock:
            self._threads.discard(threading.current_thread())
            self._threads_changed.notify_all()

    def start(self):
        self._watcher = threading.Thread(target=self._watch, name="valet-deadlines",
                                         daemon=True)
        self._watcher.start()
        for _ in range(self.size):
            self._spawn()

    def halt(self):
        """Start no more jobs: those still queued stay PENDING in the store."""
        with self._lock:
            self._stopping = True
            self._waiting.clear()

    def stop(self, grace):
        """halt(), then wait up to `grace` seconds for running jobs, then fail them.

        Timeouts are still enforced while it waits.
        """
        self.halt()
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._ready.put(_STOP)
        with self._lock:
            # Threads leave the pool when they exit, or when their job times out.
            self._threads_changed.wait_for(lambda: not self._threads, grace)
            unfinished = list(self._running)
            self._running.clear()
            self._watching = False
            self._deadline_added.notify_all()
        for job_id in unfinished:
            self.settle(job_id, FAILED, f"the server stopped before the job finished "
                                         f"(shutdown grace period: {grace:g}s)")
        if self._watcher is not None:
            self._watcher.join(10)


# --------------------------------------------------------------------- HTTP --

def _encode(payload):
    return json.dumps(payload, allow_nan=False, separators=(",", ":")).encode()


# Parse hooks: what Python's json accepts but other parsers would not (or could
# not give back) is refused, so whatever valet stores it can always answer with.

def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range for a JSON number")
    return value


def _bounded_int(text):
    if len(text) > 1000:
        raise ValueError(f"an integer of {len(text)} digits is too long")
    return int(text)


def _unique_keys(pairs):
    obj = dict(pairs)
    if len(obj) < len(pairs):
        seen = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"the key {duplicate!r} appears twice in one object")
    return obj


def _json_type(value):
    """The JSON name of a value's type, for messages: object, array, string, ..."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"),
                       (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null"


_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a 64-bit integer


class _Request:
    """What a route function sees of a request."""

    __slots__ = ("params", "args", "body", "prefix")

    def __init__(self, params, args, body, prefix):
        self.params = params  # from the path: {"id": ...}
        self.args = args      # from the query string, as the route allows them
        self.body = body
        self.prefix = prefix  # "/api" when the request came in under it, else ""

    def json(self) -> dict:
        """The body as a JSON object, or HTTPError(400) saying what is wrong with it."""
        try:
            text = self.body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise HTTPError(400, f"body is not valid UTF-8: {exc.reason} at byte "
                                 f"{exc.start}") from None
        if not text.strip():
            raise HTTPError(400, "body is empty; expected a JSON object")
        try:
            value = json.loads(text, parse_constant=_reject_constant,
                               parse_float=_finite_float, parse_int=_bounded_int,
                               object_pairs_hook=_unique_keys)
        except json.JSONDecodeError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc.msg} at line "
                                 f"{exc.lineno} column {exc.colno}") from None
        except ValueError as exc:
            raise HTTPError(400, f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise HTTPError(400, "body is not valid JSON: nested too deeply") from None
        if not isinstance(value, dict):
            raise HTTPError(400, f"body must be a JSON object, got {_json_type(value)}")
        if "\\ud" in text.lower():  # a \uD800-\uDFFF escape must be half of a pair
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:
                raise HTTPError(400, "body is not valid JSON: it has a lone surrogate "
                                     "escape (\\uD800-\\uDFFF), which is not text") from None
        return value



def _find_job(app, req):
    job = app.store.get(req.params["id"])
    if job is None:
        raise HTTPError(404, f"job {req.params['id']!r} not found")
    return job


def _post_job(app, req):
    job = app.submit(req.json())
    return 202, job, {"Location": f"{req.prefix}/jobs/{job['id']}"}


def _list_jobs(app, req):
    args = req.args
    status = args.get("status")
    if status is not None:
        status = status.upper()
        if status not in STATUSES:
            raise HTTPError(400, f"status must be one of {', '.join(STATUSES)}, "
                                 f"got {args['status']!r}")
    limit = args.get("limit", str(DEFAULT_PAGE_SIZE))
    if not (_DIGITS.fullmatch(limit) and 1 <= int(limit) <= MAX_PAGE_SIZE):
        raise HTTPError(400, f"limit must be an integer from 1 to {MAX_PAGE_SIZE}, "
                             f"got {limit!r}")
    cursor = args.get("cursor", "0")
    if not _DIGITS.fullmatch(cursor):
        raise HTTPError(400, f"cursor must be a next_cursor from an earlier page, "
                             f"got {cursor!r}")
    limit = int(limit)
    jobs = app.store.list(status, after=int(cursor), limit=limit + 1)
    next_cursor = str(jobs[limit - 1]["seq"]) if len(jobs) > limit else None
    return 200, {"jobs": [_job_json(j) for j in jobs[:limit]], "next_cursor": next_cursor}


def _get_job(app, req):
    return 200, _job_json(_find_job(app, req))


def _patch_job(app, req):
    fields = req.json()
    for key in fields:
        if key not in JOB_FIELDS and key not in _JOB_INPUT:
            raise HTTPError(400, f"unknown field {key!r}; a PATCH may change only name "
                                 f"and description")
        if key not in ("name", "description"):
            raise HTTPError(400, f"field {key!r} cannot be changed; a PATCH may change "
                                 f"only name and description")
    changes = {}
    if "name" in fields:
        changes["name"] = _check_text(fields, "name", required=True)
    if "description" in fields:
        changes["description"] = _check_text(fields, "description", required=False)
    if not app.store.update(req.params["id"], changes):
        raise HTTPError(404, f"job {req.params['id']!r} not found")
    return 204, None


def _delete_job(app, req):
    job_id = req.params["id"]
    status = app.store.delete(job_id, (PENDING, *FINISHED))
    if status is None:
        raise HTTPError(404, f"job {job_id!r} not found")
    if status == IN_PROGRESS:
        raise HTTPError(409, f"job {job_id!r} is running; it can be deleted once it "
                             f"has finished")
    app.pool.discard(job_id)
    log.info("job %s: deleted (was %s)", job_id, status)
    return 204, None


def _get_result(app, req):
    result = app.result(req.params["id"])
    if result is None:
        job = _find_job(app, req)
        result = app.result(job["id"])  # it may have finished since the first read
    if result is None:
        if job["status"] in FINISHED:
            raise HTTPError(404, f"the result of job {job['id']!r} was deleted")
        raise HTTPError(404, f"job {job['id']!r} has not finished; its status is "
                             f"{job['status']}")
    return 200, result


def _delete_result(app, req):
    if not app.store.delete_result(req.params["id"]):
        job = _find_job(app, req)
        raise HTTPError(404, f"job {job['id']!r} has no result to delete "
                             f"(status {job['status']})")
    return 204, None


def _list_tasks(app, req):
    return 200, {"tasks": sorted(app.tasks)}


def _status(app, req):
    pool = app.pool.stats()
    return 200, {
        "version": __version__,
        "time": _rfc3339(time.time()),
        "uptime": round(time.monotonic() - app.started_at, 3) if app.started_at else 0,
        "storage": {"option": app.store.option, "ok": app.store.ping()},
        "queue": {"depth": pool["depth"], "capacity": app.pool.capacity,
                  "accepting": pool["depth"] < app.pool.capacity},
        "workers": {"busy": pool["busy"], "total": app.pool.size},
    }


# (method, path, route function, the query parameters it takes)
ROUTES = [
    ("POST", "/jobs", _post_job, ()),
    ("GET", "/jobs", _list_jobs, ("status", "limit", "cursor")),
    ("GET", "/jobs/{id}", _get_job, ()),
    ("PATCH", "/jobs/{id}", _patch_job, ()),
    ("DELETE", "/jobs/{id}", _delete_job, ()),
    ("GET", "/jobs/{id}/results", _get_result, ()),
    ("DELETE", "/jobs/{id}/results", _delete_result, ()),
    ("GET", "/tasks", _list_tasks, ()),
    ("GET", "/status", _status, ()),
]

_COMPILED_ROUTES = [
    (method, re.compile(r"(?P<prefix>/api)?" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", pattern)
                        + "/?"), fn, query)
    for method, pattern, fn, query in ROUTES
]


def _match(method, path):
    """Return (route function, path parameters, allowed query parameters), or raise
    HTTPError 404 or 405."""
    allowed = []
    for route_method, regex, fn, query in _COMPILED_ROUTES:
        found = regex.fullmatch(path)
        if found:
            if route_method == method:
                return fn, found.groupdict(), query
            allowed.append(route_method)
    if allowed:
        raise HTTPError(405, f"{method} is not allowed on {path}; allowed: "
                             f"{', '.join(allowed)}", {"Allow": ", ".join(allowed)})
    raise HTTPError(404, f"no such path: {path}")


def _parse_query(query, allowed):
    """The query parameters that have a value (an empty one counts as not given), or
    HTTPError(400) for one the route does not take or one given twice."""
    args = {}
    for name, value in urllib.parse.parse_qsl(query, keep_blank_values=True):
        if name not in allowed:
            takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
            raise HTTPError(400, f"unknown query parameter {name!r}; {takes}")
        if name in args:
            raise HTTPError(400, f"query parameter {name!r} is given more than once")
        args[name] = value
    return {name: value for name, value in args.items() if value}


class _Handler(http.server.BaseHTTPRequestHandler):
    """Reads a request, finds its route, and writes what the route returns."""

    protocol_version = "HTTP/1.1"  # keep-alive
    server_version = f"valet/{__version__}"
    disable_nagle_algorithm = True
    timeout = 60  # seconds a connection may stay idle before it is closed

    def do_GET(self):
        self._dispatch()

    # Every method goes through the routes, so an unrouted one gets 405 with Allow.
    do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

    def setup(self):
        super().setup()
        threading.current_thread().name = "valet-http-connection"

    def _dispatch(self):
        started = time.perf_counter()
        app = self.server.app
        path, _, query = self.path.partition("?")
        try:
            body = self._read_body()
            if app.stopping:  # a keep-alive connection that outlived the listener
                self.close_connection = True
                raise HTTPError(503, "valet is shutting down", {"Retry-After": "1"})
            fn, params, allowed = _match(self.command, path)
            prefix = params.pop("prefix") or ""
            request = _Request(params, _parse_query(query, allowed), body, prefix)
            status, payload, *rest = fn(app, request)
            headers = rest[0] if rest else {}
            data = b"" if payload is None else _encode(payload)
        except HTTPError as exc:
            status, headers, data = exc.status, exc.headers, _encode(exc.body())
        except Exception:
            log.exception("%s %s: internal error", self.command, self.path)
            status, headers = 500, {}
            data = _encode(HTTPError(500, "internal server error").body())
        self._send(status, data, headers)
        log.info("%s %s %d %.2fms", self.command, self.path, status,
                 (time.perf_counter() - started) * 1000)

    def _content_length(self):
        """The declared body length, or HTTPError (closing the connection, whose
        framing can no longer be trusted) if it is missing its form or too large."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise HTTPError(411, "send the body with a Content-Length; chunked transfer "
                                 "encoding is not supported")
        length = self.headers.get("Content-Length", "0").strip() or "0"
        if not _DIGITS.fullmatch(length):
            self.close_connection = True
            raise HTTPError(400, f"Content-Length must be a whole number, got {length!r}")
        length, limit = int(length), self.server.app.config["server.max_body_bytes"]
        if length > limit:
            self.close_connection = True
            raise HTTPError(413, f"body is {length} bytes; the limit is {limit} "
                                 f"(server.max_body_bytes)")
        return length

    def handle_expect_100(self):
        """Refuse a bad body before the client sends it, rather than after."""
        try:
            self._content_length()
        except HTTPError as exc:
            self._send(exc.status, _encode(exc.body()), exc.headers)
            log.info("%s %s %d (before the body)", self.command, self.path, exc.status)
            return False
        return super().handle_expect_100()

    def _read_body(self):
        length = self._content_length()
        body = self.rfile.read(length) if length else b""
        if len(body) < length:
            self.close_connection = True
            raise HTTPError(400, "body is shorter than its Content-Length")
        return body

    def _send(self, status, data, headers):
        """Write the whole response in one send: status line, headers and body."""
        phrase = self.responses.get(status, ("",))[0]
        lines = [f"HTTP/1.1 {status} {phrase}", f"Server: {self.server_version}",
                 f"Date: {self.date_time_string()}"]
        if status != 204:
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        if self.command == "HEAD":
            data = b""
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, an unknown method), as JSON."""
        self.close_connection = True
        message = message or self.responses.get(code, ("error",))[0]
        self._send(code, _encode(HTTPError(code, message).body()), {})
        log.info("%s %s %d (%s)", self.command, getattr(self, "path", ""), code, message)

    def log_message(self, format, *args):
        log.debug(format, *args)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # stop() must not wait for idle keep-alive connections

    def __init__(self, address, app):
        self.app = app
        super().__init__(address, _Handler)


# ------------------------------------------------------------------- façade --

class Valet:
    """The whole server: store, worker pool and HTTP API, built from a config and tasks.

    `config` is what load_config() takes (None, a YAML path or a dict) or its
    result; `tasks` maps task names to functions, and defaults to the TASKS dict
    of the module named by `tasks_module`. Constructing opens the store (and so
    may raise sqlite3.Error or ConfigError) but starts nothing else.
    """

    def __init__(self, config=None, tasks: dict | None = None):
        self.config = load_config(config)  # validates; a loaded config passes unchanged
        self.tasks = dict(tasks if tasks is not None else _load_tasks(self.config["tasks_module"]))
        self.store = _open_store(self.config)
        self.pool = _WorkerPool(self.store, self.tasks, self.config["worker_pool.workers"],
                                self.config["worker_pool.queue_capacity"],
                                self.config["timeout_unit"])
        self.started_at = None
        self.stopping = False  # set first thing in stop(): requests then get 503
        self._server = None
        self._lifecycle = threading.Lock()  # guards started_at and stopping

    @property
    def port(self) -> int:
        """The port the HTTP server listens on (useful after asking for port 0)."""
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def recover(self):
        """Settle what a previous run left: fail jobs it was running, queue its pending ones.

        Called by start(); safe to call on its own (for tests and tools) before it.
        """
        for job_id in self.store.ids(IN_PROGRESS):
            self.pool.settle(job_id, FAILED, "the server stopped while the job was running")
        pending = self.store.ids(PENDING)
        for job_id in pending:
            self.pool.enqueue(job_id, reserved=False)
        if pending:
            log.info("queued %d pending job(s) from the store", len(pending))

    def start(self) -> "Valet":
        """Recover, listen, and start the workers. Raises OSError if it cannot listen."""
        with self._lifecycle:
            if self.started_at is not None:
                raise RuntimeError("valet is already started")
            self.recover()
            self._server = _Server((self.config["server.host"], self.config["server.port"]),
                                   self)
            self.pool.start()
            # serve_forever notices shutdown() only between polls: a short interval
            # makes stop() quick at the cost of a few idle wake-ups a second.
            threading.Thread(target=self._server.serve_forever, args=(0.05,),
                             name="valet-http", daemon=True).start()
            self.started_at = time.monotonic()
        log.info("valet %s listening on %s (storage: %s, workers: %d)", __version__,
                 self.url, self.store.option, self.pool.size)
        return self

    def stop(self, grace: float | None = None):
        """Stop accepting requests, let running jobs finish for up to `grace` seconds
        (default worker_pool.shutdown_grace), and close the store. Blocks; idempotent."""
        with self._lifecycle:
            if self.stopping:
                return
            self.stopping = True
        if grace is None:
            grace = self.config["worker_pool.shutdown_grace"]
        self.pool.halt()
        if self.started_at is not None:
            log.info("stopping: no new job starts; running jobs get up to %gs", grace)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self.started_at is not None:
            self.pool.stop(grace)
        self.store.close()
        if self.started_at is not None:
            log.info("valet stopped")

    def submit(self, fields: dict) -> dict:
        """Store a job (the fields of a POST /jobs body) and queue it; return its JSON.

        Blocks until the job is stored (committed, on SQLite). Raises HTTPError:
        400 naming the field that is wrong, 503 when the backlog is full; in either
        case nothing is stored. Thread-safe.
        """
        job = _new_job(fields, self.tasks, self.config["timeout_unit"], time.time())
        self.pool.reserve()
        try:
            self.store.add(job)
        except BaseException:
            self.pool.unreserve()
            raise
        self.pool.enqueue(job["id"])
        log.info("job %s: created %s (task %s)", job["id"], PENDING, job["task_name"])
        return _job_json(job)

    def job(self, job_id: str) -> dict | None:
        """The job's JSON (as GET /jobs/{id} gives it), or None. Thread-safe."""
        job = self.store.get(job_id)
        return None if job is None else _job_json(job)

    def result(self, job_id: str) -> dict | None:
        """The finished job's {"job_id", "metadata", "error"} (as GET /jobs/{id}/results
        gives it), or None while it has none. Thread-safe."""
        result = self.store.result(job_id)
        if result is None:
            return None
        return {"job_id": job_id, "metadata": result["value"], "error": result["error"]}

    def wait(self, job_id: str, timeout: float | None = None) -> dict | None:
        """Block until the job has finished, or `timeout` seconds have passed; return
        its JSON then, whatever its status (None if there is no such job). Thread-safe."""
        with self.pool.watching(job_id) as finished:
            job = self.store.get(job_id)
            if job is not None and job["status"] not in FINISHED:
                finished.wait(timeout)
                job = self.store.get(job_id)
        return None if job is None else _job_json(job)


# --------------------------------------------------------------------- main --

class _JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {"time": _rfc3339(record.created), "level": record.levelname,
                "logger": record.name, "thread": record.threadName,
                "message": record.getMessage()}
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _setup_logging(config):
    handler = logging.StreamHandler()
    if config["logging_format"] == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(threadName)s %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(config["logging_level"].upper())
    log.propagate = False


def main(argv=None) -> int:
    """Run valet from the command line; return the exit code (2 for a bad config)."""
    parser = argparse.ArgumentParser(prog="valet", description="an asynchronous job server")
    parser.add_argument("--config", help="YAML config file (default: ./config.yaml if present)")
    parser.add_argument("--host", help="listen on this address (overrides server.host)")
    parser.add_argument("--port", type=int, help="listen on this port; 0 picks a free one")
    args = parser.parse_args(argv)
    path = args.config or ("config.yaml" if os.path.exists("config.yaml") else None)
    overrides = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if os.getcwd() not in sys.path:
        sys.path.insert(1, os.getcwd())  # so tasks_module is found where valet runs
    try:
        config = load_config(path, overrides)
        _setup_logging(config)
        app = Valet(config)
    except ConfigError as exc:
        print(f"valet: config error: {exc}", file=sys.stderr)
        return 2
    except sqlite3.Error as exc:
        print(f"valet: cannot open {config['storage.sqlite.path']!r}: {exc}", file=sys.stderr)
        return 1

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    try:
        app.start()
    except OSError as exc:
        print(f"valet: cannot listen on {config['server.host']}:{config['server.port']}: "
              f"{exc.strerror or exc}", file=sys.stderr)
        app.stop()
        return 1
    stopping.wait()
    log.info("signal received")
    app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
