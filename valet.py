"""valet: a small asynchronous job server in one module.

A client POSTs a job that names a registered Python task and carries a JSON
payload; valet stores it, answers 202 at once, runs it on a worker thread and
keeps its status and result for the client to read.

Run it:     python valet.py [--config config.yaml] [--host H] [--port N]
Embed it:   app = Valet({"server": {"port": 0}}, tasks={"add": add}).start()
            ...
            app.stop()

Endpoints (each also answers under /api, where the original Go valet served them):

    POST   /jobs                     submit a job (run_at: later)            202
    GET    /jobs                     list jobs: ?status= ?limit= ?cursor=     200
    GET    /jobs/{id}                one job; ?wait=S waits until it finishes 200
    PATCH  /jobs/{id}                change its name and/or description      204
    DELETE /jobs/{id}                remove a job that is not running        204
    POST   /jobs/{id}/cancel         cancel a job that has not finished      200
    GET    /jobs/{id}/results        a finished job's result                 200
    DELETE /jobs/{id}/results        remove a finished job's result          204
    POST   /pipelines                submit jobs that run one after another  202
    GET    /pipelines                list pipelines: ?status= ?limit= ?cursor= 200
    GET    /pipelines/{id}           one pipeline, with its jobs             200
    PATCH  /pipelines/{id}           change its name and/or description      204
    DELETE /pipelines/{id}           remove a pipeline that is not running   204
    GET    /pipelines/{id}/jobs      its jobs, in order                      200
    POST   /pipelines/{id}/cancel    cancel what is left of a pipeline       200
    GET    /periodic                 the periodic jobs and when they are due 200
    GET    /tasks                    the registered task names               200
    GET    /status                   version, storage, queue and workers     200

A job moves SCHEDULED -> PENDING -> IN_PROGRESS -> COMPLETED | FAILED, may be
CANCELLED before it finishes, and goes back to SCHEDULED when a failed attempt
has retries left. It moves only through the store's transition(), so no race
can move a finished job back.
"""

__version__ = "0.3.0"

__all__ = [
    "Valet", "load_config", "ConfigError", "HTTPError", "InvalidTransition",
    "MemoryStore", "SqliteStore", "Context", "main",
    "SCHEDULED", "PENDING", "IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED", "STATUSES",
]

import argparse
import bisect
import contextlib
import datetime
import heapq
import http.server
import importlib
import inspect
import itertools
import json
import logging
import math
import os
import queue
import random
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

SCHEDULED = "SCHEDULED"
PENDING = "PENDING"
IN_PROGRESS = "IN_PROGRESS"
COMPLETED = "COMPLETED"
FAILED = "FAILED"
CANCELLED = "CANCELLED"
STATUSES = (SCHEDULED, PENDING, IN_PROGRESS, COMPLETED, FAILED, CANCELLED)
FINISHED = (COMPLETED, FAILED, CANCELLED)
UNFINISHED = (SCHEDULED, PENDING, IN_PROGRESS)

# The only moves a status may make. transition() refuses any other.
_MOVES = {
    SCHEDULED: {PENDING, CANCELLED},                           # due, or cancelled
    PENDING: {IN_PROGRESS, CANCELLED},
    IN_PROGRESS: {COMPLETED, FAILED, CANCELLED, SCHEDULED},    # SCHEDULED: a retry
    COMPLETED: set(),
    FAILED: set(),
    CANCELLED: set(),
}

# Every key of a job's JSON, in the order it is written; unset is null.
JOB_FIELDS = (
    "id", "name", "description", "task_name", "metadata", "timeout", "priority",
    "status", "failure_reason", "progress", "attempts", "max_retries", "retry_backoff",
    "run_at", "created_at", "started_at", "completed_at", "duration",
    "pipeline_id", "next_job_id", "use_previous_results",
)

# Every key of a pipeline's JSON, in order.
PIPELINE_FIELDS = (
    "id", "name", "description", "priority", "status", "run_at", "created_at",
    "started_at", "completed_at", "duration", "jobs",
)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_MAX_TIMEOUT_SECONDS = 366 * 24 * 3600  # a year: longer is a mistake, not a timeout
_MAX_RETRIES = 100
_MAX_BACKOFF = 3600.0      # seconds: the longest wait before a retry, jitter included
_DEFAULT_BACKOFF = 1.0     # seconds before the first retry, doubling after each
_MAX_PRIORITY = 1_000_000  # priorities run from -_MAX_PRIORITY to _MAX_PRIORITY
_MAX_PIPELINE_JOBS = 100
MAX_WAIT = 60  # seconds: the longest GET /jobs/{id}?wait= may hold a request


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
# A check may raise ConfigError itself, to name the part of the value at fault.
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
    "periodic": ([], lambda v: _periodic_entries(v) is not None,
                 "a list of entries, each with name, task_name and cron or every"),
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
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt ]([0-9]{2}):([0-9]{2}):([0-9]{2})"
    r"(?:\.([0-9]{1,9}))?(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))?")


def _parse_time(text):
    """Epoch seconds from an RFC 3339 time; no offset means UTC. ValueError if not one."""
    found = _RFC3339.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        raise ValueError("not an RFC 3339 time")
    year, month, day, hour, minute, second = map(int, found.group(1, 2, 3, 4, 5, 6))
    fraction, sign = found.group(7) or "0", found.group(9)
    offset = datetime.timedelta()
    if sign:
        offset = datetime.timedelta(hours=int(found.group(10)), minutes=int(found.group(11)))
        offset = -offset if sign == "-" else offset
    moment = datetime.datetime(year, month, day, hour, minute, second,
                               tzinfo=datetime.timezone(offset))
    return moment.timestamp() + int(fraction.ljust(9, "0")) / 1e9


def _job_json(job, progress=None):
    """The public form of a stored job record: every key of JOB_FIELDS, in order.
    `progress` is what its task last reported, while it runs."""
    started, completed = job["started_at"], job["completed_at"]
    return {
        "id": job["id"],
        "name": job["name"],
        "description": job["description"],
        "task_name": job["task_name"],
        "metadata": job["metadata"],
        "timeout": job["timeout"],
        "priority": job["priority"],
        "status": job["status"],
        "failure_reason": job["failure_reason"],
        "progress": progress if job["status"] == IN_PROGRESS else None,
        "attempts": job["attempts"],
        "max_retries": job["max_retries"],
        "retry_backoff": job["retry_backoff"],
        "run_at": _rfc3339(job["run_at"]),
        "created_at": _rfc3339(job["created_at"]),
        "started_at": _rfc3339(started),
        "completed_at": _rfc3339(completed),
        "duration": (round((completed - started) * 1000, 3)
                     if started is not None and completed is not None else None),
        "pipeline_id": job["pipeline_id"],
        "next_job_id": job["next_job_id"],
        "use_previous_results": bool(job["use_previous_results"]),
    }


_JOB_INPUT = ("name", "description", "task_name", "metadata", "task_params", "timeout",
              "priority", "run_at", "max_retries", "retry_backoff")
_PIPELINE_JOB_INPUT = ("name", "description", "task_name", "metadata", "task_params",
                       "timeout", "max_retries", "retry_backoff", "use_previous_results")
_PIPELINE_INPUT = ("name", "description", "priority", "run_at", "jobs")


def _check_text(fields, key, required, where=""):
    value = fields.get(key)
    if value is None and not required:
        return None
    if key not in fields:
        raise HTTPError(400, f"{where}{key} is required")
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string or null"
        raise HTTPError(400, f"{where}{key} must be {kind}, got {_show(value)}")
    return value


def _check_unknown(fields, allowed, what, where=""):
    unknown = sorted(set(fields) - set(allowed))
    if unknown:
        raise HTTPError(400, f"{where}unknown field {unknown[0]!r}; {what} takes "
                             f"{', '.join(allowed)}")


def _check_number(fields, key, default, check, expected, where=""):
    value = fields.get(key)
    if value is None:
        return default
    if not check(value):
        raise HTTPError(400, f"{where}{key} must be {expected}, got {_show(value)}")
    return value


def _check_priority(fields, where=""):
    return _check_number(
        fields, "priority", 0, lambda v: _is_int(v) and abs(v) <= _MAX_PRIORITY,
        f"an integer from -{_MAX_PRIORITY} to {_MAX_PRIORITY}", where)


def _check_run_at(fields, where=""):
    value = fields.get("run_at")
    if value is None:
        return None
    if not (isinstance(value, str) and _RFC3339.fullmatch(value)):
        raise HTTPError(400, f"{where}run_at must be an RFC 3339 time such as "
                             f"\"2026-11-28T09:30:00Z\", got {_show(value)}")
    try:
        run_at = _parse_time(value)
        _rfc3339(run_at)  # in UTC too, it must fall within years 1 to 9999
    except (ValueError, OverflowError, OSError) as exc:
        raise HTTPError(400, f"{where}run_at {_show(value)} is not a real time: "
                             f"{exc}") from None
    return run_at


def _first_status(run_at, now):
    """A new job waits for its run_at if that is to come; else it is ready at once."""
    return SCHEDULED if run_at is not None and run_at > now else PENDING


def _new_job(fields, tasks, timeout_unit, now, allowed=_JOB_INPUT, where=""):
    """Validate a submitted job body and build its record; HTTPError(400) names the field.

    `tasks` None skips the check that task_name is registered; `where` prefixes
    every message ("jobs[1]: "), for a job inside a pipeline or a config entry.
    """
    what = "a pipeline job" if allowed is _PIPELINE_JOB_INPUT else "a job"
    _check_unknown(fields, allowed, what, where)
    name = _check_text(fields, "name", required=True, where=where)
    task_name = fields.get("task_name")
    if "task_name" not in fields:
        raise HTTPError(400, f"{where}task_name is required")
    if not isinstance(task_name, str):
        raise HTTPError(400, f"{where}task_name must be a string, got {_show(task_name)}")
    if tasks is not None and task_name not in tasks:
        raise HTTPError(400, f"{where}task_name {task_name!r} is not a registered task; "
                             f"registered tasks: {', '.join(sorted(tasks)) or '(none)'}")
    description = _check_text(fields, "description", required=False, where=where)
    if "metadata" in fields and "task_params" in fields:
        raise HTTPError(400, f"{where}give metadata or task_params (its old name), not both")
    longest = _MAX_TIMEOUT_SECONDS * (1000 if timeout_unit == "millisecond" else 1)
    timeout = _check_number(
        fields, "timeout", None, lambda v: _is_number(v) and 0 < v <= longest,
        f"a number greater than 0 and at most {longest} (in {timeout_unit}s)", where)
    max_retries = _check_number(
        fields, "max_retries", 0, lambda v: _is_int(v) and 0 <= v <= _MAX_RETRIES,
        f"an integer from 0 to {_MAX_RETRIES}", where)
    retry_backoff = _check_number(
        fields, "retry_backoff", _DEFAULT_BACKOFF,
        lambda v: _is_number(v) and 0 <= v <= _MAX_BACKOFF,
        f"a number of seconds from 0 to {_MAX_BACKOFF:g}", where)
    use_previous = fields.get("use_previous_results", False)
    if not isinstance(use_previous, bool):
        raise HTTPError(400, f"{where}use_previous_results must be true or false, got "
                             f"{_show(use_previous)}")
    run_at = _check_run_at(fields, where)
    return {
        "id": str(uuid.uuid4()), "name": name, "description": description,
        "task_name": task_name, "metadata": fields.get("metadata", fields.get("task_params")),
        "timeout": timeout, "priority": _check_priority(fields, where),
        "status": _first_status(run_at, now),
        "failure_reason": None, "attempts": 0, "max_retries": max_retries,
        "retry_backoff": retry_backoff, "run_at": run_at, "created_at": now,
        "started_at": None, "completed_at": None, "pipeline_id": None,
        "previous_job_id": None, "next_job_id": None, "use_previous_results": use_previous,
    }


def _new_pipeline(fields, tasks, timeout_unit, now):
    """Validate a submitted pipeline body: (pipeline record, its job records in order)."""
    _check_unknown(fields, _PIPELINE_INPUT, "a pipeline")
    name = _check_text(fields, "name", required=True)
    description = _check_text(fields, "description", required=False)
    priority = _check_priority(fields)
    run_at = _check_run_at(fields)
    specs = fields.get("jobs")
    if not isinstance(specs, list):
        raise HTTPError(400, f"jobs must be a list of 2 to {_MAX_PIPELINE_JOBS} jobs, got "
                             f"{_show(specs)}")
    if not 2 <= len(specs) <= _MAX_PIPELINE_JOBS:
        hint = "; submit a single job with POST /jobs" if len(specs) == 1 else ""
        raise HTTPError(400, f"jobs must be a list of 2 to {_MAX_PIPELINE_JOBS} jobs, got "
                             f"{len(specs)} job{'' if len(specs) == 1 else 's'}{hint}")
    pipeline = {"id": str(uuid.uuid4()), "name": name, "description": description,
                "priority": priority, "run_at": run_at, "created_at": now}
    jobs = []
    for i, spec in enumerate(specs):
        where = f"jobs[{i}]: "
        if not isinstance(spec, dict):
            raise HTTPError(400, f"{where}a job must be a JSON object, got {_show(spec)}")
        job = _new_job(spec, tasks, timeout_unit, now, _PIPELINE_JOB_INPUT, where)
        if i == 0 and job["use_previous_results"]:
            raise HTTPError(400, f"{where}use_previous_results cannot be true for the "
                                 f"first job: it has no previous job")
        if job["use_previous_results"] and not _takes_previous(tasks[job["task_name"]]):
            raise HTTPError(400, f"{where}task {job['task_name']!r} cannot take the previous "
                                 f"result: with use_previous_results it is called as "
                                 f"fn(metadata, previous_result)")
        job.update(pipeline_id=pipeline["id"], priority=priority)  # run_at not taken
        if i == 0:
            job.update(run_at=run_at, status=_first_status(run_at, now))
        else:
            job["previous_job_id"] = jobs[-1]["id"]
            jobs[-1]["next_job_id"] = job["id"]
        jobs.append(job)
    return pipeline, jobs


def _takes_previous(fn):
    """True if fn can be called as fn(metadata, previous_result) (with context=, if it
    takes that)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some callables have none: let the call decide
        return True
    try:
        signature.bind(None, None, **({"context": None} if _takes_context(fn) else {}))
    except TypeError:
        return False
    return True


def _pipeline_status(jobs):
    """A pipeline's status, which is never stored: the status of its first job that
    has not completed (COMPLETED if none), except that a pipeline waiting for its
    next job, or for a retry, after it has started is IN_PROGRESS."""
    for i, job in enumerate(jobs):
        status = job["status"]
        if status == COMPLETED:
            continue
        if status in (SCHEDULED, PENDING) and (i > 0 or job["attempts"] > 0):
            return IN_PROGRESS
        return status
    return COMPLETED


def _pipeline_json(pipeline, jobs, job_json=_job_json):
    """The public form of a pipeline and its job records (in order): every key of
    PIPELINE_FIELDS, in order, with each job written by `job_json`."""
    status = _pipeline_status(jobs)
    started = jobs[0]["started_at"]
    completed = (max(j["completed_at"] for j in jobs if j["completed_at"] is not None)
                 if status in FINISHED else None)
    return {
        "id": pipeline["id"],
        "name": pipeline["name"],
        "description": pipeline["description"],
        "priority": pipeline["priority"],
        "status": status,
        "run_at": _rfc3339(pipeline["run_at"]),
        "created_at": _rfc3339(pipeline["created_at"]),
        "started_at": _rfc3339(started),
        "completed_at": _rfc3339(completed),
        "duration": (round((completed - started) * 1000, 3)
                     if started is not None and completed is not None else None),
        "jobs": [job_json(job) for job in jobs],
    }


# ------------------------------------------------------------------ storage --
#
# Both stores implement the same small interface. Records are plain dicts with
# the keys of a job or pipeline (times as epoch seconds) plus "seq", its place in
# submission order, which never changes and is never reused. A job record also
# has "previous_job_id", which its JSON does not show. Every method is
# thread-safe; every write is atomic and durable when it returns.
#
#   add(job, fired=None) -> bool              store a new job; fired=(periodic name,
#                                             due time) records that firing in the same
#                                             write, and stores nothing (False) if a
#                                             firing that late is already recorded
#   get(job_id) -> record | None
#   list(status, after, limit) -> [record]    in seq order, seq > after
#   update(job_id, fields) -> bool            name/description; False if missing
#   transition(job_id, from_states, to_state, fields, result, then) -> record | None
#       the one way a status changes: the move is made only if the job's status is
#       in from_states; a move to IN_PROGRESS counts an attempt, and sets
#       started_at only on the first. result=(value,
#       error) is stored with it, and so are `then`, further moves (job_id,
#       from_states, to_state, fields) each made where its from_states match.
#   delete(job_id, states) -> status | None   deletes only if its status is in states
#   result(job_id) -> {"value", "error"} | None
#   delete_result(job_id) -> bool
#   add_pipeline(pipeline, jobs)              a pipeline and its jobs, in one write
#   get_pipeline(pipeline_id) -> record | None
#   pipeline_jobs(pipeline_id) -> [record]    its jobs, in order
#   list_pipelines(after, limit) -> [record]  in seq order, seq > after
#   update_pipeline(pipeline_id, fields) -> bool
#   delete_pipeline(pipeline_id) -> status | None
#       with its jobs and their results, unless its status is IN_PROGRESS
#   periodic_last(name, now) -> due time      of its last firing; stores `now` as
#                                             that time when it has none yet
#   ping() -> bool; close()

_NO_RESULT = object()


def _check_move(from_states, to_state):
    for state in from_states:
        if to_state not in _MOVES[state]:
            raise InvalidTransition(f"{state} -> {to_state} is not an allowed move")


class MemoryStore:
    """Jobs and pipelines in dicts, guarded by one lock. Lost when the process ends."""

    option = "memory"

    def __init__(self):
        self._lock = threading.Lock()  # guards every attribute below
        self._jobs = {}        # job id -> record; metadata kept as JSON text
        self._results = {}     # job id -> (value as JSON text, error)
        self._seqs = []        # seq of every job, ascending
        self._by_status = {s: [] for s in STATUSES}  # seqs per status, ascending
        self._ids = {}         # seq -> job id
        self._next_seq = itertools.count(1)
        self._pipelines = {}   # pipeline id -> record
        self._pipeline_jobs = {}  # pipeline id -> its job ids, in order
        self._pipeline_seqs = []  # seq of every pipeline, ascending
        self._pipeline_ids = {}   # seq -> pipeline id
        self._next_pipeline_seq = itertools.count(1)
        self._periodic = {}    # periodic entry name -> due time of its last firing

    @staticmethod
    def _out(record):
        job = dict(record)
        job["metadata"] = json.loads(record["metadata"])
        return job

    def add(self, job, fired=None):
        record = dict(job, metadata=json.dumps(job["metadata"]))
        with self._lock:
            if fired is not None:
                name, due = fired
                if self._periodic.get(name, -math.inf) >= due:
                    return False
                self._periodic[name] = due
            self._insert(record)
            return True

    def _insert(self, record):
        seq = record["seq"] = next(self._next_seq)
        self._jobs[record["id"]] = record
        self._ids[seq] = record["id"]
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

    def update(self, job_id, fields):
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return False
            record.update(fields)
            return True

    def transition(self, job_id, from_states, to_state, fields=None, result=_NO_RESULT,
                   then=()):
        _check_move(from_states, to_state)
        for _, states, state, _ in then:
            _check_move(states, state)
        with self._lock:
            record = self._move(job_id, from_states, to_state, fields)
            if record is None:
                return None
            if result is not _NO_RESULT:
                value, error = result
                self._results[job_id] = (json.dumps(value), error)
            for move in then:
                self._move(*move)
            return self._out(record)

    def _move(self, job_id, from_states, to_state, fields):
        """Make one move, with the lock held; the record, or None if it does not apply."""
        record = self._jobs.get(job_id)
        if record is None or record["status"] not in from_states:
            return None
        seq, old = record["seq"], record["status"]
        old_seqs = self._by_status[old]
        del old_seqs[bisect.bisect_left(old_seqs, seq)]
        bisect.insort(self._by_status[to_state], seq)
        first_start = record["started_at"]
        record.update(fields or {}, status=to_state)
        if to_state == IN_PROGRESS:
            record["attempts"] += 1
            if first_start is not None:  # started_at stays the first attempt's
                record["started_at"] = first_start
        return record

    def delete(self, job_id, states):
        with self._lock:
            record = self._jobs.get(job_id)
            if record is None:
                return None
            if record["status"] in states:
                self._remove(record)
            return record["status"]

    def _remove(self, record):
        seq, job_id = record["seq"], record["id"]
        if record["pipeline_id"] in self._pipeline_jobs:
            self._pipeline_jobs[record["pipeline_id"]].remove(job_id)
        del self._jobs[job_id], self._ids[seq]
        del self._seqs[bisect.bisect_left(self._seqs, seq)]
        by_status = self._by_status[record["status"]]
        del by_status[bisect.bisect_left(by_status, seq)]
        self._results.pop(job_id, None)

    def result(self, job_id):
        with self._lock:
            stored = self._results.get(job_id)
        if stored is None:
            return None
        return {"value": json.loads(stored[0]), "error": stored[1]}

    def delete_result(self, job_id):
        with self._lock:
            return self._results.pop(job_id, None) is not None

    def add_pipeline(self, pipeline, jobs):
        records = [dict(job, metadata=json.dumps(job["metadata"])) for job in jobs]
        with self._lock:
            seq = next(self._next_pipeline_seq)
            self._pipelines[pipeline["id"]] = dict(pipeline, seq=seq)
            self._pipeline_seqs.append(seq)
            self._pipeline_ids[seq] = pipeline["id"]
            self._pipeline_jobs[pipeline["id"]] = [job["id"] for job in jobs]
            for record in records:
                self._insert(record)

    def get_pipeline(self, pipeline_id):
        with self._lock:
            record = self._pipelines.get(pipeline_id)
            return None if record is None else dict(record)

    def pipeline_jobs(self, pipeline_id):
        with self._lock:
            ids = self._pipeline_jobs.get(pipeline_id, ())
            return [self._out(self._jobs[job_id]) for job_id in ids]

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE):
        with self._lock:
            start = bisect.bisect_right(self._pipeline_seqs, after)
            return [dict(self._pipelines[self._pipeline_ids[s]])
                    for s in self._pipeline_seqs[start:start + limit]]

    def update_pipeline(self, pipeline_id, fields):
        with self._lock:
            record = self._pipelines.get(pipeline_id)
            if record is None:
                return False
            record.update(fields)
            return True

    def delete_pipeline(self, pipeline_id):
        with self._lock:
            if pipeline_id not in self._pipelines:
                return None
            jobs = [self._jobs[job_id] for job_id in self._pipeline_jobs[pipeline_id]]
            status = _pipeline_status(jobs)
            if status != IN_PROGRESS:
                for record in jobs:
                    self._remove(record)
                seq = self._pipelines.pop(pipeline_id)["seq"]
                del self._pipeline_jobs[pipeline_id], self._pipeline_ids[seq]
                del self._pipeline_seqs[bisect.bisect_left(self._pipeline_seqs, seq)]
            return status

    def periodic_last(self, name, now):
        with self._lock:
            return self._periodic.setdefault(name, now)

    def ping(self):
        return True

    def close(self):
        pass


# The tables. jobs is as valet 0.1.0 made it: the columns added since are in
# _ADDED_COLUMNS, which every open adds where they are missing, so a new file and
# an old one go through the same steps.
_SQL_TABLES = """
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
CREATE TABLE IF NOT EXISTS results (
    job_id TEXT PRIMARY KEY,
    value  TEXT NOT NULL,          -- JSON
    error  TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS pipelines (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    id          TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL,
    description TEXT,
    priority    INTEGER NOT NULL,
    run_at      REAL,
    created_at  REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS periodic (
    name     TEXT PRIMARY KEY,
    last_due REAL NOT NULL         -- the due time of its last firing
) WITHOUT ROWID;
"""

_ADDED_COLUMNS = (  # (column, its declaration) added to jobs after 0.1.0
    ("priority", "INTEGER NOT NULL DEFAULT 0"),
    ("attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("max_retries", "INTEGER NOT NULL DEFAULT 0"),
    ("retry_backoff", f"DEFAULT {_DEFAULT_BACKOFF}"),  # no type, like timeout
    ("run_at", "REAL"),
    ("pipeline_id", "TEXT"),
    ("previous_job_id", "TEXT"),
    ("next_job_id", "TEXT"),
    ("use_previous_results", "INTEGER NOT NULL DEFAULT 0"),
)

_SQL_INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_by_pipeline ON jobs (pipeline_id, seq)
    WHERE pipeline_id IS NOT NULL;
"""

_JOB_COLUMNS = ("seq", "id", "name", "description", "task_name", "metadata", "timeout",
                "status", "failure_reason", "created_at", "started_at", "completed_at",
                *(column for column, _ in _ADDED_COLUMNS))
_JOB_INSERT = (f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS[1:])}) "  # all but seq
               f"VALUES ({', '.join('?' * (len(_JOB_COLUMNS) - 1))})")
_PIPELINE_COLUMNS = ("id", "name", "description", "priority", "run_at", "created_at")
_MAX_BATCH = 512  # writes applied in one transaction, at most
_IDLE_READERS = 8  # read connections kept open between reads, at most


def _dict_row(cursor, row):
    return {column[0]: value for column, value in zip(cursor.description, row)}


class _Write:
    """A write waiting to be committed: fn(connection), then its outcome."""

    __slots__ = ("fn", "done", "leads", "value", "error")

    def __init__(self, fn):
        self.fn = fn
        self.done = threading.Lock()  # held until it is answered: the cheapest signal
        self.done.acquire()
        self.leads = False  # its caller is to commit the next batch
        self.value, self.error = None, RuntimeError("the write was not committed")


class SqliteStore:
    """Jobs in one SQLite file (WAL). Durable: every write has committed when it returns.

    Writes that arrive together share one transaction and one commit (one fsync),
    without a writer thread: the caller of a write that finds no commit under way
    leads. It takes every write queued (its own first) into one transaction,
    commits, answers each caller, and hands the lead to the caller of the oldest
    write still queued, if any; the others wait for their answer. A write on an
    idle store thus costs no switch between threads, and under load one commit
    serves many callers. If a write fails, the batch is applied again with each
    write in its own savepoint, so that one failing write cannot undo the others.
    Reads use a pool of their own connections, which WAL lets run during a write.
    """

    option = "sqlite"

    def __init__(self, path, synchronous="full"):
        self.path = os.fspath(path)
        self._synchronous = synchronous.upper()
        self._conn = self._connect()
        self._conn.execute("PRAGMA journal_mode = WAL")
        self._conn.executescript(_SQL_TABLES)
        self._add_columns()
        self._conn.executescript(_SQL_INDEXES)
        self._readers = queue.SimpleQueue()  # idle read connections
        self._queue_lock = threading.Lock()  # guards the three attributes below
        self._queued = []       # _Writes waiting for a commit, oldest first
        self._leading = False   # a caller is committing (and will pass the lead on)
        self._closed = False
        self._idle = threading.Condition(self._queue_lock)  # notified when none leads
        self.commits = 0  # transactions committed (counted by the leader of each)

    def _connect(self):
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = _dict_row
        conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn

    def _add_columns(self):
        """Bring a jobs table made by an older valet up to date, in one transaction
        (a crash half way leaves it as it was)."""
        def columns():
            return {row["name"] for row in self._conn.execute("PRAGMA table_info(jobs)")}

        if all(column in columns() for column, _ in _ADDED_COLUMNS):
            return
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            have = columns()  # again: another process may have just done it
            for column, declaration in _ADDED_COLUMNS:
                if column not in have:
                    self._conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {declaration}")
            if "attempts" not in have:  # every job that started made one attempt
                self._conn.execute("UPDATE jobs SET attempts = 1 WHERE started_at IS NOT NULL")
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    # -- writing

    def _write(self, fn):
        """Run fn(connection) in a transaction; block until it has committed."""
        write = _Write(fn)
        try:
            with self._queue_lock:
                if self._closed:
                    raise RuntimeError("the store is closed")
                self._queued.append(write)
                write.leads, self._leading = not self._leading, True
            if not write.leads:
                write.done.acquire()  # answered by a leader, or handed the lead
        except BaseException:  # interrupted while it waited (KeyboardInterrupt, say)
            self._withdraw(write)
            raise
        finally:
            if write.leads:  # even when interrupted: the lead must not be dropped
                write.done.acquire(blocking=False)  # held, as _apply will release it
                self._lead()
        if write.error is not None:
            raise write.error
        return write.value

    def _withdraw(self, write):
        """Take a write whose caller has gone off the queue, unless a leader has it
        already, so that the lead is never handed to a caller that is not there."""
        with self._queue_lock:
            if not write.leads and write in self._queued:
                self._queued.remove(write)

    def _lead(self):
        """Commit the writes queued (the leader's own first), then pass the lead on."""
        try:
            with self._queue_lock:
                batch = self._queued[:_MAX_BATCH]
                del self._queued[:_MAX_BATCH]
            self._apply(batch)
        finally:
            with self._queue_lock:
                if self._queued:
                    successor = self._queued[0]
                    successor.leads = True
                    successor.done.release()
                else:
                    self._leading = False
                    self._idle.notify_all()

    def _apply(self, writes):
        """Apply a batch in one transaction and answer every caller, whatever happens
        (a write whose outcome was not set is answered with an error)."""
        try:
            try:
                outcomes = self._transaction(writes, savepoints=False)  # the common case
            except Exception:
                self._rollback()
                try:  # again, so that the writes that can succeed do
                    outcomes = self._transaction(writes, savepoints=True)
                except Exception as exc:  # the transaction failed: nothing was written
                    log.exception("sqlite: a write transaction failed")
                    self._rollback()
                    outcomes = [(None, exc)] * len(writes)
            for write, (value, error) in zip(writes, outcomes):
                write.value, write.error = value, error
        except BaseException:  # interrupted: leave no transaction open on the connection
            self._rollback()
            raise
        finally:
            for write in writes:
                write.done.release()

    def _transaction(self, writes, savepoints):
        """Apply the writes and commit; return each one's (value, error). Without
        savepoints, a write that fails raises; with them, it is undone and its
        error kept. A write function must do nothing but SQL on the connection, as
        it may be applied twice (the second time after a rollback)."""
        conn = self._conn
        outcomes = []
        conn.execute("BEGIN IMMEDIATE")
        for write in writes:
            if not savepoints:
                outcomes.append((write.fn(conn), None))
                continue
            conn.execute("SAVEPOINT one")
            try:
                outcomes.append((write.fn(conn), None))
                conn.execute("RELEASE one")
            except Exception as exc:
                conn.execute("ROLLBACK TO one")
                conn.execute("RELEASE one")
                outcomes.append((None, exc))
        conn.execute("COMMIT")
        self.commits += 1
        return outcomes

    def _rollback(self):
        with contextlib.suppress(sqlite3.Error):
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

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
        if row is not None and "metadata" in row:
            row["metadata"] = json.loads(row["metadata"])
            row["use_previous_results"] = bool(row["use_previous_results"])
        return row

    def _read(self, sql, args=()):
        with self._reading() as conn:
            return [self._out(row) for row in conn.execute(sql, args).fetchall()]

    # -- the interface

    @staticmethod
    def _job_row(job):
        return [json.dumps(job[c]) if c == "metadata" else job[c] for c in _JOB_COLUMNS[1:]]

    def add(self, job, fired=None):
        values = self._job_row(job)

        def insert(conn):
            if fired is not None and conn.execute(
                    "INSERT INTO periodic VALUES (?, ?) ON CONFLICT (name) DO UPDATE "
                    "SET last_due = excluded.last_due WHERE last_due < excluded.last_due",
                    fired).rowcount == 0:
                return False
            conn.execute(_JOB_INSERT, values)
            return True

        return self._write(insert)

    def get(self, job_id):
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return rows[0] if rows else None

    def list(self, status=None, after=0, limit=DEFAULT_PAGE_SIZE):
        where, args = "seq > ?", [after]
        if status is not None:
            where, args = "status = ? AND seq > ?", [status, after]
        return self._read(f"SELECT * FROM jobs WHERE {where} ORDER BY seq LIMIT ?",
                          [*args, limit])

    def update(self, job_id, fields):
        return self._update("jobs", job_id, fields)

    def _update(self, table, row_id, fields):
        columns = [c for c in fields if c in ("name", "description")]
        sets = ", ".join(f"{c} = ?" for c in columns) or "id = id"
        sql = f"UPDATE {table} SET {sets} WHERE id = ?"
        args = [fields[c] for c in columns] + [row_id]
        return self._write(lambda conn: conn.execute(sql, args).rowcount == 1)

    @staticmethod
    def _move_sql(job_id, from_states, to_state, fields):
        _check_move(from_states, to_state)
        for column in fields or {}:
            if column not in _JOB_COLUMNS:
                raise ValueError(f"no such job column: {column}")
        sets = "".join(f", {c} = ?" for c in fields or {})
        if to_state == IN_PROGRESS:
            sets = sets.replace("started_at = ?", "started_at = COALESCE(started_at, ?)")
            sets += ", attempts = attempts + 1"
        marks = ", ".join("?" * len(from_states))
        sql = f"UPDATE jobs SET status = ?{sets} WHERE id = ? AND status IN ({marks})"
        return sql, [to_state, *(fields or {}).values(), job_id, *from_states]

    def transition(self, job_id, from_states, to_state, fields=None, result=_NO_RESULT,
                   then=()):
        sql, args = self._move_sql(job_id, from_states, to_state, fields)
        more = [self._move_sql(*move) for move in then]
        if result is not _NO_RESULT:
            value_json = json.dumps(result[0])

        def move(conn):
            if conn.execute(sql, args).rowcount == 0:
                return None
            if result is not _NO_RESULT:
                conn.execute("INSERT OR REPLACE INTO results VALUES (?, ?, ?)",
                             (job_id, value_json, result[1]))
            for then_sql, then_args in more:
                conn.execute(then_sql, then_args)
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
        rows = self._read("SELECT value, error FROM results WHERE job_id = ?", (job_id,))
        if not rows:
            return None
        return {"value": json.loads(rows[0]["value"]), "error": rows[0]["error"]}

    def delete_result(self, job_id):
        return self._write(lambda conn: conn.execute(
            "DELETE FROM results WHERE job_id = ?", (job_id,)).rowcount == 1)

    def add_pipeline(self, pipeline, jobs):
        job_rows = [self._job_row(job) for job in jobs]
        sql = (f"INSERT INTO pipelines ({', '.join(_PIPELINE_COLUMNS)}) "
               f"VALUES ({', '.join('?' * len(_PIPELINE_COLUMNS))})")

        def insert(conn):
            conn.execute(sql, [pipeline[c] for c in _PIPELINE_COLUMNS])
            conn.executemany(_JOB_INSERT, job_rows)

        self._write(insert)

    def get_pipeline(self, pipeline_id):
        rows = self._read("SELECT * FROM pipelines WHERE id = ?", (pipeline_id,))
        return rows[0] if rows else None

    def pipeline_jobs(self, pipeline_id):
        return self._read("SELECT * FROM jobs WHERE pipeline_id = ? ORDER BY seq",
                          (pipeline_id,))

    def list_pipelines(self, after=0, limit=DEFAULT_PAGE_SIZE):
        return self._read("SELECT * FROM pipelines WHERE seq > ? ORDER BY seq LIMIT ?",
                          (after, limit))

    def update_pipeline(self, pipeline_id, fields):
        return self._update("pipelines", pipeline_id, fields)

    def delete_pipeline(self, pipeline_id):
        def remove(conn):
            if conn.execute("SELECT 1 FROM pipelines WHERE id = ?",
                            (pipeline_id,)).fetchone() is None:
                return None
            jobs = conn.execute("SELECT status, attempts FROM jobs WHERE pipeline_id = ? "
                                "ORDER BY seq", (pipeline_id,)).fetchall()
            status = _pipeline_status(jobs)
            if status != IN_PROGRESS:
                conn.execute("DELETE FROM results WHERE job_id IN "
                             "(SELECT id FROM jobs WHERE pipeline_id = ?)", (pipeline_id,))
                conn.execute("DELETE FROM jobs WHERE pipeline_id = ?", (pipeline_id,))
                conn.execute("DELETE FROM pipelines WHERE id = ?", (pipeline_id,))
            return status

        return self._write(remove)

    def periodic_last(self, name, now):
        def anchor(conn):
            conn.execute("INSERT OR IGNORE INTO periodic VALUES (?, ?)", (name, now))
            return conn.execute("SELECT last_due FROM periodic WHERE name = ?",
                                (name,)).fetchone()["last_due"]

        return self._write(anchor)

    def ping(self):
        try:
            with self._reading() as conn:
                conn.execute("SELECT 1").fetchone()
        except sqlite3.Error:
            return False
        return not self._closed

    def close(self):
        """Let the writes already queued commit, then close every connection.
        Idempotent."""
        with self._queue_lock:
            if self._closed:
                return
            self._closed = True
            while self._leading:
                self._idle.wait()
        self._conn.close()
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

class Context:
    """What a task is given when it takes a `context` keyword argument:

        def resize(metadata, context):
            for i, image in enumerate(metadata["images"]):
                if context.cancelled.is_set():
                    return {"stopped_at": i}
                ...
                context.progress((i + 1) / len(metadata["images"]), f"{i + 1} done")

    `job_id` and `attempt` (1 for the first run, 2 for the first retry, ...);
    `deadline`, the epoch second its timeout runs out (None without a timeout);
    `cancelled`, a threading.Event set when the job is cancelled, times out or
    the server stops, so the task can stop early (its result is discarded then);
    and progress(fraction, message), which the job's JSON shows while it runs.
    """

    def __init__(self, job_id, attempt, deadline, claim, clock=time.time):
        self.job_id = job_id
        self.attempt = attempt
        self.deadline = deadline
        self.cancelled = claim.cancelled
        self._claim = claim
        self._clock = clock

    def remaining(self):
        """Seconds left before the timeout (never below 0), or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - self._clock())

    def progress(self, fraction, message=""):
        """Report how far the task has got: a number from 0 to 1 and a short message."""
        if not (_is_number(fraction) and 0 <= fraction <= 1):
            raise ValueError(f"progress fraction must be a number from 0 to 1, "
                             f"got {fraction!r}")
        self._claim.progress = {"fraction": fraction, "message": str(message)[:200]}


class _Claim:
    """A job taken by a worker thread: whoever pops it from the pool's `_running`
    (the worker, the deadline watcher, a cancel, stop) settles the job."""

    __slots__ = ("thread", "job", "cancelled", "progress", "abandoned")

    def __init__(self, thread):
        self.thread = thread
        self.job = None        # its record, once it is IN_PROGRESS
        self.cancelled = threading.Event()
        self.progress = None
        self.abandoned = False  # taken from its thread, which left the pool


def _takes_context(fn):
    """True if fn accepts a `context` keyword argument."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature
        return False
    return any(p.name == "context" and p.kind != p.POSITIONAL_ONLY
               or p.kind == p.VAR_KEYWORD for p in parameters)


def _backoff(base, attempts):
    """Seconds to wait before the retry that follows failed attempt number `attempts`:
    doubling from `base`, capped, with jitter (half to all of it) so that jobs that
    failed together do not all retry at the same moment."""
    delay = min(_MAX_BACKOFF, base * 2 ** min(attempts - 1, 32))
    return delay * random.uniform(0.5, 1.0)


_STOP = object()  # put on the ready queue, one per worker, to end it


def _guarded(step, *args):
    """Run one step of a thread's loop; an error (the store's, say) is logged, and
    the thread goes on. A job it left behind is settled at the next start."""
    try:
        return step(*args)
    except Exception:
        log.exception("%s: unexpected error", threading.current_thread().name)
        return True


class _WorkerPool:
    """Worker threads taking job ids from a priority queue, and a watcher that enforces
    timeouts.

    A job belongs to the thread running it while its _Claim is in `_running`; the
    first thread to pop the claim (the worker, when the task returns; the watcher,
    when the deadline passes; cancel(); stop(), when the grace period runs out)
    settles the job, and the others drop what they have. A Python thread cannot
    be killed, so a worker whose job was taken from it is left to finish its task
    on its own: a replacement starts at once, and the old thread exits when the
    task returns, its late result discarded.
    """

    def __init__(self, store, tasks, workers, capacity, timeout_unit, scheduler,
                 clock=time.monotonic):
        self.size = workers
        self.capacity = capacity
        self._store = store
        self._tasks = tasks
        self._unit = timeout_unit
        self._scheduler = scheduler
        self._now = scheduler.clock  # the wall clock, for the times a job records
        self._clock = clock
        # (-priority, order, job id) of PENDING jobs: highest priority first, then FIFO
        self._ready = queue.PriorityQueue()
        self._order = itertools.count()
        self._names = itertools.count(1)
        self._context = {}  # task name -> whether its function takes a context argument
        self._watcher = None
        self._lock = threading.Lock()  # guards every attribute below
        self._deadline_added = threading.Condition(self._lock)
        self._threads_changed = threading.Condition(self._lock)
        self._reserved = 0     # submissions given a place in the backlog, not yet queued
        self._waiting = set()  # ids queued and not yet taken by a worker (nor deleted)
        self._running = {}     # job id -> the _Claim of the thread that owns it
        self._deadlines = []   # heap of (monotonic deadline, order, claim, timeout reason)
        self._settled_early = 0  # entries in _deadlines whose job finished in time
        self._threads = set()  # the pool's worker threads (an abandoned one leaves it)
        self._abandoned = 0    # abandoned threads whose task has not returned yet
        self._watchers = {}    # job id -> Events of callers waiting for it to change
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

    def enqueue(self, job_id, priority=0, reserved=True):
        """Queue a stored PENDING job. Jobs that were accepted earlier (scheduled ones
        coming due, a pipeline's next job, start-up recovery) pass reserved=False:
        they take a place even when the backlog is full."""
        with self._lock:
            self._reserved -= reserved
            self._waiting.add(job_id)
        self._ready.put((-priority, next(self._order), job_id))

    def discard(self, job_id):
        """Forget a queued job that was deleted or cancelled: it gives back its place
        and never runs."""
        with self._lock:
            self._waiting.discard(job_id)
        self._wake(job_id)

    def promote(self, job_id):
        """A scheduled job has come due: make it PENDING and queue it."""
        job = self._store.transition(job_id, (SCHEDULED,), PENDING)
        if job is not None:
            log.debug("job %s: %s -> %s", job_id, SCHEDULED, PENDING)
            self.enqueue(job_id, job["priority"], reserved=False)

    @contextlib.contextmanager
    def watching(self, job_id):
        """An Event set when the job's status next changes after it has started (it
        finishes, is retried, cancelled or deleted). Read the job's status after
        entering, so that a change just before is not missed."""
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
            return {"depth": len(self._waiting) + self._reserved, "busy": len(self._running),
                    "abandoned": self._abandoned}

    def progress(self, job_id):
        """What the running job's task last reported, or None."""
        with self._lock:
            claim = self._running.get(job_id)
            return None if claim is None else claim.progress

    # -- a worker's single step

    def run_once(self, block=True, timeout=None):
        """Take one job id from the queue and run that job to its end.

        Returns False when this thread should stop: it took the stop sentinel, or
        its job was taken from it (a timeout, a cancel) and a replacement has
        taken its place. Raises queue.Empty when not blocking (or after
        `timeout`) and nothing is queued.
        """
        *_, job_id = self._ready.get(block, timeout)
        if job_id is _STOP:
            return False
        with self._lock:
            if job_id not in self._waiting or self._stopping:
                return True  # deleted or cancelled while queued; or left for the next start
            self._waiting.remove(job_id)
            claim = self._running[job_id] = _Claim(threading.current_thread())
        try:
            return self._run(job_id, claim)
        finally:
            with self._lock:
                if self._running.get(job_id) is claim:  # an error (the store's, say):
                    del self._running[job_id]           # the job waits for the next start
                if claim.abandoned:
                    self._abandoned -= 1

    def _run(self, job_id, claim):
        job = self._store.transition(job_id, (PENDING,), IN_PROGRESS,
                                     {"started_at": self._now()})
        with self._lock:
            owned = self._running.get(job_id) is claim
            if job is None or not owned:  # cancelled or deleted before it started
                if owned:
                    del self._running[job_id]
                    self._threads_changed.notify_all()
                return owned  # if not, the canceller started a replacement
            claim.job = job
            self._threads_changed.notify_all()  # stop() may wait for this start
            deadline = None
            if job["timeout"] is not None:
                seconds = job["timeout"] / (1000 if self._unit == "millisecond" else 1)
                plural = "" if job["timeout"] == 1 else "s"
                reason = f"timed out after {job['timeout']:g} {self._unit}{plural}"
                deadline = self._now() + seconds
                heapq.heappush(self._deadlines,
                               (self._clock() + seconds, next(self._order), claim, reason))
                self._deadline_added.notify()
        log.debug("job %s: %s -> %s (attempt %d)", job_id, PENDING, IN_PROGRESS,
                  job["attempts"])

        context = Context(job_id, job["attempts"], deadline, claim, self._now)
        status, value, reason = self._call(job, context)

        with self._lock:
            owned = self._running.get(job_id) is claim
            if owned:
                del self._running[job_id]
                if job["timeout"] is not None:
                    self._forget_deadline()
        if not owned:
            log.info("job %s: the task returned after the job was settled; "
                     "its result is discarded", job_id)
            return False
        self.settle(job, status, reason, value)
        return True

    def _forget_deadline(self):
        """Count a deadline entry made stale by a job that finished in time, and prune
        the heap once most of it is stale: a busy server with long timeouts would
        otherwise hold an entry per job until its deadline. Call with the lock held."""
        self._settled_early += 1
        if self._settled_early * 2 > len(self._deadlines):
            self._deadlines = [d for d in self._deadlines
                               if self._running.get(d[2].job["id"]) is d[2]]
            heapq.heapify(self._deadlines)
            self._settled_early = 0

    def _call(self, job, context):
        """Call the job's task outside every lock: (status, value, failure reason)."""
        fn = self._tasks.get(job["task_name"])
        if fn is None:
            return FAILED, None, f"task {job['task_name']!r} is not registered"
        if job["task_name"] not in self._context:  # by name: a task need not be hashable
            self._context[job["task_name"]] = _takes_context(fn)
        args = [job["metadata"]]
        try:
            if job["use_previous_results"]:
                previous = self._store.result(job["previous_job_id"])
                args.append(None if previous is None else previous["value"])
            kwargs = {"context": context} if self._context[job["task_name"]] else {}
            value = fn(*args, **kwargs)
        except BaseException as exc:  # a task's failure must never end the worker
            log.warning("job %s: task %s raised", job["id"], job["task_name"], exc_info=True)
            return FAILED, None, f"{type(exc).__name__}: {exc}"
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError, RecursionError) as exc:
            return FAILED, None, f"the task's result is not JSON-serialisable: {exc}"
        return COMPLETED, value, None

    # -- the one way an attempt ends

    def settle(self, job, status, reason, value=None, states=(IN_PROGRESS,)):
        """End an attempt of a job the caller owns, moving it from `states`: a failure
        with retries left schedules the next attempt; otherwise the job finishes as
        `status` with its result, a pipeline's next job is queued, or (when it did
        not complete) the rest of its pipeline is cancelled in the same write.
        Returns the moved record; None (and nothing happens) if it was not in
        `states` any more.
        """
        job_id, now = job["id"], self._now()
        if status == FAILED and job["attempts"] <= job["max_retries"]:
            run_at = now + _backoff(job["retry_backoff"], max(1, job["attempts"]))
            moved = self._store.transition(job_id, states, SCHEDULED,
                                           {"run_at": run_at, "failure_reason": reason})
            if moved is not None:
                log.info("job %s: attempt %d failed (%s); retry %d of %d at %s", job_id,
                         moved["attempts"], reason, moved["attempts"], moved["max_retries"],
                         _rfc3339(run_at))
                self._scheduler.at(run_at, self.promote, job_id)
                self._wake(job_id)
            return moved
        later = []
        if status != COMPLETED and job["next_job_id"] is not None:
            jobs = self._store.pipeline_jobs(job["pipeline_id"])
            ids = [j["id"] for j in jobs]
            what = "failed" if status == FAILED else "was cancelled"
            reason_later = (f"job {job['name']!r} ({job_id}) before it in the pipeline "
                            f"{what}")
            later = [(later_id, (SCHEDULED, PENDING), CANCELLED,
                      {"completed_at": now, "failure_reason": reason_later})
                     for later_id in ids[ids.index(job_id) + 1:]]
        result = (value, reason) if status != CANCELLED else _NO_RESULT
        moved = self._store.transition(job_id, states, status,
                                       {"completed_at": now, "failure_reason": reason},
                                       result=result, then=later)
        if moved is None:
            return None
        log.log(logging.DEBUG if status == COMPLETED else logging.INFO, "job %s: %s -> %s%s",
                job_id, job["status"], status, f" ({reason})" if reason else "")
        for later_id, *_ in later:
            self.discard(later_id)
        self._wake(job_id)
        if status == COMPLETED and job["next_job_id"] is not None:
            self.enqueue(job["next_job_id"], job["priority"], reserved=False)
        return moved

    def cancel(self, job_id, reason):
        """Cancel a job that has not finished: it never starts, or, if it is running,
        its task is told (context.cancelled) and its late result discarded.
        Returns (the job's record or None if there is none, whether this call
        cancelled it): a job that finished first keeps its status."""
        for attempt in itertools.count():
            job = self._store.get(job_id)
            if job is None or job["status"] in FINISHED:
                return job, False
            with self._lock:
                claim = self._running.pop(job_id, None)
                if claim is not None:
                    self._abandon(claim)
                    if claim.job is not None and claim.job["timeout"] is not None:
                        self._forget_deadline()
                else:  # no worker may take it from the queue from now on
                    self._waiting.discard(job_id)
            if claim is not None:  # this call owns it now
                claim.cancelled.set()
                self._replace()
                moved = self.settle(claim.job or job, CANCELLED, reason, states=UNFINISHED)
            else:
                # Without its claim, a running job is the settling thread's (a worker
                # whose task returned, the deadline watcher); or nobody's, after an
                # error, and then, after a few rounds, this call's.
                states = (SCHEDULED, PENDING) if attempt < 3 else UNFINISHED
                moved = self.settle(job, CANCELLED, reason, states=states)
            if moved is not None:  # settle() has woken its waiters
                return moved, True
            if claim is None:
                self._wait_for_owner(job_id)

    def _wait_for_owner(self, job_id):
        """Wait up to a second for a running job that no claim holds to be settled."""
        with self.watching(job_id) as changed:
            job = self._store.get(job_id)
            with self._lock:
                unclaimed = job_id not in self._running
            if job is not None and job["status"] == IN_PROGRESS and unclaimed:
                changed.wait(1)

    # -- the deadline watcher's single step

    def tick(self, now):
        """Fail every running job whose deadline is at or before `now` (monotonic).

        Each such job's thread leaves the pool and a replacement starts, so the
        pool keeps its full number of free workers. A timed-out attempt is a
        failed one: it is retried if the job has retries left. Returns how many
        it timed out.
        """
        overdue = []
        with self._lock:
            while self._deadlines and self._deadlines[0][0] <= now:
                _, _, claim, reason = heapq.heappop(self._deadlines)
                job_id = claim.job["id"]
                if self._running.get(job_id) is not claim:  # it finished in time
                    self._settled_early = max(0, self._settled_early - 1)
                    continue
                del self._running[job_id]
                self._abandon(claim)
                overdue.append((claim, reason))
        for claim, _ in overdue:
            claim.cancelled.set()
            self._replace()
        for claim, reason in overdue:  # one that cannot be written leaves the rest be
            _guarded(self.settle, claim.job, FAILED, reason)
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
            _guarded(self.tick, self._clock())

    # -- threads

    def _in_pool(self, thread):
        with self._lock:
            return thread in self._threads

    def _abandon(self, claim):
        """The claim's thread leaves the pool (call with the lock held)."""
        claim.abandoned = True
        self._abandoned += 1
        self._threads.discard(claim.thread)
        self._threads_changed.notify_all()

    def _replace(self):
        """Start a worker in place of an abandoned one (once the pool has started)."""
        if self._watcher is not None:
            self._spawn()

    def _spawn(self):
        thread = threading.Thread(target=self._work, name=f"valet-worker-{next(self._names)}",
                                  daemon=True)
        with self._lock:
            if self._stopping:
                return
            self._threads.add(thread)
        thread.start()

    def _work(self):
        # A thread stops when run_once says so, and also when it left the pool while
        # an error cut its job short (a cancel took the job, then the start failed).
        while _guarded(self.run_once) and self._in_pool(threading.current_thread()):
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
        """Start no more jobs: those still queued stay PENDING in the store. Wakes
        every caller waiting for a job, so that it can answer before valet stops."""
        with self._lock:
            self._stopping = True
            self._waiting.clear()
            watchers, self._watchers = self._watchers, {}
        for events in watchers.values():
            for event in events:
                event.set()

    def stop(self, grace):
        """halt(), then wait up to `grace` seconds for running jobs, then fail them
        (retrying those with retries left, at the next start).

        Timeouts are still enforced while it waits.
        """
        self.halt()
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._ready.put((-math.inf, next(self._order), _STOP))
        with self._lock:
            # Threads leave the pool when they exit, or when their job is taken.
            self._threads_changed.wait_for(lambda: not self._threads, grace)
            # A claim without a job is a start still being written: wait for it, so
            # that it is settled with the rest rather than run after stop returns.
            self._threads_changed.wait_for(
                lambda: all(claim.job for claim in self._running.values()), 10)
            unfinished = [claim for claim in self._running.values() if claim.job]
            for claim in unfinished:
                del self._running[claim.job["id"]]
            self._watching = False
            self._deadline_added.notify_all()
        for claim in unfinished:
            claim.cancelled.set()
            _guarded(self.settle, claim.job, FAILED, f"the server stopped before the job "
                                                    f"finished (shutdown grace period: "
                                                    f"{grace:g}s)")
        if self._watcher is not None:
            self._watcher.join(10)


# ---------------------------------------------------------------- scheduler --

class _Scheduler:
    """Runs actions at wall-clock times: scheduled jobs coming due, retries, periodic
    firings. A heap of (time, order, action, args) and a thread that sleeps on a
    Condition until the earliest entry is due, woken early when an earlier one is
    added; no polling.
    """

    def __init__(self, clock=time.time):
        self.clock = clock  # epoch seconds; tests pass their own
        self._order = itertools.count()
        self._thread = None
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)  # guards the two below
        self._heap = []
        self._running = True

    def at(self, when, action, *args):
        """Run action(*args) on the scheduler's thread at epoch second `when`."""
        with self._lock:
            heapq.heappush(self._heap, (when, next(self._order), action, args))
            self._changed.notify()

    def tick(self, now):
        """Run every action due at or before `now`, in time order; return how many.
        One that raises is logged, and the rest still run."""
        done = 0
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > now:
                    return done
                _, _, action, args = heapq.heappop(self._heap)
            _guarded(action, *args)
            done += 1

    def next_due(self):
        """The epoch second the earliest entry is due, or None."""
        with self._lock:
            return self._heap[0][0] if self._heap else None

    def _loop(self):
        while True:
            with self._lock:
                while self._running:
                    delay = self._heap[0][0] - self.clock() if self._heap else None
                    if delay is not None and delay <= 0:
                        break
                    # Capped, so that a step of the wall clock delays nothing for long.
                    self._changed.wait(60 if delay is None else min(delay, 60))
                if not self._running:
                    return
            self.tick(self.clock())

    def start(self):
        self._thread = threading.Thread(target=self._loop, name="valet-scheduler",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        with self._lock:
            self._running = False
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join(10)


# Periodic jobs: config entries that each create an ordinary job when due.

_CRON_FIELDS = (("minute", 0, 59), ("hour", 0, 23), ("day of month", 1, 31),
                ("month", 1, 12), ("day of week", 0, 7))
_CRON_PART = re.compile(r"(\*|[0-9]{1,2})(?:-([0-9]{1,2}))?(?:/([0-9]{1,2}))?")
_CRON_STEPS = 5000  # a search gives up after this many steps: about five years
_EVERY = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)?")
_EVERY_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


class _Cron:
    """A standard five-field cron expression (minute hour day-of-month month
    day-of-week; numbers, *, ranges a-b, steps /n and lists a,b), in UTC. As in
    Vixie cron, when both day fields are restricted (neither starts with *), a
    day matches if either does."""

    def __init__(self, text):
        fields = text.split()
        if len(fields) != 5:
            shortcut = " (shortcuts such as @daily are not supported)" if "@" in text else ""
            raise ValueError(f"expected five fields (minute hour day-of-month month "
                             f"day-of-week), got {len(fields)}{shortcut}")
        values = [self._field(f, *spec) for f, spec in zip(fields, _CRON_FIELDS)]
        self.minutes, self.hours, self.days, self.months, weekdays = values
        self.weekdays = {day % 7 for day in weekdays}  # 0 and 7 are both Sunday
        self.either_day = not fields[2].startswith("*") and not fields[4].startswith("*")
        self.text = text
        if self.next_after(time.time()) is None:
            raise ValueError(f"{text!r} never matches a date")

    @staticmethod
    def _field(text, name, low, high):
        values = set()
        for part in text.split(","):
            found = _CRON_PART.fullmatch(part)
            if found is None:
                raise ValueError(f"{name} field {part!r} is not a number, *, a range "
                                 f"a-b, a step /n or a list of those (names such as MON "
                                 f"are not supported: use numbers)")
            first, last, step = found.groups()
            if first == "*" and last is not None:
                raise ValueError(f"{name} field {part!r}: * cannot start a range")
            start = low if first == "*" else int(first)
            end = high if first == "*" or (last is None and step) else int(last or first)
            if not (low <= start <= high and low <= end <= high):
                raise ValueError(f"{name} field {part!r} is out of range: {name} runs "
                                 f"from {low} to {high}")
            if start > end:
                raise ValueError(f"{name} field {part!r} is a range that runs backwards")
            if step is not None and not 1 <= int(step) <= high:
                raise ValueError(f"{name} field {part!r} has a step outside 1 to {high}")
            values.update(range(start, end + 1, int(step or 1)))
        return values

    def _matches_day(self, moment):
        in_month = moment.day in self.days
        in_week = moment.isoweekday() % 7 in self.weekdays
        return in_month or in_week if self.either_day else in_month and in_week

    def _search(self, moment, forward):
        """The first matching minute from `moment` on (or back), as epoch seconds."""
        for _ in range(_CRON_STEPS):
            if moment.month not in self.months:
                start = moment.replace(day=1, hour=0, minute=0)
                moment = ((start + datetime.timedelta(days=32)).replace(day=1) if forward
                          else start - datetime.timedelta(minutes=1))
            elif not self._matches_day(moment):
                start = moment.replace(hour=0, minute=0)
                moment = start + (datetime.timedelta(days=1) if forward
                                  else -datetime.timedelta(minutes=1))
            elif moment.hour not in self.hours:
                start = moment.replace(minute=0)
                moment = start + (datetime.timedelta(hours=1) if forward
                                  else -datetime.timedelta(minutes=1))
            elif moment.minute not in self.minutes:
                moment += datetime.timedelta(minutes=1 if forward else -1)
            else:
                return moment.timestamp()
        return None

    def next_after(self, t):
        """The first due time after epoch second t, or None."""
        moment = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        moment = moment.replace(second=0, microsecond=0) + datetime.timedelta(minutes=1)
        return self._search(moment, forward=True)

    def latest(self, last, now):
        """The latest due time after `last` and at or before `now`, or None."""
        moment = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        found = self._search(moment.replace(second=0, microsecond=0), forward=False)
        return found if found is not None and found > last else None


class _Every:
    """A fixed interval, counted from the last due time."""

    def __init__(self, value):
        if _is_number(value):
            seconds = value
        else:
            found = _EVERY.fullmatch(value.strip()) if isinstance(value, str) else None
            if found is None:
                raise ValueError(f"{_show(value)} is not an interval; give seconds (90) "
                                 f"or a number and a unit: 90s, 5m, 2h, 1d")
            seconds = float(found.group(1)) * _EVERY_UNITS[found.group(2) or "s"]
        if not 1 <= seconds <= _MAX_TIMEOUT_SECONDS:
            raise ValueError(f"{_show(value)} is not allowed; an interval runs from 1 "
                             f"second to a year")
        self.seconds = seconds
        self.text = value

    def next_after(self, t):
        return t + self.seconds

    def latest(self, last, now):
        missed = math.floor((now - last) / self.seconds)
        return last + missed * self.seconds if missed >= 1 else None


def _next_due(schedule, last, now):
    """When a periodic entry that last fired at `last` should fire next: at once for
    the latest due time it missed (once, however many it missed), else when due."""
    missed = schedule.latest(last, now)
    return missed if missed is not None else schedule.next_after(last)


_PERIODIC_INPUT = ("name", "task_name", "cron", "every", "description", "metadata",
                   "timeout", "priority", "max_retries", "retry_backoff")


def _periodic_entries(value):
    """The `periodic` config value as [(name, schedule, job fields)]; ConfigError names
    the entry and field at fault. The job fields are checked when valet starts,
    against the registered tasks."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"periodic: {_show(value)} is not allowed; expected a list of "
                          f"entries, each with name, task_name and cron or every")
    entries, names = [], set()
    for i, entry in enumerate(value):
        where = f"periodic[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: {_show(entry)} is not allowed; expected a mapping "
                              f"with name, task_name and cron or every")
        unknown = sorted(set(entry) - set(_PERIODIC_INPUT))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key; an entry takes "
                              f"{', '.join(_PERIODIC_INPUT)}")
        name = entry.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where}.name: {_show(name)} is not allowed; expected a "
                              f"non-empty string")
        if name in names:
            raise ConfigError(f"{where}.name: {name!r} is used by an earlier entry; "
                              f"names must be unique")
        names.add(name)
        if "cron" in entry and "every" in entry:
            raise ConfigError(f"{where}: give cron or every, not both")
        if "cron" not in entry and "every" not in entry:
            raise ConfigError(f"{where}: give cron or every: when its jobs are due")
        key = "cron" if "cron" in entry else "every"
        try:
            if key == "cron" and not isinstance(entry["cron"], str):
                raise ValueError(f"{_show(entry['cron'])} is not a cron expression "
                                 f"such as \"*/5 * * * *\"")
            schedule = _Cron(entry["cron"]) if key == "cron" else _Every(entry["every"])
        except ValueError as exc:
            raise ConfigError(f"{where}.{key}: {exc}") from None
        try:
            json.dumps(entry.get("metadata"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}.metadata: it must be plain JSON (YAML dates, "
                              f".nan and .inf are not): {exc}") from None
        fields = {k: v for k, v in entry.items() if k not in ("cron", "every")}
        entries.append((name, schedule, fields))
    return entries


# --------------------------------------------------------------------- HTTP --

def _encode(payload):
    return _ENCODER.encode(payload).encode()


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))  # made once: reused


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


_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float,
                            parse_int=_bounded_int, object_pairs_hook=_unique_keys)


def _json_type(value):
    """The JSON name of a value's type, for messages: object, array, string, ..."""
    for kind, name in ((bool, "boolean"), (dict, "object"), (list, "array"),
                       (str, "string"), ((int, float), "number")):
        if isinstance(value, kind):
            return name
    return "null"


_DIGITS = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a 64-bit integer
_SECONDS = re.compile(r"[0-9]{1,6}(\.[0-9]{1,6})?")  # 2, 0.5: a plain, short decimal


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
            value = _DECODER.decode(text)
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



def _not_found(what, item_id):
    """The 404 for a job or pipeline that is not there."""
    return HTTPError(404, f"{what} {item_id!r} not found")


def _find_job(app, req):
    job = app.store.get(req.params["id"])
    if job is None:
        raise _not_found("job", req.params["id"])
    return job


def _page(args):
    """A listing's (status, limit, cursor) from its query, or HTTPError(400)."""
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
    return status, int(limit), int(cursor)


def _post_job(app, req):
    job = app.submit(req.json())
    return 202, job, {"Location": f"{req.prefix}/jobs/{job['id']}"}


def _list_jobs(app, req):
    status, limit, cursor = _page(req.args)
    jobs = app.store.list(status, after=cursor, limit=limit + 1)
    next_cursor = str(jobs[limit - 1]["seq"]) if len(jobs) > limit else None
    return 200, {"jobs": [app.job_json(j) for j in jobs[:limit]], "next_cursor": next_cursor}


def _get_job(app, req):
    if "wait" not in req.args:
        return 200, app.job_json(_find_job(app, req))
    seconds = req.args["wait"]
    if not (_SECONDS.fullmatch(seconds) and float(seconds) <= MAX_WAIT):
        raise HTTPError(400, f"wait must be a number of seconds from 0 to {MAX_WAIT}, "
                             f"written as digits such as 2 or 0.5, got {seconds!r}")
    job = app.wait(req.params["id"], float(seconds))
    if job is None:
        raise _not_found("job", req.params["id"])
    return 200, job


def _changes(fields, what, known):
    """The name/description changes a PATCH body asks for, or HTTPError(400)."""
    for key in fields:
        if key not in known:
            raise HTTPError(400, f"unknown field {key!r}; a PATCH of a {what} may change "
                                 f"only name and description")
        if key not in ("name", "description"):
            raise HTTPError(400, f"field {key!r} cannot be changed; a PATCH of a {what} "
                                 f"may change only name and description")
    changes = {}
    if "name" in fields:
        changes["name"] = _check_text(fields, "name", required=True)
    if "description" in fields:
        changes["description"] = _check_text(fields, "description", required=False)
    return changes


def _patch_job(app, req):
    changes = _changes(req.json(), "job", (*JOB_FIELDS, *_JOB_INPUT))
    if not app.store.update(req.params["id"], changes):
        raise _not_found("job", req.params["id"])
    return 204, None


def _delete_job(app, req):
    job = _find_job(app, req)
    if job["pipeline_id"] is not None:
        raise HTTPError(409, f"job {job['id']!r} belongs to pipeline "
                             f"{job['pipeline_id']!r}; delete the pipeline instead")
    status = app.store.delete(job["id"], (SCHEDULED, PENDING, *FINISHED))
    if status is None:
        raise _not_found("job", job["id"])
    if status == IN_PROGRESS:
        raise HTTPError(409, f"job {job['id']!r} is running; cancel it, or delete it "
                             f"once it has finished")
    app.pool.discard(job["id"])
    log.info("job %s: deleted (was %s)", job["id"], status)
    return 204, None


def _cancel_job(app, req):
    return 200, app.cancel(req.params["id"])


def _get_result(app, req):
    result = app.result(req.params["id"])
    if result is None:
        job = _find_job(app, req)
        result = app.result(job["id"])  # it may have finished since the first read
    if result is None:
        if job["status"] == CANCELLED:
            raise HTTPError(404, f"job {job['id']!r} was cancelled, so it has no result "
                                 f"({job['failure_reason']})")
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


def _find_pipeline(app, req):
    """The pipeline and its jobs, or HTTPError(404)."""
    pipeline_id = req.params["id"]
    pipeline = app.store.get_pipeline(pipeline_id)
    jobs = app.store.pipeline_jobs(pipeline_id) if pipeline is not None else []
    if not jobs:  # none, or deleted between the two reads
        raise _not_found("pipeline", pipeline_id)
    return pipeline, jobs


def _post_pipeline(app, req):
    pipeline = app.submit_pipeline(req.json())
    return 202, pipeline, {"Location": f"{req.prefix}/pipelines/{pipeline['id']}"}


def _list_pipelines(app, req):
    status, limit, cursor = _page(req.args)
    found, after = [], cursor
    # A pipeline's status follows from its jobs, so a filtered page reads on until
    # it has enough.
    while len(found) <= limit:
        pipelines = app.store.list_pipelines(after, limit=MAX_PAGE_SIZE)
        for pipeline in pipelines:
            jobs = app.store.pipeline_jobs(pipeline["id"])
            if jobs and (status is None or _pipeline_status(jobs) == status):
                found.append((pipeline, jobs))
                if len(found) > limit:
                    break
        if len(pipelines) < MAX_PAGE_SIZE:
            break
        after = pipelines[-1]["seq"]
    next_cursor = str(found[limit - 1][0]["seq"]) if len(found) > limit else None
    return 200, {"pipelines": [app.pipeline_json(p, jobs) for p, jobs in found[:limit]],
                 "next_cursor": next_cursor}


def _get_pipeline(app, req):
    return 200, app.pipeline_json(*_find_pipeline(app, req))


def _patch_pipeline(app, req):
    changes = _changes(req.json(), "pipeline", (*PIPELINE_FIELDS, *_PIPELINE_INPUT))
    if not app.store.update_pipeline(req.params["id"], changes):
        raise _not_found("pipeline", req.params["id"])
    return 204, None


def _delete_pipeline(app, req):
    pipeline, jobs = _find_pipeline(app, req)
    status = app.store.delete_pipeline(pipeline["id"])
    if status is None:
        raise _not_found("pipeline", pipeline["id"])
    if status == IN_PROGRESS:
        raise HTTPError(409, f"pipeline {pipeline['id']!r} is running; cancel it, or "
                             f"delete it once it has finished")
    for job in jobs:
        app.pool.discard(job["id"])
    log.info("pipeline %s: deleted (was %s) with its %d jobs", pipeline["id"], status,
             len(jobs))
    return 204, None


def _pipeline_jobs(app, req):
    _, jobs = _find_pipeline(app, req)
    return 200, {"jobs": [app.job_json(job) for job in jobs]}


def _cancel_pipeline(app, req):
    return 200, app.cancel_pipeline(req.params["id"])


def _list_periodic(app, req):
    return 200, {"periodic": app.periodic()}


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
        "workers": {"busy": pool["busy"], "total": app.pool.size,
                    "abandoned": pool["abandoned"]},
    }


_LISTING = ("status", "limit", "cursor")

# (method, path, route function, the query parameters it takes)
ROUTES = [
    ("POST", "/jobs", _post_job, ()),
    ("GET", "/jobs", _list_jobs, _LISTING),
    ("GET", "/jobs/{id}", _get_job, ("wait",)),
    ("PATCH", "/jobs/{id}", _patch_job, ()),
    ("DELETE", "/jobs/{id}", _delete_job, ()),
    ("POST", "/jobs/{id}/cancel", _cancel_job, ()),
    ("GET", "/jobs/{id}/results", _get_result, ()),
    ("DELETE", "/jobs/{id}/results", _delete_result, ()),
    ("POST", "/pipelines", _post_pipeline, ()),
    ("GET", "/pipelines", _list_pipelines, _LISTING),
    ("GET", "/pipelines/{id}", _get_pipeline, ()),
    ("PATCH", "/pipelines/{id}", _patch_pipeline, ()),
    ("DELETE", "/pipelines/{id}", _delete_pipeline, ()),
    ("GET", "/pipelines/{id}/jobs", _pipeline_jobs, ()),
    ("POST", "/pipelines/{id}/cancel", _cancel_pipeline, ()),
    ("GET", "/periodic", _list_periodic, ()),
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
    if not query:
        return {}
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
            if app.stopping:  # the store closed under the request, most likely
                log.warning("%s %s: error while stopping", self.command, self.path,
                            exc_info=True)
                status, headers = 503, {"Retry-After": "1"}
                data = _encode(HTTPError(503, "valet is shutting down").body())
            else:
                log.exception("%s %s: internal error", self.command, self.path)
                status, headers = 500, {}
                data = _encode(HTTPError(500, "internal server error").body())
        self._send(status, data, headers)
        log.log(logging.INFO if status >= 400 else logging.DEBUG, "%s %s %d %.2fms",
                self.command, self.path, status, (time.perf_counter() - started) * 1000)

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
                 f"Date: {self._date()}"]
        if status != 204:
            lines += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if self.close_connection:
            lines.append("Connection: close")
        if self.command == "HEAD":
            data = b""
        self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data)

    _last_date = (0, "")  # (epoch second, its Date header), shared by every connection

    def _date(self):
        """The Date header, formatted once a second rather than once a response."""
        second = int(time.time())
        if _Handler._last_date[0] != second:
            _Handler._last_date = (second, self.date_time_string(second))
        return _Handler._last_date[1]

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
    """The whole server: store, worker pool, scheduler and HTTP API, built from a config
    and tasks.

    `config` is what load_config() takes (None, a YAML path or a dict) or its
    result; `tasks` maps task names to functions, and defaults to the TASKS dict
    of the module named by `tasks_module`; `clock` is the wall clock (epoch
    seconds) that run_at times and periodic due times follow, which tests replace.
    Constructing opens the store (and so may raise sqlite3.Error or ConfigError)
    but starts nothing else.
    """

    def __init__(self, config=None, tasks: dict | None = None, clock=time.time):
        self.config = load_config(config)  # validates; a loaded config passes unchanged
        self.tasks = dict(tasks if tasks is not None else _load_tasks(self.config["tasks_module"]))
        self._periodic = _periodic_entries(self.config["periodic"])
        for i, (_, _, fields) in enumerate(self._periodic):
            try:
                _new_job(fields, self.tasks, self.config["timeout_unit"], 0,
                         where=f"periodic[{i}]: ")
            except HTTPError as exc:
                raise ConfigError(exc.message) from None
        self._next_firing = {}  # periodic entry name -> epoch second it fires next
        self.store = _open_store(self.config)
        self.clock = clock  # the wall clock that run_at and periodic due times follow
        self.scheduler = _Scheduler(clock)
        self.pool = _WorkerPool(self.store, self.tasks, self.config["worker_pool.workers"],
                                self.config["worker_pool.queue_capacity"],
                                self.config["timeout_unit"], self.scheduler)
        self.started_at = None
        self._recovered = False
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

    def _stored(self, status):
        """Every stored job with this status, in submission order."""
        after = 0
        while True:
            jobs = self.store.list(status, after, MAX_PAGE_SIZE)
            yield from jobs
            if len(jobs) < MAX_PAGE_SIZE:
                return
            after = jobs[-1]["seq"]

    def recover(self, now=None):
        """Take up what a previous run left: schedule its scheduled jobs, settle the
        jobs it was running (a failed attempt: retried if the job has retries
        left), queue the pending jobs whose turn it is, and schedule each periodic
        entry (at once, if it missed a due time while valet was down).

        Called by start(), unless it was called before; safe to call on its own (for
        tests and tools) before start().
        """
        if self._recovered:
            return
        self._recovered = True
        now = self.clock() if now is None else now
        scheduled = list(self._stored(SCHEDULED))
        for job in scheduled:
            self.scheduler.at(job["run_at"], self.pool.promote, job["id"])
        for job in list(self._stored(IN_PROGRESS)):
            self.pool.settle(job, FAILED, "the server stopped while the job was running")
        queued = 0
        for job in list(self._stored(PENDING)):
            previous = job["previous_job_id"] and self.store.get(job["previous_job_id"])
            if not previous or previous["status"] == COMPLETED:  # its turn in a pipeline
                self.pool.enqueue(job["id"], job["priority"], reserved=False)
                queued += 1
        if queued or scheduled:
            log.info("from the store: %d pending job(s) queued, %d scheduled", queued,
                     len(scheduled))
        for entry in self._periodic:
            name, schedule, _ = entry
            due = _next_due(schedule, self.store.periodic_last(name, now), now)
            self._plan(entry, due)

    def _plan(self, entry, due):
        self._next_firing[entry[0]] = due
        self.scheduler.at(due, self._fire, entry, due)

    def _fire(self, entry, due):
        """Create the periodic entry's job for one due time (at most once, even across
        restarts: the store records the firing with the job), and plan the next."""
        name, schedule, fields = entry
        now = self.clock()
        try:
            job = _new_job(fields, self.tasks, self.config["timeout_unit"], now)
            if self.store.add(job, fired=(name, due)):
                self.pool.enqueue(job["id"], job["priority"], reserved=False)
                log.info("job %s: created %s by periodic entry %r (due %s)", job["id"],
                         PENDING, name, _rfc3339(due))
        finally:  # a firing that failed (a full disk, say) does not end the schedule
            self._plan(entry, _next_due(schedule, due, now))

    def start(self) -> "Valet":
        """Recover, listen, and start the workers and the scheduler. Raises OSError if
        it cannot listen."""
        with self._lifecycle:
            if self.started_at is not None:
                raise RuntimeError("valet is already started")
            self.recover()
            self._server = _Server((self.config["server.host"], self.config["server.port"]),
                                   self)
            self.pool.start()
            self.scheduler.start()
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
        (default worker_pool.shutdown_grace), and close the store. Blocks; idempotent.
        Scheduled and pending jobs stay in the store for the next start."""
        with self._lifecycle:
            if self.stopping:
                return
            self.stopping = True
        if grace is None:
            grace = self.config["worker_pool.shutdown_grace"]
        self.pool.halt()
        self.scheduler.stop()
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

    # -- what the routes and an embedding program call

    def job_json(self, job):
        """A stored job record as its JSON, with its progress while it runs."""
        progress = self.pool.progress(job["id"]) if job["status"] == IN_PROGRESS else None
        return _job_json(job, progress)

    def pipeline_json(self, pipeline, jobs):
        return _pipeline_json(pipeline, jobs, self.job_json)

    def submit(self, fields: dict) -> dict:
        """Store a job (the fields of a POST /jobs body) and queue or schedule it;
        return its JSON.

        Blocks until the job is stored (committed, on SQLite). Raises HTTPError:
        400 naming the field that is wrong, 503 when the backlog is full or valet
        is stopping; in any case nothing is stored. Thread-safe.
        """
        job = _new_job(fields, self.tasks, self.config["timeout_unit"], self.clock())
        self._accept(job, lambda: self.store.add(job))
        log.debug("job %s: created %s (task %s)", job["id"], job["status"], job["task_name"])
        return _job_json(job)

    def submit_pipeline(self, fields: dict) -> dict:
        """Store a pipeline (the fields of a POST /pipelines body) and queue or schedule
        its first job; return its JSON with its jobs. Raises HTTPError as submit() does."""
        pipeline, jobs = _new_pipeline(fields, self.tasks, self.config["timeout_unit"],
                                       self.clock())
        self._accept(jobs[0], lambda: self.store.add_pipeline(pipeline, jobs))
        log.debug("pipeline %s: created with %d jobs, the first %s", pipeline["id"], len(jobs),
                  jobs[0]["status"])
        return _pipeline_json(pipeline, jobs)

    def _accept(self, job, store):
        """Store a new job (by calling `store`) and queue it, or schedule it if it has
        a run_at to come; a queued job needs a place in the backlog first."""
        self._refuse_when_stopping()
        if job["status"] == SCHEDULED:
            store()
            self.scheduler.at(job["run_at"], self.pool.promote, job["id"])
            return
        self.pool.reserve()
        try:
            store()
        except BaseException:
            self.pool.unreserve()
            raise
        self.pool.enqueue(job["id"], job["priority"])

    def _refuse_when_stopping(self):
        if self.stopping:
            raise HTTPError(503, "valet is shutting down", {"Retry-After": "1"})

    def cancel(self, job_id: str, reason: str = "cancelled by request") -> dict:
        """Cancel a job that has not finished; return its JSON. Raises HTTPError 404
        (no such job) or 409 (it has finished). Thread-safe."""
        self._refuse_when_stopping()
        job, cancelled = self.pool.cancel(job_id, reason)
        if job is None:
            raise _not_found("job", job_id)
        if not cancelled:
            raise HTTPError(409, f"job {job_id!r} has finished (status {job['status']}); "
                                 f"only a job that has not finished can be cancelled")
        log.debug("job %s: cancelled", job_id)
        return self.job_json(job)

    def cancel_pipeline(self, pipeline_id: str) -> dict:
        """Cancel what is left of a pipeline; return its JSON. Raises HTTPError 404 or
        409 (it has finished). Thread-safe."""
        self._refuse_when_stopping()
        while True:
            pipeline = self.store.get_pipeline(pipeline_id)
            jobs = self.store.pipeline_jobs(pipeline_id)
            if pipeline is None or not jobs:
                raise _not_found("pipeline", pipeline_id)
            status = _pipeline_status(jobs)
            if status in FINISHED:
                raise HTTPError(409, f"pipeline {pipeline_id!r} has finished (status "
                                     f"{status}); only one that has not can be cancelled")
            current = next(job for job in jobs if job["status"] not in FINISHED)
            _, cancelled = self.pool.cancel(current["id"], "cancelled by request: its "
                                                           "pipeline was cancelled")
            if cancelled:
                log.info("pipeline %s: cancelled", pipeline_id)
                return self.pipeline_json(pipeline, self.store.pipeline_jobs(pipeline_id))
            # that job finished just before: cancel from the next one

    def job(self, job_id: str) -> dict | None:
        """The job's JSON (as GET /jobs/{id} gives it), or None. Thread-safe."""
        job = self.store.get(job_id)
        return None if job is None else self.job_json(job)

    def result(self, job_id: str) -> dict | None:
        """The finished job's {"job_id", "metadata", "error"} (as GET /jobs/{id}/results
        gives it), or None while it has none. Thread-safe."""
        result = self.store.result(job_id)
        if result is None:
            return None
        return {"job_id": job_id, "metadata": result["value"], "error": result["error"]}

    def wait(self, job_id: str, timeout: float | None = None) -> dict | None:
        """Block until the job has finished, `timeout` seconds have passed, or valet is
        stopping; return its JSON then, whatever its status (None if there is no such
        job). Thread-safe."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self.pool.watching(job_id) as changed:
                job = self.store.get(job_id)
                left = None if deadline is None else deadline - time.monotonic()
                if (job is None or job["status"] in FINISHED or self.stopping
                        or (left is not None and left <= 0)):
                    return None if job is None else self.job_json(job)
                changed.wait(left)

    def periodic(self) -> list:
        """The periodic entries, with the time each fires next (GET /periodic)."""
        return [{"name": name, "task_name": fields["task_name"],
                 "cron": schedule.text if isinstance(schedule, _Cron) else None,
                 "every": schedule.text if isinstance(schedule, _Every) else None,
                 "next_run_at": _rfc3339(self._next_firing.get(name))}
                for name, schedule, fields in self._periodic]


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
